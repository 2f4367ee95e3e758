"""Nearest-mean-of-exemplars classification (iCaRL)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def class_mean(features: torch.Tensor, flipped_features: torch.Tensor | None = None) -> torch.Tensor:
    """normalize(mean of normalize(f)); with a second (flipped) view, both views' normalised features are averaged,
    as the released code does."""
    f = F.normalize(features.float(), dim=1)
    if flipped_features is not None:
        f = torch.cat([f, F.normalize(flipped_features.float(), dim=1)])
    return F.normalize(f.mean(0), dim=0)


def nme_predict(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Index of the nearest class mean (Euclidean on normalised features == largest cosine). means: [C, d]."""
    return (F.normalize(features.float(), dim=1) @ means.T).argmax(1)
