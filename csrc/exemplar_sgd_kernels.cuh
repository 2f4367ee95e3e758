// Kernel of mnemonics_fast::exemplar_sgd_step_ (host glue: exemplar_sgd.cu): torch.optim.SGD (momentum, weight
// decay, no dampening/nesterov) followed by a clamp, for every tensor of a list in ONE kernel launch:
//
//   buf   = momentum * buf + grad + weight_decay * param
//   param = clamp(param - lr * buf, clamp_min, clamp_max)
//
// Multi-tensor layout (after apex's multi_tensor_apply, but with a single launch for any list length): every tensor is
// cut into chunks of kChunk floats; tensor t owns chunks [chunk_begin[t], chunk_begin[t] + ceil(numel/kChunk)). Each
// block takes a contiguous range of chunks, finds its first tensor by binary search, then walks forward. The tensor
// table travels in the kernel arguments for up to kMaxArgTensors tensors (no copy; CUDA-graph capturable); longer
// lists upload it once per call from pinned memory (one H2D copy on the same stream). One tensor (an exemplar bank)
// is the recommended and fastest case: a plain grid-stride-like sweep with float4 loads.

#pragma once

#include <cstdint>

namespace mnemonics_fast {

constexpr int kSgdThreads = 256;
constexpr int kSgdUnroll = 4;                                // float4 loads in flight per thread and operand
constexpr int64_t kChunk = kSgdThreads * kSgdUnroll * 4;     // 4096 floats: one pass of the block
constexpr int kMaxArgTensors = 64;                           // 64 * 40 B table + header < 4 KiB of kernel arguments

struct SgdTensor {
  float* param;
  const float* grad;
  float* buf;
  int64_t numel;
  int64_t chunk_begin;
};

struct ExemplarSgdStepParams {
  const SgdTensor* table;  // device-resident table, or nullptr to use `inline_tensors`
  int64_t num_tensors;
  int64_t total_chunks;
  int64_t chunks_per_block;
  float lr, momentum, weight_decay, clamp_min, clamp_max;
  bool use_weight_decay;
  SgdTensor inline_tensors[kMaxArgTensors];
};
static_assert(sizeof(ExemplarSgdStepParams) <= 4096, "kernel arguments must fit the classic 4 KiB limit");

struct SgdScalars {
  float lr, momentum, weight_decay, clamp_min, clamp_max;
  bool use_weight_decay;
};

// Rounding follows the reference's op sequence (mul_, add_, add_(alpha=wd), add_(alpha=-lr), clamp_).
// momentum 0 does not read the buffer (0 * a non-finite buffer, e.g. from empty_like, would poison every step).
__device__ __forceinline__ void sgd_update(float& param, float grad, float& buf, const SgdScalars& s) {
  float b = s.momentum != 0.f ? __fadd_rn(__fmul_rn(s.momentum, buf), grad) : grad;
  if (s.use_weight_decay) b = fmaf(s.weight_decay, param, b);
  buf = b;
  float q = fmaf(-s.lr, b, param);
  // torch.clamp semantics: NaN stays NaN, a NaN bound gives NaN; clamp_min > clamp_max gives clamp_max.
  q = (q < s.clamp_min || s.clamp_min != s.clamp_min) ? s.clamp_min : q;
  q = (q > s.clamp_max || s.clamp_max != s.clamp_max) ? s.clamp_max : q;
  param = q;
}

__device__ __forceinline__ void sgd_update4(float4& p, const float4& g, float4& b, const SgdScalars& s) {
  sgd_update(p.x, g.x, b.x, s);
  sgd_update(p.y, g.y, b.y, s);
  sgd_update(p.z, g.z, b.z, s);
  sgd_update(p.w, g.w, b.w, s);
}

// One chunk (len <= kChunk elements) by the whole block.
__device__ __forceinline__ void sgd_chunk(float* __restrict__ param, const float* __restrict__ grad,
                                          float* __restrict__ buf, int len, bool vec, const SgdScalars& s) {
  if (vec) {
    const int nvec = len >> 2;
    float4* p4 = reinterpret_cast<float4*>(param);
    const float4* g4 = reinterpret_cast<const float4*>(grad);
    float4* b4 = reinterpret_cast<float4*>(buf);
    float4 pv[kSgdUnroll], gv[kSgdUnroll], bv[kSgdUnroll];
#pragma unroll
    for (int u = 0; u < kSgdUnroll; ++u) {  // all loads first: 3 * kSgdUnroll 16-byte loads in flight
      const int i = threadIdx.x + u * kSgdThreads;
      if (i < nvec) {
        pv[u] = p4[i];
        gv[u] = __ldcs(g4 + i);  // read once: stream past the caches
        bv[u] = b4[i];
      }
    }
#pragma unroll
    for (int u = 0; u < kSgdUnroll; ++u) {
      const int i = threadIdx.x + u * kSgdThreads;
      if (i < nvec) {
        sgd_update4(pv[u], gv[u], bv[u], s);
        p4[i] = pv[u];
        b4[i] = bv[u];
      }
    }
    const int i = (nvec << 2) + threadIdx.x;  // at most 3 trailing elements (only in a tensor's last chunk)
    if (i < len) {
      float p = param[i], b = buf[i];
      sgd_update(p, grad[i], b, s);
      param[i] = p;
      buf[i] = b;
    }
  } else {
    for (int i = threadIdx.x; i < len; i += kSgdThreads) {
      float p = param[i], b = buf[i];
      sgd_update(p, grad[i], b, s);
      param[i] = p;
      buf[i] = b;
    }
  }
}

__global__ void __launch_bounds__(kSgdThreads) exemplar_sgd_step_cuda_kernel(
    const __grid_constant__ ExemplarSgdStepParams p) {
  // __grid_constant__ lets us point into the kernel arguments without a local copy.
  const SgdTensor* table = p.table != nullptr ? p.table : p.inline_tensors;
  const SgdScalars s{p.lr, p.momentum, p.weight_decay, p.clamp_min, p.clamp_max, p.use_weight_decay};
  int64_t chunk = static_cast<int64_t>(blockIdx.x) * p.chunks_per_block;
  const int64_t chunk_end = min(chunk + p.chunks_per_block, p.total_chunks);
  if (chunk >= chunk_end) return;
  // last tensor t with table[t].chunk_begin <= chunk (block-uniform)
  int64_t lo = 0, hi = p.num_tensors - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (table[mid].chunk_begin <= chunk) lo = mid;
    else hi = mid - 1;
  }
  int64_t t = lo;
  SgdTensor e = table[t];
  int64_t next_begin = t + 1 < p.num_tensors ? table[t + 1].chunk_begin : p.total_chunks;
  for (; chunk < chunk_end; ++chunk) {
    while (chunk >= next_begin) {
      ++t;
      e = table[t];
      next_begin = t + 1 < p.num_tensors ? table[t + 1].chunk_begin : p.total_chunks;
    }
    const int64_t off = (chunk - e.chunk_begin) * kChunk;
    const int len = static_cast<int>(min(kChunk, e.numel - off));
    const bool vec =
        ((reinterpret_cast<uintptr_t>(e.param) | reinterpret_cast<uintptr_t>(e.grad) |
          reinterpret_cast<uintptr_t>(e.buf)) & 15u) == 0;
    sgd_chunk(e.param + off, e.grad + off, e.buf + off, len, vec, s);
  }
}

// ---- launch shape (shared by the host glue and the CPU emulation) -------------------------------------------------
inline int64_t sgd_num_chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Contiguous ranges of chunks per block, at most max_grid blocks. Returns the grid size.
inline int64_t plan_sgd_launch(ExemplarSgdStepParams& p, int64_t max_grid) {
  p.chunks_per_block = (p.total_chunks + max_grid - 1) / max_grid;
  return (p.total_chunks + p.chunks_per_block - 1) / p.chunks_per_block;
}

}  // namespace mnemonics_fast
