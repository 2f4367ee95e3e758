// Just enough of CUDA's device built-ins, on the host, to run this project's kernels on a CPU in tests.
//
// A "launch" runs the grid's blocks one after another; each block runs blockDim.x std::threads that meet at real
// barriers (__syncthreads) and exchange values through per-warp buffers (__shfl_xor_sync). __shared__ becomes a
// function-local static, i.e. one copy per kernel instantiation, which is exactly per-block storage when blocks run
// one at a time. It checks indexing, tiling, bounds, barriers and reductions of the real kernel source; it cannot
// check timing, memory-model races between blocks or anything compiled by nvcc (compute-sanitizer does those).
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static
#define __restrict__
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

namespace cuda_host_shim {

struct Warp {
  std::barrier<> bar{32};
  double vals[32];  // float or double lanes, exactly
};

inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local Warp* warp = nullptr;

}  // namespace cuda_host_shim

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

inline void __syncthreads() { cuda_host_shim::block_barrier->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
inline T __shfl_xor_sync(unsigned int /*mask*/, T v, int offset) {
  cuda_host_shim::Warp& w = *cuda_host_shim::warp;
  const int lane = static_cast<int>(threadIdx.x & 31);
  w.vals[lane] = static_cast<double>(v);
  w.bar.arrive_and_wait();
  const T r = static_cast<T>(w.vals[lane ^ offset]);
  w.bar.arrive_and_wait();
  return r;
}

inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
  return std::atomic_ref<unsigned int>(*p).fetch_add(v);
}

template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}

// Compiled with -ffp-contract=off, so these round each operation like the _rn intrinsics.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

inline int min(int a, int b) { return std::min(a, b); }
inline long min(long a, long b) { return std::min(a, b); }
inline long long min(long long a, long long b) { return std::min(a, b); }

namespace cuda_host_shim {

// Runs kernel(args...) over grid x block (1-D blocks; blockDim.x a multiple of 32).
template <typename Kernel, typename... Args>
void launch(dim3 grid, unsigned int threads, Kernel kernel, const Args&... args) {
  const unsigned int n_warps = (threads + 31) / 32;
  for (unsigned int bz = 0; bz < grid.z; ++bz)
    for (unsigned int by = 0; by < grid.y; ++by)
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(threads);
        std::vector<std::unique_ptr<Warp>> warps;
        for (unsigned int w = 0; w < n_warps; ++w) warps.push_back(std::make_unique<Warp>());
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = uint3{t, 0, 0};
            blockIdx = uint3{bx, by, bz};
            blockDim = dim3(threads);
            gridDim = grid;
            block_barrier = &bar;
            warp = warps[t / 32].get();
            kernel(args...);
            // A thread that returns leaves the barriers, as an exited CUDA thread no longer counts.
            warp->bar.arrive_and_drop();
            bar.arrive_and_drop();
          });
        }
        for (auto& th : pool) th.join();
      }
}

}  // namespace cuda_host_shim
