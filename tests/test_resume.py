"""Resuming: after a clean stop between phases, after a crash in the middle of a phase (partial checkpoint), and a
checkpoint write killed halfway never leaves a broken file under the final name."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO, run_trainer, tiny_config
from mnemonics_fast.trainer import Trainer
from mnemonics_fast.utils.io import atomic_torch_save, atomic_write_text

pytestmark = pytest.mark.slow

# 3 epochs per phase with a mid-phase checkpoint after every epoch; 3 phases.
# One milestone after the first epoch that a kill can hit: a resume that rebuilt the scheduler instead of restoring
# it would train epoch 2 at the wrong lr (consecutive milestones [1, 2] hid that: a fresh scheduler agreed with them).
RESUME_CHANGES = {"train.epochs": 3, "train.milestones": [2], "run.checkpoint_every": 1}


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    return run_trainer(tiny_config(tmp_path_factory.mktemp("ref"), name="run", **RESUME_CHANGES))


def _final_model(run_dir):
    return torch.load(run_dir / "checkpoints" / "phase_002.pt", weights_only=False)


def _assert_same_run(run, reference):
    for key in ("top1", "top5", "acc_matrix", "avg_incremental_acc", "last_acc", "forgetting"):
        assert run.summary[key] == reference.summary[key], key
    assert [p["phase"] for p in run.summary["phases"]] == [0, 1, 2]
    a, b = _final_model(run.run_dir), _final_model(reference.run_dir)
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    assert a["memory"]["ranking"].keys() == b["memory"]["ranking"].keys()
    for c, r in b["memory"]["ranking"].items():
        assert torch.equal(a["memory"]["ranking"][c], r)
    assert torch.equal(a["class_means"], b["class_means"])


def test_stop_between_phases_then_resume(tmp_path, reference):
    cfg = tiny_config(tmp_path, name="run", **RESUME_CHANGES, **{"run.stop_after_phase": 1})
    first = run_trainer(cfg)
    assert "stopping after phase 1" in first.stdout
    assert len(first.summary["top1"]["cnn"]) == 2
    ckdir = first.run_dir / "checkpoints"
    assert sorted(p.name for p in ckdir.glob("*.pt")) == ["phase_000.pt", "phase_001.pt"]
    # A temp file left by an interrupted write is ignored by the resume.
    (ckdir / ".phase_002.pt.abc123.tmp").write_bytes(b"\x00garbage")
    resumed = run_trainer(tiny_config(tmp_path, name="run", **RESUME_CHANGES))      # resume=auto is the default
    assert "resumed from" in resumed.stdout and "phase 1 complete" in resumed.stdout
    assert resumed.stdout.count("top 1 accuracy CNN") == 1                          # only phase 2 was run
    _assert_same_run(resumed, reference)
    # metrics.json after the resume holds all phases.
    import json
    saved = json.loads((resumed.run_dir / "metrics.json").read_text())
    assert saved["top1"] == reference.summary["top1"]


@pytest.mark.parametrize("crash_phase,crash_epoch", [(2, 0), (0, 1)])
def test_crash_mid_phase_then_resume(tmp_path, monkeypatch, reference, crash_phase, crash_epoch):
    """Simulate a kill right after a partial (mid-phase) checkpoint was written; the resumed run continues from it."""
    orig = Trainer._save_partial
    saved = []

    def save_then_crash(self, phase, epoch, model, opt, sched):
        orig(self, phase, epoch, model, opt, sched)
        saved.append((phase, epoch))
        if (phase, epoch) == (crash_phase, crash_epoch):
            raise Crash("simulated kill")

    monkeypatch.setattr(Trainer, "_save_partial", save_then_crash)
    cfg = tiny_config(tmp_path, name="run", **RESUME_CHANGES)
    with pytest.raises(Crash):
        run_trainer(cfg)
    ckdir = tmp_path / "run" / "checkpoints"
    partial = torch.load(ckdir / "partial.pt", weights_only=False)
    assert (partial["phase"], partial["epoch"]) == (crash_phase, crash_epoch)
    assert sorted(p.name for p in ckdir.glob("phase_*.pt")) == [f"phase_{i:03d}.pt" for i in range(crash_phase)]
    monkeypatch.setattr(Trainer, "_save_partial", orig)

    resumed = run_trainer(tiny_config(tmp_path, name="run", **RESUME_CHANGES))
    assert f"resuming phase {crash_phase} at epoch {crash_epoch + 1}" in resumed.stdout     # the partial was used
    _assert_same_run(resumed, reference)
    assert not (ckdir / "partial.pt").exists()                     # removed once its phase completed
    # The scheduler state came back too: the resumed phase saw the same lr schedule (the identical final model is the
    # strong check; this one says why).
    assert partial["scheduler"]["last_epoch"] == crash_epoch + 1
    # The phase's time and throughput count the epochs before the kill too (they used to restart at the resume).
    prog = partial["progress"]
    assert prog["n_img"] > 0 and 0 < prog["train_s"] <= prog["wall_s"]
    phase_metrics = resumed.summary["phases"][crash_phase]
    assert phase_metrics["train_s"] >= prog["train_s"] and phase_metrics["wall_s"] >= prog["wall_s"]


def test_resume_refuses_a_different_protocol(tmp_path):
    cfg = tiny_config(tmp_path, name="run", **{"run.stop_after_phase": 0, "train.epochs": 1})
    run_trainer(cfg)
    from mnemonics_fast.config import ConfigError
    with pytest.raises(ConfigError, match="memory"):
        run_trainer(tiny_config(tmp_path, name="run", **{"train.epochs": 1, "memory.per_class": 3}))
    # resume=never starts afresh (and clears the old checkpoints).
    fresh = run_trainer(tiny_config(tmp_path, name="run", **{"train.epochs": 1, "memory.per_class": 3,
                                                             "run.resume": "never"}))
    assert "resumed" not in fresh.stdout and len(fresh.summary["top1"]["cnn"]) == 3



def test_resume_refuses_another_seed_and_keeps_the_run_config(tmp_path):
    """A finished run asked again with another seed is refused (it used to print the old seed's results as if
    resumed), and the refused call leaves config.yaml describing the checkpoints, not the refused settings."""
    from mnemonics_fast.config import ConfigError
    run_trainer(tiny_config(tmp_path, name="run", **{"run.stop_after_phase": 0, "train.epochs": 1}))
    cfg_file = tmp_path / "run" / "config.yaml"
    before = cfg_file.read_text()
    with pytest.raises(ConfigError, match="seed 0, this run has seed 3"):
        run_trainer(tiny_config(tmp_path, name="run", **{"train.epochs": 1, "seed": 3}))
    with pytest.raises(ConfigError, match="model.arch"):
        run_trainer(tiny_config(tmp_path, name="run", **{"train.epochs": 1, "model.arch": "resnet18"}))
    assert cfg_file.read_text() == before


def test_a_partial_checkpoint_refuses_other_settings(tmp_path, monkeypatch):
    """Killed in phase 0 (only partial.pt exists): a rerun with another lr must not continue the old schedule."""
    from mnemonics_fast.config import ConfigError
    orig = Trainer._save_partial

    def save_then_crash(self, phase, epoch, model, opt, sched):
        orig(self, phase, epoch, model, opt, sched)
        raise Crash("simulated kill")

    monkeypatch.setattr(Trainer, "_save_partial", save_then_crash)
    with pytest.raises(Crash):
        run_trainer(tiny_config(tmp_path, name="run", **RESUME_CHANGES))
    monkeypatch.setattr(Trainer, "_save_partial", orig)
    ckdir = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckdir.iterdir()] == ["partial.pt"]
    before = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"partial\.pt was written with a different 'train' section \(train\.lr\)"):
        run_trainer(tiny_config(tmp_path, name="run", **{**RESUME_CHANGES, "train.lr": 0.5}))
    assert (tmp_path / "run" / "config.yaml").read_text() == before
    assert [p.name for p in ckdir.iterdir()] == ["partial.pt"]                # nothing lost
    # run.resume=never starts afresh and says what it removed
    fresh = run_trainer(tiny_config(tmp_path, name="run", **{**RESUME_CHANGES, "train.lr": 0.5,
                                                             "run.resume": "never", "run.stop_after_phase": 0}))
    assert "run.resume=never: removed 1 checkpoint(s)" in fresh.stdout and "resuming" not in fresh.stdout


# ------------------------------------------------------------------ atomic writes
def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    old = {"phase": 1, "w": torch.randn(64, 64)}
    atomic_torch_save(old, path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_torch_save({"phase": 2, "w": torch.randn(64, 64)}, path)
    monkeypatch.undo()
    back = torch.load(path, weights_only=False)
    assert back["phase"] == 1 and torch.equal(back["w"], old["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]          # the temp file was cleaned up


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time, torch
    from mnemonics_fast.utils.io import atomic_torch_save
    path = sys.argv[1]
    atomic_torch_save({"phase": 1, "w": torch.arange(1000.0)}, path)
    real_fsync = os.fsync
    def stall(fd):
        print("WRITING", flush=True)    # the new data are in the temp file, not yet renamed
        time.sleep(120)
    os.fsync = stall
    atomic_torch_save({"phase": 2, "w": torch.randn(2_000_000)}, path)
    print("DONE", flush=True)
""")


def test_killed_in_the_middle_of_a_checkpoint_write(tmp_path):
    """SIGKILL while a big checkpoint is being written: the previous file loads, nothing partial has its name."""
    path = tmp_path / "phase_001.pt"
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITING"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    back = torch.load(path, weights_only=False)
    assert back["phase"] == 1 and torch.equal(back["w"], torch.arange(1000.0))
    # The half-written data only ever lived in a hidden temp file, which a resume ignores.
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("phase_001.pt", "writer.py")]
    assert all(n.startswith(".phase_001.pt.") and n.endswith(".tmp") for n in leftovers)
    assert sorted(tmp_path.glob("phase_*.pt")) == [path]


def test_atomic_write_text_replaces_whole_file(tmp_path):
    p = tmp_path / "m.json"
    atomic_write_text(p, "a" * 1000)
    atomic_write_text(p, "b")
    assert p.read_text() == "b"


# ------------------------------------------------------------------ a resume never mixes two experiments
def test_resume_refuses_a_different_mnemonics_or_train_section(tmp_path):
    """A herding run's checkpoints resumed under a mnemonics config would skip mnemonics on every finished phase."""
    from mnemonics_fast.config import ConfigError
    run_trainer(tiny_config(tmp_path, name="run", **{"run.stop_after_phase": 0, "train.epochs": 1}))
    with pytest.raises(ConfigError, match=r"'mnemonics' section \(mnemonics\.enabled\)"):
        run_trainer(tiny_config(tmp_path, name="run", **{"train.epochs": 1, "mnemonics.enabled": True}))
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        run_trainer(tiny_config(tmp_path, name="run", **{"train.epochs": 2}))
    # speed-only fields may change across a resume
    resumed = run_trainer(tiny_config(tmp_path, name="run", **{"train.epochs": 1, "train.eval_batch_size": 7,
                                                               "run.stop_after_phase": 1}))
    assert "phase 0 complete" in resumed.stdout


def test_resume_counts_a_key_newer_than_the_checkpoint_as_its_default(tmp_path):
    """A run checkpointed before a config key existed ran with that key's default: it resumes under the default and
    is refused under any other value (mnemonics.inner_update is the example)."""
    from mnemonics_fast.config import ConfigError
    first = run_trainer(tiny_config(tmp_path, name="run", **{"run.stop_after_phase": 0, "train.epochs": 1}))
    path = first.run_dir / "checkpoints" / "phase_000.pt"
    state = torch.load(path, weights_only=False)
    del state["config"]["mnemonics"]["inner_update"]   # as written before the key existed
    atomic_torch_save(state, path)
    with pytest.raises(ConfigError, match=r"mnemonics\.inner_update"):
        run_trainer(tiny_config(tmp_path, name="run", **{"train.epochs": 1, "mnemonics.inner_update": "normalised"}))
    resumed = run_trainer(tiny_config(tmp_path, name="run", **{"train.epochs": 1, "run.stop_after_phase": 1}))
    assert "phase 0 complete" in resumed.stdout


# ------------------------------------------------------------------ branching from a shared phase-0 model
MN = {"mnemonics.enabled": True, "mnemonics.outer_steps": 2, "mnemonics.old_outer_steps": 1,
      "mnemonics.query_batch_size": 8, "train.epochs": 1, "train.milestones": [1]}


def test_branch_from_phase0_equals_a_straight_run(tmp_path):
    """A mnemonics run branched from a herding run's phase-0 checkpoint ends exactly like a mnemonics run trained
    from scratch: the model level is shared, the exemplar level of phase 0 is redone (not skipped)."""
    base = run_trainer(tiny_config(tmp_path, name="base", **{"run.stop_after_phase": 0, "train.epochs": 1,
                                                             "train.milestones": [1]}))
    straight = run_trainer(tiny_config(tmp_path, name="straight", **MN))
    branched = run_trainer(tiny_config(tmp_path, name="branched", **MN, **{"run.branch_from": str(base.run_dir)}))
    assert "branched from" in branched.stdout and "redoing its exemplar level" in branched.stdout
    assert branched.stdout.count("mnemonics (b)") == 3          # phase 0's exemplar level ran, then phases 1 and 2
    for key in ("top1", "acc_matrix"):
        assert branched.summary[key] == straight.summary[key], key
    a = torch.load(branched.run_dir / "checkpoints" / "phase_002.pt", weights_only=False)
    b = torch.load(straight.run_dir / "checkpoints" / "phase_002.pt", weights_only=False)
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    assert a["memory"]["pixels"].keys() == b["memory"]["pixels"].keys() and len(b["memory"]["pixels"]) == 6
    for c, px in b["memory"]["pixels"].items():
        assert torch.equal(a["memory"]["pixels"][c], px), c
    # the branch's phase 0 exemplars differ from the herding base's real images (mnemonics did run on them)
    assert base.trainer.memory.pixels == {}
    p0 = torch.load(branched.run_dir / "checkpoints" / "phase_000.pt", weights_only=False)["memory"]
    x = branched.trainer.x_train.cpu().float() / 255
    moved = [float((p0["pixels"][c] - x[p0["ranking"][c]]).abs().max()) for c in p0["pixels"]]
    assert len(moved) == 2 and min(moved) > 0                   # optimised, not the real images they started from
    # the branched run resumes like any other
    again = run_trainer(tiny_config(tmp_path, name="branched", **MN, **{"run.branch_from": str(base.run_dir)}))
    assert "phase 2 complete" in again.stdout and again.summary["top1"] == straight.summary["top1"]


def test_branch_from_refuses_a_different_model_level(tmp_path):
    from mnemonics_fast.config import ConfigError
    base = run_trainer(tiny_config(tmp_path, name="base", **{"run.stop_after_phase": 1, "train.epochs": 1,
                                                             "train.milestones": [1]}))
    with pytest.raises(ConfigError, match=r"train\.lr"):
        run_trainer(tiny_config(tmp_path, name="b1", **MN, **{"train.lr": 0.2, "run.branch_from": str(base.run_dir)}))
    with pytest.raises(ConfigError, match="phase-1 checkpoint"):
        run_trainer(tiny_config(tmp_path, name="b2", **MN, **{
            "run.branch_from": str(base.run_dir / "checkpoints" / "phase_001.pt")}))
    with pytest.raises(ConfigError, match="not a file"):
        run_trainer(tiny_config(tmp_path, name="b3", **MN, **{"run.branch_from": str(tmp_path / "nope.pt")}))


def test_precision_options_reach_the_exemplar_level(tmp_path, monkeypatch):
    """mnemonics.tf32 (default false: full fp32 exemplar gradients on CUDA) and mnemonics.bf16 (default false; on the
    CPU too) are what the exemplar level is given, for (b) and for (c)."""
    from mnemonics_fast.trainer import mnemonics_stage
    seen = []
    for name in ("optimise_exemplars", "adjust_old_exemplars"):
        real = getattr(mnemonics_stage, name)

        def spy(*a, _real=real, **kw):
            seen.append((kw["allow_tf32"], kw["autocast_dtype"]))
            return _real(*a, **kw)
        monkeypatch.setattr(mnemonics_stage, name, spy)
    run_trainer(tiny_config(tmp_path, name="fp32", **{**MN, "run.stop_after_phase": 1}))
    assert len(seen) == 3 and set(seen) == {(False, None)}      # (b) of phases 0 and 1, (c) of phase 1
    seen.clear()
    run_trainer(tiny_config(tmp_path, name="fast", **{**MN, "run.stop_after_phase": 0, "mnemonics.tf32": True,
                                                      "mnemonics.bf16": True}))
    assert seen == [(True, torch.bfloat16)]


def test_lr_scale_reaches_the_trainer(tmp_path):
    """mnemonics.lr_scale=exemplars multiplies beta by the exemplar count of the inner loss (16 in phase 0 here):
    the trainer's log shows the phase-0 exemplars moving more than under the paper's plain beta."""
    import re

    def change(scale):
        r = run_trainer(tiny_config(tmp_path, name=f"scale_{scale}", **{**MN, "mnemonics.lr": 0.01,
                                                                        "mnemonics.lr_scale": scale}))
        first = re.search(r"mnemonics \(b\): .*mean \|change\| ([0-9.e+-]+)", r.stdout)
        return float(first.group(1))

    plain, scaled = change("none"), change("exemplars")
    assert plain > 0 and scaled > 4 * plain


def test_mnemonics_init_random_picks_the_seeded_random_exemplars(tmp_path):
    """With mnemonics on, mnemonics.init (not memory.selection) chooses the initial exemplars: init=random starts
    from exactly the images a plain memory.selection=random run keeps, and the log names the selection that ran."""
    plain = run_trainer(tiny_config(tmp_path, name="plain_random", **{"train.epochs": 1, "train.milestones": [1],
                                                                      "memory.selection": "random"}))
    mn = run_trainer(tiny_config(tmp_path, name="mn_random", **{**MN, "mnemonics.init": "random",
                                                                "memory.selection": "herding"}))
    assert "selection random, mnemonics full" in mn.stdout
    assert "selection random" in plain.stdout and "mnemonics" not in plain.stdout.split("memory:")[1].splitlines()[0]
    assert plain.trainer.memory.ranking.keys() == mn.trainer.memory.ranking.keys()
    for c, r in plain.trainer.memory.ranking.items():
        assert torch.equal(r, mn.trainer.memory.ranking[c]), f"class {c}"


def test_mnemonics_reports_feature_drift_in_the_log_and_metrics(tmp_path):
    """Each exemplar level reports how far it moved the exemplars in feature space (what NME's class means see):
    cosines before/after in the log line and in the phase's metrics; with beta = 0 nothing moves (cosine 1)."""
    import json

    moved = run_trainer(tiny_config(tmp_path, name="moved", **{**MN, "mnemonics.lr": 50.0, "mnemonics.old_lr": 50.0}))
    still = run_trainer(tiny_config(tmp_path, name="still", **{**MN, "mnemonics.lr": 0.0, "mnemonics.old_lr": 0.0}))
    assert "features vs before: exemplar cosine" in moved.stdout and "exemplars classified correctly" in moved.stdout
    for run, changed in ((moved, True), (still, False)):
        phases = json.loads((run.run_dir / "metrics.json").read_text())["phases"]
        assert [("mnemonics" in p, "old" in p.get("mnemonics", {})) for p in phases] == [
            (True, False), (True, True), (True, True)]
        for p in phases:
            for level in p["mnemonics"].values():
                assert -1.0 <= level["exemplar_feature_cosine_min"] <= level["exemplar_feature_cosine_mean"] <= 1.0
                assert level["class_mean_cosine_min"] <= level["class_mean_cosine_mean"] <= 1.0 + 1e-6
                assert -1.0 <= level["nearest_other_class_mean_cosine_mean"] <= 1.0 + 1e-6
                assert 0 <= level["exemplar_accuracy_after"] <= 100 and 0 <= level["exemplar_accuracy_before"] <= 100
                if changed:
                    assert level["pixel_change_uint8_levels"] > 0 and level["exemplar_feature_cosine_mean"] < 1.0
                else:
                    assert level["pixel_change_uint8_levels"] == 0
                    assert level["exemplar_feature_cosine_min"] > 1.0 - 1e-5
                    assert level["classes_moved_past_nearest_neighbour"] == 0
                    assert level["exemplar_accuracy_after"] == level["exemplar_accuracy_before"]


def test_resuming_on_another_world_size_is_noted_and_recorded(tmp_path):
    """Resuming a 2-rank run's checkpoint on 1 rank works (same global batch) but is said, and every phase records
    the world size it ran on."""
    run_trainer(tiny_config(tmp_path, name="run", **{"run.stop_after_phase": 0, "train.epochs": 1}))
    ck = tmp_path / "run" / "checkpoints" / "phase_000.pt"
    state = torch.load(ck, weights_only=False)
    assert state["world_size"] == 1
    state["world_size"] = 2                                     # as a torchrun --nproc_per_node=2 run writes it
    atomic_torch_save(state, ck)
    resumed = run_trainer(tiny_config(tmp_path, name="run", **{"train.epochs": 1}))
    assert "phase_000.pt was written by a run on 2 rank(s); this one continues on 1" in resumed.stdout
    assert [p["world_size"] for p in resumed.summary["phases"]][1:] == [1, 1]


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """Results written atomically are readable like any file open() creates (umask applied), not mkstemp's 0600."""
    mask = os.umask(0)
    os.umask(mask)
    atomic_write_text(tmp_path / "m.json", "{}")
    atomic_torch_save({"a": 1}, tmp_path / "c.pt")
    for f in ("m.json", "c.pt"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o666 & ~mask


def test_uint8_storage_rounds_what_the_exemplar_level_returns(tmp_path, monkeypatch):
    """The trainer keeps optimised pixels as uint8 by rounding (128/255 - 1e-6 is level 128), never truncating
    (the released code's astype('uint8') gives 127: every pixel half a level darker on average)."""
    from mnemonics_fast.trainer import mnemonics_stage

    def fake(model, pixels, labels, *a, **kw):
        return torch.full_like(pixels, 128 / 255 - 1e-6)
    monkeypatch.setattr(mnemonics_stage, "optimise_exemplars", fake)
    run = run_trainer(tiny_config(tmp_path, **{**MN, "run.stop_after_phase": 0, "mnemonics.storage": "uint8"}))
    px = run.trainer.memory.pixels
    assert px and all(v.dtype == torch.uint8 and bool((v == 128).all()) for v in px.values())


def test_a_mnemonics_run_resumed_mid_way_ends_as_a_straight_one(tmp_path):
    """Stopped after phase 1 and resumed: the optimised pixels come back from the checkpoint (not the real images they
    started from), so phase 2 and the final memory equal an uninterrupted run's."""
    cfg = {**MN, "mnemonics.lr": 3.0}
    straight = run_trainer(tiny_config(tmp_path, name="straight", **cfg))
    run_trainer(tiny_config(tmp_path, name="cut", **{**cfg, "run.stop_after_phase": 1}))
    resumed = run_trainer(tiny_config(tmp_path, name="cut", **cfg))
    assert "resumed from" in resumed.stdout and "phase 1 complete" in resumed.stdout
    a, b = straight.trainer.memory.pixels, resumed.trainer.memory.pixels
    assert a.keys() == b.keys() and len(a) > 0
    for c in a:
        assert torch.equal(a[c], b[c]), f"class {c}: pixels differ after the resume"
    assert resumed.summary["top1"] == straight.summary["top1"]
