"""LUCIR (Hou et al., CVPR 2019): CE + adaptive-lambda less-forget + margin ranking (SPEC §3)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Method, PhaseInfo


def less_forget_lambda(num_old: int, num_new: int, base: float) -> float:
    """lambda = lambda_base * sqrt(#old classes / #new classes) (LUCIR's adaptive weight)."""
    if num_old <= 0 or num_new <= 0:
        raise ValueError(f"less_forget_lambda needs num_old, num_new > 0 (got {num_old}, {num_new})")
    return base * math.sqrt(num_old / num_new)


def less_forget_loss(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 - cos(f_cur, f_old), f = the feature entering the head."""
    return (1.0 - F.cosine_similarity(features.float(), old_features.float(), dim=1)).mean()


def margin_ranking_loss(cos: torch.Tensor, targets: torch.Tensor, num_old: int, k: int = 2,
                        margin: float = 0.5) -> torch.Tensor:
    """LUCIR's inter-class separation on UNscaled cosines.

    For each sample whose label is an old class (< num_old), and each of the k highest-scoring new classes:
    max(0, margin - (s_gt - s_new)); mean over all such pairs. Exactly 0 when no old-class sample is present.
    cos: [B, C] with classes 0..num_old-1 old and num_old..C-1 new.
    """
    num_new = cos.shape[1] - num_old
    if num_old <= 0 or num_new <= 0:
        return cos.sum() * 0.0  # keeps the graph (DDP) and is exactly 0
    k = min(k, num_new)
    # Masked rather than indexed (cos[old]) so that no step waits on the GPU to count the old-class samples.
    c = cos.float()
    old = (targets < num_old).float()[:, None]                      # [B, 1]
    gt = c.gather(1, targets[:, None])                               # [B, 1]
    hard = c[:, num_old:].topk(k, dim=1).values                      # [B, k]
    pairs = old.sum() * k
    return (F.relu(margin - (gt - hard)) * old).sum() / pairs.clamp_min(1.0)


class LUCIR(Method):
    name = "lucir"

    def loss(self, out, targets, teacher_out, info: PhaseInfo):
        ce = F.cross_entropy(out.logits.float(), targets)
        if teacher_out is None:  # phase 0
            return ce, {"ce": ce.detach()}
        lam = less_forget_lambda(info.num_old, info.num_new, self.cfg.lambda_base)
        lf = less_forget_loss(out.features, teacher_out.features)
        mr = margin_ranking_loss(out.cos, targets, info.num_old, self.cfg.top_k, self.cfg.margin)
        total = ce + lam * lf + self.cfg.mr_weight * mr
        return total, {"ce": ce.detach(), "lf": lf.detach(), "mr": mr.detach()}
