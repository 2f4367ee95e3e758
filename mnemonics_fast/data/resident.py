"""The small-image fast path (airbench-style): the whole split as uint8 on the training device, augmentation batched
there, phase subsets and exemplar sets as index tensors. Nothing is rebuilt per phase but an index vector.

Loaders yield float images in [0, 1] (the model normalises). DDP: every rank draws the same global permutation
(seeded by seed and epoch) and takes a strided share of each global batch, so 1 and K processes see the same global
batches and every rank runs the same number of steps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_device_nchw(images_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> uint8 [N, 3, H, W] on `device` (done once per split)."""
    return images_u8.to(device).permute(0, 3, 1, 2).contiguous()


def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator | None) -> torch.Tensor:
    """Batched CIFAR augmentation on float [B, C, S, S]: zero-pad `pad`, random SxS crop, random horizontal flip.

    Zero padding in [0, 1] pixel space is black, as torchvision's RandomCrop(padding=4) on the raw image.
    """
    b = x.shape[0]
    off = torch.randint(0, 2 * pad + 1, (2, b), generator=generator, device="cpu").to(x.device)
    flip = (torch.rand(b, generator=generator, device="cpu") < 0.5).to(x.device)
    return crop_flip(x, pad, off, flip)


def crop_flip(x: torch.Tensor, pad: int, off: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Crop at offsets off[0] (rows), off[1] (cols) in [0, 2*pad] of the zero-padded images, then flip where `flip`.
    Two gathers, no per-sample Python loop."""
    b, c, s, _ = x.shape
    dev = x.device
    xp = F.pad(x, (pad, pad, pad, pad))
    ar = torch.arange(s, device=dev)
    rows = (off[0][:, None] + ar)[:, None, :, None].expand(b, c, s, s + 2 * pad)
    xp = xp.gather(2, rows)
    cols = off[1][:, None] + ar
    cols = torch.where(flip[:, None], cols.flip(1), cols)   # a flipped crop = reversed column index
    return xp.gather(3, cols[:, None, None, :].expand(b, c, s, s))


class ResidentTrainLoader:
    """Batches of (x float [b, 3, S, S] in [0, 1], y int64) from resident uint8 images plus optional pixel exemplars.

    images: uint8 [N, 3, S, S] on the device (the whole split); indices: which of them this phase trains on;
    labels: remapped labels of `indices`; extra: (pixels float [M, 3, S, S] in [0, 1], labels [M]) appended as if
    they were more images (mnemonics exemplars).
    """

    def __init__(self, images: torch.Tensor, indices: torch.Tensor, labels: torch.Tensor,
                 extra: tuple[torch.Tensor, torch.Tensor] | None, batch_size: int, device: torch.device,
                 rank: int = 0, world: int = 1, seed: int = 0, augment: bool = True, pad: int = 4,
                 drop_last: bool = False):
        self.images, self.device = images, device
        self.indices = indices.to(device)
        self.labels = labels.to(device)
        self.extra = None if extra is None or len(extra[1]) == 0 else (extra[0].to(device), extra[1].to(device))
        self.n_real = len(self.indices)
        self.n = self.n_real + (0 if self.extra is None else len(self.extra[1]))
        if self.n == 0:
            raise ValueError("training set of this phase is empty")
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.seed, self.augment, self.pad = seed, augment, pad
        self.epoch = 0
        # Drop a last global batch too small to give every rank >= 2 samples (BatchNorm needs > 1 per rank).
        full, rest = divmod(self.n, batch_size)
        self.steps = full + (1 if rest >= 2 * world and not (drop_last and full > 0) else 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def _epoch_plan(self):
        """Everything random about one epoch, drawn on the CPU (so CPU and GPU runs draw the same numbers) and sent
        to the device in one copy: this rank's sample order, with each step's real images first and exemplar pixels
        after (order inside a batch is irrelevant to SGD), the per-step split counts, crop offsets and flips. The loop
        then only slices device tensors with Python ints: no step waits on the GPU."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        order, counts, whole = [], [], []
        for s in range(self.steps):
            batch = perm[s * self.batch_size:(s + 1) * self.batch_size]
            whole += [batch[batch < self.n_real], batch[batch >= self.n_real]]   # the 1-process order
            pos = batch[self.rank::self.world]
            real = pos[pos < self.n_real]
            order += [real, pos[pos >= self.n_real]]
            counts.append((len(real), len(pos)))
        order = torch.cat(order) if order else torch.zeros(0, dtype=torch.long)
        whole = torch.cat(whole) if whole else torch.zeros(0, dtype=torch.long)
        # Crops and flips are drawn for the whole global epoch, in a 1-process run's order, and each sample takes the
        # draw of its place there: every rank draws the same numbers, a sample gets the augmentation it would get in
        # one process, and no two ranks share a draw. (Drawn per rank, rank r's i-th sample and rank r''s i-th
        # sample got the same crop and flip: K ranks, K copies of every draw.)
        off = torch.randint(0, 2 * self.pad + 1, (2, len(whole)), generator=g)
        flip = torch.rand(len(whole), generator=g) < 0.5
        if self.world > 1:
            place = torch.empty(self.n, dtype=torch.long)
            place[whole] = torch.arange(len(whole))
            off, flip = off[:, place[order]], flip[place[order]]
        dev = lambda t: t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" \
            else t  # noqa: E731
        return dev(order), dev(off), dev(flip), counts

    def __iter__(self):
        order, off, flip, counts = self._epoch_plan()
        start = 0
        for n_real, n in counts:
            sl = slice(start, start + n)
            real = order[start:start + n_real]
            x = self.images[self.indices[real]].float().div_(255)
            y = self.labels[real]
            if n > n_real:
                extra = order[start + n_real:start + n] - self.n_real
                x = torch.cat([x, self.extra[0][extra].float()])
                y = torch.cat([y, self.extra[1][extra]])
            if self.augment:
                x = crop_flip(x, self.pad, off[:, sl], flip[sl])
            start += n
            yield x, y


class ResidentEvalLoader:
    """(x, y, pos) over `indices` in order, no augmentation; rank r gets positions r, r+world, ... (each once)."""

    def __init__(self, images: torch.Tensor, indices: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 device: torch.device, rank: int = 0, world: int = 1, flip: bool = False):
        self.images, self.device, self.flip = images, device, flip
        self.indices, self.labels = indices.to(device), labels.to(device)
        self.pos = torch.arange(len(indices), device=device)[rank::world]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.pos) / self.batch_size)

    def __iter__(self):
        for s in range(len(self)):
            p = self.pos[s * self.batch_size:(s + 1) * self.batch_size]
            x = self.images[self.indices[p]].float().div_(255)
            if self.flip:
                x = x.flip(3)
            yield x, self.labels[p], p
