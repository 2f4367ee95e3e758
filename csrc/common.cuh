// Small device helpers shared by the kernels: dtype-erased scalar load/store, warp and block sums.
//
// The kernel headers (*_kernels.cuh) depend only on this file and c10's header-only Half/BFloat16, never on ATen:
// tests/test_ops.py also compiles them for the CPU through csrc/emulation/cuda_host_shim.h and runs them there.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace mnemonics_fast {

// A 0-dim tensor's dtype, passed to kernels as a small int so one kernel instantiation serves every sigma dtype.
enum ScalarKind : int { kScalarF32 = 0, kScalarF16 = 1, kScalarBF16 = 2, kScalarF64 = 3 };

__device__ __forceinline__ float load_scalar(const void* p, int kind) {
  switch (kind) {
    case kScalarF16: return static_cast<float>(*reinterpret_cast<const c10::Half*>(p));
    case kScalarBF16: return static_cast<float>(*reinterpret_cast<const c10::BFloat16*>(p));
    case kScalarF64: return static_cast<float>(*reinterpret_cast<const double*>(p));
    default: return *reinterpret_cast<const float*>(p);
  }
}

__device__ __forceinline__ void store_scalar(void* p, int kind, float v) {
  switch (kind) {
    case kScalarF16: *reinterpret_cast<c10::Half*>(p) = c10::Half(v); break;
    case kScalarBF16: *reinterpret_cast<c10::BFloat16*>(p) = c10::BFloat16(v); break;
    case kScalarF64: *reinterpret_cast<double*>(p) = static_cast<double>(v); break;
    default: *reinterpret_cast<float*>(p) = v;
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; the result is valid in thread 0. Every thread must call it. `scratch` holds >= 32 values.
// The order of additions is fixed by the launch shape, so the result is deterministic.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v, Acc* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = Acc(0);
  if (warp == 0) {
    v = lane < n_warps ? scratch[lane] : Acc(0);
    v = warp_sum(v);
  }
  return v;
}

}  // namespace mnemonics_fast
