from .base import Method, PhaseInfo
from .icarl import ICaRL
from .lucir import LUCIR

METHODS = {"lucir": LUCIR, "icarl": ICaRL}


def build_method(cfg) -> Method:
    return METHODS[cfg.name](cfg)


__all__ = ["Method", "PhaseInfo", "LUCIR", "ICaRL", "METHODS", "build_method"]
