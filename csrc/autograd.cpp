// The dispatch layers above the backend kernels, in C++ (every backend):
//   Autograd         for cosine_linear (a torch::autograd::Function)
//   ADInplaceOrView  for exemplar_sgd_step_ (bumps the version counters of the tensors it writes)
// Without the extension, mnemonics_fast/ops/cosine.py and exemplar_sgd.py register Python twins of both instead.
//
// cosine_linear. Why C++: an eager call was host-bound on the H100 (0.23 ms against 0.025 ms inside a CUDA graph), and
// the Python autograd registration (torch.library.register_autograd) wraps every call in a Python autograd.Function.
// Here forward and backward go from the dispatcher straight to the backend kernels (the CUDA kernels, or on CPU the
// plain-PyTorch reference registered from Python). bench/bench_cosine_autograd.py measures the difference.
//
// Formulas: forward saves (x, weight, sigma, out). backward, ordinary (grad mode off): the op cosine_linear_backward.
// backward with create_graph=True (grad mode on; mnemonics' unrolled inner step differentiates through it): the same
// formulas as mnemonics_fast/ops/reference.py::reference_cosine_linear_backward written in differentiable ATen ops, so
// every higher-order gradient is exact.
//
// exemplar_sgd_step_. The kernels write through raw pointers, so something must bump the version counters of params
// and momentum buffers (as torch.library.custom_op does for mutable ops), or autograd would not notice a graph that
// saved them before the step. A Python kernel for this turned every call into two extra conversions of the three
// tensor lists between C++ and Python (thousands of tensors in the list form); here it is a loop over pointers.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace mnemonics_fast {
namespace {

constexpr double kNormEps = 1e-12;  // as F.normalize and reference.py's NORM_EPS

at::Tensor call_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& sigma) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mnemonics_fast::cosine_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(x, weight, sigma);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                                             const at::Tensor& x, const at::Tensor& weight,
                                                             const at::Tensor& sigma) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mnemonics_fast::cosine_linear_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&)>();
  return op.call(grad_out, out, x, weight, sigma);
}

// reference_cosine_linear_backward in differentiable ATen ops (double backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor> differentiable_backward(const at::Tensor& grad_out,
                                                                       const at::Tensor& out, const at::Tensor& x,
                                                                       const at::Tensor& weight,
                                                                       const at::Tensor& sigma) {
  const bool low = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  const auto compute = low ? at::kFloat : x.scalar_type();
  const auto g = grad_out.to(compute), o = out.to(compute);
  const auto xc = x.to(compute), wc = weight.to(compute), s = sigma.to(compute);
  const auto nx = xc.norm(2, {1}, true), nw = wc.norm(2, {1}, true);
  const auto inv_x = nx.clamp_min(kNormEps).reciprocal(), inv_w = nw.clamp_min(kNormEps).reciprocal();
  const auto xn = xc * inv_x, wn = wc * inv_w;
  const auto h = at::matmul(g, wn), k = at::matmul(g.t(), xn);
  const auto go = g * o;
  // F.normalize's clamp_min passes no gradient to the norm of a row shorter than eps.
  const auto r = at::where(nx >= kNormEps, go.sum({1}, true), at::zeros_like(nx));
  const auto s_ = at::where(nw >= kNormEps, go.sum({0}).unsqueeze(1), at::zeros_like(nw));
  const auto dx = inv_x * (s * h - xn * r);
  const auto dw = inv_w * (s * k - wn * s_);
  const auto ds = (h * xn).sum();
  return {dx.to(x.scalar_type()).contiguous(), dw.to(weight.scalar_type()).contiguous(),
          ds.to(sigma.scalar_type()).reshape(sigma.sizes())};
}

class CosineLinearFunction : public torch::autograd::Function<CosineLinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& sigma) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below;  // to the backend kernel, not back into this function
      out = call_forward(x, weight, sigma);
    }
    ctx->save_for_backward({x, weight, sigma, out});
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& weight = saved[1];
    const auto& sigma = saved[2];
    const auto& out = saved[3];
    // Autograd may hand a gradient with any strides; the kernels want a dense one.
    const auto grad_out = grads[0].contiguous();
    std::tuple<at::Tensor, at::Tensor, at::Tensor> r;
    if (at::GradMode::is_enabled()) {
      r = differentiable_backward(grad_out, out, x, weight, sigma);
    } else {
      r = call_backward(grad_out, out, x, weight, sigma);
    }
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
  }
};

at::Tensor cosine_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& sigma) {
  return CosineLinearFunction::apply(x, weight, sigma);
}

void exemplar_sgd_step_ad_inplace_or_view(c10::DispatchKeySet keys, at::TensorList params, at::TensorList grads,
                                          at::TensorList momentum_buffers, double lr, double momentum,
                                          double weight_decay, double clamp_min, double clamp_max) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mnemonics_fast::exemplar_sgd_step_", "")
                       .typed<void(at::TensorList, at::TensorList, at::TensorList, double, double, double, double,
                                   double)>();
  for (const auto& t : params) t.unsafeGetTensorImpl()->bump_version();
  for (const auto& t : momentum_buffers) t.unsafeGetTensorImpl()->bump_version();
  at::AutoDispatchBelowADInplaceOrView below;
  op.redispatch(keys & c10::after_ADInplaceOrView_keyset, params, grads, momentum_buffers, lr, momentum,
                weight_decay, clamp_min, clamp_max);
}

}  // namespace

TORCH_LIBRARY_IMPL(mnemonics_fast, Autograd, m) { m.impl("cosine_linear", &cosine_linear_autograd); }

TORCH_LIBRARY_IMPL(mnemonics_fast, ADInplaceOrView, m) {
  m.impl("exemplar_sgd_step_", torch::dispatch(c10::DispatchKey::ADInplaceOrView,
                                               TORCH_FN(exemplar_sgd_step_ad_inplace_or_view)));
}

}  // namespace mnemonics_fast
