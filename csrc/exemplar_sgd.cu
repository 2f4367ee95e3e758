// Host glue of mnemonics_fast::exemplar_sgd_step_ on CUDA: checks, the tensor table, the single launch. The kernel
// and the multi-tensor layout are described in exemplar_sgd_kernels.cuh.

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <unordered_set>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "exemplar_sgd_kernels.cuh"
#include "mnemonics_fast.h"

namespace mnemonics_fast {
namespace {

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
  TORCH_CHECK(t.device() == device, "exemplar_sgd_step_: ", list, "[", std::to_string(i), "] is on ", t.device().str(),
              " but params[0] is on ", device.str());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "exemplar_sgd_step_: ", list, "[", std::to_string(i),
              "] must be float32, got ", c10::toString(t.scalar_type()));
  TORCH_CHECK(t.is_contiguous(), "exemplar_sgd_step_: ", list, "[", std::to_string(i),
              "] must be contiguous (keep exemplars in one contiguous bank, see docs/kernels.md)");
  TORCH_CHECK(t.sizes() == param.sizes(), "exemplar_sgd_step_: ", list, "[", std::to_string(i), "] has shape ",
              shape_str(t), " but params[", std::to_string(i), "] has shape ", shape_str(param));
}

}  // namespace

void exemplar_sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                            double lr, double momentum, double weight_decay, double clamp_min, double clamp_max) {
  TORCH_CHECK(params.size() == grads.size() && params.size() == momentum_buffers.size(),
              "exemplar_sgd_step_: params, grads and momentum_buffers must have the same length, got ",
              std::to_string(params.size()), ", ", std::to_string(grads.size()), " and ",
              std::to_string(momentum_buffers.size()));
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "exemplar_sgd_step_: params[0] must be a CUDA tensor, got ", device.str());
  const c10::cuda::CUDAGuard guard(device);

  std::vector<SgdTensor> tensors;
  tensors.reserve(params.size());
  std::unordered_set<const void*> written;  // a tensor written twice in one launch would race
  int64_t total_chunks = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(!(at::GradMode::is_enabled() && p.requires_grad()), "exemplar_sgd_step_: params[",
                std::to_string(i), "] requires grad and grad mode is on; the op writes it in place, so call it under "
                "torch.no_grad() (mnemonics_fast.ops.exemplar_sgd_step_ does)");
    check_sgd_tensor("params", i, p, p, device);
    check_sgd_tensor("grads", i, grads[i], p, device);
    check_sgd_tensor("momentum_buffers", i, momentum_buffers[i], p, device);
    const int64_t n = p.numel();
    if (n == 0) continue;
    float* pp = p.mutable_data_ptr<float>();
    const float* gp = grads[i].const_data_ptr<float>();
    float* bp = momentum_buffers[i].mutable_data_ptr<float>();
    TORCH_CHECK(pp != bp && static_cast<const float*>(pp) != gp && static_cast<const float*>(bp) != gp,
                "exemplar_sgd_step_: params[", std::to_string(i), "], grads[", std::to_string(i),
                "] and momentum_buffers[", std::to_string(i), "] must be distinct tensors");
    TORCH_CHECK(written.insert(pp).second && written.insert(bp).second, "exemplar_sgd_step_: params[",
                std::to_string(i), "] or momentum_buffers[", std::to_string(i),
                "] is also written at another position of the lists (each tensor may appear once)");
    tensors.push_back(SgdTensor{pp, gp, bp, n, total_chunks});
    total_chunks += sgd_num_chunks(n);
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
  const int64_t grid = plan_sgd_launch(args, max_blocks(device.index()));

  at::Tensor device_table;  // keeps the uploaded table alive until the launch is enqueued
  const size_t table_bytes = tensors.size() * sizeof(SgdTensor);
  if (tensors.size() <= static_cast<size_t>(kMaxArgTensors)) {
    std::memcpy(args.inline_tensors, tensors.data(), table_bytes);
    args.table = nullptr;
  } else {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    TORCH_CHECK(capture == cudaStreamCaptureStatusNone, "exemplar_sgd_step_: a list of ",
                std::to_string(tensors.size()), " tensors (more than ", std::to_string(kMaxArgTensors),
                ") uploads its pointer table from host memory and cannot be captured in a CUDA graph; pass the "
                "exemplars as one bank tensor (or at most ", std::to_string(kMaxArgTensors), " tensors)");
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
