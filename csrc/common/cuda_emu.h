// CUDA portability layer: lets the same .cu sources build with nvcc for the GPU and with g++
// (C++20) for the CPU, where the emulated library `libfastscan_cuda_emu` runs them in tests.
//
// Every .cu file includes this header (directly or through its op's .cuh). It provides:
//   FS_LAUNCH(kernel, grid, block, smem_bytes, stream, args...)
//       `kernel<<<grid, block, smem_bytes, stream>>>(args...)` under nvcc, an emulated launch under
//       FASTSCAN_CUDA_EMU. `kernel` must be one macro argument: write a template-id as
//       `(my_kernel<float, 8>)` or take its address first (`auto k = &my_kernel<float, 8>;`).
//       At least one kernel argument is required.
//   FS_DYNAMIC_SHARED(type, name)
//       declares the dynamic shared-memory array (`extern __shared__ type name[]` under nvcc).
//   Static shared memory is written the normal CUDA way: `__shared__ float buf[N];` inside a
//   kernel or device function, no initializer.
//
// Emulation model (FASTSCAN_CUDA_EMU; compile with g++ -std=c++20 -pthread, see below):
//   * Blocks run one after another. The threads of a block are fibers (ucontext user-level
//     threads with their own stacks) on the launching OS thread, switched cooperatively at
//     __syncthreads, __syncwarp, shuffles and votes. NOTE: one OS thread per CUDA thread was the
//     first plan; on a 2-core machine a 128-thread std::barrier costs ~170 us per phase (measured),
//     a fiber round ~20-40 us, and the scan kernels pass thousands of barriers per block.
//     Fibers also make barrier divergence a reported error (cudaErrorLaunchFailure) instead of a hang.
//   * threadIdx/blockIdx/blockDim/gridDim are thread_local globals; the scheduler writes
//     threadIdx before resuming a fiber.
//   * `__shared__` expands to `static`: one instance per function, shared by all threads of the
//     running block. This is correct because only one block runs at a time in the whole process:
//     launches are serialized by a process-wide mutex. Contents persist from block to block
//     (undefined on a GPU; do not rely on it).
//   * Warp shuffles/votes go through a per-warp, double-buffered exchange buffer and a warp
//     barrier; only full-warp masks are modelled (anything else sets cudaErrorNotSupported).
//   * atomics use std::atomic_ref; cudaMemsetAsync & co. act synchronously on host memory.
//   * Not modelled: CUB, inline PTX, tensor-core intrinsics, cooperative groups, partial-mask
//     warp operations, concurrent blocks, streams (everything is synchronous).
//
// Emulated build flags:
//   g++ -std=c++20 -O2 -pthread -fPIC -x c++ -include csrc/common/cuda_emu.h
//       -DFASTSCAN_CUDA_EMU=1 -DFASTSCAN_BACKEND_NAME="cuda_emu"
//       -Icsrc/common -I/usr/local/cuda/include   <file>.cu
// (Only the CUDA headers are needed, for __half/__nv_bfloat16 and the runtime's types; nothing
// from libcudart is linked, so the emulated library never touches a GPU driver.)
#pragma once

#if !defined(FASTSCAN_CUDA_EMU)
// ------------------------------------------------------------------------------- nvcc build ----
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define FS_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__)
#define FS_DYNAMIC_SHARED(type, name) extern __shared__ type name[]

#else
// ---------------------------------------------------------------------------- emulated build ---
#if defined(__CUDACC__)
#error "FASTSCAN_CUDA_EMU is for host compilers (g++ -x c++), not nvcc"
#endif

// The real fp16/bf16 headers work in host mode and pull in cuda_runtime_api.h, which gives us
// dim3, uint3, float4, cudaStream_t, cudaError_t and the enum values. Runtime functions that
// kernels' launchers call are redirected by macros below to inline host versions, so this
// library exports no cuda* symbols and cannot be confused with (or interpose on) libcudart.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <ucontext.h>
#include <sys/mman.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// Kernels carry `#pragma unroll`, which g++ does not know (this works from GCC 13 on; older
// g++ warns under -Wall unless given -Wno-unknown-pragmas).
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
// The emulator's globals stay inside the library that compiles it.
#pragma GCC visibility push(hidden)

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __noinline__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __constant__ static
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)

inline thread_local uint3 threadIdx = {0, 0, 0};
inline thread_local uint3 blockIdx = {0, 0, 0};
inline thread_local dim3 blockDim = dim3(1, 1, 1);
inline thread_local dim3 gridDim = dim3(1, 1, 1);
constexpr int warpSize = 32;

namespace fs_emu {
namespace detail {

constexpr std::size_t kFiberStackBytes = 256 * 1024;
constexpr int kMaxBlockThreads = 1024;
constexpr std::size_t kMaxDynamicShared = 227 * 1024;

struct Barrier {
  int arrived = 0;
  int expected = 0;
  std::uint64_t generation = 0;
};

struct Fiber {
  ucontext_t context;
  void* stack = nullptr;
  uint3 tid = {0, 0, 0};
  Barrier* waiting = nullptr;
  std::uint64_t wait_generation = 0;
  unsigned exchange_count = 0;  // parity picks the half of the warp exchange buffer
  bool done = false;
};

struct WarpExchange {
  alignas(16) unsigned char slot[2][32][16];
};

struct Launch {
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  int nthreads = 0;
  int live = 0;
  int current = 0;
  bool deadlock = false;
  cudaError_t error = cudaSuccess;
  std::vector<Fiber> fibers;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<int> warp_live;
  std::vector<WarpExchange> warps;
  std::vector<unsigned char> dynamic_shared;
  ucontext_t scheduler;
};

inline thread_local Launch* current_launch = nullptr;
inline thread_local cudaError_t last_error = cudaSuccess;
inline std::mutex launch_mutex;       // one block in flight per process: `__shared__` is static
inline std::vector<void*> stack_pool;  // fiber stacks, reused across launches (under launch_mutex)

inline int lanes_in_warp(const Launch* L, int w) {
  return (w + 1) * 32 <= L->nthreads ? 32 : L->nthreads - w * 32;
}

inline bool runnable(const Fiber& f) {
  return !f.done && (f.waiting == nullptr || f.waiting->generation != f.wait_generation);
}

inline void resume(Launch* L, int from, int to) {
  L->current = to;
  threadIdx = L->fibers[to].tid;
  swapcontext(&L->fibers[from].context, &L->fibers[to].context);
}

// Hands the CPU to the next runnable fiber (round robin). Returns when this fiber runs again.
__attribute__((noinline)) inline void switch_away(Launch* L) {
  const int cur = L->current, n = L->nthreads;
  for (int k = 1; k <= n; ++k) {
    const int j = (cur + k) % n;
    if (runnable(L->fibers[j])) {
      if (j != cur) resume(L, cur, j);
      return;
    }
  }
  // Nobody can run: every live thread waits on a barrier that cannot complete.
  L->deadlock = true;
  swapcontext(&L->fibers[cur].context, &L->scheduler);  // never resumed
}

inline void release_if_complete(Barrier& b) {
  if (b.arrived > 0 && b.arrived >= b.expected) {
    b.arrived = 0;
    ++b.generation;
  }
}

__attribute__((noinline)) inline void arrive_and_wait(Barrier& b) {
  Launch* L = current_launch;
  Fiber& f = L->fibers[L->current];
  std::atomic_signal_fence(std::memory_order_seq_cst);
  if (++b.arrived >= b.expected) {
    b.arrived = 0;
    ++b.generation;
  } else {
    f.waiting = &b;
    f.wait_generation = b.generation;
    switch_away(L);
    f.waiting = nullptr;
  }
  std::atomic_signal_fence(std::memory_order_seq_cst);
}

inline void fiber_entry() {
  Launch* L = current_launch;
  L->body(L->body_arg);
  const int me = L->current;
  Fiber& f = L->fibers[me];
  f.done = true;
  --L->live;
  // Exited threads no longer count at barriers (as on sm_70+).
  L->block_barrier.expected = L->live;
  release_if_complete(L->block_barrier);
  const int w = me / 32;
  --L->warp_live[w];
  L->warp_barriers[w].expected = L->warp_live[w];
  release_if_complete(L->warp_barriers[w]);
  if (L->live == 0) {
    setcontext(&L->scheduler);
  }
  for (int k = 1; k < L->nthreads; ++k) {
    const int j = (me + k) % L->nthreads;
    if (runnable(L->fibers[j])) {
      L->current = j;
      threadIdx = L->fibers[j].tid;
      setcontext(&L->fibers[j].context);
    }
  }
  L->deadlock = true;
  setcontext(&L->scheduler);
}

inline void run_launch(dim3 grid, dim3 block, std::size_t smem, void (*body)(void*), void* arg) {
  const long long nthreads = 1LL * block.x * block.y * block.z;
  if (nthreads < 1 || nthreads > kMaxBlockThreads || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem > kMaxDynamicShared) {
    last_error = cudaErrorInvalidValue;
    return;
  }
  std::lock_guard<std::mutex> lock(launch_mutex);
  Launch L;
  L.body = body;
  L.body_arg = arg;
  L.nthreads = static_cast<int>(nthreads);
  L.fibers.resize(L.nthreads);
  const int nwarps = (L.nthreads + 31) / 32;
  L.warp_barriers.resize(nwarps);
  L.warp_live.resize(nwarps);
  L.warps.resize(nwarps);
  L.dynamic_shared.assign(smem + 16, 0);
  while (stack_pool.size() < static_cast<std::size_t>(L.nthreads)) {
    void* s = mmap(nullptr, kFiberStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (s == MAP_FAILED) {
      last_error = cudaErrorMemoryAllocation;
      return;
    }
    stack_pool.push_back(s);
  }
  for (int t = 0; t < L.nthreads; ++t) {
    L.fibers[t].stack = stack_pool[t];
    L.fibers[t].tid = uint3{static_cast<unsigned>(t % block.x),
                            static_cast<unsigned>((t / block.x) % block.y),
                            static_cast<unsigned>(t / (block.x * block.y))};
  }
  Launch* saved_launch = current_launch;
  const uint3 saved_tid = threadIdx, saved_bid = blockIdx;
  const dim3 saved_bdim = blockDim, saved_gdim = gridDim;
  current_launch = &L;
  blockDim = block;
  gridDim = grid;
  for (unsigned bz = 0; bz < grid.z && !L.deadlock; ++bz) {
    for (unsigned by = 0; by < grid.y && !L.deadlock; ++by) {
      for (unsigned bx = 0; bx < grid.x && !L.deadlock; ++bx) {
        blockIdx = uint3{bx, by, bz};
        L.live = L.nthreads;
        L.block_barrier.arrived = 0;
        L.block_barrier.expected = L.nthreads;
        for (int w = 0; w < nwarps; ++w) {
          L.warp_live[w] = lanes_in_warp(&L, w);
          L.warp_barriers[w].arrived = 0;
          L.warp_barriers[w].expected = L.warp_live[w];
        }
        for (int t = 0; t < L.nthreads; ++t) {
          Fiber& f = L.fibers[t];
          f.waiting = nullptr;
          f.exchange_count = 0;
          f.done = false;
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack;
          f.context.uc_stack.ss_size = kFiberStackBytes;
          f.context.uc_link = nullptr;
          makecontext(&f.context, fiber_entry, 0);
        }
        L.current = 0;
        threadIdx = L.fibers[0].tid;
        swapcontext(&L.scheduler, &L.fibers[0].context);
      }
    }
  }
  current_launch = saved_launch;
  threadIdx = saved_tid;
  blockIdx = saved_bid;
  blockDim = saved_bdim;
  gridDim = saved_gdim;
  if (L.deadlock) {
    last_error = cudaErrorLaunchFailure;
  } else if (L.error != cudaSuccess) {
    last_error = L.error;
  }
}

inline int lane_of_current() { return current_launch->current % 32; }

inline void check_full_mask(Launch* L, unsigned mask) {
  const int w = L->current / 32;
  const int lanes = lanes_in_warp(L, w);
  const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if (mask != full || L->warp_live[w] != lanes) L->error = cudaErrorNotSupported;
}

enum class ShuffleMode { Index, Up, Down, Xor };

template <class T>
T shuffle(unsigned mask, T value, int arg, int width, ShuffleMode mode) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "shuffle of a <=16-byte value");
  Launch* L = current_launch;
  check_full_mask(L, mask);
  const int me = L->current, w = me / 32, lane = me % 32;
  Fiber& f = L->fibers[me];
  // Double buffering makes one barrier per shuffle enough: a lane can write this half again
  // only after the next exchange's barrier, which every lane reaches after reading this one.
  const int half = f.exchange_count++ & 1;
  WarpExchange& x = L->warps[w];
  std::memcpy(x.slot[half][lane], &value, sizeof(T));
  arrive_and_wait(L->warp_barriers[w]);
  const int segment = lane & ~(width - 1), in_segment = lane - segment;
  int src = lane;
  switch (mode) {
    case ShuffleMode::Index: src = segment + (arg & (width - 1)); break;
    case ShuffleMode::Up: src = in_segment >= arg ? lane - arg : lane; break;
    case ShuffleMode::Down: src = in_segment + arg < width ? lane + arg : lane; break;
    case ShuffleMode::Xor: src = ((lane ^ arg) & ~(width - 1)) == segment ? (lane ^ arg) : lane; break;
  }
  if (src < 0 || src >= lanes_in_warp(L, w)) src = lane;
  T result;
  std::memcpy(&result, x.slot[half][src], sizeof(T));
  return result;
}

inline unsigned ballot(unsigned mask, bool predicate) {
  Launch* L = current_launch;
  check_full_mask(L, mask);
  const int me = L->current, w = me / 32, lane = me % 32;
  Fiber& f = L->fibers[me];
  const int half = f.exchange_count++ & 1;
  WarpExchange& x = L->warps[w];
  x.slot[half][lane][0] = predicate ? 1 : 0;
  arrive_and_wait(L->warp_barriers[w]);
  unsigned bits = 0;
  for (int i = 0; i < lanes_in_warp(L, w); ++i) bits |= static_cast<unsigned>(x.slot[half][i][0]) << i;
  return bits;
}

}  // namespace detail

template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t,
            Args&&... args) {
  struct Call {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> args;
  };
  Call call{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  detail::run_launch(grid, block, smem,
                     [](void* p) {
                       Call* c = static_cast<Call*>(p);
                       std::apply(c->kernel, c->args);
                     },
                     &call);
}

inline void* dynamic_shared_memory() {
  return detail::current_launch->dynamic_shared.data();
}

// ---- runtime API (host side), redirected by the macros below --------------------------------
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = detail::last_error;
  detail::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return detail::last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulator: barrier deadlock)";
    case cudaErrorNotSupported: return "operation not supported (emulator: partial-mask warp op)";
    default: return "cuda emulator error";
  }
}
inline const char* cudaGetErrorName(cudaError_t e) { return fs_emu::cudaGetErrorString(e); }
inline cudaError_t cudaMemsetAsync(void* p, int value, std::size_t bytes, cudaStream_t = nullptr) {
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int value, std::size_t bytes) {
  return fs_emu::cudaMemsetAsync(p, value, bytes);
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind,
                                   cudaStream_t = nullptr) {
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind k) {
  return fs_emu::cudaMemcpyAsync(dst, src, bytes, k);
}
inline cudaError_t cudaMalloc(void** p, std::size_t bytes) {
  *p = std::malloc(bytes ? bytes : 1);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = 132; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    default: *value = 0; break;
  }
  return cudaSuccess;
}
template <class F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}

}  // namespace fs_emu

#define cudaGetLastError ::fs_emu::cudaGetLastError
#define cudaPeekAtLastError ::fs_emu::cudaPeekAtLastError
#define cudaGetErrorString ::fs_emu::cudaGetErrorString
#define cudaGetErrorName ::fs_emu::cudaGetErrorName
#define cudaMemsetAsync ::fs_emu::cudaMemsetAsync
#define cudaMemset ::fs_emu::cudaMemset
#define cudaMemcpyAsync ::fs_emu::cudaMemcpyAsync
#define cudaMemcpy ::fs_emu::cudaMemcpy
#define cudaMalloc ::fs_emu::cudaMalloc
#define cudaFree ::fs_emu::cudaFree
#define cudaStreamSynchronize ::fs_emu::cudaStreamSynchronize
#define cudaDeviceSynchronize ::fs_emu::cudaDeviceSynchronize
#define cudaGetDevice ::fs_emu::cudaGetDevice
#define cudaDeviceGetAttribute ::fs_emu::cudaDeviceGetAttribute
#define cudaFuncSetAttribute ::fs_emu::cudaFuncSetAttribute

#define FS_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ::fs_emu::launch(kernel, dim3(grid), dim3(block), (smem_bytes), (stream), __VA_ARGS__)
#define FS_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(::fs_emu::dynamic_shared_memory())

// ---- device intrinsics ------------------------------------------------------------------------
inline void __syncthreads() {
  ::fs_emu::detail::arrive_and_wait(::fs_emu::detail::current_launch->block_barrier);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  auto* L = ::fs_emu::detail::current_launch;
  ::fs_emu::detail::check_full_mask(L, mask);
  ::fs_emu::detail::arrive_and_wait(L->warp_barriers[L->current / 32]);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::fs_emu::detail::shuffle(mask, v, src_lane, width, ::fs_emu::detail::ShuffleMode::Index);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::fs_emu::detail::shuffle(mask, v, static_cast<int>(delta), width,
                                   ::fs_emu::detail::ShuffleMode::Up);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::fs_emu::detail::shuffle(mask, v, static_cast<int>(delta), width,
                                   ::fs_emu::detail::ShuffleMode::Down);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::fs_emu::detail::shuffle(mask, v, lane_mask, width, ::fs_emu::detail::ShuffleMode::Xor);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return ::fs_emu::detail::ballot(mask, predicate != 0);
}
inline int __any_sync(unsigned mask, int predicate) {
  return ::fs_emu::detail::ballot(mask, predicate != 0) != 0;
}
inline int __all_sync(unsigned mask, int predicate) {
  return ::fs_emu::detail::ballot(mask, predicate != 0) == mask;
}

template <class T>
inline T __ldg(const T* p) { return *p; }

inline float atomicAdd(float* p, float v) {
  return std::atomic_ref<float>(*p).fetch_add(v, std::memory_order_relaxed);
}
inline double atomicAdd(double* p, double v) {
  return std::atomic_ref<double>(*p).fetch_add(v, std::memory_order_relaxed);
}
inline int atomicAdd(int* p, int v) {
  return std::atomic_ref<int>(*p).fetch_add(v, std::memory_order_relaxed);
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return std::atomic_ref<unsigned>(*p).fetch_add(v, std::memory_order_relaxed);
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v, std::memory_order_relaxed);
}
inline int atomicMax(int* p, int v) {
  std::atomic_ref<int> r(*p);
  int old = r.load(std::memory_order_relaxed);
  while (old < v && !r.compare_exchange_weak(old, v, std::memory_order_relaxed)) {
  }
  return old;
}
inline int atomicCAS(int* p, int compare, int value) {
  std::atomic_ref<int>(*p).compare_exchange_strong(compare, value, std::memory_order_relaxed);
  return compare;
}

// Fast-math intrinsics: the host versions are the accurate functions (tests compare against
// float64 with tolerances that cover the GPU's approximations).
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanhf(float x) { return std::tanh(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; std::memcpy(&x, &f, 4); return x; }
inline unsigned __float_as_uint(float f) { unsigned x; std::memcpy(&x, &f, 4); return x; }

// CUDA has global min/max overloads in device code; host C++ has only std::min/max.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

#pragma GCC visibility pop

#endif  // FASTSCAN_CUDA_EMU
