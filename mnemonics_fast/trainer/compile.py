"""`train.compile`: torch.compile for the model level's training loop (the backbone only, in place, for one call).

Why the backbone and nothing else:
- its shapes never change across phases (only the head grows), so Dynamo compiles it once per mode (train with
  grad, teacher eval without grad; one more when the last batch of an epoch is smaller, after which the batch
  dimension is dynamic) and every later phase, and the teacher copy, reuse that code. Compiling the whole network
  would recompile at every phase and, past torch's recompile limit (8), silently fall back to eager.
- it is nearly all of the kernels; the head is one fused op (`mnemonics_fast.ops.cosine_linear`) already.

`nn.Module.compile` keeps the module's class and state_dict keys (checkpoints are unchanged). It is undone when the
training call returns, because the exemplar level differentiates the backbone twice (`torch.func.functional_call` +
double backward), which compiled graphs do not support (AOTAutograd), and feature extraction stays eager.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager

import torch

# Graphs per backbone forward a whole run may need: train and teacher (grad mode is guarded), each for the full
# batch, a dynamic batch range (an epoch's smaller last batch) and sizes of 16 and below (conv specialises them).
# torch's default of 8 could be reached in a long run, after which Dynamo silently runs that frame eagerly.
RECOMPILE_LIMIT = 32


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile's inductor backend cannot run on `device` here, or None when it can."""
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # pragma: no cover - every supported torch has it
            return "torch.utils._triton is missing from this torch"
        return None if has_triton() else "triton is not installed (inductor generates its CUDA kernels with triton)"
    cxx = os.environ.get("CXX", "")
    if cxx and shutil.which(cxx.split()[0]):
        return None
    if any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return None
    return "no C++ compiler (g++, c++, clang++ or $CXX) on PATH (inductor compiles its CPU kernels with one)"


@contextmanager
def compiled_backbones(models, mode: str):
    """Within the block, each model's backbone runs through torch.compile(mode=mode); afterwards it is eager again.

    `models` may contain None (no teacher in phase 0). mode "none" does nothing.
    """
    nets = [m for m in models if m is not None] if mode != "none" else []
    if not nets:
        yield
        return
    import torch._dynamo.config as dynamo_config   # lazily: importing Dynamo costs start-up time
    limit = dynamo_config.recompile_limit
    dynamo_config.recompile_limit = max(limit, RECOMPILE_LIMIT)
    for m in nets:
        m.backbone.compile(mode=None if mode == "default" else mode)
    try:
        yield
    finally:
        dynamo_config.recompile_limit = limit
        for m in nets:
            # nn.Module.compile stores the compiled call here; dropping it restores the plain call
            # (tests/test_trainer.py::test_compile_trains_like_eager_and_is_undone pins this against torch upgrades).
            m.backbone._compiled_call_impl = None
