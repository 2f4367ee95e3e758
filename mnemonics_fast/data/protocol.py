"""The class-incremental protocol (SPEC §1): class order, phases, memory budget."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def class_order(num_classes: int, seed: int = 1993) -> list[int]:
    """The class order of LUCIR/iCaRL/mnemonics: `RandomState(seed).shuffle(arange(C))`.

    Identical to `np.random.seed(1993); np.random.shuffle(...)`. Labels are remapped to positions in this list.
    The class-order seed is independent of the training seed.
    """
    order = np.arange(num_classes)
    np.random.RandomState(seed).shuffle(order)
    return order.tolist()


@dataclass(frozen=True)
class Phases:
    """Phase 0 holds `base` classes, then `num_phases` equal phases. Classes are in *remapped* label space."""
    num_classes: int
    base: int
    num_phases: int

    def __post_init__(self):
        if not 0 < self.base <= self.num_classes:
            raise ValueError(f"protocol.base_classes={self.base} must be in 1..{self.num_classes}")
        rest = self.num_classes - self.base
        if self.num_phases < 0 or (self.num_phases == 0 and rest) or (self.num_phases and rest % self.num_phases):
            raise ValueError(f"protocol.num_phases={self.num_phases} must split the {rest} non-base classes evenly")

    @property
    def per_phase(self) -> int:
        return (self.num_classes - self.base) // self.num_phases if self.num_phases else 0

    def __len__(self) -> int:  # number of phases including phase 0 (= number of evaluations)
        return self.num_phases + 1

    def classes_up_to(self, phase: int) -> int:
        """Number of classes seen after `phase` (they are labels 0..n-1)."""
        return self.base + phase * self.per_phase

    def new_classes(self, phase: int) -> range:
        lo = 0 if phase == 0 else self.classes_up_to(phase - 1)
        return range(lo, self.classes_up_to(phase))


def exemplars_per_class(memory: str, num_seen: int, per_class: int = 20, total: int = 2000) -> int:
    """'growing': `per_class` for every seen class (LUCIR/paper default); 'fixed': `total` split evenly."""
    if memory == "growing":
        return per_class
    if memory == "fixed":
        return total // num_seen
    raise ValueError(f"memory.kind: unknown {memory!r}; choose 'growing' or 'fixed'")
