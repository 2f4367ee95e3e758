"""The class-incremental network: input normalisation -> backbone -> cosine head that grows phase by phase."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from .cosine import CosineLinear, SplitCosineLinear, grow_head
from .resnet_cifar import resnet32
from .resnet_imagenet import resnet18
from .transfer import apply_weight_transfer

BACKBONES = {"resnet32": resnet32, "resnet18": resnet18}


class NetOutput(NamedTuple):
    features: torch.Tensor  # [B, d], the feature entering the head (LUCIR's less-forget loss uses it)
    logits: torch.Tensor    # [B, C], sigma-scaled cosines
    cos: torch.Tensor       # [B, C], unscaled cosines (margin ranking uses them)


class IncrementalNet(nn.Module):
    """Takes images as floats in [0, 1] pixel space, [B, 3, H, W].

    Normalisation by the dataset's mean/std is the model's first op rather than the loader's, so that real images,
    stored exemplars and mnemonics exemplar *parameters* (which live in [0, 1], clipped there) all enter the same way.
    """

    def __init__(self, arch: str, num_classes: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if arch not in BACKBONES:
            raise ValueError(f"model.arch: unknown backbone {arch!r}; choose one of {sorted(BACKBONES)}")
        self.arch = arch
        self.backbone = BACKBONES[arch]()
        self.head: CosineLinear | SplitCosineLinear = CosineLinear(self.backbone.out_dim, num_classes)
        self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def feature_dim(self) -> int:
        return self.backbone.out_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.input_mean) / self.input_std)

    def forward(self, x: torch.Tensor, return_all: bool = False):
        f = self.features(x)
        if not return_all:
            return self.head(f)
        logits, cos = self.head(f, return_cos=True)
        return NetOutput(f, logits, cos)

    def grow(self, num_new: int, weight_transfer: bool = False) -> None:
        """Enter the next phase: freeze the current rows as old rows, add `num_new` rows (imprint them afterwards)."""
        self.head = grow_head(self.head, num_new)
        if weight_transfer:
            apply_weight_transfer(self.backbone)

    def structure(self) -> dict:
        """What is needed to rebuild an empty model with this state_dict's shapes (for checkpoints)."""
        h = self.head
        split = isinstance(h, SplitCosineLinear)
        return {"arch": self.arch, "num_old": h.num_old if split else 0, "num_new": h.num_new if split else h.num_classes,
                "weight_transfer": any(n.endswith(".scale") for n, _ in self.backbone.named_parameters())}


def build_model(arch: str, mean, std, structure: dict | None = None, num_classes: int | None = None) -> IncrementalNet:
    """A fresh phase-0 model (`num_classes`), or an empty model shaped like `structure` to load a state_dict into."""
    if structure is None:
        return IncrementalNet(arch, num_classes, mean, std)
    first = structure["num_old"] if structure["num_old"] else structure["num_new"]
    net = IncrementalNet(structure["arch"], first, mean, std)
    if structure["num_old"]:
        net.grow(structure["num_new"], weight_transfer=structure["weight_transfer"])
    elif structure["weight_transfer"]:
        apply_weight_transfer(net.backbone)
    return net
