"""ImageNet-scale data (SPEC §1): class lists, the on-disk tree, and the sharded epoch plans of the file loaders.

Three parts, top to bottom:
  1. Class lists. Each variant is a list of wnids shipped in `data/wnids/` with its sha256 pinned here. Labels are
     the index in that (sorted) list, i.e. ImageFolder order; the protocol's class-order shuffle
     (`protocol.class_order`, seed 1993) is applied on top of these labels by the trainer.
  2. The tree. `load_imagenet_tree` lists `root/train/<wnid>/*` and `root/val/<wnid>/*` (or a flat ILSVRC val folder
     with a label file), validates it before any training starts and raises ONE `DatasetError` naming every problem.
  3. Epoch plans. `train_plan` / `eval_plan` decide which sample goes to which rank in which step. Both file loaders
     (DALI and torchvision) take their order from here, so the two see identical batches for a given (seed, epoch),
     and exemplar pixel tensors (`extra`) are shuffled jointly with the files, as if they were part of the dataset.
  4. Loader factory: `make_train_loader(kind, ...)`, `make_eval_loader(kind, ...)`, `resolve_loader_kind`.
"""
from __future__ import annotations

import csv
import hashlib
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .images import IMAGE_EXTENSIONS, is_hidden, is_image_name, open_rgb
from .sources import IMAGENET_MEAN, IMAGENET_STD, Dataset, DatasetError, Split

# ======================================================================================================================
# 1. Class lists
# ======================================================================================================================

WNID_DIR = Path(__file__).resolve().parent / "wnids"

# Provenance (docs/imagenet.md): imagenet1k_wnids.txt is byte-identical to timm 1.0.31's
# timm/data/_info/imagenet_synsets.txt (the 1000 ILSVRC-2012 class folders, sorted); the other two are derived from
# it by the code in `_derive_variant` and a test re-derives them.
WNID_FILES = {
    "imagenet1k": ("imagenet1k_wnids.txt", "70002b0ff5de60a3a17a82dbfcff291931f96225ddf941ad2e182fc39e183d15"),
    # SPEC §1 ImageNet-Subset: np.random.seed(1993); np.random.choice(sorted 1000, 100, replace=False), stored sorted.
    "imagenet_subset": ("imagenet_subset_seed1993.txt",
                        "bbfc1ad00af3270b8a99afd7d8542caf909c1d52820b6dbad6a50b9b20d7e340"),
    # The *other* "ImageNet-100" (PODNet/DER): the first 100 wnids in sorted order. A different class set.
    "imagenet_subset_sorted": ("imagenet100_sorted_first100.txt",
                               "b332dbd149be58bd06982a583959d80f93d796938a70c0db0146a9e4fc9d661f"),
}
VARIANTS = ("imagenet_subset", "imagenet_subset_sorted", "imagenet1k", "imagefolder")
NUM_CLASSES = {"imagenet_subset": 100, "imagenet_subset_sorted": 100, "imagenet1k": 1000}

# IMAGENET_MEAN / IMAGENET_STD (SPEC §1, from .sources): the model normalises its own input with them; the loaders
# output [0, 1] pixels. DatasetError (from .sources) is the one data error type; messages here list every problem.
ENV_ROOT = "MNEMONICS_FAST_IMAGENET"
ENV_CHECK = "MNEMONICS_FAST_IMAGENET_CHECK"  # none | size | magic (default) | decode


def _problems_message(head: str, problems: Sequence[str], limit: int = 20) -> str:
    lines = [f"{head}: {len(problems)} problem(s)"]
    lines += [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def read_wnid_file(path: str | os.PathLike, expected_sha256: str | None = None) -> list[str]:
    data = Path(path).read_bytes()
    if expected_sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != expected_sha256:
            raise DatasetError(f"{path}: sha256 {got} != pinned {expected_sha256}; the shipped class list was altered")
    wnids = data.decode().split()
    if len(set(wnids)) != len(wnids):
        raise DatasetError(f"{path}: duplicate wnids")
    return wnids


def wnids_for(variant: str) -> list[str]:
    """The class list of a named variant (sha256-checked), in label order (sorted)."""
    if variant not in WNID_FILES:
        raise DatasetError(f"data.variant: {variant!r} has no shipped class list; choose one of {sorted(WNID_FILES)} "
                           f"(or 'imagefolder', whose classes are the folders under root/train)")
    name, sha = WNID_FILES[variant]
    return read_wnid_file(WNID_DIR / name, sha)


def _derive_variant(variant: str, sorted_1000: Sequence[str]) -> list[str]:
    """How the 100-class lists were made from the sorted 1000 (a test re-runs this against the shipped files)."""
    if variant == "imagenet_subset":
        # SPEC §1 spells it `np.random.seed(1993); np.random.choice(...)`; a private RandomState(1993) draws the same
        # numbers without touching the global RNG (the test checks both spellings).
        chosen = np.random.RandomState(1993).choice(list(sorted_1000), 100, replace=False)
        return sorted(chosen.tolist())
    if variant == "imagenet_subset_sorted":
        return list(sorted_1000)[:100]
    if variant == "imagenet1k":
        return list(sorted_1000)
    raise DatasetError(f"no derivation for {variant!r}")


# ======================================================================================================================
# 2. The tree
# ======================================================================================================================

# JPEG SOI, PNG signature (ILSVRC has a PNG named .JPEG: fine), BMP; WebP is RIFF....WEBP (checked below)
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")
CHECKS = ("none", "size", "magic", "decode")


@dataclass
class ImageTree:
    train_files: list[str]
    train_labels: torch.Tensor  # int64 [N], index into class_names
    val_files: list[str]
    val_labels: torch.Tensor
    class_names: list[str]      # wnids in label order

    def __iter__(self):  # so that `train_files, train_labels, val_files, val_labels, names = load_imagenet_tree(...)`
        return iter((self.train_files, self.train_labels, self.val_files, self.val_labels, self.class_names))


def resolve_imagenet_root(root: str | os.PathLike | None) -> Path:
    """The data root: the config's `data.root` (or its dotted override `data.root=...`) when set, else the
    environment variable MNEMONICS_FAST_IMAGENET. `~` and `$VARS` are expanded."""
    src = "data.root"
    if root is None or str(root).strip() == "":
        root, src = os.environ.get(ENV_ROOT, ""), f"${ENV_ROOT}"
        if not root.strip():
            raise DatasetError(f"no ImageNet root: set data.root in the config, pass data.root=/path on the command "
                               f"line, or export {ENV_ROOT}=/path (a folder holding train/ and val/)")
    path = Path(os.path.expandvars(os.path.expanduser(str(root))))
    if not path.is_dir():
        raise DatasetError(f"ImageNet root {str(path)!r} (from {src}) is not a directory")
    return path


def _list_images(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        # not is_dir() rather than is_file(): a link to a missing file stays in the list, so the file check (or
        # the decode) names it instead of the image vanishing from its class
        names = [e.name for e in it if is_image_name(e.name) and not e.is_dir()]
    names.sort()
    return [str(folder / n) for n in names]


def _check_file(path: str, check: str) -> str | None:
    """None if fine, else a short reason. 'size': non-empty; 'magic': + JPEG/PNG signature; 'decode': + full decode."""
    try:
        if check == "size":
            return None if os.path.getsize(path) > 0 else "empty file"
        with open(path, "rb") as f:
            head = f.read(12)
        if not head:
            return "empty file"
        if not (head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")):
            return f"not a JPEG/PNG/BMP/WebP (starts with {head[:4].hex()})"
        if check == "decode":
            open_rgb(path)
        return None
    except Exception as e:  # unreadable (permissions, I/O error) or undecodable
        return f"unreadable: {type(e).__name__}: {e}"


def _read_flat_val_labels(val_dir: Path, root: Path) -> dict[str, str] | None:
    """Flat ILSVRC val layout: filename -> wnid, from LOC_val_solution.csv (Kaggle: ImageId,PredictionString whose
    first token is the wnid) or val_labels.txt (lines '<filename> <wnid>', whitespace or comma separated)."""
    for cand in (root / "LOC_val_solution.csv", val_dir / "LOC_val_solution.csv"):
        if cand.is_file():
            out = {}
            with open(cand, newline="") as f:
                for row in csv.DictReader(f):
                    out[row["ImageId"]] = row["PredictionString"].split()[0]
            return out
    for cand in (root / "val_labels.txt", val_dir / "val_labels.txt"):
        if cand.is_file():
            out = {}
            for line in cand.read_text().splitlines():
                parts = line.replace(",", " ").split()
                if len(parts) >= 2:
                    out[Path(parts[0]).stem] = parts[1]
            return out
    return None


def load_imagenet_tree(root: str | os.PathLike | None, variant: str = "imagenet_subset", check: str = "magic",
                       num_threads: int = 16) -> ImageTree:
    """List and validate an ImageNet-style tree. Returns (train_files, train_labels, val_files, val_labels,
    class_names) (an `ImageTree`, which unpacks like that tuple).

    Layout: `root/train/<wnid>/*.{JPEG,jpg,png}`; val either `root/val/<wnid>/*` (ImageFolder) or flat
    `root/val/*.JPEG` with `LOC_val_solution.csv` / `val_labels.txt` (see `_read_flat_val_labels`). The root may hold
    more classes than the variant (e.g. a full ImageNet-1k tree for `imagenet_subset`): only the variant's are read.
    Labels = index in the variant's sorted wnid list; `imagefolder` uses the sorted folder names of root/train.
    Files are sorted by name within a class, classes in label order, so the lists are deterministic.

    `check`: 'none' | 'size' (non-empty) | 'magic' (default: + JPEG/PNG signature, 8 bytes per file, threaded) |
    'decode' (+ full PIL decode; slow). Every problem (missing wnid folder, empty class, bad file) is collected and
    raised together as ONE `DatasetError` before training starts.
    """
    if variant not in VARIANTS:
        raise DatasetError(f"data.variant: unknown {variant!r}; choose one of {list(VARIANTS)}")
    if check not in CHECKS:
        raise DatasetError(f"data check: unknown {check!r}; choose one of {list(CHECKS)}")
    root = resolve_imagenet_root(root)
    train_dir, val_dir = root / "train", root / "val"
    if variant == "imagefolder" and not val_dir.is_dir() and (root / "test").is_dir():
        val_dir = root / "test"   # as the in-memory ImageFolder path: train/ + val/ or train/ + test/
    problems: list[str] = []
    for d in (train_dir, val_dir):
        if not d.is_dir():
            problems.append(f"missing folder {d}")
    if problems:
        raise DatasetError(_problems_message(f"ImageNet tree {root} ({variant})", problems))

    if variant == "imagefolder":
        with os.scandir(train_dir) as it:
            wnids = sorted(e.name for e in it if e.is_dir() and not is_hidden(e.name))
        if not wnids:
            raise DatasetError(f"ImageNet tree {root}: no class folders under {train_dir}")
    else:
        wnids = wnids_for(variant)

    def list_split(split_dir: Path, split: str) -> tuple[list[str], list[int]]:
        files, labels = [], []
        for label, w in enumerate(wnids):
            d = split_dir / w
            if not d.is_dir():
                problems.append(f"{split}: missing class folder {w} ({d})")
                continue
            fs = _list_images(d)
            if not fs:
                problems.append(f"{split}: empty class folder {w} ({d}) holds no {'/'.join(IMAGE_EXTENSIONS)} file")
            files += fs
            labels += [label] * len(fs)
        return files, labels

    train_files, train_labels = list_split(train_dir, "train")
    flat = None if any((val_dir / w).is_dir() for w in wnids[:50]) else _read_flat_val_labels(val_dir, root)
    if flat is None:
        val_files, val_labels = list_split(val_dir, "val")
        if variant == "imagefolder":   # (a named variant may sit in a bigger tree: its other folders are not errors)
            with os.scandir(val_dir) as it:
                extra = sorted(set(e.name for e in it if e.is_dir() and not is_hidden(e.name)) - set(wnids))
            if extra:
                problems.append(f"val: {len(extra)} class folder(s) that train/ does not have, whose images would be "
                                f"left out: {', '.join(extra[:20])}")
    else:  # flat ILSVRC val folder + label file
        index = {w: i for i, w in enumerate(wnids)}
        by_class: dict[int, list[str]] = {}
        unlisted = []
        for f in _list_images(val_dir):
            w = flat.get(Path(f).stem)
            if w is None:
                unlisted.append(f)
            elif w in index:
                by_class.setdefault(index[w], []).append(f)
        if unlisted:
            problems.append(f"val: {len(unlisted)} image(s) in flat folder {val_dir} have no label in its label file "
                            f"(e.g. {unlisted[0]})")
        val_files, val_labels = [], []
        for label, w in enumerate(wnids):
            fs = by_class.get(label, [])
            if not fs:
                problems.append(f"val: no image of class {w} in flat folder {val_dir} (per its label file)")
            val_files += fs
            val_labels += [label] * len(fs)

    if check != "none":
        all_files = train_files + val_files
        with ThreadPoolExecutor(max(1, num_threads)) as pool:  # I/O bound: threads overlap the opens
            reasons = list(pool.map(lambda p: _check_file(p, check), all_files, chunksize=256))
        problems += [f"corrupt file {p}: {r}" for p, r in zip(all_files, reasons) if r is not None]
    if problems:
        raise DatasetError(_problems_message(f"ImageNet tree {root} ({variant}, check={check})", problems))
    return ImageTree(train_files, torch.tensor(train_labels, dtype=torch.int64), val_files,
                     torch.tensor(val_labels, dtype=torch.int64), list(wnids))


def load_imagenet_dataset(cfg_data, variant: str) -> Dataset:
    """`data.dataset: imagenet_subset | imagenet_subset_sorted | imagenet1k` as a file-backed `sources.Dataset`
    (labels = index in the variant's sorted wnid list; the trainer applies the class order). The root is
    `data.root`, else $MNEMONICS_FAST_IMAGENET; the file check is $MNEMONICS_FAST_IMAGENET_CHECK (default 'magic')."""
    check = os.environ.get(ENV_CHECK, "magic").strip() or "magic"
    t = load_imagenet_tree(cfg_data.root, variant, check=check)
    return Dataset(variant, t.class_names, Split(t.train_labels, None, t.train_files),
                   Split(t.val_labels, None, t.val_files), IMAGENET_MEAN, IMAGENET_STD, cfg_data.image_size)


# ======================================================================================================================
# 3. Epoch plans (shared by the DALI and torchvision file loaders)
# ======================================================================================================================

def per_rank_batch(batch_size: int, world: int) -> int:
    b = batch_size // world
    if b < 1:
        raise ValueError(f"batch size {batch_size} (global) is smaller than the world size {world}")
    return b


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, epoch): identical on every rank, resumable."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x6D6E656D]).permutation(n)


def train_plan(num_files: int, num_extra: int, batch_size: int, rank: int, world: int, seed: int,
               epoch: int) -> list[np.ndarray]:
    """This rank's batches for one epoch, as arrays of joint indices: [0, num_files) are files, [num_files,
    num_files + num_extra) are rows of the exemplar tensor.

    Files and exemplars are permuted jointly from (seed, epoch), as one dataset (the LUCIR code appends exemplars to
    the training set and shuffles; this does the same without copying any pixels). The permutation is padded with
    its own first entries to a multiple of `world` (at most world-1 repeats per epoch; none when world == 1), then
    rank r takes every world-th entry from r on (DistributedSampler's layout) and cuts it into batches of
    batch_size // world. The last batch may be smaller (the same size on every rank, so DDP never waits on a rank that
    has run out); it is dropped when it would hold a single sample per rank (BatchNorm statistics of one image, and a
    full-lr step on it), as the resident loader does: then at most `world` samples miss that epoch, different ones
    each epoch.
    """
    total = num_files + num_extra
    b = per_rank_batch(batch_size, world)
    steps = train_steps(num_files, num_extra, batch_size, world)
    if steps == 0:
        return []
    perm = epoch_permutation(total, seed, epoch)
    padded = math.ceil(total / world) * world
    if padded > total:
        perm = np.concatenate([perm, perm[: padded - total]])
    mine = perm[rank::world]
    return [mine[i * b: (i + 1) * b] for i in range(steps)]


def train_steps(num_files: int, num_extra: int, batch_size: int, world: int) -> int:
    """Steps per epoch: ceil(ceil(total / world) / b), less one when the last (partial) step would hold a single
    sample per rank (unless it is the only step)."""
    total = num_files + num_extra
    per_rank = math.ceil(total / world)
    b = per_rank_batch(batch_size, world)
    steps = math.ceil(per_rank / b)
    last = per_rank - (steps - 1) * b
    if steps > 1 and last < 2 and last < b:  # b == 1: every step holds one sample anyway
        steps -= 1
    return steps


def eval_plan(num_files: int, batch_size: int, rank: int, world: int) -> list[np.ndarray]:
    """This rank's eval batches: positions into the file list, in order, each file exactly once across ranks, no
    padding. Rank r takes the r-th of `world` contiguous, near-equal chunks (sizes differ by at most one) in batches of
    `batch_size` (PER RANK, as the resident eval loader: eval holds no gradients, so each GPU takes a full batch).
    Every rank gets the same number of batches: where a shorter chunk would come out one batch short, its last batch
    is split in two (a batch is empty only when a rank has fewer files than batches)."""
    b = max(1, int(batch_size))
    steps = eval_steps(num_files, batch_size, world)
    chunk = np.array_split(np.arange(num_files, dtype=np.int64), world)[rank]
    batches = [chunk[i: i + b] for i in range(0, len(chunk), b)]
    while len(batches) < steps:
        if batches and len(batches[-1]) >= 2:
            last = batches.pop()
            h = (len(last) + 1) // 2
            batches += [last[:h], last[h:]]
        else:
            batches.append(chunk[:0])
    return batches


def eval_steps(num_files: int, batch_size: int, world: int) -> int:
    return math.ceil(math.ceil(num_files / world) / max(1, int(batch_size)))


# ----------------------------------------------------------------------------------------------------------------------
# Exemplar pixels merged into training batches
# ----------------------------------------------------------------------------------------------------------------------

EXTRA_AUGMENTS = ("crop_flip", "flip", "none")


def _check_extra(extra, image_size: int):
    if extra is None or len(extra[1]) == 0:
        return None
    x, y = extra
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[0] != y.shape[0]:
        raise ValueError(f"extra: expected pixels [M,3,S,S] and labels [M], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype not in (torch.uint8, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"extra: pixels must be uint8 (0..255) or float in [0, 1], got {x.dtype}")
    return x, y.long()


class ExtraSampler:
    """Gathers the exemplar rows a batch needs, moves only those to the device, and augments them there.

    The loader keeps a *reference* to `extra` (no copy): memory stays at whatever the caller holds, e.g. for
    20 x 1000 exemplars of 3x224x224: 3.0 GB as uint8, 6.0 GB as bf16, 12.0 GB as float32. Per step only
    k = (rows in this batch) are gathered: k x 3 x S x S floats (about 0.6 MB per row at 224).
    Augmentation (`augment`): 'crop_flip' (default) = RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3, bilinear, via one
    batched `roi_align`) + horizontal flip p=0.5; 'flip' = flip only; 'none'. Randomness comes from a generator seeded
    by (seed, rank), advanced every step, so runs are reproducible.
    """

    def __init__(self, extra, image_size: int, device: torch.device, seed: int, rank: int, augment: str = "crop_flip"):
        if augment not in EXTRA_AUGMENTS:
            raise ValueError(f"extra augment: unknown {augment!r}; choose one of {list(EXTRA_AUGMENTS)}")
        self.x, self.y = extra
        self.size = image_size
        self.device = device
        self.augment = augment
        self.gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + 7919 * int(rank) + 17) & 0x7FFFFFFFFFFFFFFF)
        self._y_dev = self.y.to(device)

    def __len__(self) -> int:
        return self.x.shape[0]

    def take(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
        x = self.x.index_select(0, idx.to(self.x.device))
        x = x.to(self.device, non_blocking=True)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        y = self._y_dev.index_select(0, idx.to(self.device))
        k = x.shape[0]
        if k == 0 or self.augment == "none":
            return self._resize_if_needed(x), y
        if self.augment == "crop_flip":
            x = self._random_resized_crop(x)
        else:
            x = self._resize_if_needed(x)
        flip = (torch.rand(k, generator=self.gen) < 0.5).to(self.device)
        x = torch.where(flip.view(k, 1, 1, 1), x.flip(-1), x)
        return x, y

    def _resize_if_needed(self, x):
        if x.shape[-1] == self.size and x.shape[-2] == self.size:
            return x
        return torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                                               align_corners=False)

    def _random_resized_crop(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's RandomResizedCrop box sampling, vectorised (10 tries per row, first valid one; fallback the
        whole image clamped to the ratio range), then all crops resized to SxS in one `roi_align` call."""
        from torchvision.ops import roi_align
        k, _, h, w = x.shape
        tries = 10
        area = h * w * torch.empty(k, tries).uniform_(0.08, 1.0, generator=self.gen)
        log_r = torch.empty(k, tries).uniform_(math.log(3 / 4), math.log(4 / 3), generator=self.gen)
        r = torch.exp(log_r)
        cw = torch.sqrt(area * r).round()
        ch = torch.sqrt(area / r).round()
        ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((k,), -1))
        sel = first.clamp(min=0).unsqueeze(1)
        cw = cw.gather(1, sel).squeeze(1)
        ch = ch.gather(1, sel).squeeze(1)
        # fallback (no valid try): central crop with the ratio clamped to [3/4, 4/3]; for square inputs: whole image
        fb = first < 0
        if fb.any():
            ratio = w / h
            fw, fh = (w, round(w / (4 / 3))) if ratio > 4 / 3 else ((round(h * 3 / 4), h) if ratio < 3 / 4 else (w, h))
            cw = torch.where(fb, torch.tensor(float(fw)), cw)
            ch = torch.where(fb, torch.tensor(float(fh)), ch)
        u = torch.rand(k, 2, generator=self.gen)
        x0 = torch.floor(u[:, 0] * (w - cw + 1)).clamp(max=w - cw)
        y0 = torch.floor(u[:, 1] * (h - ch + 1)).clamp(max=h - ch)
        x0 = torch.where(fb, ((w - cw) / 2).floor(), x0)
        y0 = torch.where(fb, ((h - ch) / 2).floor(), y0)
        boxes = torch.stack([torch.arange(k, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], 1).to(x.device, x.dtype)
        # aligned=True: box edges are pixel edges, so a full-image box with S == H reproduces the image exactly
        return roi_align(x, boxes, output_size=(self.size, self.size), spatial_scale=1.0, sampling_ratio=2,
                         aligned=True)


def split_batch(batch: np.ndarray, num_files: int) -> tuple[np.ndarray, np.ndarray]:
    """Joint indices -> (file positions, exemplar rows)."""
    is_file = batch < num_files
    return batch[is_file], batch[~is_file] - num_files


# ======================================================================================================================
# 4. Loader factory: `data.loader: dali | torchvision`
# ======================================================================================================================

LOADER_KINDS = ("dali", "torchvision")
_fallback_reported = False


def resolve_loader_kind(kind: str, fallback: bool = True) -> str:
    """'dali' when DALI imports, else (with `fallback`) print ONE message per process and return 'torchvision'."""
    global _fallback_reported
    if kind not in LOADER_KINDS:
        raise ValueError(f"data.loader: unknown {kind!r}; choose one of {list(LOADER_KINDS)}")
    if kind == "torchvision":
        return kind
    from .dali import dali_available
    ok, why = dali_available()
    if ok:
        return kind
    if not fallback:
        raise RuntimeError(f"data.loader=dali but {why}")
    if not _fallback_reported:
        print(f"[mnemonics_fast] data.loader=dali requested but {why}; using the torchvision loader instead",
              file=sys.stderr, flush=True)
        _fallback_reported = True
    return "torchvision"


def make_train_loader(kind: str, files, labels, extra, batch_size, device, rank, world, seed, image_size=224,
                      num_workers=4, **kwargs):
    """`kind` in {'dali', 'torchvision'}; falls back to torchvision (one message) when DALI is missing."""
    kind = resolve_loader_kind(kind)
    if kind == "dali":
        from .dali import DaliTrainLoader as cls
    else:
        from .torchvision_loader import TorchvisionTrainLoader as cls
    return cls(files, labels, extra, batch_size, device, rank, world, seed, image_size=image_size,
               num_workers=num_workers, **kwargs)


def make_eval_loader(kind: str, files, labels, batch_size, device, rank, world, image_size=224, resize=256,
                     num_workers=4, **kwargs):
    kind = resolve_loader_kind(kind)
    if kind == "dali":
        from .dali import DaliEvalLoader as cls
    else:
        from .torchvision_loader import TorchvisionEvalLoader as cls
    return cls(files, labels, batch_size, device, rank, world, image_size=image_size, resize=resize,
               num_workers=num_workers, **kwargs)


class PlannedTrainLoader:
    """What the DALI and torchvision training loaders share: the (seed, epoch) plan over files + exemplar rows, the
    step count, and the exemplar sampler. Subclasses decode the file part of each planned batch."""

    def _init_plan(self, files, labels: torch.Tensor, extra, batch_size: int, device, rank: int, world: int,
                   seed: int, image_size: int, extra_augment: str) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.device = torch.device(device)
        self.num_files = len(files)
        self.labels = labels.long().to(self.device)
        extra = _check_extra(extra, image_size)
        self.extra = None if extra is None else ExtraSampler(extra, image_size, self.device, seed, rank, extra_augment)
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return train_steps(self.num_files, len(self.extra) if self.extra else 0, self.batch_size, self.world)

    def plan(self) -> list[np.ndarray]:
        return train_plan(self.num_files, len(self.extra) if self.extra else 0, self.batch_size, self.rank,
                          self.world, self.seed, self.epoch)
