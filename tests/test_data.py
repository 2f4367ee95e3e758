"""Data: dataset sources, the resident loader's augmentation and its DDP sharding."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mnemonics_fast.config import DataConfig
from mnemonics_fast.data import DatasetError, load_dataset
from mnemonics_fast.data.resident import (ResidentEvalLoader, ResidentTrainLoader, random_crop_flip,
                                          to_device_nchw)
from mnemonics_fast.data.sources import load_image_folder

CPU = torch.device("cpu")


# ------------------------------------------------------------------ augmentation
def _all_views(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Every crop (and its mirror) of the zero-padded image x [C, S, S]: [(2p+1)^2 * 2, C, S, S]."""
    s = x.shape[-1]
    xp = F.pad(x, (pad, pad, pad, pad))
    views = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = xp[:, dy:dy + s, dx:dx + s]
            views += [crop, crop.flip(2)]
    return torch.stack(views)


@pytest.mark.parametrize("pad,size", [(4, 8), (4, 32), (2, 5)])
def test_random_crop_flip_outputs_valid_views(pad, size):
    g = torch.Generator().manual_seed(size)
    x = torch.rand(200, 3, size, size, generator=g) + 0.01      # strictly positive: zero padding is recognisable
    out = random_crop_flip(x, pad, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    kinds = set()
    for i in range(len(x)):
        views = _all_views(x[i], pad)
        match = torch.nonzero((views == out[i]).flatten(1).all(1)).flatten()
        assert len(match) >= 1, f"sample {i} is not a crop/flip of its padded input"
        kinds.add(int(match[0]))
    # The draws cover flips and non-flips and many offsets.
    assert any(k % 2 == 0 for k in kinds) and any(k % 2 == 1 for k in kinds)
    assert len({k // 2 for k in kinds}) > (2 * pad + 1) ** 2 // 2
    # Mostly not the identity (centre crop, no flip: 1 view in 2 * (2p+1)^2).
    same = (out == x).flatten(1).all(1)
    assert int(same.sum()) < len(x) // 4


def test_random_crop_flip_seeded():
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = random_crop_flip(x, 4, torch.Generator().manual_seed(3))
    b = random_crop_flip(x, 4, torch.Generator().manual_seed(3))
    c = random_crop_flip(x, 4, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------ resident loaders and DDP sharding
def _identifiable_images(n: int, s: int = 4) -> torch.Tensor:
    """uint8 [n, 3, s, s] whose first pixel encodes the image's index (n <= 256 * 256)."""
    g = torch.Generator().manual_seed(n)
    imgs = torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=g)
    imgs[:, 0, 0, 0] = torch.arange(n) % 256
    imgs[:, 1, 0, 0] = torch.arange(n) // 256
    return imgs


def _ids(x: torch.Tensor) -> list[int]:
    u8 = (x * 255).round().long()
    return (u8[:, 0, 0, 0] + 256 * u8[:, 1, 0, 0]).tolist()


def _batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(_ids(x), y.tolist()) for x, y in loader]


@pytest.mark.parametrize("n,extra_n,bs", [(100, 0, 16), (37, 10, 8), (64, 0, 16), (21, 0, 10)])
def test_ddp_ranks_partition_each_global_batch(n, extra_n, bs):
    images = _identifiable_images(n + extra_n)
    idx = torch.randperm(n + extra_n, generator=torch.Generator().manual_seed(1))[:n]
    labels = idx % 7
    extra = None
    if extra_n:
        ex_ids = torch.arange(n + extra_n)[~torch.isin(torch.arange(n + extra_n), idx)]
        extra = (images[ex_ids].float() / 255, ex_ids % 7)

    def make(rank, world):
        return ResidentTrainLoader(images, idx, labels, extra, bs, CPU, rank=rank, world=world, seed=5, augment=False)

    single = make(0, 1)
    ranks = [make(0, 2), make(1, 2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)            # every rank runs the same number of steps
    for epoch in (0, 1):
        glob = _batches(single, epoch)
        per_rank = [_batches(r, epoch) for r in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(glob)
        seen = []
        for step, (ids, ys) in enumerate(glob):
            a, b = per_rank[0][step][0], per_rank[1][step][0]
            assert not set(a) & set(b)                               # disjoint
            assert sorted(a + b) == sorted(ids)                      # together: exactly the global batch
            assert len(a) >= 2 and len(b) >= 2                       # BatchNorm needs > 1 sample per rank
            seen += ids
            # Labels travel with their images.
            for r in range(2):
                for i, y in zip(*per_rank[r][step]):
                    assert y == i % 7
        assert len(seen) == len(set(seen))                          # each image at most once per epoch
        dropped = single.n - len(seen)
        assert 0 <= dropped < bs


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_augment_each_sample_as_one_process_would(world):
    """Crops and flips follow the sample, not the rank's slot: with K ranks every sample of a global batch gets the
    augmented view a 1-process run gives it (no two ranks share a draw; the old per-rank stream gave rank r's i-th
    sample and rank r''s i-th sample the same crop and flip)."""
    g = torch.Generator().manual_seed(3)
    n, extra_n, bs = 40, 9, 12
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    idx, labels = torch.arange(n), torch.arange(n)
    extra = (torch.rand(extra_n, 3, 8, 8, generator=g), torch.arange(n, n + extra_n))

    def views(rank, w):
        loader = ResidentTrainLoader(images, idx, labels, extra, bs, CPU, rank=rank, world=w, seed=7, pad=2)
        loader.set_epoch(1)
        return {int(y): x for xb, yb in loader for x, y in zip(xb, yb)}

    single = views(0, 1)
    seen = {}
    for r in range(world):
        seen.update(views(r, world))
    assert set(seen) == set(single)
    for k, x in seen.items():
        assert torch.equal(x, single[k]), f"sample {k} augmented differently on its rank"


def test_epochs_reshuffle_deterministically():
    images = _identifiable_images(50)
    idx = torch.arange(50)

    def make():
        return ResidentTrainLoader(images, idx, idx % 3, None, 10, CPU, seed=3, augment=True)

    a, b = make(), make()
    e0, e1 = _batches(a, 0), _batches(a, 1)
    assert e0 != e1                                                   # a new order each epoch
    assert _batches(b, 1) == e1 and _batches(b, 0) == e0             # the same order for the same (seed, epoch)
    # Augmented pixels too.
    a.set_epoch(2)
    b.set_epoch(2)
    for (xa, _), (xb, _) in zip(a, b):
        assert torch.equal(xa, xb)
    other = ResidentTrainLoader(images, idx, idx % 3, None, 10, CPU, seed=4, augment=True)
    assert _batches(other, 0) != e0


def test_train_loader_drops_a_too_small_last_batch():
    images = _identifiable_images(33)
    idx = torch.arange(33)
    assert len(ResidentTrainLoader(images, idx, idx, None, 16, CPU, world=1)) == 2     # 16 + 16, the single one dropped
    assert len(ResidentTrainLoader(images, idx, idx, None, 15, CPU, world=1)) == 3     # 15 + 15 + 3
    assert len(ResidentTrainLoader(images, idx, idx, None, 15, CPU, world=2)) == 2     # 3 < 2 per rank
    with pytest.raises(ValueError):
        ResidentTrainLoader(images, idx[:0], idx[:0], None, 16, CPU)


def test_eval_loader_ranks_partition_positions():
    images = _identifiable_images(23)
    idx = torch.tensor([5, 3, 22, 0, 7, 9, 11, 13, 2, 1, 4])
    labels = idx * 10
    seen = {}
    for rank in range(2):
        for x, y, pos in ResidentEvalLoader(images, idx, labels, 4, CPU, rank=rank, world=2):
            for i, yy, p in zip(_ids(x), y.tolist(), pos.tolist()):
                assert p not in seen
                seen[p] = (i, yy)
    assert sorted(seen) == list(range(len(idx)))
    for p, (i, yy) in seen.items():
        assert i == int(idx[p]) and yy == int(labels[p])
    # Flip gives the mirrored image, in order.
    plain = next(iter(ResidentEvalLoader(images, idx, labels, 11, CPU)))[0]
    flipped = next(iter(ResidentEvalLoader(images, idx, labels, 11, CPU, flip=True)))[0]
    assert torch.equal(flipped, plain.flip(3))
    assert torch.equal(plain, images[idx].float() / 255)


def test_to_device_nchw():
    x = torch.randint(0, 256, (3, 5, 6, 3), dtype=torch.uint8)
    y = to_device_nchw(x, CPU)
    assert y.shape == (3, 3, 5, 6) and torch.equal(y[1, 2], x[1, :, :, 2])


# ------------------------------------------------------------------ sources
def test_digits_dataset():
    ds = load_dataset(DataConfig(dataset="digits", image_size=16))
    assert ds.num_classes == 10 and ds.resident and ds.image_size == 16
    assert ds.train.images.dtype == torch.uint8 and ds.train.images.shape[1:] == (16, 16, 3)
    assert len(ds.train) + len(ds.test) == 1797
    assert set(ds.train.labels.tolist()) == set(range(10)) == set(ds.test.labels.tolist())
    assert ds.train.images.float().std() > 10
    # Deterministic split.
    again = load_dataset(DataConfig(dataset="digits", image_size=16))
    assert torch.equal(again.train.labels, ds.train.labels) and torch.equal(again.test.images, ds.test.images)
    assert all(0 < m < 1 for m in ds.mean) and all(0 < s < 1 for s in ds.std)


def test_synthetic_dataset():
    ds = load_dataset(DataConfig(dataset="synthetic", synthetic_classes=5, synthetic_per_class=12, image_size=8))
    assert ds.num_classes == 5 and len(ds.train) == 60 and len(ds.test) == 20
    assert ds.train.images.shape == (60, 8, 8, 3)
    assert torch.bincount(ds.train.labels).tolist() == [12] * 5
    assert len(torch.unique(ds.train.images.flatten(1), dim=0)) == 60        # no duplicate images


def _write_tree(root, classes: dict[str, int], size=8, split="train", seed=0):
    from PIL import Image
    rng = np.random.RandomState(seed)
    for name, n in classes.items():
        d = root / split / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_image_folder_loads_and_caches(tmp_path):
    root = tmp_path / "tree"
    _write_tree(root, {"b": 3, "a": 4})
    _write_tree(root, {"b": 2, "a": 1}, split="val", seed=1)
    cache = tmp_path / "cache"
    ds = load_image_folder(str(root), 8, str(cache), progress=False)
    assert ds.class_names == ["a", "b"]                                # sorted
    assert ds.train.labels.tolist() == [0] * 4 + [1] * 3 and ds.test.labels.tolist() == [0, 1, 1]
    from PIL import Image
    first = np.array(Image.open(root / "train" / "a" / "0.png").convert("RGB"))
    assert torch.equal(ds.train.images[0], torch.from_numpy(first))
    assert len(list(cache.glob("*.pt"))) == 1
    again = load_image_folder(str(root), 8, str(cache), progress=False)   # from the cache
    assert torch.equal(again.train.images, ds.train.images)


def test_image_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="nowhere"):
        load_image_folder(str(tmp_path / "nowhere"), 8, str(tmp_path / "c"), progress=False)
    root = tmp_path / "tree"
    _write_tree(root, {"a": 2, "b": 2})
    _write_tree(root, {"a": 1}, split="val")
    (root / "val" / "b").mkdir()
    with pytest.raises(DatasetError, match=r"without images \(.*\): b"):
        load_image_folder(str(root), 8, str(tmp_path / "c"), progress=False)
    with pytest.raises(DatasetError, match="data.root"):
        load_dataset(DataConfig(dataset="imagefolder", root=""))


def test_cifar_missing_root_names_path_and_download(tmp_path):
    missing = tmp_path / "no_cifar_here"
    with pytest.raises(DatasetError) as e:
        load_dataset(DataConfig(dataset="cifar100", root=str(missing)))
    assert str(missing) in str(e.value) and "data.download" in str(e.value)
