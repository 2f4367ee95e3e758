"""mnemonics_fast::cosine_linear: out = sigma * normalize(x) @ normalize(weight).T, with its registrations.

Dispatch:
    CUDA      the fused kernels / cuBLAS path of csrc/cosine_linear.cu (reference + one warning if not built)
    CPU       reference_cosine_linear
    Meta/fake shape functions below (torch.compile, opcheck)
    Autograd  in C++ when the extension is built (csrc/autograd.cpp), else the Python twin below;
              backward is the op cosine_linear_backward (CUDA kernels / reference_cosine_linear_backward on CPU).
              With create_graph=True (double backward, e.g. mnemonics' unrolled inner step) the backward runs the
              reference formula in differentiable PyTorch instead, so higher-order gradients are exact (and slower).
              cosine_linear_backward itself has no autograd formula.
    Autocast  x and weight are cast to the autocast dtype (like F.linear), sigma is left alone; the op then runs in
              that dtype (fp32 accumulation) and returns it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import _extension as ext
from .reference import reference_cosine_linear, reference_cosine_linear_backward

_fwd = ext.op("cosine_linear")
_bwd = ext.op("cosine_linear_backward")


# ---- implementations --------------------------------------------------------------------------------------------
# The CPU kernels check their inputs as the fake and CUDA kernels do (_check_inputs below), so that a shape the
# compiled or CUDA path refuses is not quietly broadcast by the reference's plain PyTorch ops on the CPU.
def _cosine_linear_cpu(x, weight, sigma):
    _check_inputs(x, weight, sigma)
    return reference_cosine_linear(x, weight, sigma)


def _cosine_linear_backward_cpu(grad_out, out, x, weight, sigma):
    _check_backward_inputs(grad_out, out, x, weight, sigma)
    return reference_cosine_linear_backward(grad_out, out, x, weight, sigma)


ext.impl_lib.impl("cosine_linear", _cosine_linear_cpu, "CPU")
ext.impl_lib.impl("cosine_linear_backward", _cosine_linear_backward_cpu, "CPU")

if not ext.KERNELS:
    def _cosine_linear_cuda_fallback(x, weight, sigma):
        ext.warn_no_kernels_once()
        return reference_cosine_linear(x, weight, sigma)

    def _cosine_linear_backward_cuda_fallback(grad_out, out, x, weight, sigma):
        ext.warn_no_kernels_once()
        return reference_cosine_linear_backward(grad_out, out, x, weight, sigma)

    ext.impl_lib.impl("cosine_linear", _cosine_linear_cuda_fallback, "CUDA")
    ext.impl_lib.impl("cosine_linear_backward", _cosine_linear_backward_cuda_fallback, "CUDA")


# ---- fake (meta) kernels ----------------------------------------------------------------------------------------
def _check_inputs(x, weight, sigma):
    torch._check(x.dim() == 2, lambda: f"cosine_linear: x must be 2-D [B, D], got shape {tuple(x.shape)}")
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[1],
                 lambda: f"cosine_linear: weight must be [C, D] with D = {x.shape[1]}, got {tuple(weight.shape)}")
    torch._check(sigma.dim() == 0, lambda: f"cosine_linear: sigma must be 0-dim, got shape {tuple(sigma.shape)}")
    torch._check(x.dtype.is_floating_point and sigma.dtype.is_floating_point,
                 lambda: f"cosine_linear: x, weight and sigma must be floating point, got {x.dtype} and {sigma.dtype}")
    torch._check(x.dtype == weight.dtype,
                 lambda: f"cosine_linear: x and weight must have the same dtype, got {x.dtype} and {weight.dtype}")
    # The CUDA kernels take all three from one device (csrc/cosine_linear.cu checks the same before touching data).
    torch._check(weight.device == x.device and sigma.device == x.device,
                 lambda: f"cosine_linear: x, weight and sigma must be on one device, got {x.device}, {weight.device}, "
                         f"{sigma.device}")


@torch.library.register_fake("mnemonics_fast::cosine_linear")
def _cosine_linear_fake(x, weight, sigma):
    _check_inputs(x, weight, sigma)
    return x.new_empty((x.shape[0], weight.shape[0]))


def _check_backward_inputs(grad_out, out, x, weight, sigma):
    """`out` must be cosine_linear(x, weight, sigma) itself (autograd saves it): the CUDA kernels read dsigma off it
    (sum(grad_out * out) / sigma), the reference recomputes the cosines, so another `out` has no single meaning."""
    _check_inputs(x, weight, sigma)
    want = (x.shape[0], weight.shape[0])
    torch._check(tuple(grad_out.shape) == want and tuple(out.shape) == want,
                 lambda: f"cosine_linear_backward: grad_out and out must be [B, C] = {list(want)}, got "
                         f"{tuple(grad_out.shape)} and {tuple(out.shape)}")


@torch.library.register_fake("mnemonics_fast::cosine_linear_backward")
def _cosine_linear_backward_fake(grad_out, out, x, weight, sigma):
    _check_backward_inputs(grad_out, out, x, weight, sigma)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), sigma.new_empty(sigma.shape)


# ---- autograd ---------------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, weight, sigma = inputs
    ctx.save_for_backward(x, weight, sigma, output)


def _backward(ctx, grad_out):
    x, weight, sigma, out = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True (double backward, e.g. mnemonics' unrolled inner step): the reference formula in plain
        # differentiable ops, so every higher-order gradient is exact. Grad mode is off in ordinary backward passes
        # and while torch.compile traces one, which therefore use the kernel op.
        return reference_cosine_linear_backward(grad_out, out, x, weight, sigma)
    return _bwd(grad_out, out, x, weight, sigma)


# With the extension the autograd kernel is C++ (csrc/autograd.cpp: the same formulas without a Python
# autograd.Function per call, which was most of an eager call's cost); without it, this Python twin.
def use_python_autograd() -> None:
    """Register the Python autograd twin (over the C++ one when the extension is built): the A/B switch of
    bench/bench_cosine_autograd.py, also set by MNEMONICS_FAST_PYTHON_AUTOGRAD=1. Process-wide, not undoable."""
    torch.library.register_autograd("mnemonics_fast::cosine_linear", _backward, setup_context=_setup_context)


if not ext.KERNELS or ext._env_flag("MNEMONICS_FAST_PYTHON_AUTOGRAD"):
    use_python_autograd()


# ---- autocast ---------------------------------------------------------------------------------------------------
def _register_autocast(device_type: str) -> None:
    """Like torch.library.register_autocast, but casting to the autocast dtype in effect at call time."""
    key_name = {"cuda": "AutocastCUDA", "cpu": "AutocastCPU"}[device_type]
    key = getattr(torch._C.DispatchKey, key_name)

    def cast(t):
        return t.to(torch.get_autocast_dtype(device_type)) if t.is_floating_point() and t.dtype != torch.float64 \
            else t

    def autocast_impl(x, weight, sigma):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return _fwd(cast(x), cast(weight), sigma)

    _fwd.py_impl(key)(autocast_impl)  # seen by the Python dispatcher while torch.compile traces
    ext.impl_lib.impl("cosine_linear", autocast_impl, key_name)


_register_autocast("cuda")
_register_autocast("cpu")


# ---- public wrapper ---------------------------------------------------------------------------------------------
_PLAIN_TORCH = False  # set by plain_torch(): route every call to the differentiable twin


@contextlib.contextmanager
def plain_torch() -> Iterator[None]:
    """Within the block, cosine_linear computes the plain-PyTorch twin (differentiable to any order) instead of the
    registered op. For torch.func transforms (grad of grad, vmap), which cannot run a registered autograd kernel
    ("cannot use C++ torch::autograd::Function with functorch transforms"); methods/compiled_grad.py uses it, and
    inductor then fuses the twin's few ops itself. Not thread-safe (a module flag, which torch.compile guards on)."""
    global _PLAIN_TORCH
    prev, _PLAIN_TORCH = _PLAIN_TORCH, True
    try:
        yield
    finally:
        _PLAIN_TORCH = prev


def cosine_linear(x: torch.Tensor, weight: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """sigma * normalize(x) @ normalize(weight).T (eps 1e-12 as F.normalize), differentiable in all three.

    x: [B, D], weight: [C, D] (same dtype: float32, bfloat16 or float16; any strides), sigma: 0-dim floating
    tensor on x's device. Returns [B, C] in x's dtype. float64 on CUDA runs the reference (the kernels are fp32 math).
    """
    if _PLAIN_TORCH or (ext.KERNELS and x.dtype == torch.float64 and x.is_cuda):
        return reference_cosine_linear(x, weight, sigma)
    return _fwd(x, weight, sigma)
