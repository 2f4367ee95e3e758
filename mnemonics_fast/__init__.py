"""mnemonics_fast: Mnemonics Training (Liu et al., CVPR 2020) on LUCIR, fast and faithful.

Layers, bottom to top (nothing imports upward):
    ops (custom CUDA ops + their plain-PyTorch reference twins)
    data -> models -> exemplars -> methods (LUCIR, iCaRL, mnemonics) -> trainer -> train (CLI)
"""

__version__ = "0.1.0"
