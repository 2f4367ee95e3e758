"""One image file reads the same on every path (resident cache, torchvision file loader, tree check), and a tree's
problems are named, not dropped: EXIF orientation, 16-bit greyscale, extensions and hidden entries, classes only
val/ has, broken links, truncated files, unreadable or unwritable caches, the eval resize of small images."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mnemonics_fast.config import ConfigError, DataConfig, load_config
from mnemonics_fast.data.images import eval_resize, open_rgb
from mnemonics_fast.data.imagenet import load_imagenet_tree
from mnemonics_fast.data.sources import DatasetError, load_image_folder
from mnemonics_fast.data.torchvision_loader import TorchvisionEvalLoader
from mnemonics_fast.train import _one_line


def _png(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)


def _tree(root, classes=("a", "b"), n=2, size=8, seed=0):
    rng = np.random.RandomState(seed)
    for split in ("train", "val"):
        for c in classes:
            for i in range(n):
                _png(root / split / c / f"{i}.png", rng.randint(0, 256, (size, size, 3), dtype=np.uint8))


def _sideways_jpeg(path):
    """Left half red, right half blue, stored with EXIF Orientation 6 (display rotated 90 degrees clockwise)."""
    a = np.zeros((16, 16, 3), np.uint8)
    a[:, :8] = (255, 0, 0)
    a[:, 8:] = (0, 0, 255)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=95, exif=exif)


def test_open_rgb_applies_exif_and_scales_16_bit(tmp_path):
    _sideways_jpeg(tmp_path / "s.jpg")
    rot = np.asarray(open_rgb(str(tmp_path / "s.jpg"))).astype(int)
    # rotated clockwise: the left (red) half is now on top, the blue half at the bottom
    assert rot[1, 8, 0] > 200 and rot[1, 8, 2] < 60 and rot[-2, 8, 2] > 200 and rot[-2, 8, 0] < 60
    grey16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)        # 0 .. 63000 of 65535
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    got = np.asarray(open_rgb(str(tmp_path / "g16.png")))
    assert got.shape == (8, 8, 3) and (got[..., 0] == got[..., 2]).all()
    np.testing.assert_allclose(got[..., 0].astype(float), grey16 / 257.0, atol=0.51)   # scaled, not clipped to 255
    assert got.max() < 255


def test_resident_and_file_paths_read_the_same_files_and_pixels(tmp_path):
    root = tmp_path / "tree"
    _tree(root)
    _sideways_jpeg(root / "train" / "a" / "2.jpg")
    Image.fromarray((np.ones((8, 8), np.uint16) * 40000)).save(root / "train" / "b" / "2.png")
    Image.fromarray(np.full((8, 8, 3), 77, np.uint8)).save(root / "train" / "b" / "3.bmp")
    (root / "train" / "a" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")          # macOS metadata, not an image
    (root / "train" / ".ipynb_checkpoints").mkdir()                                    # not a class
    res = load_image_folder(str(root), 8, str(tmp_path / "cache"), progress=False)
    tree = load_imagenet_tree(str(root), "imagefolder", check="decode")
    assert res.class_names == tree.class_names == ["a", "b"]
    assert res.train.files == tree.train_files and len(tree.train_files) == 7
    assert res.train.labels.tolist() == tree.train_labels.tolist()
    # the 16-bit image is grey 40000/257 ~ 156 on both paths, not white
    i16 = res.train.files.index(str(root / "train" / "b" / "2.png"))
    assert int(res.train.images[i16].float().mean().round()) == 156
    loader = TorchvisionEvalLoader(tree.train_files, tree.train_labels, 8, torch.device("cpu"), 0, 1, image_size=8,
                                   resize=8, num_workers=0)
    for x, _, pos in loader:
        for k, p in enumerate(pos.tolist()):
            # 8x8 images, resize 8 + centre crop 8: the file path's pixels are the resident path's
            torch.testing.assert_close(x[k], res.train.images[p].permute(2, 0, 1).float() / 255, atol=1 / 255, rtol=0)


def test_classes_only_val_has_are_errors_on_both_paths(tmp_path):
    root = tmp_path / "tree"
    _tree(root)
    _png(root / "val" / "c" / "0.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="that train/ does not have: c"):
        load_image_folder(str(root), 8, str(tmp_path / "cache"), progress=False)
    with pytest.raises(DatasetError, match="that train/ does not have.*: c"):
        load_imagenet_tree(str(root), "imagefolder")


def test_a_broken_link_is_named_on_both_paths(tmp_path):
    root = tmp_path / "tree"
    _tree(root)
    os.symlink(tmp_path / "gone.png", root / "train" / "a" / "9.png")
    with pytest.raises(DatasetError, match="9.png"):
        load_image_folder(str(root), 8, str(tmp_path / "cache"), progress=False)
    with pytest.raises(DatasetError, match="9.png"):
        load_imagenet_tree(str(root), "imagefolder", check="magic")


def test_a_truncated_file_met_by_the_file_loader_names_itself(tmp_path):
    root = tmp_path / "tree"
    _tree(root, size=32)
    bad = root / "val" / "b" / "1.jpg"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(bad, quality=95)
    bad.write_bytes(bad.read_bytes()[:200])
    tree = load_imagenet_tree(str(root), "imagefolder", check="magic")     # the header is fine: the check passes
    for workers in (0, 1):
        loader = TorchvisionEvalLoader(tree.val_files, tree.val_labels, 4, torch.device("cpu"), 0, 1, image_size=32,
                                       resize=32, num_workers=workers)
        with pytest.raises(DatasetError) as e:
            list(loader)
        assert str(bad) in _one_line(str(e.value)) and "\n" not in _one_line(str(e.value))


def test_an_unreadable_cache_is_decoded_again_and_an_unwritable_one_skipped(tmp_path):
    root = tmp_path / "tree"
    _tree(root)
    cache = tmp_path / "cache"
    first = load_image_folder(str(root), 8, str(cache), progress=False)
    (f,) = cache.glob("*.pt")
    f.write_bytes(f.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable"):
        again = load_image_folder(str(root), 8, str(cache), progress=False)
    assert torch.equal(again.train.images, first.train.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image_folder(str(root), 8, str(cache), progress=False)                # rewritten: read silently
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="cannot be written"):
        third = load_image_folder(str(root), 8, str(blocker / "cache"), progress=False)
    assert torch.equal(third.train.images, first.train.images)


def test_eval_resize_keeps_the_papers_crop_share_and_is_checked():
    assert eval_resize(DataConfig(image_size=224)) == 256 and eval_resize(DataConfig(image_size=32)) == 37
    assert eval_resize(DataConfig(image_size=32, resize=40)) == 40
    with pytest.raises(ConfigError, match="data.resize"):
        load_config(None, ["data.image_size=64", "data.resize=32"])


def test_a_test_folder_stands_for_val_on_both_paths(tmp_path):
    root = tmp_path / "tree"
    _tree(root)
    (root / "val").rename(root / "test")
    res = load_image_folder(str(root), 8, str(tmp_path / "cache"), progress=False)
    tree = load_imagenet_tree(str(root), "imagefolder")
    assert res.test.files == tree.val_files and len(tree.val_files) == 4
    (root / "test").rename(root / "elsewhere")
    with pytest.raises(DatasetError, match="/val"):        # the error names the usual folder
        load_image_folder(str(root), 8, str(tmp_path / "cache"), progress=False)


def test_non_square_images_on_the_small_image_path_are_noted(tmp_path):
    root = tmp_path / "tree"
    _tree(root)
    _png(root / "train" / "a" / "7.png", np.zeros((8, 12, 3), np.uint8))
    with pytest.warns(UserWarning, match=r"1 of 5 images are not square.*7\.png"):
        load_image_folder(str(root), 8, str(tmp_path / "cache"), progress=False)
