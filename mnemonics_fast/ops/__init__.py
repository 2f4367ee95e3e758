"""Custom operators (namespace `mnemonics_fast`), each with a plain-PyTorch twin in reference.py.

    cosine_linear(x, weight, sigma)            sigma * normalize(x) @ normalize(weight).T, fused fwd + bwd on CUDA
    exemplar_sgd_step_(params, grads, bufs, lr, momentum, weight_decay, clamp_min, clamp_max)
                                               SGD + clamp over a list of tensors in one CUDA launch
    kernels_available()                        are the compiled CUDA kernels loaded?
    backend_info()                             what runs where, and what the extension was built against

CUDA tensors use the compiled kernels of mnemonics_fast._C when it is built and loads; CPU tensors always use the
references. MNEMONICS_FAST_FORCE_REFERENCE=1 (read at import) makes every device use the references. Without the
extension the ops still exist (same schemas) and warn once when first called on a GPU. Details: docs/kernels.md.
"""
from ._extension import backend_info, get_cosine_linear_path, kernels_available, set_cosine_linear_path  # noqa: F401
from .cosine import cosine_linear  # noqa: F401
from .exemplar_sgd import exemplar_sgd_step_  # noqa: F401
from .reference import (  # noqa: F401
    reference_cosine_linear,
    reference_cosine_linear_backward,
    reference_exemplar_sgd_step_,
)

__all__ = ["cosine_linear", "exemplar_sgd_step_", "kernels_available", "backend_info", "set_cosine_linear_path",
           "get_cosine_linear_path", "reference_cosine_linear", "reference_cosine_linear_backward",
           "reference_exemplar_sgd_step_"]
