// Declarations shared by the extension's translation units (ops.cpp, cosine_linear.cu, exemplar_sgd.cu).
#pragma once

#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace mnemonics_fast {

// "[4, 8]": a tensor's shape for error messages, built with std::to_string in ops.cpp (host compiler). The .cu files
// never stream an IntArrayRef into TORCH_CHECK: on the H200 test machine (torch 2.11, gVisor) exactly those checks
// crashed the process (SIGSEGV while raising) instead of raising, while checks naming dtypes or devices raised fine.
std::string shape_str(const at::Tensor& t);

// ---- cosine_linear (cosine_linear.cu) ---------------------------------------------------------------------------
at::Tensor cosine_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& sigma);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_linear_backward_cuda(const at::Tensor& grad_out,
                                                                           const at::Tensor& out,
                                                                           const at::Tensor& x,
                                                                           const at::Tensor& weight,
                                                                           const at::Tensor& sigma);

// Which implementation cosine_linear uses on CUDA: 0 = auto (by problem size), 1 = fused SIMT kernels,
// 2 = cuBLAS GEMMs between normalise/epilogue kernels. Process-wide; set from Python (ops/cosine.py).
void set_cosine_linear_path(int path);
int get_cosine_linear_path();

// CUDART_VERSION the .cu files were compiled with (e.g. 13000).
int cuda_runtime_version_built();

// ---- exemplar_sgd_step_ (exemplar_sgd.cu) -----------------------------------------------------------------------
void exemplar_sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                            double lr, double momentum, double weight_decay, double clamp_min, double clamp_max);

}  // namespace mnemonics_fast
