"""The exemplar gradient of `full` / `first_order` as ONE pure function, compiled whole by torch.compile.

Why. The eager engine (`_ExemplarGrad._full_unrolled`) builds an autograd graph through T inner steps and then runs
autograd's double backward over it: about 3,000 small kernels per outer step for ResNet-32 (H200 profile,
bench/results/profile_mnemonics_step_h200.txt), and it cannot be handed to torch.compile, because AOTAutograd does not
differentiate a compiled graph twice. Written with torch.func instead - the validation loss is a function of the
pixels that itself takes `torch.func.grad` of the inner loss - one outer step is a plain function

    (bank, fixed_x, theta, y_all, qx, qy) -> (dL_val/dbank, L_val)

with no autograd graph left at run time. torch.compile traces it (fullgraph) into one graph holding the forward, the
backward and the double backward of every layer; inductor fuses the batch-norm/ReLU/normalise chains of all three,
and code that computes unused results is dead: the [C, M, H, W]-kernel weight-gradient convolutions that
lean_conv.py removes by hand from the eager engine are simply never emitted. mode="reduce-overhead" also replays it
as a CUDA graph.

Exact: the same mathematics as the unrolled engine (tests: float64 agreement to 1e-10 for T=1, T=2, first_order,
fixed exemplars); in float32 the two differ by rounding. The cosine head is evaluated through its plain-PyTorch twin
while traced (torch.func transforms cannot run registered autograd kernels; inductor generates a fused one instead).

Not used with (the caller says so once and keeps the eager engine): exemplar_chunk (the memory option: the compiled
graph keeps every intermediate, like the unrolled engine), shard_inner (collectives in the inner loop), modes head
and proto (no second-order pass through the backbone to speed up).

Cost: compilation takes seconds to minutes once per distinct shape set. Shapes cannot be made dynamic here (see
_COMPILED below), so the trainer compiles about twice per phase: the new classes' exemplars, then the A/B halves. It
pays off when a shape set runs many outer steps: benchmarks, large K, ImageNet-size exemplar levels. It does not pay
off for the CIFAR schedules' 50 + 2 x 20 steps per phase.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..ops import cosine as _cosine

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILABLE_MODES = ("full", "first_order")


def _autocast(device_type: str, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


def make_outer_grad(module: nn.Module, names: Sequence[str], *, mode: str, inner_lr: float, inner_steps: int,
                    autocast_dtype: torch.dtype | None, device_type: str, inner_update: str = "sgd"):
    """The pure function (bank, fixed_x | None, theta, y_all, qx, qy) -> (dL_val/dbank, L_val) for `module`
    (forward(x) -> logits over all seen classes). theta: tensors in the order of `names` (detached: gradients come
    from torch.func, not autograd). Not compiled: `CompiledExemplarGrad` compiles it; tests call it as is."""
    if mode not in COMPILABLE_MODES:
        raise ValueError(f"the compiled engine covers modes {COMPILABLE_MODES}, not {mode!r}")
    alpha, steps, names = float(inner_lr), int(inner_steps), tuple(names)
    normalised = inner_update == "normalised"
    from .mnemonics import _inner_direction  # the eager engine's step direction (imported here: mnemonics imports us)

    def logits(theta, x):
        with _autocast(device_type, autocast_dtype):
            out = functional_call(module, dict(zip(names, theta)), (x,))
        return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out

    def inner_loss(theta, x, y):  # mean over every exemplar of the call, as the eager engine
        return F.cross_entropy(logits(theta, x), y)

    def val_loss(bank, fixed_x, theta, y_all, qx, qy):
        x = bank if fixed_x is None else torch.cat([bank, fixed_x])
        for t in range(steps):
            # first_order: the inner gradient at a detached theta_{t-1} (no Hessian terms in theta), still a
            # function of the pixels (the mixed term), exactly as the eager engine's detach().requires_grad_()
            at = theta if (mode == "full" or t == 0) else tuple(p.detach() for p in theta)
            g = torch.func.grad(inner_loss)(at, x, y_all)
            theta = tuple(p - alpha * gi for p, gi in zip(theta, _inner_direction(g, normalised)))
        return F.cross_entropy(logits(theta, qx), qy)

    grad_and_value = torch.func.grad_and_value(val_loss, argnums=0)

    # A function of our own around it: Dynamo keeps compiled code per code object, and functorch's wrapper's code is
    # shared by every grad_and_value in the process.
    def outer_grad(bank, fixed_x, theta, y_all, qx, qy):
        return grad_and_value(bank, fixed_x, theta, y_all, qx, qy)

    return outer_grad


# One compiled function per (module, settings), reused by every optimiser on that module: a run creates several
# optimisers per phase (new classes; A and B of the old-class adjustment), and a fresh closure for each would fail
# Dynamo's guards every time. Shapes are static (dynamic=False): functorch's grad, as Dynamo traces it, specialises
# the batch size anyway (its autograd call guards Eq(M, 7) even under dynamic=True, measured with torch 2.14), so every
# new shape set - each phase's exemplar and class counts, with or without fixed exemplars - is one compilation.
# Only the latest module's functions are kept (a run trains one model; each function's closure holds its module, so
# a cache keyed weakly on the module would still keep every model alive).
_COMPILED: dict = {"module": None, "fns": {}}
# Compilations one outer_grad may accumulate before Dynamo runs it eagerly: about two per phase (new classes; the
# A/B adjustment), 25 phases at most in the protocols, with room.
RECOMPILE_LIMIT = 128


def _compiled_outer_grad(module, names, **settings):
    key = (tuple(names), tuple(sorted(settings.items(), key=lambda kv: kv[0])))
    if _COMPILED["module"] is not module:
        _COMPILED["module"], _COMPILED["fns"] = module, {}
    per_module = _COMPILED["fns"]
    if key not in per_module:
        compile_mode = settings.pop("compile_mode")
        fn = make_outer_grad(module, names, **settings)
        per_module[key] = torch.compile(fn, fullgraph=True, dynamic=False,
                                        mode=None if compile_mode == "default" else compile_mode)
    return per_module[key]


class CompiledExemplarGrad:
    """Drop-in for `_ExemplarGrad` (full/first_order, unchunked, unsharded): `self(bank, qx, qy) -> (grad, loss)`,
    the outer-step function of `make_outer_grad` run through torch.compile(fullgraph=True, mode=compile_mode)."""

    def __init__(self, module: nn.Module, names: Sequence[str], params: Sequence[torch.Tensor],
                 y_all: torch.Tensor, fixed_x: torch.Tensor | None, *, mode: str, inner_lr: float, inner_steps: int,
                 autocast_dtype: torch.dtype | None, compile_mode: str, inner_update: str = "sgd"):
        if compile_mode not in COMPILE_MODES or compile_mode == "none":
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES[1:]}, got {compile_mode!r}")
        self.params = list(params)
        self.y_all, self.fixed_x = y_all, fixed_x
        self._fn = _compiled_outer_grad(module, names, mode=mode, inner_lr=float(inner_lr),
                                        inner_steps=int(inner_steps), autocast_dtype=autocast_dtype,
                                        device_type=y_all.device.type, compile_mode=compile_mode,
                                        inner_update=inner_update)

    def __call__(self, bank: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch._dynamo.config as dynamo_config  # imported by torch.compile already
        theta = tuple(p.detach() for p in self.params)  # the current values (the model level may have moved them)
        # no_grad: torch.func computes every gradient; nothing here should record an autograd graph (which would make
        # AOTAutograd build a backward for the compiled graph). The cosine head runs its twin while traced.
        with torch.no_grad(), _cosine.plain_torch(), \
                dynamo_config.patch(recompile_limit=max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)):
            return self._fn(bank.detach(), self.fixed_x, theta, self.y_all, qx, qy)
