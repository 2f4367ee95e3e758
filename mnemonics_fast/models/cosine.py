"""LUCIR's cosine-normalised classifiers (SPEC §2).

logits = sigma * cos(f, w_c); sigma is one learnable scalar (init 1). From phase 1 on the head is a
SplitCosineLinear: old rows (fc1, frozen) and new rows (fc2, trained) sharing one sigma carried over from the
previous phase. Both route through `mnemonics_fast.ops.cosine_linear`, the fused kernel where it is built.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


class CosineLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, sigma: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.sigma = nn.Parameter(torch.ones(())) if sigma else None
        bound = 1.0 / math.sqrt(in_features)  # U(-1/sqrt(d), 1/sqrt(d)), as LUCIR
        nn.init.uniform_(self.weight, -bound, bound)

    @property
    def num_classes(self) -> int:
        return self.out_features

    def full_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor, return_cos: bool = False):
        sigma = self.sigma if self.sigma is not None else x.new_ones(())
        logits = ops.cosine_linear(x, self.weight, sigma)
        if not return_cos:
            return logits
        # Unscaled cosines for the margin-ranking loss: one fused call, then an exact division (d/dsigma is 0).
        return logits, logits / sigma


class SplitCosineLinear(nn.Module):
    """Old rows (fc1) + new rows (fc2) with one shared sigma. fc1 is frozen by the trainer (requires_grad=False,
    which is LUCIR's lr 0 / weight decay 0 for those rows)."""

    def __init__(self, in_features: int, num_old: int, num_new: int, sigma: bool = True):
        super().__init__()
        self.in_features = in_features
        self.fc1 = CosineLinear(in_features, num_old, sigma=False)
        self.fc2 = CosineLinear(in_features, num_new, sigma=False)
        self.sigma = nn.Parameter(torch.ones(())) if sigma else None

    @property
    def num_old(self) -> int:
        return self.fc1.out_features

    @property
    def num_new(self) -> int:
        return self.fc2.out_features

    @property
    def num_classes(self) -> int:
        return self.num_old + self.num_new

    def full_weight(self) -> torch.Tensor:
        return torch.cat([self.fc1.weight, self.fc2.weight], dim=0)

    def forward(self, x: torch.Tensor, return_cos: bool = False):
        sigma = self.sigma if self.sigma is not None else x.new_ones(())
        logits = ops.cosine_linear(x, self.full_weight(), sigma)
        if not return_cos:
            return logits
        return logits, logits / sigma


def grow_head(head: CosineLinear | SplitCosineLinear, num_new: int) -> SplitCosineLinear:
    """The next phase's head: every current row becomes an old (frozen) row, `num_new` fresh rows, same sigma."""
    old_w = head.full_weight().detach()
    new = SplitCosineLinear(head.in_features, old_w.shape[0], num_new).to(old_w.device)
    with torch.no_grad():
        new.fc1.weight.copy_(old_w)
        new.sigma.copy_(head.sigma.detach())
    new.fc1.weight.requires_grad_(False)
    return new


@torch.no_grad()
def imprint_weights(head: SplitCosineLinear, new_class_features: list[torch.Tensor]) -> None:
    """Imprinting (LUCIR): row of new class c = normalize(mean_i normalize(f_i)) * mean L2 norm of the old rows.

    `new_class_features[c]` holds eval-mode, un-augmented features [n_c, d] of new class c's training images.
    """
    if len(new_class_features) != head.num_new:
        raise ValueError(f"imprinting needs features for {head.num_new} new classes, got {len(new_class_features)}")
    old_norm = head.fc1.weight.norm(dim=1).mean()
    for c, feats in enumerate(new_class_features):
        if feats.numel() == 0:
            raise ValueError(f"imprinting: new class {c} has no training features")
        proto = F.normalize(F.normalize(feats.float(), dim=1).mean(0), dim=0)
        head.fc2.weight[c].copy_(proto * old_norm)
