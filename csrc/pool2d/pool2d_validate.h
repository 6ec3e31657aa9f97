// Parameter checks shared by the CPU and CUDA launchers of pool2d_tokens (one copy, one message).
#pragma once
#include "pool2d_abi.h"
#include "status.h"

inline int validate_pool2d_params(const FsPool2dParams* p, const char* fn) {
  if (p == nullptr) return fs_fail(FS_ERR_INVALID, "%s: params is NULL", fn);
  if (p->num_images < 0 || p->H < 1 || p->W < 1 || p->C < 0 || p->kh < 1 || p->kw < 1 ||
      p->Ho != (p->H + p->kh - 1) / p->kh || p->Wo != (p->W + p->kw - 1) / p->kw) {
    return fs_fail(FS_ERR_INVALID, "%s: bad sizes num_images=%lld H=%lld W=%lld C=%lld kh=%lld kw=%lld Ho=%lld Wo=%lld",
                   fn, (long long)p->num_images, (long long)p->H, (long long)p->W, (long long)p->C,
                   (long long)p->kh, (long long)p->kw, (long long)p->Ho, (long long)p->Wo);
  }
  if (p->dtype != FS_FLOAT32 && p->dtype != FS_FLOAT16 && p->dtype != FS_BFLOAT16) {
    return fs_fail(FS_ERR_INVALID, "%s: unknown dtype code %d", fn, p->dtype);
  }
  if (p->mode != FS_POOL_AVG && p->mode != FS_POOL_MAX) {
    return fs_fail(FS_ERR_INVALID, "%s: unknown mode code %d", fn, p->mode);
  }
  if (p->num_images > 0 && p->C > 0 && p->x == nullptr) return fs_fail(FS_ERR_INVALID, "%s: x is NULL", fn);
  return FS_OK;
}
