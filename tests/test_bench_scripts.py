"""The GPU scripts, dry-run on the CPU: a device lease is 15 minutes, so a typo in bench/device_all.sh or a flag that a
benchmark no longer accepts would waste one. Every part runs with a stand-in Python that records its command lines;
each recorded `bench/*.py` call must name only flags that script's argparse knows."""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _dry_run(tmp_path: Path, part: int) -> list[list[str]]:
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fakepy"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\x1f" "$@" >> "{calls}"\necho >> "{calls}"\nexit 0\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    data = tmp_path / "data"
    data.mkdir()
    # On a copy of the scripts: device_check.sh's build section removes mnemonics_fast/_C*.so before rebuilding,
    # which must not touch this checkout's (editable-installed) extension.
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "bench", repo / "bench", ignore=shutil.ignore_patterns("results", "__pycache__"))
    (repo / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "test_ops_cuda.py", repo / "tests")
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
           "DATA": str(data), "BUDGET": "300"}
    r = subprocess.run(["bash", "bench/device_all.sh", str(part)], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "out" / f"device_part{part}.tgz").is_file(), r.stdout[-2000:]
    assert "skipped, device time budget spent" not in r.stdout
    lines = calls.read_text().splitlines() if calls.exists() else []
    return [[a for a in line.split("\x1f") if a] for line in lines if line]


def _flags(argv: list[str]) -> set[str]:
    return {a.split("=")[0] for a in argv if a.startswith("--")}


@functools.cache
def _help(script: str) -> str:
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, f"{script} --help failed: {r.stderr[-2000:]}"
    return r.stdout


@pytest.mark.parametrize("part", [1, 2, 3, 4, 5, 6])
def test_device_all_part_runs_and_calls_benchmarks_with_known_flags(tmp_path, part):
    built = sorted(ROOT.glob("mnemonics_fast/_C*"))
    calls = _dry_run(tmp_path, part)
    assert sorted(ROOT.glob("mnemonics_fast/_C*")) == built    # the checkout's extension is left alone
    bench_calls = [c for c in calls if c and re.fullmatch(r"bench/\w+\.py", c[0])]
    expected = {1: {"bench/bench_cosine_autograd.py", "bench/bench_mnemonics.py", "bench/bench_train.py",
                    "bench/profile_mnemonics_step.py"},
                2: {"bench/tin100_experiments.py"}, 3: {"bench/tin100_experiments.py"},
                4: {"bench/bench_cosine_autograd.py", "bench/bench_mnemonics.py", "bench/profile_mnemonics_step.py"},
                5: {"bench/tin100_experiments.py", "bench/bench_mnemonics.py"},
                6: {"bench/kernels_ab_train.py"}}[part]
    assert {c[0] for c in bench_calls} >= expected, calls
    for c in bench_calls:
        assert (ROOT / c[0]).is_file(), c[0]
        known = set(re.findall(r"--[\w-]+", _help(c[0])))
        unknown = _flags(c[1:]) - known
        assert not unknown, f"{c[0]} does not accept {sorted(unknown)} (device_all.sh part {part})"
    if part in (1, 4, 5, 6):   # the build (and the CUDA tests) go through device_check.sh with the same Python
        assert any(c[:2] == ["setup.py", "build_ext"] for c in calls), calls
    if part in (1, 5):
        tests = [c for c in calls if c[:2] == ["-m", "pytest"]]
        assert tests and all((ROOT / a).is_file() for c in tests for a in c if a.startswith("tests/")), tests


def test_bench_shard_inner_smoke(tmp_path):
    """The shard_inner benchmark on 2 gloo ranks, tiny: runs, writes its JSON, and both ways give the same bank."""
    out = tmp_path / "shard.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "bench/bench_shard_inner.py", "--world", "2", "--m", "5", "--image", "8",
                        "--query", "2", "--steps", "1", "--repeats", "1", "--warmup", "0", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [x["shard_inner"] for x in rows] == [False, True]
    assert rows[1]["max_abs_bank_diff_vs_replicated"] < 1e-5


def _tin100_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("tin100_experiments", ROOT / "bench" / "tin100_experiments.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tin100_compare_summary_compares_runs_cut_short_over_common_phases(tmp_path):
    """A time limit stops the comparison's runs at different phases: the summary averages the phases every run
    finished (here 1..2), so a run that got further is not compared over more (harder) phases."""
    t = _tin100_module()
    runs = tmp_path / "runs"
    accs = {"lucir_random_s0": [50, 40, 30, 20], "lucir_herding_s0": [50, 42, 34, 26], "lucir_mnemonics_s0": [50, 44, 38]}
    for name, acc in accs.items():
        (runs / name).mkdir(parents=True)
        m = {"top1": {"cnn": acc, "nme": [a + 1 for a in acc]},
             "avg_incremental_acc": {"cnn": sum(acc[1:]) / (len(acc) - 1), "nme": 0.0}, "last_acc": {}, "forgetting": {},
             "phases": [{"wall_s": 1.0, "train_s": 0.5, "train_img_per_s": 100.0} for _ in acc]}
        (runs / name / "metrics.json").write_text(json.dumps(m))
    a = argparse.Namespace(runs=str(runs), epochs=4)
    rcs = {"lucir_random_s0": 0, "lucir_herding_s0": 0, "lucir_mnemonics_s0": -15}
    out = t.compare_summary(a, list(accs), rcs)
    assert out["common_phases"] == 2 and out["complete"] is False
    assert out["summary"]["random"]["cnn"]["mean"] == 35.0
    assert out["summary"]["herding"]["cnn"]["mean"] == 38.0
    assert out["summary"]["mnemonics"]["cnn"]["mean"] == 41.0 and out["summary"]["mnemonics"]["nme"]["mean"] == 42.0
    assert out["runs"]["lucir_mnemonics_s0"]["phases_done"] == 3


def test_tin100_sweep_names_round_trip_and_normalised_runs_are_summarised_apart(tmp_path):
    """Every sweep setting (beta1, alpha, lr_scale, inner_update) survives its run name, which is how the best one is
    read back; lucir_mnemonics_normalised runs never count as lucir_mnemonics (a prefix match would mix them)."""
    t = _tin100_module()
    for setting in [(1.0, 0.01, "none", "sgd"), (0.05, 0.01, "exemplars", "sgd"),
                    (0.5, 0.02, "exemplars", "normalised"), (3.0, 0.01, "none", "normalised")]:
        name = t._sweep_name(*setting)
        assert tuple(type(v)(x) for v, x in zip(setting, t._parse_sweep_name(name))) == setting, name
        assert f"mnemonics.inner_update={setting[3]}" in t._mn_setting(*setting)
    assert t._parse_best("0.5,0.02,exemplars") == ("0.5", "0.02", "exemplars", "sgd")
    runs = tmp_path / "runs"
    accs = {"lucir_herding_s0": [50, 40], "lucir_mnemonics_s0": [50, 44], "lucir_mnemonics_normalised_s0": [50, 30],
            "lucir_mnemonics_s1": [50, 46]}
    for name, acc in accs.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.json").write_text(json.dumps({
            "top1": {"cnn": acc, "nme": acc}, "avg_incremental_acc": {"cnn": acc[1], "nme": acc[1]}, "last_acc": {},
            "forgetting": {}, "phases": [{"wall_s": 1.0, "train_s": 0.5, "train_img_per_s": 100.0} for _ in acc]}))
    out = t.compare_summary(argparse.Namespace(runs=str(runs), epochs=4), list(accs), {n: 0 for n in accs})
    assert out["summary"]["mnemonics"]["cnn"]["mean"] == 45.0 and out["summary"]["mnemonics"]["cnn"]["n"] == 2
    assert out["summary"]["mnemonics_normalised"]["cnn"]["mean"] == 30.0


def test_tin100_stop_children_ends_every_run(tmp_path):
    t = _tin100_module()
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    t._CHILDREN.extend(procs)
    t.stop_children(grace_s=5)
    assert all(p.poll() is not None for p in procs)


def test_kernels_ab_summary_pairs_each_seed_over_the_phases_both_ways_finished(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("kernels_ab_train", ROOT / "bench" / "kernels_ab_train.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    runs = tmp_path / "runs"
    accs = {"kernels_s0": [60, 50, 40], "reference_s0": [60, 52], "kernels_s1": [70, 60], "reference_s1": [69, 59]}
    for name, acc in accs.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.json").write_text(json.dumps({"top1": {"cnn": acc, "nme": acc}}))
        way = "plain-PyTorch reference (MNEMONICS_FAST_FORCE_REFERENCE=1); ..." if name.startswith("ref") else "cuda"
        (runs / name / "log.txt").write_text(f"[t] something\n[t] ops: {way}\n")
    out = ab.summarise(argparse.Namespace(runs=str(runs)), [0, 1], {n: 0 for n in accs})
    assert [(p["seed"], p["phases"]) for p in out["pairs"]] == [(0, 2), (1, 2)]
    assert [p["diff"]["cnn"] for p in out["pairs"]] == [-1.0, 1.0]
    assert out["summary"]["cnn"]["diff"]["mean"] == 0.0 and out["summary"]["cnn"]["diff"]["n"] == 2
    assert out["runs"]["reference_s1"]["ops"].startswith("plain-PyTorch reference") and out["complete"]
    # another A/B (--compare bf16): the same pairing under its own way names, first minus second
    for name, acc in {"bf16_s0": [60, 51], "fp32_s0": [60, 50]}.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.json").write_text(json.dumps({"top1": {"cnn": acc, "nme": acc}}))
    out = ab.summarise(argparse.Namespace(runs=str(runs)), [0], {"bf16_s0": 0, "fp32_s0": 0}, ("bf16", "fp32"))
    assert out["pairs"][0]["diff"]["cnn"] == 0.5 and set(out["summary"]["cnn"]) == {"diff", "bf16", "fp32"}
    assert ab.COMPARES["bf16"][0][2] == ["mnemonics.bf16=true"] and ab.COMPARES["tf32"][0][2] == ["mnemonics.tf32=true"]
