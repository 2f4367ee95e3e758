"""The exemplar memory: per class, a ranking of training-set indices (herding order or random), and - once
mnemonics has optimised them - the exemplars' pixels.

Memory is counted in exemplars (images): growing = `per_class` per seen class; fixed = `total` split evenly over the
seen classes, old classes trimmed to the top of their stored ranking. Pixel exemplars stored as uint8 cost the same
bytes as the real images they replace (3*H*W each); stored as float32 they cost 4x that (reported in metrics).
"""
from __future__ import annotations

import torch


class ExemplarMemory:
    def __init__(self):
        self.ranking: dict[int, torch.Tensor] = {}   # class -> LongTensor of train-split indices (selection order)
        self.pixels: dict[int, torch.Tensor] = {}    # class -> [m, 3, S, S] float in [0,1] or uint8 (mnemonics)

    @property
    def classes(self) -> list[int]:
        return sorted(self.ranking)

    def __len__(self) -> int:
        return sum(len(self.ranking[c]) if c not in self.pixels else len(self.pixels[c]) for c in self.ranking)

    def set_class(self, c: int, ranking: torch.Tensor) -> None:
        self.ranking[c] = ranking.detach().to("cpu", torch.long)
        self.pixels.pop(c, None)

    def trim(self, m: int) -> None:
        """Keep the top-m of every class's ranking (fixed memory); pixel exemplars follow the same order."""
        for c in self.ranking:
            self.ranking[c] = self.ranking[c][:m]
            if c in self.pixels:
                self.pixels[c] = self.pixels[c][:m]

    def index_exemplars(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train-split indices, labels) of the classes whose exemplars are real images (no pixels stored)."""
        cs = [c for c in self.classes if c not in self.pixels]
        if not cs:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        idx = torch.cat([self.ranking[c] for c in cs])
        lab = torch.cat([torch.full((len(self.ranking[c]),), c, dtype=torch.long) for c in cs])
        return idx, lab

    def pixel_exemplars(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(pixels float [M, 3, S, S] in [0,1], labels) of the classes with stored pixels, or None."""
        cs = [c for c in self.classes if c in self.pixels]
        if not cs:
            return None
        px = torch.cat([self.pixels[c].float() / 255.0 if self.pixels[c].dtype == torch.uint8 else self.pixels[c]
                        for c in cs])
        lab = torch.cat([torch.full((len(self.pixels[c]),), c, dtype=torch.long) for c in cs])
        return px, lab

    def nbytes(self, image_bytes: int) -> int:
        """Memory footprint: index exemplars count as stored images (uint8), pixel exemplars as what they are."""
        total = 0
        for c in self.classes:
            if c in self.pixels:
                total += self.pixels[c].numel() * self.pixels[c].element_size()
            else:
                total += len(self.ranking[c]) * image_bytes
        return total

    def state_dict(self) -> dict:
        return {"ranking": dict(self.ranking), "pixels": {c: p.cpu() for c, p in self.pixels.items()}}

    def load_state_dict(self, state: dict) -> None:
        # Rankings index CPU label tensors and pixels are staged per phase: both live on the CPU, whatever the
        # checkpoint's map_location was.
        self.ranking = {int(c): r.cpu() for c, r in state["ranking"].items()}
        self.pixels = {int(c): p.cpu() for c, p in state["pixels"].items()}
