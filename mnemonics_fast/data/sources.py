"""Datasets as plain tensors: small images decoded once into uint8 arrays, large ones (ImageNet) as file lists.

Every source returns a `Dataset` whose labels are the ORIGINAL class ids (index into `class_names`); the trainer
remaps them to positions in the protocol's class order.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .images import DECODE_ERRORS, IMAGE_EXTENSIONS, is_hidden, is_image_name, open_rgb
CIFAR100_MEAN = (0.5071, 0.4866, 0.4409)   # LUCIR's values (SPEC §1)
CIFAR100_STD = (0.2009, 0.1984, 0.2023)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(ValueError):
    """Bad or missing data: the message names the path, class or file at fault."""


@dataclass
class Split:
    labels: torch.Tensor                  # int64 [N], original class ids
    images: torch.Tensor | None = None    # uint8 [N, H, W, 3] for in-memory (resident) datasets
    files: list[str] | None = None        # image paths for file-backed datasets

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    name: str
    class_names: list[str]
    train: Split
    test: Split
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def resident(self) -> bool:
        return self.train.images is not None


def _resize_u8(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of uint8 [N, H, W, 3] to size x size (no-op when already that size)."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    t = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _stats(images_u8: np.ndarray) -> tuple[tuple, tuple]:
    x = images_u8.reshape(-1, 3).astype(np.float64) / 255.0
    return tuple(float(v) for v in x.mean(0)), tuple(float(v) for v in x.std(0))


# ------------------------------------------------------------------ embedded sets (no download, run offline)

def load_digits(image_size: int = 16) -> Dataset:
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes), upscaled and made RGB.

    Split per class: a fixed seeded 75/25 train/test split.
    """
    from sklearn.datasets import load_digits as _load

    d = _load()
    imgs = (d.images * (255.0 / 16.0)).round().astype(np.uint8)           # [N, 8, 8], 0..16 -> 0..255
    imgs = np.repeat(imgs[..., None], 3, axis=3)
    imgs = _resize_u8(imgs, image_size)
    y = d.target.astype(np.int64)
    rng = np.random.RandomState(0)
    test_mask = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test_mask[rng.choice(idx, len(idx) // 4, replace=False)] = True
    mean, std = _stats(imgs[~test_mask])
    return Dataset("digits", [str(c) for c in range(10)],
                   Split(torch.from_numpy(y[~test_mask]), torch.from_numpy(imgs[~test_mask])),
                   Split(torch.from_numpy(y[test_mask]), torch.from_numpy(imgs[test_mask])), mean, std, image_size)


def load_synthetic(num_classes: int = 20, per_class: int = 60, image_size: int = 32, seed: int = 0) -> Dataset:
    """A generated, learnable set: each class is a smooth random colour template; images are shifted, noisy copies."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, 3, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(templates, size=(image_size, image_size), mode="bicubic",
                                                align_corners=False)

    def make(n_per: int) -> Split:
        y = torch.arange(num_classes).repeat_interleave(n_per)
        x = templates[y]
        shift = torch.randint(-3, 4, (len(y), 2), generator=g)
        x = torch.stack([torch.roll(img, (int(s[0]), int(s[1])), dims=(1, 2)) for img, s in zip(x, shift)])
        x = x + 0.25 * torch.randn(x.shape, generator=g)
        u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        return Split(y, u8)

    train, test = make(per_class), make(max(per_class // 3, 2))
    mean, std = _stats(train.images.numpy())
    return Dataset("synthetic", [f"class{c:03d}" for c in range(num_classes)], train, test, mean, std, image_size)


# ------------------------------------------------------------------ CIFAR-100 (torchvision's on-disk format)

def load_cifar100(root: str, download: bool = False) -> Dataset:
    import torchvision

    root_p = Path(root).expanduser()
    try:
        tr = torchvision.datasets.CIFAR100(str(root_p), train=True, download=download)
        te = torchvision.datasets.CIFAR100(str(root_p), train=False, download=download)
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as e:
        raise DatasetError(
            f"CIFAR-100 not found or unreadable under data.root={str(root_p)!r} (expected "
            f"{root_p / 'cifar-100-python'}/train, test, meta in torchvision's format, matching its checksums). Set "
            f"data.download=true to fetch it, or point data.root at it. ({type(e).__name__}: {e})") from None
    split = lambda ds: Split(torch.tensor(ds.targets, dtype=torch.int64), torch.from_numpy(ds.data))  # noqa: E731
    return Dataset("cifar100", list(tr.classes), split(tr), split(te), CIFAR100_MEAN, CIFAR100_STD, 32)


# ------------------------------------------------------------------ ImageFolder trees of small images

def list_image_folder(split_dir: Path, class_names: list[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """Files and labels of `split_dir/<class>/*` (classes sorted, or `class_names` in that order)."""
    if not split_dir.is_dir():
        raise DatasetError(f"image folder {split_dir} does not exist (expected <root>/train/<class>/* and "
                           f"<root>/val/<class>/*)")
    present = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not is_hidden(p.name))
    classes = class_names or present
    if not classes:
        raise DatasetError(f"image folder {split_dir} has no class sub-folders")
    if class_names is not None:
        extra = sorted(set(present) - set(class_names))
        if extra:   # a class only the evaluation has would be dropped without a word
            raise DatasetError(f"image folder {split_dir}: {len(extra)} class folder(s) that train/ does not have: "
                               f"{', '.join(extra[:20])}")
    files, labels, empty, broken = [], [], [], []
    for c, name in enumerate(classes):
        d = split_dir / name
        found = sorted(p for p in d.iterdir() if is_image_name(p.name)) if d.is_dir() else []
        broken += [str(p) for p in found if not p.is_file()]   # e.g. a symbolic link to a missing file
        if not found:
            empty.append(name)
        files += [str(p) for p in found]
        labels += [c] * len(found)
    if empty:
        raise DatasetError(f"image folder {split_dir}: {len(empty)} class folder(s) missing or without images "
                           f"({'/'.join(IMAGE_EXTENSIONS)}): {', '.join(empty[:20])}")
    if broken:
        raise DatasetError(f"image folder {split_dir}: {len(broken)} image entr{'y is' if len(broken) == 1 else 'ies are'}"
                           f" not readable files (broken links?): {', '.join(broken[:10])}")
    return files, labels, classes


def _decode_files(files: list[str], size: int, progress: bool) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    it = files
    if progress:
        from tqdm import tqdm
        it = tqdm(files, desc="decoding images (once; cached)", unit="img", mininterval=1.0, disable=None)
    squashed, example = 0, None
    for i, f in enumerate(it):
        try:
            im = open_rgb(f)
            if im.width != im.height:
                squashed, example = squashed + 1, example or f
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            out[i] = np.asarray(im)
        except DECODE_ERRORS as e:
            raise DatasetError(f"cannot decode image file {f}: {e}") from None
    if squashed:   # the small-image path resizes whole images to size x size (no crop), as CIFAR-like sets need
        warnings.warn(f"{squashed} of {len(files)} images are not square and were resized to {size}x{size} without "
                      f"keeping their aspect ratio (e.g. {example}); for photos use data.loader=torchvision or dali "
                      f"(resize + crop)", stacklevel=2)
    return out


def _cache_key(files: list[str], size: int) -> str:
    h = hashlib.sha256(f"v2:{size}".encode())   # v2: EXIF orientation and 16-bit greyscale (data/images.py)
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def load_image_folder(root: str, image_size: int, cache_dir: str, progress: bool = True) -> Dataset:
    """`root/train/<class>/*` + `root/val/<class>/*`, decoded once into a uint8 cache keyed by the file list."""
    root_p = Path(root).expanduser()
    if not root_p.is_dir():
        raise DatasetError(f"data.root={str(root_p)!r} does not exist")
    train_files, train_y, classes = list_image_folder(root_p / "train")
    val_dir = root_p / "val" if (root_p / "val").is_dir() or not (root_p / "test").is_dir() else root_p / "test"
    val_files, val_y, _ = list_image_folder(val_dir, classes)
    cache = Path(cache_dir).expanduser()
    key = _cache_key(train_files + val_files, image_size)
    cache_file = cache / f"imagefolder_{root_p.name}_{key}.pt"
    blob = None
    if cache_file.is_file():
        try:
            blob = torch.load(cache_file, weights_only=True)
            if tuple(blob["train"].shape) != (len(train_files), image_size, image_size, 3) or \
                    tuple(blob["val"].shape) != (len(val_files), image_size, image_size, 3):
                raise ValueError("its shapes do not match the tree")
        except Exception as e:  # noqa: BLE001 - any unreadable cache is decoded again, never trusted
            warnings.warn(f"data cache {cache_file} is unreadable ({type(e).__name__}: {e}); decoding the tree again",
                          stacklevel=2)
            blob = None
    if blob is not None:
        tr_x, te_x = blob["train"], blob["val"]
    else:
        tr_x = torch.from_numpy(_decode_files(train_files, image_size, progress))
        te_x = torch.from_numpy(_decode_files(val_files, image_size, progress))
        from ..utils.io import atomic_torch_save
        try:
            cache.mkdir(parents=True, exist_ok=True)
            atomic_torch_save({"train": tr_x, "val": te_x}, cache_file)
        except OSError as e:   # the decoded tree is still good: run without the cache rather than lose it
            warnings.warn(f"data.cache_dir={str(cache)!r} cannot be written ({type(e).__name__}: {e}); going on "
                          f"without a cache (the tree is decoded again next run)", stacklevel=2)
    mean, std = _stats(tr_x.numpy())
    train = Split(torch.tensor(train_y, dtype=torch.int64), tr_x, train_files)
    test = Split(torch.tensor(val_y, dtype=torch.int64), te_x, val_files)
    return Dataset(root_p.name, classes, train, test, mean, std, image_size)


def load_dataset(cfg_data, progress: bool = True) -> Dataset:
    """Dispatch on `data.dataset` (see DataConfig)."""
    name = cfg_data.dataset
    if name == "digits":
        return load_digits(cfg_data.image_size)
    if name == "synthetic":
        return load_synthetic(cfg_data.synthetic_classes, cfg_data.synthetic_per_class, cfg_data.image_size)
    if name == "cifar100":
        return load_cifar100(cfg_data.root, cfg_data.download)
    if name == "imagefolder":
        if not cfg_data.root:
            raise DatasetError("data.root is empty: point it at an ImageFolder tree (train/<class>/*, val/<class>/*)")
        if cfg_data.loader in ("dali", "torchvision"):
            # The ImageNet pipeline on any tree: files decoded per batch (random-resized crop / resize + centre
            # crop, ImageNet statistics) instead of the small-image path's decoded in-memory copy.
            from .imagenet import load_imagenet_dataset
            return load_imagenet_dataset(cfg_data, "imagefolder")
        return load_image_folder(cfg_data.root, cfg_data.image_size, cfg_data.cache_dir, progress)
    if name in ("imagenet_subset", "imagenet_subset_sorted", "imagenet1k"):
        from .imagenet import load_imagenet_dataset
        return load_imagenet_dataset(cfg_data, name)
    raise DatasetError(f"data.dataset: unknown dataset {name!r}")
