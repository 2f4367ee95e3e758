// Declarations shared by the extension's translation units (ops.cpp, cosine_linear.cu, exemplar_sgd.cu).
#pragma once

#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace mnemonics_fast {

// "[4, 8]": a tensor's shape for error messages, built with std::to_string in ops.cpp (host compiler).
//
// Rule for every TORCH_CHECK in the .cu files: its message parts are strings only (literals, std::string,
// std::to_string(n), shape_str(t), device.str(), c10::toString(dtype)), never an integer, IntArrayRef, Device or
// ScalarType streamed as such. On the GPU test machines (torch 2.11, CUDA 13.0, g++ 13 as nvcc's host compiler; H200
// 2026-11-26 and H100 2026-11-27) a check that streamed an IntArrayRef, an int64_t or a size_t SIGSEGV'd while raising,
// instead of raising; checks whose parts were all strings raised fine. After the change all 405 CUDA tests passed on
// the H100, bad-input cases included, and compute-sanitizer memcheck/racecheck were clean (bench/results/
// device_check_h100_2026-11-27.txt). The cause inside the ostream path was not pinned down (no debugger time).
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
