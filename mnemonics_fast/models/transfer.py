"""Weight transfer, the mnemonics paper's model-level addition (SPEC §2, ablatable via `model.weight_transfer`).

From phase 1 on every conv kernel is frozen at its phase-0 value and multiplied by a learnable per-(out, in) scale
initialised to 1; BN layers stay trainable. The scales carry over from phase to phase; the kernels never change.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TransferConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.bias is not None or conv.groups != 1:
            raise ValueError("weight transfer expects bias-free, ungrouped convolutions (ResNet convs)")
        # The frozen phase-0 kernel is a buffer: it is saved, moved and broadcast with the model, never trained.
        self.register_buffer("frozen_weight", conv.weight.detach().clone())
        self.scale = nn.Parameter(torch.ones(conv.out_channels, conv.in_channels, 1, 1, device=conv.weight.device))
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, 1

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # a separate method, as in nn.Conv2d, so the exemplar level can swap in its lean second-order convolution
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.frozen_weight * self.scale, None)


def apply_weight_transfer(module: nn.Module) -> int:
    """Replace every nn.Conv2d below `module` by a TransferConv2d, in place. Returns how many were replaced.

    Idempotent: modules already converted are left alone (their scales carry over to the next phase).
    """
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv2d):
            setattr(module, name, TransferConv2d(child))
            n += 1
        else:
            n += apply_weight_transfer(child)
    return n
