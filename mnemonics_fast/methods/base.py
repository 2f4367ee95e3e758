"""A method is the loss of the model level; it plugs into the trainer as a small class."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PhaseInfo:
    phase: int
    num_old: int   # classes 0..num_old-1 are old (frozen head rows)
    num_new: int   # classes num_old..num_old+num_new-1 are this phase's


class Method:
    name = "base"

    def __init__(self, cfg):
        self.cfg = cfg  # MethodConfig

    def loss(self, out, targets: torch.Tensor, teacher_out, info: PhaseInfo) -> tuple[torch.Tensor, dict]:
        """out/teacher_out: NetOutput of the current / frozen previous-phase model (None in phase 0)."""
        raise NotImplementedError
