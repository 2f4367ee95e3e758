"""Bad input through the CLI: a non-zero exit, a short stderr naming the culprit (no traceback), and nothing in the
run folder that looks like a finished run. Plus the documented small-class behaviour."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import overrides, run_cli, run_trainer, tiny_config

pytestmark = pytest.mark.slow


def _assert_clean_failure(r, *needles, out_dir=None):
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "Traceback" not in err, err[-2000:]
    assert err.startswith("error:"), err[-2000:]
    assert len(err.splitlines()) <= 3, err
    for n in needles:
        assert n in err, f"{n!r} not in stderr: {err}"
    if out_dir is not None and out_dir.exists():
        assert not list(out_dir.rglob("metrics.json")) and not list(out_dir.rglob("metrics.csv"))
        assert not list(out_dir.rglob("*.pt"))


def _tiny_cli_args(out_dir, **changes) -> list[str]:
    return overrides(**{"run.output_dir": str(out_dir), **changes})


@pytest.mark.parametrize("bad,needle", [
    ("train.epochz=3", "'train.epochz'"),                        # unknown key
    ("train.epochs=abc", "'train.epochs'"),                      # wrong type
    ("memory.kind=infinite", "'memory.kind'"),                   # bad choice
    ("protocol.num_phases=3", "protocol.num_phases"),            # 6 classes: 2 base + 4 do not split into 3 phases
])
def test_cli_config_errors(tmp_path, bad, needle):
    out = tmp_path / "runs"
    r = run_cli(_tiny_cli_args(out) + [bad], cwd=tmp_path)
    _assert_clean_failure(r, needle, out_dir=out)


def test_cli_missing_config_file(tmp_path):
    r = run_cli(["--config", str(tmp_path / "nope.yaml")], cwd=tmp_path)
    _assert_clean_failure(r, "nope.yaml")


def test_cli_missing_cifar_root(tmp_path):
    out = tmp_path / "runs"
    missing = tmp_path / "no" / "cifar"
    r = run_cli(_tiny_cli_args(out, **{"data.dataset": "cifar100", "data.root": str(missing)}), cwd=tmp_path)
    _assert_clean_failure(r, str(missing), "data.download", out_dir=out)


def _write_tree(root, counts: dict[str, int], val_per_class: int = 2, size: int = 8):
    from PIL import Image
    rng = np.random.RandomState(0)
    for split, per in (("train", None), ("val", val_per_class)):
        for name, n in counts.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per or n):
                Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.jpg")


def test_cli_corrupt_image_names_the_file(tmp_path):
    root = tmp_path / "tree"
    _write_tree(root, {"a": 3, "b": 3, "c": 3, "d": 3})
    bad = root / "train" / "c" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg" * 10)
    out = tmp_path / "runs"
    args = _tiny_cli_args(out, **{"data.dataset": "imagefolder", "data.root": str(root),
                                  "data.cache_dir": str(tmp_path / "cache"), "protocol.base_classes": 2,
                                  "protocol.num_phases": 1})
    r = run_cli(args, cwd=tmp_path)
    _assert_clean_failure(r, str(bad), out_dir=out)
    assert not list(tmp_path.rglob("imagefolder_*.pt"))          # no decoded cache of a tree that failed


def test_small_class_keeps_all_its_images(tmp_path):
    """A class with fewer training images than memory.per_class keeps all of them as exemplars; the run succeeds
    and says so."""
    root = tmp_path / "tree"
    _write_tree(root, {"a": 12, "b": 12, "c": 3, "d": 12})
    cfg = tiny_config(tmp_path / "runs", name="small", **{
        "data.dataset": "imagefolder", "data.root": str(root), "data.cache_dir": str(tmp_path / "cache"),
        "protocol.base_classes": 2, "protocol.num_phases": 1, "memory.per_class": 5, "train.epochs": 1,
        "train.milestones": [], "train.batch_size": 8})
    run = run_trainer(cfg)
    assert "fewer training images than memory.per_class=5" in run.stdout and "class c" in run.stdout
    tr = run.trainer
    small = tr.order.index(tr.ds.class_names.index("c"))        # remapped label of class 'c'
    for c, r in tr.memory.ranking.items():
        expected = 3 if c == small else 5
        assert len(r) == expected
        assert len(set(r.tolist())) == expected and bool((tr.y_train[r] == c).all())
    assert json.loads((run.run_dir / "metrics.json").read_text())["phases"][-1]["memory_exemplars"] == 3 * 5 + 3


def test_help_and_usage_errors_exit_as_argparse_says(tmp_path):
    """`--help` exits 0 with the usage, an unknown flag exits 2 with argparse's one line: no traceback (the entry
    point's crash handler must not treat argparse's SystemExit as a crash)."""
    ok = run_cli(["--help"], cwd=tmp_path, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("usage:") and "Traceback" not in ok.stderr
    bad = run_cli(["--bogus"], cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr and "Traceback" not in bad.stderr
