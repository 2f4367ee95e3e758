// Host glue of mnemonics_fast::cosine_linear on CUDA: input checks, path choice, workspace, launches. The kernels
// and the math (with the backward derivation) are in cosine_linear_kernels.cuh.
//
// Two implementations, same math, chosen per call by problem size (or forced from Python):
//   fused: forward is ONE kernel (tiled SIMT GEMM that also accumulates the row norms of its tiles and scales in the
//          epilogue); backward is TWO kernels (row/column statistics, then both GEMMs + epilogues + dsigma in one
//          launch). fp32 accumulation for every input dtype. Wins where launch count dominates (small problems).
//   blas:  forward = normalise kernel (writes sigma*xn and wn) + cuBLAS GEMM; backward = normalise + 2 cuBLAS GEMMs
//          + one row-wise epilogue kernel. Tensor cores for bf16/fp16 (and TF32 for fp32 only if the user enabled
//          torch.backends.cuda.matmul.allow_tf32, exactly like eager PyTorch). Wins for large problems.

#include <atomic>
#include <cstdint>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cosine_linear_kernels.cuh"
#include "mnemonics_fast.h"

// The kernels' input dtypes: fp32, fp16, bf16 (fp32 accumulation for all). Not AT_DISPATCH_FLOATING_TYPES_AND2,
// which would also instantiate (and compile) a double version.
#define MNEMONICS_FAST_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)          \
                             AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace mnemonics_fast {
namespace {

// ---- path selection ------------------------------------------------------------------------------------------------
std::atomic<int> g_cosine_path{0};
// The fused kernels loop over K = C (dx) and K = B (dw) inside one block and use 32x32 tiles, so they are only
// chosen while both are short; the cut-off on the GEMM size depends on whether the call is being captured:
// - in a CUDA graph the host cost vanishes and GPU time decides: cuBLAS's tiling and tensor cores win above ~2^24
//   MACs (graphed at 256x512x1000: blas 0.065 ms vs fused 0.125 ms fp32, 0.030 vs 0.134 bf16, H100 and H200);
// - an eager call is host-bound and the fused path launches fewer kernels: at 256x512x1000 it was faster eagerly on
//   both cards and both dtypes (fp32: 0.14 vs 0.24 ms on the H200, 0.22 vs 0.36-0.67 on the H100). Its GPU time grows
//   with B*C*D (0.125 ms there), reaching the blas path's eager host cost near 2^28 MACs.
// bench/bench_cosine_linear.py times both paths at every size, eager and graphed.
constexpr int64_t kFusedMaxRows = 1024;
constexpr int64_t kFusedMaxMacsGraphed = int64_t{1} << 24;  // B * C * D
constexpr int64_t kFusedMaxMacsEager = int64_t{1} << 28;

bool use_fused_path(int64_t B, int64_t C, int64_t D, cudaStream_t stream) {
  const int path = g_cosine_path.load(std::memory_order_relaxed);
  if (path == 1) return true;
  if (path == 2) return false;
  if (B > kFusedMaxRows || C > kFusedMaxRows) return false;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  return B * C * D <= (capture == cudaStreamCaptureStatusNone ? kFusedMaxMacsEager : kFusedMaxMacsGraphed);
}

int scalar_kind(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return kScalarF32;
    case c10::ScalarType::Half: return kScalarF16;
    case c10::ScalarType::BFloat16: return kScalarBF16;
    case c10::ScalarType::Double: return kScalarF64;
    default: TORCH_CHECK(false, "mnemonics_fast: unsupported sigma dtype ", c10::toString(t));
  }
  return kScalarF32;
}

// ---- host side -----------------------------------------------------------------------------------------------------
// Every check here reads only tensor metadata (dim, sizes, device, dtype), never data, and all of them run before
// anything else in the entry points: a bad input (e.g. a CPU 0-dim sigma next to CUDA x/weight, which the dispatcher
// routes here) fails with a readable error before any pointer is taken or any kernel is launched.
void check_cosine_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& sigma) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [B, D], got shape ", shape_str(x));
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), op, ": weight must be [C, D] with D = x.size(1) = ",
              std::to_string(x.size(1)), ", got shape ", shape_str(weight));
  TORCH_CHECK(sigma.dim() == 0, op, ": sigma must be a 0-dim tensor, got shape ", shape_str(sigma));
  TORCH_CHECK(x.is_cuda() && weight.is_cuda() && sigma.is_cuda(), op,
              ": x, weight and sigma must all be CUDA tensors, got ", x.device().str(), ", ", weight.device().str(),
              ", ", sigma.device().str());
  TORCH_CHECK(weight.device() == x.device() && sigma.device() == x.device(), op,
              ": x, weight and sigma must be on one device, got ", x.device().str(), ", ", weight.device().str(),
              ", ", sigma.device().str());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16 (float64 runs the reference), got ", c10::toString(t));
  TORCH_CHECK(weight.scalar_type() == t, op, ": x and weight must have the same dtype, got ", c10::toString(t), " and ",
              c10::toString(weight.scalar_type()));
  TORCH_CHECK(at::isFloatingType(sigma.scalar_type()), op, ": sigma must be a floating-point tensor, got ",
              c10::toString(sigma.scalar_type()));
}

template <typename T>
void launch_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sigma, at::Tensor& out) {
  const int64_t B = x.size(0), D = x.size(1), C = w.size(0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  CosineLinearParams<T> p{};
  p.x = x.const_data_ptr<T>();
  p.weight = w.const_data_ptr<T>();
  p.sigma = sigma.const_data_ptr();
  p.sigma_kind = scalar_kind(sigma.scalar_type());
  p.out = out.mutable_data_ptr<T>();
  p.B = B;
  p.C = C;
  p.D = D;
  if (use_fused_path(B, C, D, stream)) {
    const int64_t row_tiles = ceil_div(B, kTile), col_tiles = ceil_div(C, kTile);
    TORCH_CHECK(row_tiles <= 65535 && col_tiles < (int64_t{1} << 31),
                "cosine_linear: problem too large for the fused path (B = ", std::to_string(B),
                ", C = ", std::to_string(C), ")");
    const dim3 grid(static_cast<unsigned int>(col_tiles), static_cast<unsigned int>(row_tiles));
    cosine_linear_fwd_fused_kernel<T><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  at::Tensor xs = at::empty({B, D}, x.options());
  at::Tensor ws = at::empty({C, D}, w.options());
  p.x_scaled = xs.mutable_data_ptr<T>();
  p.w_scaled = ws.mutable_data_ptr<T>();
  p.scale_x_by_sigma = true;
  cosine_linear_normalize_kernel<T><<<row_blocks(B, C), kRowThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::mm_out(out, xs, ws.t());  // cuBLAS on the current stream
}

template <typename T>
void launch_backward(const at::Tensor& g, const at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                     const at::Tensor& sigma, at::Tensor& gx, at::Tensor& gw, at::Tensor& gs) {
  const int64_t B = x.size(0), D = x.size(1), C = w.size(0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = x.options().dtype(at::kFloat);
  CosineLinearBackwardParams<T> p{};
  p.grad = g.const_data_ptr<T>();
  p.out = out.const_data_ptr<T>();
  p.x = x.const_data_ptr<T>();
  p.weight = w.const_data_ptr<T>();
  p.sigma = sigma.const_data_ptr();
  p.sigma_kind = scalar_kind(sigma.scalar_type());
  p.grad_x = gx.mutable_data_ptr<T>();
  p.grad_weight = gw.mutable_data_ptr<T>();
  p.grad_sigma = gs.mutable_data_ptr();
  p.B = B;
  p.C = C;
  p.D = D;
  if (use_fused_path(B, C, D, stream)) {
    const FusedBackwardLayout l = fused_backward_layout(B, C, D);
    at::Tensor ws = at::empty({l.workspace_floats}, f32);
    assign_fused_workspace(p, l, ws.mutable_data_ptr<float>());
    cosine_linear_bwd_prep_kernel<T><<<l.prep_blocks, kPrepThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cosine_linear_bwd_fused_kernel<T><<<l.n_dx_tiles + l.n_dw_tiles, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // blas: normalise (unscaled) -> h = g @ wn, k = g.T @ xn -> row-wise epilogue
  at::Tensor xn = at::empty({B, D}, x.options());
  at::Tensor wn = at::empty({C, D}, w.options());
  const int64_t n_row_blocks = row_blocks(B, C);
  at::Tensor ws = at::empty({blas_backward_workspace_floats(B, C)}, f32);
  CosineLinearParams<T> np{};
  np.x = p.x;
  np.weight = p.weight;
  np.sigma = p.sigma;
  np.sigma_kind = p.sigma_kind;
  np.x_scaled = xn.mutable_data_ptr<T>();
  np.w_scaled = wn.mutable_data_ptr<T>();
  np.scale_x_by_sigma = false;
  np.B = B;
  np.C = C;
  np.D = D;
  assign_blas_workspace(p, np, ws.mutable_data_ptr<float>());
  cosine_linear_normalize_kernel<T><<<n_row_blocks, kRowThreads, 0, stream>>>(np);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor h = at::mm(g, wn);      // [B, D]
  const at::Tensor k = at::mm(g.t(), xn);  // [C, D]
  p.h = h.const_data_ptr<T>();
  p.k = k.const_data_ptr<T>();
  cosine_linear_bwd_epilogue_kernel<T><<<n_row_blocks, kRowThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void set_cosine_linear_path(int path) {
  TORCH_CHECK(path >= 0 && path <= 2, "cosine_linear path must be 0 (auto), 1 (fused) or 2 (blas), got ",
              std::to_string(path));
  g_cosine_path.store(path, std::memory_order_relaxed);
}

int get_cosine_linear_path() { return g_cosine_path.load(std::memory_order_relaxed); }

int cuda_runtime_version_built() { return CUDART_VERSION; }

at::Tensor cosine_linear_cuda(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& sigma) {
  check_cosine_inputs("cosine_linear", x_in, weight_in, sigma);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = weight_in.contiguous();
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  if (out.numel() == 0) return out;
  MNEMONICS_FAST_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "cosine_linear_cuda",
                                          [&] { launch_forward<scalar_t>(x, w, sigma, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_linear_backward_cuda(const at::Tensor& grad_out,
                                                                           const at::Tensor& out_in,
                                                                           const at::Tensor& x_in,
                                                                           const at::Tensor& weight_in,
                                                                           const at::Tensor& sigma) {
  check_cosine_inputs("cosine_linear_backward", x_in, weight_in, sigma);
  const int64_t B = x_in.size(0), D = x_in.size(1), C = weight_in.size(0);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == B && grad_out.size(1) == C,
              "cosine_linear_backward: grad_out must be [B, C] = [", std::to_string(B), ", ", std::to_string(C),
              "], got ", shape_str(grad_out));
  TORCH_CHECK(out_in.dim() == 2 && out_in.size(0) == B && out_in.size(1) == C,
              "cosine_linear_backward: out must be [B, C] = [", std::to_string(B), ", ", std::to_string(C), "], got ",
              shape_str(out_in));
  TORCH_CHECK(grad_out.device() == x_in.device() && out_in.device() == x_in.device(),
              "cosine_linear_backward: grad_out and out must be on ", x_in.device().str(), ", got ",
              grad_out.device().str(), " and ", out_in.device().str());
  TORCH_CHECK(at::isFloatingType(grad_out.scalar_type()) && at::isFloatingType(out_in.scalar_type()),
              "cosine_linear_backward: grad_out and out must be floating-point, got ",
              c10::toString(grad_out.scalar_type()), " and ", c10::toString(out_in.scalar_type()));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto t = x_in.scalar_type();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = weight_in.contiguous();
  // Autograd may hand over an expanded (stride-0) or differently typed gradient: make it dense, in x's dtype.
  const at::Tensor g = grad_out.to(t).contiguous();
  const at::Tensor out = out_in.to(t).contiguous();
  at::Tensor gx = at::empty({B, D}, x.options());
  at::Tensor gw = at::empty({C, D}, w.options());
  at::Tensor gs = at::empty(sigma.sizes(), sigma.options());
  if (B == 0 || C == 0 || D == 0) {  // nothing flows: all-zero gradients
    gx.zero_();
    gw.zero_();
    gs.zero_();
    return {gx, gw, gs};
  }
  MNEMONICS_FAST_DISPATCH_FLOAT_HALF_BF16(t, "cosine_linear_backward_cuda",
                                          [&] { launch_backward<scalar_t>(g, out, x, w, sigma, gx, gw, gs); });
  return {gx, gw, gs};
}

TORCH_LIBRARY_IMPL(mnemonics_fast, CUDA, m) {
  m.impl("cosine_linear", &cosine_linear_cuda);
  m.impl("cosine_linear_backward", &cosine_linear_backward_cuda);
}

}  // namespace mnemonics_fast
