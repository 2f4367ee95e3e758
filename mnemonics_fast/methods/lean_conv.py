"""Convolutions whose backward is cheap to differentiate again: the exemplar level's second-order pass.

The mnemonics exemplar gradient differentiates the inner step's parameter gradient, so every convolution's backward
is itself differentiated. PyTorch's formula for that (`_convolution_double_backward`) computes the gradient with
respect to the weight whenever a gradient reaches the first backward's input-gradient output, whether or not the
weight's gradient is wanted, and it computes it as a convolution whose *kernel* is the transposed output gradient:
for ResNet-32's first stage with 100 exemplars, a [16, 100, 32, 32] input convolved with a [16, 100, 32, 32] kernel.
On an H200 those calls took ~1 ms each, 37% of one outer step (bench/results/profile_mnemonics_step_h200.txt); the
exemplar gradient (T = 1) never uses them.

Here the backward is written with two differentiable ops instead of one:
  d input  = conv_transpose2d(grad_out, weight)                         (its own backward honours what is needed)
  d weight = aten.convolution_backward(grad_out, input, weight, mask = weight only)
so the double backward is three ordinary convolutions plus, only when a weight gradient is really needed (T > 1 in
`full` mode), an ordinary weight-gradient convolution. The forward is F.conv2d itself; the first backward gives the
same numbers as PyTorch's up to float rounding (float64 tests: tests/test_mnemonics.py).

`lean_second_order_convs(module)` switches every zero-padded nn.Conv2d (and weight-transfer TransferConv2d) inside
`module` to it for the duration of a `with` block (instance attribute over `Conv2d._conv_forward`, removed on exit):
no cost when not in use, no change to parameters, state_dict or hooks. `mnemonics.lean_conv_grad` (default true) turns it off for A/B checks.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from ..models.transfer import TransferConv2d


class _LeanConv2d(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, weight)
        ctx.conf = (_pair(stride), _pair(padding), _pair(dilation), groups)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            # output_padding recovers the input size the strided forward rounded away
            k = weight.shape[2:]
            out_pad = [x.shape[2 + i] - ((grad_out.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                         + dilation[i] * (k[i] - 1) + 1) for i in range(2)]
            gx = F.conv_transpose2d(grad_out, weight, None, stride, padding, out_pad, groups, dilation)
        if ctx.needs_input_grad[1]:
            gw = torch.ops.aten.convolution_backward(grad_out, x, weight, None, stride, padding, dilation, False,
                                                     [0, 0], groups, [False, True, False])[1]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad_out.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None


def lean_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
                dilation=1, groups: int = 1) -> torch.Tensor:
    """F.conv2d with the backward above (integer or tuple padding only)."""
    return _LeanConv2d.apply(x, weight, bias, stride, padding, dilation, groups)


def _lean_conv_forward(self: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # What autocast does for conv2d, done outside the Function: its saved tensors and grad_out then share the low
        # precision dtype, and the casts' own backward returns float32 gradients.
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    return lean_conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def _eligible(m: nn.Module) -> bool:
    if "_conv_forward" in m.__dict__ or isinstance(getattr(m, "padding", None), str):
        return False
    # TransferConv2d: the weight-transfer conv (frozen kernel x learnable scale), the same F.conv2d underneath
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros") or type(m) is TransferConv2d


@contextlib.contextmanager
def lean_second_order_convs(module: nn.Module | None, enabled: bool = True) -> Iterator[int]:
    """Within the block, every plain zero-padded nn.Conv2d in `module` runs `lean_conv2d`; yields how many."""
    convs = [m for m in module.modules() if _eligible(m)] if (enabled and module is not None) else []
    for m in convs:
        m._conv_forward = _lean_conv_forward.__get__(m)
    try:
        yield len(convs)
    finally:
        for m in convs:
            m.__dict__.pop("_conv_forward", None)
