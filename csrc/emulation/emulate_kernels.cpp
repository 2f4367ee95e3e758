// The real kernel source (csrc/*_kernels.cuh) compiled for the CPU through cuda_host_shim.h, behind a C ABI for
// ctypes (csrc/emulation/emulator.py). Each entry point replays the launch sequence of the CUDA host glue
// (cosine_linear.cu, exemplar_sgd.cu) with the same launch-shape helpers; cuBLAS is replaced by a plain loop GEMM
// that, like cuBLAS, accumulates in fp32 and rounds its output to the operand dtype.
//
// Pointers are host memory. dtype: 0 float32, 1 float16, 2 bfloat16 (mnemonics_fast::ScalarKind).

#include "cuda_host_shim.h"  // must come first: it defines the CUDA keywords the kernel headers use

#include <cstring>
#include <vector>

#include "../cosine_linear_kernels.cuh"
#include "../exemplar_sgd_kernels.cuh"

using namespace mnemonics_fast;
using cuda_host_shim::launch;

namespace {

template <typename F>
int dispatch(int dtype, F&& f) {
  switch (dtype) {
    case kScalarF32: f(float{}); return 0;
    case kScalarF16: f(c10::Half{}); return 0;
    case kScalarBF16: f(c10::BFloat16{}); return 0;
    default: return 1;
  }
}

// out[M, N] = a @ b with a[m, k] = a_ptr[m * a_sm + k * a_sk], b[k, n] = b_ptr[k * b_sk + n * b_sn].
template <typename T>
void host_gemm(const T* a, int64_t a_sm, int64_t a_sk, const T* b, int64_t b_sk, int64_t b_sn, T* out, int64_t M,
               int64_t N, int64_t K) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k)
        acc += static_cast<float>(a[m * a_sm + k * a_sk]) * static_cast<float>(b[k * b_sk + n * b_sn]);
      out[m * N + n] = static_cast<T>(acc);
    }
}

}  // namespace

extern "C" {

int mf_emu_cosine_forward(int dtype, int fused, const void* x, const void* w, const void* sigma, int sigma_kind,
                          void* out, int64_t B, int64_t C, int64_t D) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    CosineLinearParams<T> p{};
    p.x = static_cast<const T*>(x);
    p.weight = static_cast<const T*>(w);
    p.sigma = sigma;
    p.sigma_kind = sigma_kind;
    p.out = static_cast<T*>(out);
    p.B = B;
    p.C = C;
    p.D = D;
    if (fused) {
      launch(dim3(ceil_div(C, kTile), ceil_div(B, kTile)), kThreads, cosine_linear_fwd_fused_kernel<T>, p);
      return;
    }
    std::vector<T> xs(B * D), ws(C * D);
    p.x_scaled = xs.data();
    p.w_scaled = ws.data();
    p.scale_x_by_sigma = true;
    launch(dim3(row_blocks(B, C)), kRowThreads, cosine_linear_normalize_kernel<T>, p);
    host_gemm<T>(xs.data(), D, 1, ws.data(), 1, D, static_cast<T*>(out), B, C, D);  // xs @ ws.T
  });
}

int mf_emu_cosine_backward(int dtype, int fused, const void* g, const void* out, const void* x, const void* w,
                           const void* sigma, int sigma_kind, void* gx, void* gw, void* gs, int64_t B, int64_t C,
                           int64_t D) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    CosineLinearBackwardParams<T> p{};
    p.grad = static_cast<const T*>(g);
    p.out = static_cast<const T*>(out);
    p.x = static_cast<const T*>(x);
    p.weight = static_cast<const T*>(w);
    p.sigma = sigma;
    p.sigma_kind = sigma_kind;
    p.grad_x = static_cast<T*>(gx);
    p.grad_weight = static_cast<T*>(gw);
    p.grad_sigma = gs;
    p.B = B;
    p.C = C;
    p.D = D;
    if (fused) {
      const FusedBackwardLayout l = fused_backward_layout(B, C, D);
      std::vector<float> ws(l.workspace_floats, 1e30f);  // garbage: the kernels must initialise what they read
      assign_fused_workspace(p, l, ws.data());
      *p.counter = 12345u;
      launch(dim3(l.prep_blocks), kPrepThreads, cosine_linear_bwd_prep_kernel<T>, p);
      launch(dim3(l.n_dx_tiles + l.n_dw_tiles), kThreads, cosine_linear_bwd_fused_kernel<T>, p);
      return;
    }
    const int64_t n_row_blocks = row_blocks(B, C);
    std::vector<float> ws(blas_backward_workspace_floats(B, C), 1e30f);
    std::vector<T> xn(B * D), wn(C * D), h(B * D), k(C * D);
    CosineLinearParams<T> np{};
    np.x = p.x;
    np.weight = p.weight;
    np.sigma = sigma;
    np.sigma_kind = sigma_kind;
    np.x_scaled = xn.data();
    np.w_scaled = wn.data();
    np.scale_x_by_sigma = false;
    np.B = B;
    np.C = C;
    np.D = D;
    assign_blas_workspace(p, np, ws.data());
    *p.counter = 12345u;
    launch(dim3(n_row_blocks), kRowThreads, cosine_linear_normalize_kernel<T>, np);
    host_gemm<T>(p.grad, C, 1, wn.data(), D, 1, h.data(), B, D, C);  // h = g @ wn
    host_gemm<T>(p.grad, 1, C, xn.data(), D, 1, k.data(), C, D, B);  // k = g.T @ xn
    p.h = h.data();
    p.k = k.data();
    launch(dim3(n_row_blocks), kRowThreads, cosine_linear_bwd_epilogue_kernel<T>, p);
  });
}

// params/grads/bufs: arrays of n pointers; numels: n element counts; max_grid: the "GPU size" (blocks) to plan for.
int mf_emu_exemplar_sgd_step(int64_t n, float** params, const float** grads, float** bufs, const int64_t* numels,
                             float lr, float momentum, float weight_decay, float clamp_min, float clamp_max,
                             int64_t max_grid) {
  std::vector<SgdTensor> tensors;
  int64_t total_chunks = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (numels[i] == 0) continue;
    tensors.push_back(SgdTensor{params[i], grads[i], bufs[i], numels[i], total_chunks});
    total_chunks += sgd_num_chunks(numels[i]);
  }
  if (tensors.empty()) return 0;
  auto args = std::make_unique<ExemplarSgdStepParams>();
  std::memset(args.get(), 0, sizeof(ExemplarSgdStepParams));
  args->num_tensors = static_cast<int64_t>(tensors.size());
  args->total_chunks = total_chunks;
  args->lr = lr;
  args->momentum = momentum;
  args->weight_decay = weight_decay;
  args->use_weight_decay = weight_decay != 0.f;
  args->clamp_min = clamp_min;
  args->clamp_max = clamp_max;
  if (tensors.size() <= static_cast<size_t>(kMaxArgTensors)) {
    std::memcpy(args->inline_tensors, tensors.data(), tensors.size() * sizeof(SgdTensor));
  } else {
    args->table = tensors.data();
  }
  const int64_t grid = plan_sgd_launch(*args, max_grid);
  launch(dim3(grid), kSgdThreads, exemplar_sgd_step_cuda_kernel, *args);
  return 0;
}

}  // extern "C"
