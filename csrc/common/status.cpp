#include "status.h"

#include <cstdarg>
#include <cstdio>

#ifndef FASTSCAN_BACKEND_NAME
#error "FASTSCAN_BACKEND_NAME must be defined by the build (\"cpu\", \"cuda\" or \"cuda_emu\")"
#endif

namespace {
thread_local char last_error[1024] = "";
}

int fs_fail(int code, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(last_error, sizeof(last_error), fmt, args);
  va_end(args);
  return code;
}

extern "C" FS_API const char* fs_last_error(void) { return last_error; }
extern "C" FS_API const char* fs_backend_name(void) { return FASTSCAN_BACKEND_NAME; }
