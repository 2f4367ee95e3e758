"""Loading the compiled extension (mnemonics_fast._C) and the operator namespace `mnemonics_fast`.

With the extension: its import defines the op schemas in C++ (csrc/ops.cpp) and registers the CUDA kernels.
Without it (not built, built against another torch, or MNEMONICS_FAST_FORCE_REFERENCE=1): the same schemas are defined
here and every device runs the plain-PyTorch references. Either way the ops exist under torch.ops.mnemonics_fast, so
code, tests, opcheck and torch.compile see one set of operators. A missing build is reported by ONE warning, on the
first call that would have used a kernel (a CUDA tensor); CPU-only use is silent because the reference *is* the CPU
implementation.
"""
from __future__ import annotations

import glob
import importlib
import os
import warnings

import torch

NAMESPACE = "mnemonics_fast"

# Must equal the TORCH_LIBRARY block in csrc/ops.cpp (tests/test_ops.py compares them when the extension is built).
SCHEMAS = {
    "cosine_linear": "cosine_linear(Tensor x, Tensor weight, Tensor sigma) -> Tensor",
    "cosine_linear_backward": "cosine_linear_backward(Tensor grad_out, Tensor out, Tensor x, Tensor weight, "
                              "Tensor sigma) -> (Tensor, Tensor, Tensor)",
    "exemplar_sgd_step_": "exemplar_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
                          "float lr, float momentum, float weight_decay, float clamp_min, float clamp_max) -> ()",
}

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


FORCE_REFERENCE = _env_flag("MNEMONICS_FAST_FORCE_REFERENCE")


def _so_files() -> list[str]:
    return sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")) + glob.glob(os.path.join(_PACKAGE_DIR, "_C*.pyd")))


def _load():
    """(module or None, reason it is None)."""
    if FORCE_REFERENCE:
        return None, "MNEMONICS_FAST_FORCE_REFERENCE=1"
    try:
        return importlib.import_module("mnemonics_fast._C"), None
    except (ImportError, OSError) as exc:
        if not _so_files():
            return None, ("the CUDA extension was not built (pip install --no-build-isolation -e . with nvcc and a "
                          "CUDA build of torch)")
        return None, (f"the CUDA extension failed to load ({type(exc).__name__}: {exc}); it was probably built "
                      f"against another torch than {torch.__version__}: rebuild it")


_C, UNAVAILABLE_REASON = _load()
KERNELS = _C is not None

# Without the extension, define the schemas here (the extension defines them itself; a namespace may only be
# defined once, so this is either-or).
_def_lib = None
if not KERNELS:
    _def_lib = torch.library.Library(NAMESPACE, "DEF")  # noqa: TOR901 - kept alive for the process
    for _schema in SCHEMAS.values():
        _def_lib.define(_schema, tags=(torch.Tag.pt2_compliant_tag,))

# Implementation registrations (CPU references, CUDA fallbacks, autocast) from ops/cosine.py, ops/exemplar_sgd.py.
impl_lib = torch.library.Library(NAMESPACE, "IMPL")  # noqa: TOR901

_warned = False


def warn_no_kernels_once() -> None:
    """The one warning about running the references on a GPU."""
    global _warned
    if _warned or FORCE_REFERENCE:
        return
    _warned = True
    warnings.warn(f"mnemonics_fast: CUDA kernels unavailable, using the plain-PyTorch reference ops on the GPU "
                  f"(slower): {UNAVAILABLE_REASON}. See `python -m mnemonics_fast.info`.", RuntimeWarning,
                  stacklevel=3)


def op(name: str) -> torch._ops.OpOverload:
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def kernels_available() -> bool:
    """True when the compiled CUDA kernels are loaded (and not overridden by MNEMONICS_FAST_FORCE_REFERENCE)."""
    return KERNELS


_COSINE_PATHS = {"auto": 0, "fused": 1, "blas": 2}


def set_cosine_linear_path(path: str) -> None:
    """Pick cosine_linear's CUDA implementation for this process: "auto" (by size), "fused" or "blas".

    The initial value comes from MNEMONICS_FAST_COSINE_PATH. A no-op without the kernels."""
    if path not in _COSINE_PATHS:
        raise ValueError(f"cosine_linear path must be one of {sorted(_COSINE_PATHS)}, got {path!r}")
    if KERNELS:
        _C.set_cosine_linear_path(_COSINE_PATHS[path])


def get_cosine_linear_path() -> str:
    if not KERNELS:
        return "reference"
    return {v: k for k, v in _COSINE_PATHS.items()}[_C.get_cosine_linear_path()]


if KERNELS and os.environ.get("MNEMONICS_FAST_COSINE_PATH"):
    set_cosine_linear_path(os.environ["MNEMONICS_FAST_COSINE_PATH"].strip().lower())


def backend_info() -> dict:
    """What runs where, and what the extension was built against (for logs and `python -m mnemonics_fast.info`)."""
    build = dict(_C.build_info()) if KERNELS else None
    cuda_impl = "cuda kernel" if KERNELS else "reference"
    return {
        "kernels_available": KERNELS,
        "reason_unavailable": UNAVAILABLE_REASON,
        "force_reference": FORCE_REFERENCE,
        "extension_files": _so_files(),
        "extension_module": getattr(_C, "__file__", None),
        "build": build,
        "runtime_torch_version": torch.__version__,
        "runtime_torch_cuda_version": torch.version.cuda,
        "cosine_linear_path": get_cosine_linear_path(),
        "ops": {
            "cosine_linear": {"cpu": "reference", "cuda": cuda_impl},
            "cosine_linear_backward": {"cpu": "reference", "cuda": cuda_impl},
            "exemplar_sgd_step_": {"cpu": "reference", "cuda": cuda_impl},
        },
    }
