"""Plain-PyTorch twins of every custom op, with exactly the op's signature.

They are the CPU implementation, the fallback when the extension is not built, and the oracle the CUDA kernels are
tested against.
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
            b.mul_(momentum).add_(g)
            if weight_decay != 0.0:
                b.add_(p, alpha=weight_decay)
            p.add_(b, alpha=-lr).clamp_(clamp_min, clamp_max)
