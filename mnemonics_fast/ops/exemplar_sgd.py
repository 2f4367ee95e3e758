"""mnemonics_fast::exemplar_sgd_step_: one fused SGD(momentum, weight decay) + clamp step over a list of tensors.

Dispatch:
    CUDA  one multi-tensor kernel launch for the whole list (csrc/exemplar_sgd.cu); reference + one warning if the
          extension is not built
    CPU   reference_exemplar_sgd_step_
    fake  checks only (the op mutates its inputs and returns nothing)
No autograd: it is an optimiser step; the wrapper runs it under torch.no_grad().

Recommended usage: keep all exemplars in ONE contiguous bank tensor [N, 3, H, W] (with its grad and momentum buffer
also single tensors) and pass one-element lists. That is a single sweep with float4 loads, needs no per-tensor
bookkeeping on the host and can be captured in a CUDA graph. Lists of up to 64 tensors travel in the kernel
arguments (also capturable); longer lists upload a pointer table per call, and the host-side cost of handing the op
thousands of tensors grows linearly with their number.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _extension as ext
from .reference import reference_exemplar_sgd_step_

_op = ext.op("exemplar_sgd_step_")


def check_sgd_args(params, grads, momentum_buffers, *, running: bool) -> None:
    """The op's input rules on every backend (the CUDA kernel checks the same in C++, and also needs float32 and
    contiguous tensors): equal list lengths, equal shapes and one floating dtype per (param, grad, buffer), one device,
    no tensor written twice. `running` (a real kernel, not the fake): params that require grad are refused while grad
    mode is on, since the op writes them in place behind autograd's back."""
    torch._check(len(params) == len(grads) == len(momentum_buffers), lambda: (
        f"exemplar_sgd_step_: params, grads and momentum_buffers must have the same length, got {len(params)}, "
        f"{len(grads)} and {len(momentum_buffers)}"))
    written: set[int] = set()
    for i, (p, g, b) in enumerate(zip(params, grads, momentum_buffers)):
        torch._check(g.shape == p.shape and b.shape == p.shape, lambda: (
            f"exemplar_sgd_step_: shapes differ at position {i}: params {tuple(p.shape)}, grads {tuple(g.shape)}, "
            f"momentum_buffers {tuple(b.shape)}"))
        torch._check(p.dtype.is_floating_point and g.dtype == p.dtype and b.dtype == p.dtype, lambda: (
            f"exemplar_sgd_step_: dtypes at position {i} must be one floating type, got {p.dtype}, {g.dtype}, "
            f"{b.dtype}"))
        torch._check(g.device == p.device == b.device == params[0].device, lambda: (
            f"exemplar_sgd_step_: position {i} is on {p.device}/{g.device}/{b.device}, params[0] on "
            f"{params[0].device}"))
        torch._check(p is not g and p is not b and g is not b, lambda: (
            f"exemplar_sgd_step_: params[{i}], grads[{i}] and momentum_buffers[{i}] must be distinct tensors"))
        torch._check(id(p) not in written and id(b) not in written, lambda: (
            f"exemplar_sgd_step_: params[{i}] or momentum_buffers[{i}] is also written at another position of the "
            f"lists (each tensor may appear once)"))
        written.update((id(p), id(b)))
        if running:
            torch._check(not (torch.is_grad_enabled() and p.requires_grad), lambda: (
                f"exemplar_sgd_step_: params[{i}] requires grad and grad mode is on; the op writes it in place, so "
                f"call it under torch.no_grad() (mnemonics_fast.ops.exemplar_sgd_step_ does)"))


def _exemplar_sgd_step_cpu(params, grads, momentum_buffers, lr, momentum, weight_decay, clamp_min, clamp_max):
    check_sgd_args(params, grads, momentum_buffers, running=True)
    reference_exemplar_sgd_step_(params, grads, momentum_buffers, lr, momentum, weight_decay, clamp_min, clamp_max)


ext.impl_lib.impl("exemplar_sgd_step_", _exemplar_sgd_step_cpu, "CPU")

if not ext.KERNELS:
    def _exemplar_sgd_step_cuda_fallback(params, grads, momentum_buffers, lr, momentum, weight_decay, clamp_min,
                                         clamp_max):
        ext.warn_no_kernels_once()
        _exemplar_sgd_step_cpu(params, grads, momentum_buffers, lr, momentum, weight_decay, clamp_min, clamp_max)

    ext.impl_lib.impl("exemplar_sgd_step_", _exemplar_sgd_step_cuda_fallback, "CUDA")


# Lists up to this long travel in the kernel arguments (csrc/exemplar_sgd_kernels.cuh, kMaxArgTensors); longer ones
# upload a pointer table from host memory, which a CUDA graph cannot capture.
MAX_ARG_TENSORS = 64


def _increment_versions(tensors) -> None:
    torch.autograd.graph.increment_version(tensors)


try:  # increment_version takes a list in recent torch; older versions take one tensor at a time
    torch.autograd.graph.increment_version([torch.empty(0)])
except TypeError:
    def _increment_versions(tensors) -> None:  # noqa: F811
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _exemplar_sgd_step_ad_inplace_or_view(keyset, params, grads, momentum_buffers, *scalars):
    """Bump the version counters of the tensors the op writes (as torch.library.custom_op does for mutable ops), so
    autograd notices if a graph saved them before the step. The CUDA kernel writes through raw pointers and would
    not bump them itself."""
    _increment_versions(params)
    _increment_versions(momentum_buffers)
    return _op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, params, grads, momentum_buffers, *scalars)


def use_python_inplace_layer() -> None:
    """Register the Python version-bump layer (over the C++ one when the extension is built): the A/B switch of
    bench/bench_cosine_autograd.py, also set by MNEMONICS_FAST_PYTHON_AUTOGRAD=1. Process-wide, not undoable."""
    ext.impl_lib.impl("exemplar_sgd_step_", _exemplar_sgd_step_ad_inplace_or_view, "ADInplaceOrView",
                      with_keyset=True)


# With the extension this layer is C++ (csrc/autograd.cpp): in Python it converts the three tensor lists to Python and
# back on every call, a host cost linear in the list length (bench/bench_cosine_autograd.py measures it).
if not ext.KERNELS or ext._env_flag("MNEMONICS_FAST_PYTHON_AUTOGRAD"):
    use_python_inplace_layer()


@torch.library.register_fake("mnemonics_fast::exemplar_sgd_step_")
def _exemplar_sgd_step_fake(params, grads, momentum_buffers, lr, momentum, weight_decay, clamp_min, clamp_max):
    check_sgd_args(params, grads, momentum_buffers, running=False)
    return None


def exemplar_sgd_step_(params: Sequence[torch.Tensor] | torch.Tensor, grads: Sequence[torch.Tensor] | torch.Tensor,
                       momentum_buffers: Sequence[torch.Tensor] | torch.Tensor, lr: float, momentum: float,
                       weight_decay: float, clamp_min: float, clamp_max: float) -> None:
    """In place, for every i (torch.optim.SGD semantics, then a clamp to the valid pixel range):

        momentum_buffers[i] = momentum * momentum_buffers[i] + grads[i] + weight_decay * params[i]
        params[i] = clamp(params[i] - lr * momentum_buffers[i], clamp_min, clamp_max)

    Lists of float32 tensors of matching shapes, all on one device, contiguous. A single tensor is accepted in place
    of a one-element list (the recommended exemplar bank). lr, momentum, weight decay: plain floats (per step).
    """
    if isinstance(params, torch.Tensor):
        params, grads, momentum_buffers = [params], [grads], [momentum_buffers]
    if not (len(params) == len(grads) == len(momentum_buffers)):
        raise ValueError(f"exemplar_sgd_step_: params, grads and momentum_buffers must have the same length, got "
                         f"{len(params)}, {len(grads)} and {len(momentum_buffers)}")
    if len(params) == 0:
        return
    if (len(params) > MAX_ARG_TENSORS and params[0].is_cuda and ext.KERNELS
            and torch.cuda.is_current_stream_capturing()):
        # Said here, before the kernel is called: on the H200 test machine an error raised from inside the
        # extension during stream capture crashed the process (tests/test_ops_cuda.py). The C++ check stays as backstop.
        raise RuntimeError(f"exemplar_sgd_step_: a list of {len(params)} tensors (more than {MAX_ARG_TENSORS}) uploads "
                           "its pointer table from host memory and cannot be captured in a CUDA graph; pass the "
                           f"exemplars as one bank tensor (or at most {MAX_ARG_TENSORS} tensors)")
    with torch.no_grad():
        _op(params, grads, momentum_buffers, float(lr), float(momentum), float(weight_decay), float(clamp_min),
            float(clamp_max))
