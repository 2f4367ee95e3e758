// mnemonics_fast::exemplar_sgd_step_ on CUDA: torch.optim.SGD (momentum, weight decay, no dampening/nesterov)
// followed by a clamp, for every tensor of a list in ONE kernel launch:
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

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mnemonics_fast.h"

namespace mnemonics_fast {
namespace {

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
__device__ __forceinline__ void sgd_update(float& param, float grad, float& buf, const SgdScalars& s) {
  float b = __fadd_rn(__fmul_rn(s.momentum, buf), grad);
  if (s.use_weight_decay) b = fmaf(s.weight_decay, param, b);
  buf = b;
  float q = fmaf(-s.lr, b, param);
  // torch.clamp semantics: NaN stays NaN; clamp_min > clamp_max gives clamp_max.
  q = q < s.clamp_min ? s.clamp_min : q;
  q = q > s.clamp_max ? s.clamp_max : q;
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

// Resident blocks per SM for the kernel, per device (computed once; benign race).
int max_blocks(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  std::atomic<int>* slot = device >= 0 && device < 64 ? &cache[device] : nullptr;
  if (slot != nullptr) {
    const int cached = slot->load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, exemplar_sgd_step_cuda_kernel, kSgdThreads, 0));
  const int blocks = std::max(1, sms * std::max(1, per_sm));
  if (slot != nullptr) slot->store(blocks, std::memory_order_relaxed);
  return blocks;
}

void check_sgd_tensor(const char* list, size_t i, const at::Tensor& t, const at::Tensor& param,
                      const c10::Device& device) {
  TORCH_CHECK(t.device() == device, "exemplar_sgd_step_: ", list, "[", i, "] is on ", t.device(),
              " but params[0] is on ", device);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "exemplar_sgd_step_: ", list, "[", i, "] must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "exemplar_sgd_step_: ", list, "[", i,
              "] must be contiguous (keep exemplars in one contiguous bank, see docs/kernels.md)");
  TORCH_CHECK(t.sizes() == param.sizes(), "exemplar_sgd_step_: ", list, "[", i, "] has shape ", t.sizes(),
              " but params[", i, "] has shape ", param.sizes());
}

}  // namespace

void exemplar_sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                            double lr, double momentum, double weight_decay, double clamp_min, double clamp_max) {
  TORCH_CHECK(params.size() == grads.size() && params.size() == momentum_buffers.size(),
              "exemplar_sgd_step_: params, grads and momentum_buffers must have the same length, got ",
              params.size(), ", ", grads.size(), " and ", momentum_buffers.size());
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "exemplar_sgd_step_: params[0] must be a CUDA tensor, got ", device);
  const c10::cuda::CUDAGuard guard(device);

  std::vector<SgdTensor> tensors;
  tensors.reserve(params.size());
  int64_t total_chunks = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    check_sgd_tensor("params", i, p, p, device);
    check_sgd_tensor("grads", i, grads[i], p, device);
    check_sgd_tensor("momentum_buffers", i, momentum_buffers[i], p, device);
    const int64_t n = p.numel();
    if (n == 0) continue;
    float* pp = p.mutable_data_ptr<float>();
    const float* gp = grads[i].const_data_ptr<float>();
    float* bp = momentum_buffers[i].mutable_data_ptr<float>();
    TORCH_CHECK(pp != bp && static_cast<const float*>(pp) != gp && static_cast<const float*>(bp) != gp,
                "exemplar_sgd_step_: params[", i, "], grads[", i, "] and momentum_buffers[", i,
                "] must be distinct tensors");
    tensors.push_back(SgdTensor{pp, gp, bp, n, total_chunks});
    total_chunks += (n + kChunk - 1) / kChunk;
  }
  if (tensors.empty()) return;

  const auto stream = c10::cuda::getCurrentCUDAStream();
  ExemplarSgdStepParams args{};
  args.num_tensors = static_cast<int64_t>(tensors.size());
  args.total_chunks = total_chunks;
  args.lr = static_cast<float>(lr);
  args.momentum = static_cast<float>(momentum);
  args.weight_decay = static_cast<float>(weight_decay);
  args.use_weight_decay = weight_decay != 0.0;
  args.clamp_min = static_cast<float>(clamp_min);
  args.clamp_max = static_cast<float>(clamp_max);
  const int64_t max_grid = max_blocks(device.index());
  args.chunks_per_block = (total_chunks + max_grid - 1) / max_grid;
  const int64_t grid = (total_chunks + args.chunks_per_block - 1) / args.chunks_per_block;

  at::Tensor device_table;  // keeps the uploaded table alive until the launch is enqueued
  const size_t table_bytes = tensors.size() * sizeof(SgdTensor);
  if (tensors.size() <= static_cast<size_t>(kMaxArgTensors)) {
    std::memcpy(args.inline_tensors, tensors.data(), table_bytes);
    args.table = nullptr;
  } else {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    TORCH_CHECK(capture == cudaStreamCaptureStatusNone, "exemplar_sgd_step_: a list of ", tensors.size(),
                " tensors (more than ", kMaxArgTensors,
                ") uploads its pointer table from host memory and cannot be captured in a CUDA graph; pass the "
                "exemplars as one bank tensor (or at most ", kMaxArgTensors, " tensors)");
    // Pinned staging from the caching host allocator: the copy below records an event, so the block is not reused
    // before the copy has run.
    at::Tensor host = at::empty({static_cast<int64_t>(table_bytes)},
                                at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.mutable_data_ptr(), tensors.data(), table_bytes);
    device_table = at::empty({static_cast<int64_t>(table_bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
    device_table.copy_(host, /*non_blocking=*/true);
    args.table = reinterpret_cast<const SgdTensor*>(device_table.const_data_ptr());
  }
  exemplar_sgd_step_cuda_kernel<<<grid, kSgdThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(mnemonics_fast, CUDA, m) { m.impl("exemplar_sgd_step_", &exemplar_sgd_step_cuda); }

}  // namespace mnemonics_fast
