// Small device helpers shared by the kernels: dtype-erased scalar load/store, warp/block sums, and the
// "last block finishes the reduction" pattern used for grad_sigma.
#pragma once

#include <cstdint>

#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

// The kernels' input dtypes: fp32, fp16, bf16 (fp32 accumulation for all). Not AT_DISPATCH_FLOATING_TYPES_AND2,
// which would also instantiate (and compile) a double version.
#define MNEMONICS_FAST_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)              \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)          \
                             AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace mnemonics_fast {

// A 0-dim tensor's dtype, passed to kernels as a small int so one kernel instantiation serves every sigma dtype.
enum ScalarKind : int { kScalarF32 = 0, kScalarF16 = 1, kScalarBF16 = 2, kScalarF64 = 3 };

inline int scalar_kind(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return kScalarF32;
    case c10::ScalarType::Half: return kScalarF16;
    case c10::ScalarType::BFloat16: return kScalarBF16;
    case c10::ScalarType::Double: return kScalarF64;
    default: TORCH_CHECK(false, "mnemonics_fast: unsupported scalar dtype ", t);
  }
  return kScalarF32;
}

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

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; the result is valid in thread 0. Every thread must call it. `scratch` holds >= 32 floats.
// The order of additions is fixed by the launch shape, so the result is deterministic.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = 0.f;
  if (warp == 0) {
    v = lane < n_warps ? scratch[lane] : 0.f;
    v = warp_sum(v);
  }
  return v;
}

// Each of `n_parts` blocks calls this once with its partial sum (valid in thread 0). The block that arrives last
// adds all partials in index order and stores the total as a scalar of kind `out_kind`: one launch, deterministic,
// no atomics on floats. `counter` must be zero before the launch (the kernel that precedes it zeroes it).
__device__ __forceinline__ void finish_sum_last_block(float part, int index, int n_parts, float* partials,
                                                      unsigned int* counter, void* out, int out_kind,
                                                      float* scratch) {
  __shared__ bool is_last;
  if (threadIdx.x == 0) {
    partials[index] = part;
    __threadfence();  // publish the partial before taking a ticket
    is_last = atomicAdd(counter, 1u) == static_cast<unsigned int>(n_parts - 1);
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  float s = 0.f;
  for (int i = threadIdx.x; i < n_parts; i += blockDim.x) s += __ldcg(partials + i);  // L2, not a stale L1
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) store_scalar(out, out_kind, s);
}

}  // namespace mnemonics_fast
