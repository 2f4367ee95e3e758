"""Exemplar selection: iCaRL herding (as the iCaRL/LUCIR/mnemonics code does it) and seeded random selection."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def herding(features: torch.Tensor, m: int, max_iter: int = 1000) -> torch.Tensor:
    """Herding ranking of one class (SPEC §4). features: [n, d] eval-mode features; returns LongTensor [<= m].

    Features are L2-normalised here; mu is their mean. w starts at mu; each step takes i = argmax_j <w, f_j> over ALL
    samples (already-picked ones included, as the reference code does), appends i if it is new, and always updates
    w <- w + mu - f_i. Stops when m distinct samples are ranked or after `max_iter` steps. The order is the ranking
    (fixed memory trims by it).
    """
    if features.dim() != 2:
        raise ValueError(f"herding expects features [n, d], got shape {tuple(features.shape)}")
    f = F.normalize(features.double(), dim=1)
    n = f.shape[0]
    m = min(m, n)
    mu = f.mean(0)
    w = mu.clone()
    picked: list[int] = []
    seen = torch.zeros(n, dtype=torch.bool, device=f.device)
    it = 0
    while len(picked) < m and it < max_iter:
        i = int(torch.argmax(f @ w))
        if not seen[i]:
            seen[i] = True
            picked.append(i)
        w = w + mu - f[i]
        it += 1
    return torch.tensor(picked, dtype=torch.long)


def random_selection(n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """m distinct indices out of n, uniformly without replacement (seeded by `generator`)."""
    return torch.randperm(n, generator=generator)[: min(m, n)]
