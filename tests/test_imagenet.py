"""ImageNet class lists (hashes, the seed-1993 subset), tree listing/validation, epoch plans, exemplar merging."""
from __future__ import annotations

import hashlib
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mnemonics_fast.data import imagenet
from mnemonics_fast.data.imagenet import DatasetError, load_imagenet_tree

# Pinned here independently of the code's copy: changing a shipped list must fail two places.
SHA256 = {
    "imagenet1k_wnids.txt": "70002b0ff5de60a3a17a82dbfcff291931f96225ddf941ad2e182fc39e183d15",
    "imagenet_subset_seed1993.txt": "bbfc1ad00af3270b8a99afd7d8542caf909c1d52820b6dbad6a50b9b20d7e340",
    "imagenet100_sorted_first100.txt": "b332dbd149be58bd06982a583959d80f93d796938a70c0db0146a9e4fc9d661f",
}


# ----------------------------------------------------------------------------------------------------------- lists
def test_wnid_files_match_pinned_sha256():
    for name, sha in SHA256.items():
        assert hashlib.sha256((imagenet.WNID_DIR / name).read_bytes()).hexdigest() == sha, name
    assert {f: s for f, s in imagenet.WNID_FILES.values()} == SHA256


def test_imagenet1k_list_is_1000_sorted_unique_wnids():
    w = imagenet.wnids_for("imagenet1k")
    assert len(w) == 1000 and len(set(w)) == 1000 and w == sorted(w)
    assert all(re.fullmatch(r"n\d{8}", x) for x in w)
    assert w[0] == "n01440764" and w[-1] == "n15075141"


def test_subset_is_the_seed_1993_choice_from_the_sorted_1000():
    w = imagenet.wnids_for("imagenet1k")
    state = np.random.get_state()
    np.random.seed(1993)  # SPEC §1, spelled exactly
    chosen = np.random.choice(w, 100, replace=False).tolist()
    np.random.set_state(state)
    assert chosen[:5] == ["n01729322", "n01514668", "n04550184", "n03109150", "n01990800"]
    subset = imagenet.wnids_for("imagenet_subset")
    assert subset == sorted(chosen), "shipped in sorted (ImageFolder) order: label = index in this list"
    before = np.random.get_state()[1].copy()
    assert imagenet._derive_variant("imagenet_subset", w) == subset
    assert np.array_equal(np.random.get_state()[1], before), "deriving the list must not touch the global RNG"


def test_sorted_first100_is_a_different_imagenet100():
    w = imagenet.wnids_for("imagenet1k")
    s = imagenet.wnids_for("imagenet_subset_sorted")
    assert s == w[:100] == imagenet._derive_variant("imagenet_subset_sorted", w)
    assert len(set(s) & set(imagenet.wnids_for("imagenet_subset"))) < 30  # not the same class set


def test_altered_list_is_rejected(tmp_path):
    p = tmp_path / "w.txt"
    p.write_text("n00000001\nn00000002\n")
    with pytest.raises(DatasetError, match="sha256"):
        imagenet.read_wnid_file(p, "0" * 64)
    with pytest.raises(DatasetError, match="variant"):
        imagenet.wnids_for("imagenet21k")


# ------------------------------------------------------------------------------------------------------------ tree
def _jpeg_bytes(colour=(200, 30, 30), size=(12, 9)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg_bytes()


def _make_tree(root, wnids, train_per_class=2, val_per_class=1, flat_val=False):
    for w in wnids:
        (root / "train" / w).mkdir(parents=True)
        for i in range(train_per_class):
            (root / "train" / w / f"{w}_{i}.JPEG").write_bytes(JPEG)
        if not flat_val:
            (root / "val" / w).mkdir(parents=True)
            for i in range(val_per_class):
                (root / "val" / w / f"val_{w}_{i}.JPEG").write_bytes(JPEG)
    (root / "val").mkdir(exist_ok=True)
    return root


def test_imagefolder_tree_lists_sorted_classes_and_files(tmp_path):
    root = _make_tree(tmp_path, ["b_cls", "a_cls", "c_cls"], train_per_class=3)
    (root / "train" / "a_cls" / "notes.txt").write_text("ignored: not an image extension")
    (root / "train" / "a_cls" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)  # PNG by magic: accepted
    tr_f, tr_y, va_f, va_y, names = load_imagenet_tree(root, "imagefolder")
    assert names == ["a_cls", "b_cls", "c_cls"]
    assert tr_y.tolist() == [0] * 4 + [1] * 3 + [2] * 3 and tr_y.dtype == torch.int64
    assert [p.split("/")[-1] for p in tr_f[:4]] == ["a_cls_0.JPEG", "a_cls_1.JPEG", "a_cls_2.JPEG", "x.png"]
    assert va_y.tolist() == [0, 1, 2] and all(f"/val/{names[y]}/" in f for f, y in zip(va_f, va_y.tolist()))


def test_subset_variant_reads_only_its_classes_in_sorted_order(tmp_path):
    subset = imagenet.wnids_for("imagenet_subset")
    other = next(w for w in imagenet.wnids_for("imagenet1k") if w not in subset)
    root = _make_tree(tmp_path, subset + [other], train_per_class=1)
    t = load_imagenet_tree(str(root), "imagenet_subset")
    assert t.class_names == subset and len(t.train_files) == 100 and len(t.val_files) == 100
    assert t.train_labels.tolist() == list(range(100))
    assert all(f"/train/{subset[y]}/" in f for f, y in zip(t.train_files, t.train_labels.tolist()))
    assert not any(other in f for f in t.train_files + t.val_files)


def test_validation_names_missing_wnid_empty_class_and_corrupt_files(tmp_path):
    wnids = ["n00000001", "n00000002", "n00000003"]
    root = _make_tree(tmp_path, wnids)
    (root / "val" / "n00000003").rename(root / "val_hidden")                   # val class missing
    for f in (root / "train" / "n00000002").iterdir():                       # train class empty
        f.unlink()
    (root / "train" / "n00000001" / "zero.JPEG").write_bytes(b"")            # empty file
    (root / "train" / "n00000001" / "html.JPEG").write_bytes(b"<html>oops")  # not an image
    (root / "train" / "n00000004").mkdir()                                   # not in val: imagefolder compares
    with pytest.raises(DatasetError) as e:
        load_imagenet_tree(root, "imagefolder")
    msg = str(e.value)
    assert "val: missing class folder n00000003" in msg
    assert "train: empty class folder n00000002" in msg and "train: empty class folder n00000004" in msg
    assert "zero.JPEG: empty file" in msg and "html.JPEG: not a JPEG/PNG" in msg
    assert "6 problem(s)" in msg  # one error listing all of them


def test_validation_lists_first_20_problems_and_the_count(tmp_path):
    root = _make_tree(tmp_path, ["n00000001"])
    for i in range(25):
        (root / "train" / "n00000001" / f"bad{i:02d}.jpg").write_bytes(b"\x00\x01\x02\x03")
    with pytest.raises(DatasetError, match=r"25 problem\(s\)[\s\S]*and 5 more"):
        load_imagenet_tree(root, "imagefolder")
    load_imagenet_tree(root, "imagefolder", check="size")  # the size check alone lets them through


def test_decode_check_catches_truncated_jpeg(tmp_path):
    root = _make_tree(tmp_path, ["n00000001"])
    (root / "train" / "n00000001" / "trunc.JPEG").write_bytes(_jpeg_bytes(size=(64, 64))[:60])
    load_imagenet_tree(root, "imagefolder")  # magic bytes are fine
    with pytest.raises(DatasetError, match="trunc.JPEG: unreadable"):
        load_imagenet_tree(root, "imagefolder", check="decode")


def test_flat_ilsvrc_val_with_loc_solution_csv(tmp_path):
    wnids = ["n00000001", "n00000002"]
    root = _make_tree(tmp_path, wnids, flat_val=True)
    rows = ["ImageId,PredictionString"]
    for i, w in enumerate(["n00000002", "n00000001", "n00000002", "n00000009"]):
        (root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(JPEG)
        rows.append(f"ILSVRC2012_val_{i:08d},{w} 1 2 3 4 {w} 5 6 7 8")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    _, _, va_f, va_y, _ = load_imagenet_tree(root, "imagefolder")
    assert va_y.tolist() == [0, 1, 1]  # the n00000009 image belongs to no class of this variant
    assert [f[-13:] for f in va_f] == ["00000001.JPEG", "00000000.JPEG", "00000002.JPEG"]


def test_root_resolution_config_then_env(tmp_path, monkeypatch):
    monkeypatch.delenv(imagenet.ENV_ROOT, raising=False)
    with pytest.raises(DatasetError, match=r"data\.root.*MNEMONICS_FAST_IMAGENET"):
        imagenet.resolve_imagenet_root(None)
    monkeypatch.setenv(imagenet.ENV_ROOT, str(tmp_path))
    assert imagenet.resolve_imagenet_root("") == tmp_path
    other = tmp_path / "cfg"
    other.mkdir()
    assert imagenet.resolve_imagenet_root(str(other)) == other  # the config / dotted override wins
    with pytest.raises(DatasetError, match="not a directory"):
        imagenet.resolve_imagenet_root(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------------------------------------- plans
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n_files,n_extra,batch", [(42, 5, 8), (100, 0, 16), (7, 3, 64), (1000, 200, 128),
                                                   (5, 0, 4), (41, 0, 8), (9, 0, 8), (33, 0, 16)])
def test_train_plan_covers_everything_with_equal_steps(n_files, n_extra, batch, world):
    if batch // world < 1:
        pytest.skip("batch smaller than world")
    plans = [imagenet.train_plan(n_files, n_extra, batch, r, world, seed=11, epoch=4) for r in range(world)]
    steps = imagenet.train_steps(n_files, n_extra, batch, world)
    total, b = n_files + n_extra, batch // world
    assert all(len(p) == steps for p in plans)
    for i in range(steps):  # same batch size on every rank at every step, never a lone sample in a partial step
        sizes = {len(p[i]) for p in plans}
        assert len(sizes) == 1 and 1 <= sizes.pop() <= b
    assert len(plans[0][-1]) >= 2 or b == 1 or steps == 1
    allidx = np.concatenate([b_ for p in plans for b_ in p])
    per_rank = -(-total // world)
    if steps * b >= per_rank:  # nothing dropped: everything once, plus the pad-to-a-multiple-of-world repeats
        assert set(allidx.tolist()) == set(range(total))
        assert len(allidx) - total == (-total) % world
    else:  # a last step of one sample per rank was dropped: at most `world` samples miss this epoch
        assert per_rank - steps * b == 1 and total - len(set(allidx.tolist())) <= world
    again = imagenet.train_plan(n_files, n_extra, batch, 0, world, seed=11, epoch=4)
    assert all(np.array_equal(a, b_) for a, b_ in zip(again, plans[0]))


def test_train_plan_drops_a_lone_last_sample():
    assert imagenet.train_steps(41, 0, 8, 1) == 5 and imagenet.train_steps(42, 0, 8, 1) == 6
    assert imagenet.train_steps(1, 0, 8, 1) == 1 and imagenet.train_steps(3, 0, 4, 4) == 1


def test_train_plan_mixes_files_and_exemplars_and_reshuffles():
    a = np.concatenate(imagenet.train_plan(1000, 1000, 100, 0, 1, 0, 0))
    b = np.concatenate(imagenet.train_plan(1000, 1000, 100, 0, 1, 0, 1))
    c = np.concatenate(imagenet.train_plan(1000, 1000, 100, 0, 1, 1, 0))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    files_in_first_batch = (a[:100] < 1000).sum()
    assert 30 < files_in_first_batch < 70  # a joint shuffle, not files-then-exemplars


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("n,batch", [(42, 10), (50, 16), (7, 8), (1001, 64), (16, 16), (33, 16)])
def test_eval_plan_exactly_once_equal_steps(n, batch, world):
    plans = [imagenet.eval_plan(n, batch, r, world) for r in range(world)]  # batch is per rank
    steps = imagenet.eval_steps(n, batch, world)
    assert all(len(p) == steps for p in plans)
    allidx = np.concatenate([b for p in plans for b in p])
    assert np.array_equal(np.sort(allidx), np.arange(n))
    assert all(len(b) <= batch for p in plans for b in p)
    assert all(len(b) > 0 for p in plans for b in p) or n < world * steps


def test_batch_smaller_than_world_is_an_error():
    with pytest.raises(ValueError, match="world size"):
        imagenet.train_plan(10, 0, 2, 0, 4, 0, 0)


# --------------------------------------------------------------------------------------------------------- extra
def _extra_images(k=6, size=16):
    g = torch.Generator().manual_seed(0)
    return torch.rand(k, 3, size, size, generator=g), torch.arange(k) + 50


def test_extra_sampler_none_and_flip():
    x, y = _extra_images()
    s = imagenet.ExtraSampler((x, y), 16, torch.device("cpu"), seed=0, rank=0, augment="none")
    xo, yo = s.take(np.array([3, 1]))
    assert torch.equal(xo, x[[3, 1]]) and yo.tolist() == [53, 51]
    s = imagenet.ExtraSampler((x, y), 16, torch.device("cpu"), seed=0, rank=0, augment="flip")
    xo, _ = s.take(np.arange(6))
    same = [torch.equal(xo[i], x[i]) or torch.equal(xo[i], x[i].flip(-1)) for i in range(6)]
    assert all(same)


def test_extra_sampler_random_resized_crop():
    x, y = _extra_images(k=64)
    s = imagenet.ExtraSampler((x, y), 16, torch.device("cpu"), seed=1, rank=0)
    xo, yo = s.take(np.arange(64))
    assert xo.shape == (64, 3, 16, 16) and torch.equal(yo, y)
    assert xo.min() >= 0 and xo.max() <= 1
    changed = [(xo[i] - x[i]).abs().mean() > 1e-3 and (xo[i] - x[i].flip(-1)).abs().mean() > 1e-3 for i in range(64)]
    assert sum(changed) > 50  # crops actually happen
    # A constant image stays constant under any crop (bilinear interpolation of a constant), and uint8 -> /255.
    c = torch.full((4, 3, 16, 16), 128, dtype=torch.uint8)
    s8 = imagenet.ExtraSampler((c, torch.zeros(4)), 16, torch.device("cpu"), seed=1, rank=0)
    xo, _ = s8.take(np.arange(4))
    assert torch.allclose(xo, torch.full_like(xo, 128 / 255), atol=1e-6)
    # Reproducible from (seed, rank).
    a = imagenet.ExtraSampler((x, y), 16, torch.device("cpu"), seed=9, rank=1).take(np.arange(8))[0]
    b = imagenet.ExtraSampler((x, y), 16, torch.device("cpu"), seed=9, rank=1).take(np.arange(8))[0]
    assert torch.equal(a, b)


def test_extra_checks_shapes_and_dtypes():
    with pytest.raises(ValueError, match="extra"):
        imagenet._check_extra((torch.zeros(3, 16, 16), torch.zeros(3)), 16)
    with pytest.raises(ValueError, match="uint8"):
        imagenet._check_extra((torch.zeros(2, 3, 16, 16, dtype=torch.int32), torch.zeros(2)), 16)
