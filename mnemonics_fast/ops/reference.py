"""Plain-PyTorch twins of every custom op, with exactly the op's signature.

They are the CPU implementation, the fallback when the extension is not built, and the oracle the CUDA kernels are
tested against. `reference_cosine_linear_backward` is the twin of the backward op (same formulas as the kernels, see
docs/kernels.md); it is plain differentiable PyTorch, which is also how the op gets its double backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Same epsilon as F.normalize: a zero row stays zero instead of producing NaN.
NORM_EPS = 1e-12


def reference_cosine_linear(x: torch.Tensor, weight: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """sigma * normalize(x) @ normalize(weight).T

    x: [B, D], weight: [C, D], sigma: 0-dim tensor. Returns [B, C] in x's dtype.
    """
    return sigma * F.linear(F.normalize(x, dim=1, eps=NORM_EPS), F.normalize(weight, dim=1, eps=NORM_EPS))


def reference_cosine_linear_backward(grad_out: torch.Tensor, out: torch.Tensor, x: torch.Tensor,
                                     weight: torch.Tensor, sigma: torch.Tensor):
    """Gradients of reference_cosine_linear w.r.t. (x, weight, sigma), from the saved output `out`.

    grad_out, out: [B, C]; x: [B, D]; weight: [C, D]; sigma: 0-dim. Returns (dx [B, D], dweight [C, D], dsigma 0-dim)
    in the dtypes of x, weight, sigma, contiguous. Half/bfloat16 inputs are computed in float32.
    With xn = x / max(|x|, eps), wn likewise, h = grad_out @ wn, k = grad_out.T @ xn:
        dx = (sigma h - xn * R) / max(|x|, eps),  R[b] = sum_c grad_out[b, c] out[b, c]  (0 where |x_b| < eps)
        dw = (sigma k - wn * S) / max(|w|, eps),  S[c] = sum_b grad_out[b, c] out[b, c]  (0 where |w_c| < eps)
        dsigma = sum(h * xn)
    """
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    g, o = grad_out.to(compute), out.to(compute)
    xc, wc, s = x.to(compute), weight.to(compute), sigma.to(compute)
    nx, nw = xc.norm(dim=1, keepdim=True), wc.norm(dim=1, keepdim=True)
    inv_x, inv_w = 1.0 / nx.clamp_min(NORM_EPS), 1.0 / nw.clamp_min(NORM_EPS)
    xn, wn = xc * inv_x, wc * inv_w
    h, k = g @ wn, g.t() @ xn
    go = g * o
    # F.normalize's clamp_min passes no gradient to the norm of a row shorter than eps.
    r = torch.where(nx >= NORM_EPS, go.sum(dim=1, keepdim=True), torch.zeros_like(nx))
    s_ = torch.where(nw >= NORM_EPS, go.sum(dim=0).unsqueeze(1), torch.zeros_like(nw))
    dx = inv_x * (s * h - xn * r)
    dw = inv_w * (s * k - wn * s_)
    ds = (h * xn).sum()
    return (dx.to(x.dtype).contiguous(), dw.to(weight.dtype).contiguous(),
            ds.to(sigma.dtype).reshape(sigma.shape))


def reference_exemplar_sgd_step_(params: list[torch.Tensor], grads: list[torch.Tensor],
                                 momentum_buffers: list[torch.Tensor], lr: float, momentum: float,
                                 weight_decay: float, clamp_min: float, clamp_max: float) -> None:
    """In place, torch.optim.SGD semantics, then a clamp to the valid pixel range:

        buf = momentum * buf + grad + weight_decay * param
        param -= lr * buf
        param.clamp_(clamp_min, clamp_max)

    Every list holds tensors of matching shapes (any shape, float32).
    """
    with torch.no_grad():
        for p, g, b in zip(params, grads, momentum_buffers):
            if momentum != 0.0:
                b.mul_(momentum).add_(g)
            else:   # not 0 * b: a non-finite buffer (e.g. from empty_like) must not poison the step
                b.copy_(g)
            if weight_decay != 0.0:
                b.add_(p, alpha=weight_decay)
            p.add_(b, alpha=-lr).clamp_(clamp_min, clamp_max)
