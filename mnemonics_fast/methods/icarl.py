"""iCaRL-style baseline on the cosine model: CE + knowledge distillation on the old-class logits (SPEC §3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, PhaseInfo


def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, num_old: int, temperature: float = 2.0) -> torch.Tensor:
    """Per-sample KL(teacher || student) on the old-class logits at temperature T, mean over the batch, times T^2
    (the released iCaRL+mnemonics code's scaling, which keeps gradient sizes independent of T)."""
    t = temperature
    log_p = F.log_softmax(logits[:, :num_old].float() / t, dim=1)
    q = F.softmax(teacher_logits[:, :num_old].float() / t, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * t * t


class ICaRL(Method):
    name = "icarl"

    def loss(self, out, targets, teacher_out, info: PhaseInfo):
        ce = F.cross_entropy(out.logits.float(), targets)
        if teacher_out is None:
            return ce, {"ce": ce.detach()}
        kd = kd_loss(out.logits, teacher_out.logits, info.num_old, self.cfg.kd_temperature)
        return ce + self.cfg.kd_weight * kd, {"ce": ce.detach(), "kd": kd.detach()}
