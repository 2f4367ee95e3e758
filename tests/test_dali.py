"""The ImageNet file loaders (DALI on CPU, torchvision) on a tiny JPEG tree: labels, sharding, transforms, exemplars.

Every test is parametrised over both loaders; the DALI ones skip (with the reason) when nvidia.dali does not import.
Images: 6 classes x 7 JPEGs of sizes 40x30 .. 76x60, each a unique base colour (a 4-level RGB grid, 85 levels apart)
plus a +-12-level ramp, so the mean colour of any crop identifies the source image (to within ~0.05 of [0,1] scale,
grid spacing 0.33) while eval geometry (crop position, flips) still shows up against torchvision.
"""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from mnemonics_fast.data import imagenet
from mnemonics_fast.data.dali import dali_available
from mnemonics_fast.data.torchvision_loader import TorchvisionEvalLoader, TorchvisionTrainLoader

DALI_OK, DALI_WHY = dali_available()
needs_dali = pytest.mark.skipif(not DALI_OK, reason=f"DALI loader not testable here: {DALI_WHY}")
# "dali_gpu": the same pipeline with "mixed" (nvJPEG) decoding and outputs on the GPU; runs on the GPU machine only
# (bench/device_dali.sh), where DALI is shipped in chunks.
needs_dali_gpu = pytest.mark.skipif(not (DALI_OK and torch.cuda.is_available()),
                                    reason=f"DALI mixed decoding needs DALI and a GPU: {DALI_WHY or 'no CUDA device'}")
LOADERS = [pytest.param("dali", marks=needs_dali), pytest.param("dali_gpu", marks=needs_dali_gpu), "torchvision"]
S, RESIZE, CLASSES, PER_CLASS = 32, 36, 6, 7
GRID = np.array(list(itertools.product((20, 95, 170, 235), repeat=3)), dtype=np.float64)  # 64 colours


def _image(base: np.ndarray, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = np.stack([xx / (w - 1), yy / (h - 1), (xx + yy) / (w + h - 2)], -1) * 24 - 12
    return np.clip(base + ramp, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imnet")
    files, labels, colours = [], [], []
    k = 0
    for c in range(CLASSES):
        d = root / "train" / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(PER_CLASS):
            w, h = 40 + 6 * i, 30 + 5 * i
            base = GRID[(k * 37) % 64]  # spread consecutive images over the grid
            p = d / f"{i:03d}.jpg"
            Image.fromarray(_image(base, w, h)).save(p, quality=95)
            files.append(str(p)), labels.append(c), colours.append(base / 255)
            k += 1
    return files, torch.tensor(labels), np.array(colours)


def _extra(m: int = 5):
    cols = np.array([[0.5, 0.05, 0.6], [0.05, 0.5, 0.45], [0.6, 0.6, 0.05], [0.3, 0.3, 0.3], [0.8, 0.45, 0.3]])[:m]
    x = torch.tensor(cols, dtype=torch.float32).view(m, 3, 1, 1).expand(m, 3, S, S).contiguous()
    return x, torch.arange(100, 100 + m), cols


def _identify(x: torch.Tensor, palette: np.ndarray) -> np.ndarray:
    means = x.float().mean((2, 3)).cpu().numpy()
    d = ((means[:, None, :] - palette[None]) ** 2).sum(-1)
    assert np.sqrt(d.min(1)).max() < 0.1, "a sample's colour matches no source image"
    return d.argmin(1)


def _device(kind):
    return torch.device("cuda") if kind == "dali_gpu" else torch.device("cpu")


def train_loader(kind, files, labels, extra, batch, rank, world, seed=0, workers=0):
    cls = TorchvisionTrainLoader
    if kind.startswith("dali"):
        from mnemonics_fast.data.dali import DaliTrainLoader as cls
    return cls(files, labels, extra, batch, _device(kind), rank, world, seed, image_size=S, num_workers=workers)


def eval_loader(kind, files, labels, batch, rank, world, workers=0):
    cls = TorchvisionEvalLoader
    if kind.startswith("dali"):
        from mnemonics_fast.data.dali import DaliEvalLoader as cls
    return cls(files, labels, batch, _device(kind), rank, world, image_size=S, resize=RESIZE,
               num_workers=workers)


@pytest.mark.parametrize("kind", LOADERS)
def test_train_two_shards_cover_every_sample_and_exemplar(kind, tree):
    files, labels, colours = tree
    xe, ye, ecols = _extra()
    palette = np.concatenate([colours, ecols])
    all_labels = np.concatenate([labels.numpy(), ye.numpy()])
    world, batch = 2, 8  # 42 files + 5 exemplars = 47 -> padded to 48, 24 per rank, steps of 4
    loaders = [train_loader(kind, files, labels, (xe, ye), batch, r, world, seed=3) for r in range(world)]
    for ep in (0, 1):
        seen, shapes = Counter(), []
        for r, ld in enumerate(loaders):
            ld.set_epoch(ep)
            steps = 0
            sizes = []
            for x, y in ld:
                assert x.device.type == _device(kind).type and y.device.type == _device(kind).type
                x, y = x.cpu(), y.cpu()
                assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, S, S)
                assert 0.0 <= x.min() and x.max() <= 1.0
                ids = _identify(x, palette)
                np.testing.assert_array_equal(y.numpy(), all_labels[ids])  # label = the label of the source image
                seen.update(ids.tolist())
                sizes.append(len(y))
                steps += 1
            assert steps == len(ld)
            shapes.append(sizes)
        assert shapes[0] == shapes[1], "ranks must run the same number of steps with the same batch sizes"
        total = len(files) + len(ye)
        assert set(seen) == set(range(total)), "every file and every exemplar appears in the epoch"
        padding = sum(seen.values()) - total
        assert padding == (-total) % world, "only the documented pad-to-a-multiple-of-world repeats"
    assert [len(y) for _, y in loaders[0]] == [4] * 6


@pytest.mark.parametrize("kind", LOADERS)
def test_train_order_depends_on_seed_and_epoch_only(kind, tree):
    files, labels, _ = tree
    ld = train_loader(kind, files, labels, None, 8, 0, 1, seed=5)
    ld.set_epoch(2)
    a = torch.cat([y.cpu() for _, y in ld])
    ld.set_epoch(3)
    b = torch.cat([y.cpu() for _, y in ld])
    ld.set_epoch(2)
    for i, _ in enumerate(ld):  # leave an epoch early: the next one must still be complete and in order
        if i == 1:
            break
    c = torch.cat([y.cpu() for _, y in ld])
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert len(a) == len(files)
    # The plan is loader-independent: both loaders yield the same labels in the same order.
    tv = train_loader("torchvision", files, labels, None, 8, 0, 1, seed=5)
    tv.set_epoch(2)
    assert torch.equal(torch.cat([y for _, y in tv]), a)


@pytest.mark.parametrize("kind", LOADERS)
def test_eval_each_file_exactly_once_across_two_shards(kind, tree):
    files, labels, colours = tree
    world, batch = 2, 5  # eval batch is per rank: 21 files per rank in batches of 5 -> 5 batches each
    got, counts = [], []
    for r in range(world):
        ld = eval_loader(kind, files, labels, batch, r, world)
        n = 0
        for x, y, pos in ld:
            x, y, pos = x.cpu(), y.cpu(), pos.cpu()
            assert x.shape[1:] == (3, S, S) and x.dtype == torch.float32 and pos.dtype == torch.int64
            assert torch.equal(y, labels[pos])
            np.testing.assert_array_equal(_identify(x, colours), pos.numpy())  # the pixels are the file at `pos`
            got.append(pos)
            n += 1
        assert n == len(ld)
        counts.append(n)
    assert counts[0] == counts[1]
    assert torch.equal(torch.sort(torch.cat(got)).values, torch.arange(len(files)))


@pytest.mark.parametrize("kind,tol", [pytest.param("dali", 0.005, marks=needs_dali),
                                      pytest.param("dali_gpu", 0.01, marks=needs_dali_gpu)])
def test_dali_eval_matches_torchvision_eval(kind, tol, tree):
    """Resize(36) + CenterCrop(32): DALI's linear antialiased resize vs PIL's bilinear, libjpeg-turbo in both.
    Measured on these images: mean |diff| 0.0005 (max 0.0008 per image, 2 grey levels per pixel at most). Tolerance
    0.005 per image in [0,1] scale, tighter than the 0.02 expected on natural photos (sharper edges make the two
    resamplers differ more); a horizontal flip of these ramps would be >= 0.017, a 1-level offset 0.004. nvJPEG
    ("mixed", GPU) decodes with its own IDCT and chroma upsampling, so it gets 0.01 (under a flip's 0.017)."""
    files, labels, _ = tree
    outs = {}
    for k in (kind, "torchvision"):
        xs, ps = zip(*[(x.cpu(), p.cpu()) for x, _, p in eval_loader(k, files, labels, 16, 0, 1)])
        outs[k] = torch.cat(xs)[torch.argsort(torch.cat(ps))]
    diff = (outs[kind] - outs["torchvision"]).abs().mean((1, 2, 3))
    print(f"{kind} vs torchvision eval: mean |diff| per image: max {diff.max():.5f} mean {diff.mean():.5f}")
    assert diff.max() < tol, diff


@pytest.mark.parametrize("kind", LOADERS)
def test_loaders_with_workers_and_uint8_exemplars(kind, tree):
    """num_workers > 0 (DataLoader processes / DALI threads) and exemplars stored as uint8."""
    files, labels, colours = tree
    xe, ye, ecols = _extra(3)
    xe8 = (xe * 255).round().to(torch.uint8)
    palette = np.concatenate([colours, np.round(ecols * 255) / 255])
    ld = train_loader(kind, files[:14], labels[:14], (xe8, ye), 6, 0, 1, seed=1, workers=2)
    ids = np.concatenate([_identify(x.cpu(), palette) for x, _ in ld])
    assert sorted(ids.tolist()) == list(range(14)) + [42, 43, 44]


def test_factory_falls_back_with_one_message(monkeypatch, capsys, tree):
    import mnemonics_fast.data.dali as dali_mod
    files, labels, _ = tree
    monkeypatch.setattr(dali_mod, "dali_available", lambda: (False, "NVIDIA DALI is not importable (test)"))
    monkeypatch.setattr(imagenet, "_fallback_reported", False)
    a = imagenet.make_train_loader("dali", files, labels, None, 8, torch.device("cpu"), 0, 1, 0, image_size=S,
                                   num_workers=0)
    b = imagenet.make_eval_loader("dali", files, labels, 8, torch.device("cpu"), 0, 1, image_size=S, resize=RESIZE,
                                  num_workers=0)
    assert isinstance(a, TorchvisionTrainLoader) and isinstance(b, TorchvisionEvalLoader)
    err = capsys.readouterr().err
    assert err.count("data.loader=dali requested but NVIDIA DALI is not importable") == 1
    with pytest.raises(RuntimeError, match="not importable"):
        imagenet.resolve_loader_kind("dali", fallback=False)
    with pytest.raises(ValueError, match="data.loader"):
        imagenet.resolve_loader_kind("pil")


@pytest.mark.parametrize("kind", LOADERS)
def test_a_truncated_jpeg_ends_the_epoch_with_a_dataset_error(kind, tree, tmp_path):
    """A file that passes the default 'magic' check but does not decode: the torchvision loader names it; DALI cannot
    say which file it was, so its error says how to find it."""
    from mnemonics_fast.data.sources import DatasetError
    files, labels, _ = tree
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(open(files[3], "rb").read()[:300])
    files = files[:3] + [str(bad)] + files[4:8]
    loader = eval_loader(kind, files, labels[:8], 4, 0, 1)
    with pytest.raises(DatasetError) as e:
        list(loader)
    msg = str(e.value)
    assert (str(bad) in msg) if kind == "torchvision" else ("MNEMONICS_FAST_IMAGENET_CHECK=decode" in msg)
