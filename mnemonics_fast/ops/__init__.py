"""Custom operators. Until the CUDA extension lands these dispatch to the reference twins."""
from .reference import reference_cosine_linear as cosine_linear  # noqa: F401
from .reference import reference_exemplar_sgd_step_ as exemplar_sgd_step_  # noqa: F401
