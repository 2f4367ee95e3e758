"""The ImageNet pipeline end to end through the trainer: file-backed tree -> DALI (CPU mode) or torchvision loader
-> phases with herding (one sharded eval pass per feature set), mnemonics pixel exemplars merged into file batches,
NME and evaluation, checkpoints. On a generated JPEG tree (always), and on the tin100a-32 development set read as an
ImageNet tree with its 32x32 images upscaled (skips when ../shared/data is absent, as in CI)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import overrides, run_trainer
from mnemonics_fast.config import load_config
from mnemonics_fast.data.dali import dali_available

pytestmark = pytest.mark.slow
DALI_OK, DALI_WHY = dali_available()
LOADERS = [pytest.param("dali", marks=pytest.mark.skipif(not DALI_OK, reason=f"DALI unavailable: {DALI_WHY}")),
           "torchvision"]
TIN100 = Path(os.environ.get("MNEMONICS_FAST_DEVDATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _jpeg_tree(root: Path, classes: int = 4, train: int = 10, val: int = 4) -> Path:
    """Classes told apart by colour and stripe direction, photos of varied sizes (40..70 px)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        base = np.array([(c * 67) % 256, (c * 131 + 60) % 256, (c * 29 + 120) % 256], dtype=np.float64)
        for split, n in (("train", train), ("val", val)):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(n):
                w, h = int(rng.integers(40, 71)), int(rng.integers(40, 71))
                yy, xx = np.mgrid[0:h, 0:w]
                stripes = np.sin((xx if c % 2 else yy) / 3.0)[..., None] * 40
                img = np.clip(base + stripes + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:03d}.jpg", quality=90)
    return root


def _cfg(out: Path, root: Path, loader: str, **extra):
    ov = {"data.dataset": "imagefolder", "data.root": str(root), "data.loader": loader, "data.image_size": 32,
          "data.resize": 36, "data.num_workers": 0, "model.arch": "resnet18", "protocol.base_classes": 2,
          "protocol.num_phases": 2, "memory.per_class": 3, "train.epochs": 1, "train.milestones": [1],
          "train.batch_size": 8, "train.eval_batch_size": 8, "run.output_dir": str(out), "run.name": loader,
          "run.device": "cpu", "run.progress": False, "run.tensorboard": False, "run.checkpoint_every": 0, **extra}
    return load_config(None, overrides(base=ov))


@pytest.mark.parametrize("loader", LOADERS)
def test_file_pipeline_end_to_end_with_mnemonics(tmp_path, loader):
    root = _jpeg_tree(tmp_path / "tree")
    run = run_trainer(_cfg(tmp_path / "runs", root, loader, **{
        "mnemonics.enabled": True, "mnemonics.outer_steps": 1, "mnemonics.old_outer_steps": 1,
        "mnemonics.query_batch_size": 4, "mnemonics.storage": "uint8"}))
    assert f"loader {loader}" in run.stdout
    assert run.trainer.file_loader_kind == loader and not run.trainer.ds.resident
    assert len(run.summary["top1"]["cnn"]) == 3                          # phases 0, 1, 2 of 2 + 1 + 1 classes
    for kind in ("cnn", "nme"):
        assert all(0.0 <= a <= 100.0 for a in run.summary["top1"][kind])
    # every seen class has its exemplars, as rounded uint8 pixels (file-backed: pixels live beside the files)
    mem = run.trainer.memory
    assert sorted(mem.pixels) == [0, 1, 2, 3] and all(p.dtype == torch.uint8 and p.shape == (3, 3, 32, 32)
                                                       for p in mem.pixels.values())
    assert (run.run_dir / "checkpoints" / "phase_002.pt").is_file()


def test_both_loaders_learn_the_tree(tmp_path):
    """DALI (CPU) and torchvision decode with different resize filters, so runs are not bit-equal; on this easy tree
    both must learn it (the A/B check the data.loader switch exists for). Phase 0 (2 classes, 8 val images) is
    judged on CNN and NME; later phases only on NME (their CNN after 8 tiny steps is noise)."""
    if not DALI_OK:
        pytest.skip(f"DALI unavailable: {DALI_WHY}")
    root = _jpeg_tree(tmp_path / "tree")
    for loader in ("dali", "torchvision"):
        run = run_trainer(_cfg(tmp_path / "runs", root, loader, **{"train.epochs": 8, "train.milestones": [7]}))
        top1 = run.summary["top1"]
        assert top1["cnn"][0] >= 75.0 and min(top1["nme"]) >= 75.0, (loader, top1)


@pytest.mark.skipif(not (TIN100 / "tin100a-32").exists() and not (TIN100 / "tin100a-32.tar.xz").exists(),
                    reason="the tin100a-32 development set (../shared/data) is not here")
def test_tin100a_read_as_an_imagenet_tree(tmp_path):
    """A few phases of tin100a-32 through the ImageNet file pipeline (torchvision loader, 32x32 upscaled to 64),
    reduced: 6 classes (4 base + 2 phases of 1), the first 40 train images per class."""
    src = TIN100 / "tin100a-32"
    if not src.is_dir():
        import tarfile
        with tarfile.open(TIN100 / "tin100a-32.tar.xz") as t:
            t.extractall(tmp_path / "src", filter="data")
        src = tmp_path / "src" / "tin100a-32"
    root = tmp_path / "tin"
    classes = sorted(p.name for p in (src / "train").iterdir())[:6]
    for split, n in (("train", 40), ("val", 20)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for f in sorted((src / split / c).iterdir())[:n]:
                (root / split / c / f.name).symlink_to(f)
    cfg = _cfg(tmp_path / "runs", root, "torchvision", **{
        "data.image_size": 64, "data.resize": 73, "protocol.base_classes": 4, "memory.per_class": 5,
        "train.epochs": 2, "train.milestones": [1]})
    run = run_trainer(cfg)
    assert len(run.summary["top1"]["cnn"]) == 3 and run.trainer.ds.image_size == 64
    assert run.summary["top1"]["cnn"][0] > 100 / 4      # above chance on the 4 base classes after 2 epochs
