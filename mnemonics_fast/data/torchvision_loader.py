"""torchvision/PIL file loaders with the DALI loaders' interface: `TorchvisionTrainLoader`, `TorchvisionEvalLoader`.

The fallback when DALI is missing, and the A/B reference for it (`data.loader: torchvision`). Same epoch plans as
DALI (`imagenet.train_plan` / `eval_plan`), so both loaders see the same samples in the same batches.
Training: PIL decode -> RandomResizedCrop(S, scale 0.08-1, ratio 3/4-4/3, bilinear) -> horizontal flip p=0.5;
eval: Resize(resize) + CenterCrop(S) (SPEC §1). Workers return uint8 CHW (4x less inter-process traffic than float);
the main process moves the batch to the device and divides by 255 there.
Crop boxes and flips are drawn from a numpy generator seeded by (seed, epoch, rank, position), so augmentation does
not depend on the number of workers and never touches torch's global RNG.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .imagenet import PlannedTrainLoader, eval_plan, eval_steps, split_batch
from .images import DECODE_ERRORS, open_rgb
from .sources import DatasetError


def _open_rgb(path: str):
    """8-bit RGB, decoded as every path decodes (data/images.py); a bad file raises a DatasetError naming it."""
    try:
        return open_rgb(path)
    except DECODE_ERRORS as e:
        raise DatasetError(f"cannot decode image file {path}: {type(e).__name__}: {e} (find every such file before "
                           f"training with MNEMONICS_FAST_IMAGENET_CHECK=decode)") from None


def rrc_params(rng: np.random.Generator, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, drawn from `rng`: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop, ratio clamped to the range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _TrainFiles(Dataset):
    """Item = (position, epoch) -> (uint8 [3,S,S], position)."""

    def __init__(self, files: list[str], image_size: int, seed: int, rank: int):
        self.files, self.size, self.seed, self.rank = files, image_size, int(seed), int(rank)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        import torchvision.transforms.functional as F
        pos, epoch = item
        img = _open_rgb(self.files[pos])
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, self.rank, pos, 0x7476])
        top, left, h, w = rrc_params(rng, img.height, img.width)
        img = F.resized_crop(img, top, left, h, w, [self.size, self.size],
                             interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        if rng.random() < 0.5:
            img = F.hflip(img)
        return F.pil_to_tensor(img), pos


class _EvalFiles(Dataset):
    def __init__(self, files: list[str], image_size: int, resize: int):
        self.files, self.size, self.resize = files, image_size, resize

    def __len__(self):
        return len(self.files)

    def __getitem__(self, pos):
        import torchvision.transforms.functional as F
        img = _open_rgb(self.files[pos])
        img = F.resize(img, self.resize, interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        img = F.center_crop(img, [self.size, self.size])
        return F.pil_to_tensor(img), pos


class _PlanSampler:
    """A batch sampler whose batches are set per epoch (so persistent workers survive across epochs)."""

    def __init__(self):
        self.batches: list[list] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _collate(items):
    xs, pos = zip(*items)
    return torch.stack(xs), torch.tensor(pos, dtype=torch.int64)


def _make_loader(dataset, sampler, num_workers: int, device: torch.device, seed: int):
    kw = dict(batch_sampler=sampler, num_workers=num_workers, collate_fn=_collate,
              pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(int(seed)))
    if num_workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=4)
    return DataLoader(dataset, **kw)


def _to_device_float(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device, non_blocking=True).float().div_(255.0)


class TorchvisionTrainLoader(PlannedTrainLoader):
    """Same interface and batches as `dali.DaliTrainLoader`: (x float32 [b,3,S,S] in [0,1], y int64 [b]) on device."""

    def __init__(self, files: list[str], labels: torch.Tensor, extra, batch_size: int, device: torch.device,
                 rank: int, world: int, seed: int, image_size: int = 224, num_workers: int = 4,
                 extra_augment: str = "crop_flip"):
        self._init_plan(files, labels, extra, batch_size, device, rank, world, seed, image_size, extra_augment)
        self._sampler = _PlanSampler()
        self._loader = _make_loader(_TrainFiles(files, image_size, seed, rank), self._sampler, num_workers,
                                    self.device, seed)

    def __iter__(self):
        parts = [split_batch(b, self.num_files) for b in self.plan()]
        self._sampler.batches = [[(int(p), self.epoch) for p in f] for f, _ in parts if len(f)]
        decoded = iter(self._loader) if self._sampler.batches else iter(())
        for files, rows in parts:
            xs, ys = [], []
            if len(files):
                x, pos = next(decoded)
                xs.append(_to_device_float(x, self.device))
                ys.append(self.labels[pos.to(self.device)])
            if len(rows):
                xe, ye = self.extra.take(rows)
                xs.append(xe)
                ys.append(ye)
            yield (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys))

    def close(self):
        self._loader = None


class TorchvisionEvalLoader:
    """Same interface as `dali.DaliEvalLoader`: yields (x, y, pos) on device; each file once across ranks;
    batch_size is per rank."""

    def __init__(self, files: list[str], labels: torch.Tensor, batch_size: int, device: torch.device, rank: int,
                 world: int, image_size: int = 224, resize: int = 256, num_workers: int = 4):
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.device = torch.device(device)
        self.num_files = len(files)
        self.labels = labels.long().to(self.device)
        self.batch_size, self.rank, self.world, self.image_size = batch_size, rank, world, image_size
        self._sampler = _PlanSampler()
        self._sampler.batches = [b.tolist() for b in eval_plan(self.num_files, batch_size, rank, world) if len(b)]
        self._loader = _make_loader(_EvalFiles(files, image_size, resize), self._sampler, num_workers,
                                    self.device, 0)

    def __len__(self) -> int:
        return eval_steps(self.num_files, self.batch_size, self.world)

    def __iter__(self):
        batches = eval_plan(self.num_files, self.batch_size, self.rank, self.world)
        decoded = iter(self._loader) if self._sampler.batches else iter(())
        S = self.image_size
        for b in batches:
            if len(b):
                x, pos = next(decoded)
                x, pos = _to_device_float(x, self.device), pos.to(self.device)
            else:
                x, pos = torch.empty(0, 3, S, S, device=self.device), torch.empty(0, dtype=torch.int64,
                                                                                    device=self.device)
            yield x, self.labels[pos], pos

    def close(self):
        self._loader = None
