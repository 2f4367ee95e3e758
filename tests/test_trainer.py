"""The trainer end to end (tiny CPU runs): metrics, logs, evaluation, the LR schedule, the CLI."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, run_trainer, tiny_config
from mnemonics_fast.methods import PhaseInfo
from mnemonics_fast.models import build_model
from mnemonics_fast.trainer import Trainer
from mnemonics_fast.trainer.metrics import RunLog


# ------------------------------------------------------------------ the LR schedule (SPEC §7)
class _FakeLoader:
    def __init__(self, steps=2, num_classes=3):
        g = torch.Generator().manual_seed(0)
        self.batches = [(torch.rand(4, 3, 8, 8, generator=g), torch.randint(0, num_classes, (4,), generator=g))
                        for _ in range(steps)]
        self.epochs = []

    def set_epoch(self, e):
        self.epochs.append(e)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def _record_lrs(monkeypatch):
    lrs = []
    orig = torch.optim.SGD.step

    def step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    return lrs


@pytest.mark.parametrize("epochs,milestones,gamma,expected", [
    (6, [2, 4], 0.1, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]),
    (4, [1], 0.1, [0.1, 0.01, 0.01, 0.01]),
    (3, [], 0.1, [0.1, 0.1, 0.1]),
    (4, [1, 3], 0.2, [0.1, 0.02, 0.02, 0.004]),      # train.gamma reaches the scheduler
])
def test_scheduler_steps_after_each_epoch(tmp_path, monkeypatch, epochs, milestones, gamma, expected):
    """MultiStepLR at milestones [80, 120] means epochs 0..79 at lr, 80..119 at lr/10: the lr seen by every step of
    epoch e is lr * gamma^(#milestones <= e). Stepping the scheduler before the epoch would shift this by one."""
    tr = Trainer(tiny_config(tmp_path, **{"train.gamma": gamma}))
    tr.runlog = RunLog(tmp_path, False, False)
    torch.manual_seed(0)
    model = build_model("resnet32", (0.5,) * 3, (0.25,) * 3, num_classes=3)
    loader = _FakeLoader()
    lrs = _record_lrs(monkeypatch)
    tr.train_model(model, None, loader, PhaseInfo(0, 0, 3), epochs=epochs, lr=0.1, milestones=milestones)
    assert loader.epochs == list(range(epochs))
    per_epoch = [lrs[e * len(loader):(e + 1) * len(loader)] for e in range(epochs)]
    for e, got in enumerate(per_epoch):
        assert got == pytest.approx([expected[e]] * len(loader)), f"epoch {e}"


def test_training_reduces_the_loss(tmp_path):
    """A sanity check that the training loop optimises: the loss on fixed batches goes down."""
    tr = Trainer(tiny_config(tmp_path, **{"train.weight_decay": 0.0}))
    tr.runlog = RunLog(tmp_path, False, False)
    torch.manual_seed(0)
    model = build_model("resnet32", (0.5,) * 3, (0.25,) * 3, num_classes=3)
    loader = _FakeLoader(steps=2)
    first = tr.train_model(model, None, loader, PhaseInfo(0, 0, 3), epochs=1, lr=0.05, milestones=[])["loss"]
    last = tr.train_model(model, None, loader, PhaseInfo(0, 0, 3), epochs=8, lr=0.05, milestones=[])["loss"]
    assert math.isfinite(first) and last < first


# ------------------------------------------------------------------ end to end
def _check_metrics(run, num_phases: int):
    s = run.summary
    n = num_phases + 1
    saved = json.loads((run.run_dir / "metrics.json").read_text())
    for kind in ("cnn", "nme"):
        top1 = s["top1"][kind]
        assert len(top1) == n
        assert all(0.0 <= a <= 100.0 for a in top1)
        assert s["avg_incremental_acc"][kind] == pytest.approx(sum(top1) / n)          # phase 0 included
        assert s["last_acc"][kind] == top1[-1]
        mat = s["acc_matrix"][kind]
        assert [len(row) for row in mat] == list(range(1, n + 1))                       # triangular
        assert all(0.0 <= a <= 100.0 for row in mat for a in row)
        assert s["forgetting"][kind] == pytest.approx(mat[0][0] - mat[-1][0])
        assert all(0.0 <= a <= 100.0 for a in s["top5"][kind])
        assert all(t5 >= t1 for t1, t5 in zip(top1, s["top5"][kind]))
        for key in ("avg_incremental_acc", "last_acc", "forgetting", "top1", "acc_matrix"):
            assert saved[key][kind] == s[key][kind]                                   # JSON floats round-trip
    assert len(s["phases"]) == n and [p["phase"] for p in s["phases"]] == list(range(n))
    for p in saved["phases"]:
        assert p["wall_s"] > 0 and p["train_img_per_s"] > 0 and p["peak_mem_mb"] > 0
        assert p["memory_exemplars"] > 0 and p["memory_bytes"] > 0
    assert saved["world_size"] == 1 and saved["class_order"] == run.trainer.order
    assert saved["memory_kind"] == run.trainer.cfg.memory.kind
    assert saved["config"]["seed"] == run.trainer.cfg.seed and "torch" in saved["versions"]
    rows = list(csv.reader((run.run_dir / "metrics.csv").read_text().splitlines()))
    assert rows[0][:4] == ["phase", "classes", "top1_cnn", "top1_nme"]
    assert len(rows) == n + 1
    for i, row in enumerate(rows[1:]):
        assert int(row[0]) == i and float(row[2]) == pytest.approx(s["top1"]["cnn"][i], abs=0.006)
    # Console: one 'top 1 accuracy CNN' line per phase, the memory kind, the summary table.
    out = run.stdout
    assert out.count("top 1 accuracy CNN") == n
    assert f"memory: {run.trainer.cfg.memory.kind}" in out
    assert "average incremental accuracy" in out
    assert (run.run_dir / "log.txt").read_text().count("top 1 accuracy CNN") == n


def test_lucir_herding_growing_end_to_end(lucir_run):
    _check_metrics(lucir_run, num_phases=2)
    assert "memory: growing (20 per class), selection herding" in lucir_run.stdout
    try:
        import torch.utils.tensorboard  # noqa: F401
        assert list((lucir_run.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    except ImportError:   # tensorboard is optional: the run says so and still writes metrics.json/CSV
        assert "tensorboard is not installed" in lucir_run.stdout
    # (8x8 runs of 2 epochs are too noisy for an accuracy floor; test_ddp checks learning on a 16x16 setting.)


@pytest.mark.slow
def test_icarl_random_fixed_end_to_end(icarl_run):
    _check_metrics(icarl_run, num_phases=4)
    assert "memory: fixed (60 total), selection random" in icarl_run.stdout
    tr = icarl_run.trainer
    assert len(tr.memory) <= tr.cfg.memory.total
    assert not (icarl_run.run_dir / "tensorboard").exists()            # run.tensorboard=false


@pytest.mark.slow
def test_lucir_random_fixed_class_balanced_finetune(tmp_path, monkeypatch):
    """LUCIR's ImageNet option (head-only fine-tuning with BN frozen) runs and leaves the backbone untouched."""
    cfg = tiny_config(tmp_path, **{"memory.kind": "fixed", "memory.total": 24, "memory.selection": "random",
                                   "method.class_balanced_finetune": True, "method.cbf_epochs": 2,
                                   "method.cbf_milestones": [1], "train.epochs": 1, "protocol.num_phases": 1,
                                   "data.synthetic_classes": 4})
    seen, loaders, heads = [], [], []
    orig, orig_loader = Trainer.train_model, Trainer._train_loader

    def spy(self, model, teacher, loader, info, epochs, lr, milestones, *args, **kwargs):
        before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
        head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
        out = orig(self, model, teacher, loader, info, epochs, lr, milestones, *args, **kwargs)
        after = model.backbone.state_dict()
        seen.append((info.phase, bool(kwargs.get("head_only", False)), epochs, lr,
                     all(torch.equal(before[k], after[k]) for k in before)))
        if kwargs.get("head_only"):
            head_after = model.head.state_dict()
            heads.append({k: torch.equal(head_before[k], head_after[k]) for k in head_before})
        return out

    def spy_loader(self, idx, labels, *args, **kwargs):
        loaders.append((idx.clone(), labels.clone()))
        return orig_loader(self, idx, labels, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_model", spy)
    monkeypatch.setattr(Trainer, "_train_loader", spy_loader)
    run = run_trainer(cfg)
    _check_metrics(run, num_phases=1)
    assert seen[0][:2] == (0, False) and seen[1][:2] == (1, False)
    assert seen[2] == (1, True, 2, 0.01, True)            # head only, cbf schedule, backbone (and BN stats) frozen
    # LUCIR's default CBF (ft_flag 2): old and new rows train, sigma stays; old rows frozen again afterwards
    assert heads == [{"fc1.weight": False, "fc2.weight": False, "sigma": True}]
    assert not run.trainer.model.head.fc1.weight.requires_grad and run.trainer.model.head.sigma.requires_grad
    assert "class-balanced fine-tuning" in run.stdout
    assert len(run.trainer.memory) <= 24
    # Class-balanced: 24 // 4 = 6 exemplars of each of the 4 seen classes (the old ones already trimmed from 12),
    # and they are the memory the run keeps (the new classes' selected exemplars, not other images of theirs).
    cbf_idx, cbf_lab = loaders[2]
    assert torch.bincount(cbf_lab, minlength=4).tolist() == [6, 6, 6, 6]
    mem_idx, mem_lab = run.trainer.memory.index_exemplars()
    assert sorted(zip(cbf_idx.tolist(), cbf_lab.tolist())) == sorted(zip(mem_idx.tolist(), mem_lab.tolist()))


def test_reported_accuracy_recomputed_from_the_final_model(lucir_run):
    """CNN and NME top-1 of the last phase, recomputed here from the final model, class means and the test split."""
    tr = lucir_run.trainer
    model = tr.model.eval()
    n_seen = tr.phases.classes_up_to(len(tr.phases) - 1)
    test_idx = torch.nonzero(tr.y_test < n_seen).flatten()
    y = tr.y_test[test_idx]
    bs = tr.cfg.train.eval_batch_size
    with torch.no_grad():
        outs = [model(tr.x_test[test_idx[s:s + bs]].float() / 255, return_all=True)
                for s in range(0, len(test_idx), bs)]
    logits = torch.cat([o.logits for o in outs])
    feats = torch.cat([o.features for o in outs])
    cnn = float((logits.argmax(1) == y).float().mean() * 100)
    nme = float(((F.normalize(feats, dim=1) @ tr.class_means.T).argmax(1) == y).float().mean() * 100)
    assert lucir_run.summary["last_acc"]["cnn"] == pytest.approx(cnn, abs=1e-4)
    assert lucir_run.summary["last_acc"]["nme"] == pytest.approx(nme, abs=1e-4)
    # The accuracy over all seen classes is the test-count-weighted mean of the class-group accuracies.
    groups = torch.where(y < tr.phases.base, 0, 1 + (y - tr.phases.base) // tr.phases.per_phase)
    counts = torch.bincount(groups).tolist()
    row = lucir_run.summary["acc_matrix"]["cnn"][-1]
    assert sum(a * c for a, c in zip(row, counts)) / sum(counts) == pytest.approx(cnn, abs=1e-3)


@pytest.mark.slow
def test_cli_demo_config_runs(tmp_path):
    """`python -m mnemonics_fast.train` (the embedded digits demo, shrunk): exit 0, the per-phase lines, metrics."""
    out = tmp_path / "runs"
    r = run_cli(["data.image_size=8", "train.epochs=1", "train.milestones=[]", "run.progress=false",
                 "run.tensorboard=false", f"run.output_dir={out}", "train.eval_batch_size=512"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("top 1 accuracy CNN") == 4
    assert "memory: growing (20 per class)" in r.stdout
    assert "Traceback" not in r.stderr
    metrics = json.loads((out / "demo_digits" / "metrics.json").read_text())
    assert len(metrics["top1"]["cnn"]) == 4
    assert sorted(p.name for p in (out / "demo_digits" / "checkpoints").iterdir()) == \
        [f"phase_{i:03d}.pt" for i in range(4)]


# ------------------------------------------------------------------ train.compile
def _compile_or_skip():
    from mnemonics_fast.trainer.compile import compile_unavailable
    why = compile_unavailable(torch.device("cpu"))
    if why:
        pytest.skip(f"torch.compile cannot run here: {why}")


def test_compile_trains_like_eager_and_is_undone(tmp_path):
    """train.compile: one LUCIR epoch (teacher, less-forget, margin ranking) through the compiled backbone lands on
    the eager run's weights up to float rounding; the compiled graph really ran (Dynamo counted it), and afterwards
    both backbones are plain modules again (the exemplar level needs double backward, which compiled graphs lack)."""
    _compile_or_skip()
    from torch._dynamo.utils import counters

    from mnemonics_fast.trainer.compile import compiled_backbones

    def run(mode):
        tr = Trainer(tiny_config(tmp_path))
        tr.runlog = RunLog(tmp_path, False, False)
        tr.compile_mode = mode
        torch.manual_seed(0)
        model = build_model("resnet32", (0.5,) * 3, (0.25,) * 3, num_classes=3)
        teacher = build_model("resnet32", (0.5,) * 3, (0.25,) * 3, num_classes=3)
        teacher.load_state_dict(model.state_dict())
        teacher.eval().requires_grad_(False)
        model.grow(2)
        # float64: batch-4 BatchNorm amplifies float32 rounding differences (fused vs unfused reductions) into
        # ~1e-4 weight differences within 3 steps; in float64 the two paths must agree to rounding.
        model.double(), teacher.double()
        loader = _FakeLoader(steps=3, num_classes=5)
        loader.batches = [(x.double(), y) for x, y in loader.batches]
        tr.train_model(model, teacher, loader, PhaseInfo(1, 3, 2), epochs=1, lr=0.05, milestones=[])
        for m in (model, teacher):
            assert m.backbone._compiled_call_impl is None
        return model

    torch._dynamo.reset()
    counters.clear()
    eager = run("none")
    assert counters["stats"]["unique_graphs"] == 0
    compiled = run("default")
    assert counters["stats"]["unique_graphs"] >= 2         # the student (train, grad) and the teacher (eval, no grad)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
    with compiled_backbones([compiled, None], "none"):      # "none" leaves the module alone
        assert compiled.backbone._compiled_call_impl is None


def test_compile_unavailable_is_said_once_and_training_goes_on_eagerly(tmp_path, monkeypatch):
    from mnemonics_fast.trainer import loop
    monkeypatch.setattr(loop, "compile_unavailable", lambda device: "no C++ compiler (test)")
    tr = Trainer(tiny_config(tmp_path, **{"train.compile": "default"}))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        tr.setup()
    assert tr.compile_mode == "none"
    assert buf.getvalue().count("train.compile=default: torch.compile cannot run here (no C++ compiler (test))") == 1


def test_feature_passes_stay_fp32_unless_amp_eval():
    """train.amp autocasts the model level only; evaluation, herding, imprinting and class means run in fp32 unless
    train.amp_eval asks for bf16 too (bf16 logits flip close top-1 calls). Checked on the context the trainer picks."""
    import warnings
    from mnemonics_fast.config import Config
    tr = Trainer.__new__(Trainer)
    tr.device, tr.cfg = torch.device("cuda", 0), Config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a CPU-only torch warns that CUDA autocast is unavailable
        assert tr.cfg.train.amp and not tr.cfg.train.amp_eval
        assert isinstance(tr._autocast(), torch.autocast)
        assert not isinstance(tr._autocast(evaluation=True), torch.autocast)
        tr.cfg.train.amp_eval = True
        assert isinstance(tr._autocast(evaluation=True), torch.autocast)
        tr.cfg.train.amp = False
        assert not isinstance(tr._autocast(), torch.autocast) and not isinstance(tr._autocast(True), torch.autocast)


def test_trainer_passes_lucir_the_old_and_new_class_counts(tmp_path, monkeypatch):
    """The loss tests check lambda = lambda_base * sqrt(old/new) and the margin ranking's old/new split on the
    functions; this checks the trainer's wiring: in every batch of phase p, num_old is the teacher head's size, num_new
    the phase's classes, and the lambda and margin-ranking calls receive exactly those counts."""
    import mnemonics_fast.methods.lucir as lucir
    calls, lams, mrs = [], [], []
    orig_loss, orig_lam, orig_mr = lucir.LUCIR.loss, lucir.less_forget_lambda, lucir.margin_ranking_loss

    def loss(self, out, targets, teacher_out, info):
        calls.append((info.phase, info.num_old, info.num_new, out.logits.shape[1],
                      None if teacher_out is None else teacher_out.logits.shape[1], int(targets.max())))
        return orig_loss(self, out, targets, teacher_out, info)

    def lam(num_old, num_new, base):
        lams.append((num_old, num_new, base, orig_lam(num_old, num_new, base)))
        return lams[-1][-1]

    def mr(cos, targets, num_old, *args, **kwargs):
        mrs.append((num_old, cos.shape[1]))
        return orig_mr(cos, targets, num_old, *args, **kwargs)

    monkeypatch.setattr(lucir.LUCIR, "loss", loss)
    monkeypatch.setattr(lucir, "less_forget_lambda", lam)
    monkeypatch.setattr(lucir, "margin_ranking_loss", mr)
    run = run_trainer(tiny_config(tmp_path, **{"train.epochs": 1, "method.lambda_base": 5.0}))
    _check_metrics(run, num_phases=2)
    seen = {}
    for phase, old, new, out_c, teacher_c, top in calls:
        seen.setdefault(phase, set()).add((old, new, out_c, teacher_c))
        assert top < old + new                                   # labels within the seen classes
    assert seen == {0: {(0, 2, 2, None)}, 1: {(2, 2, 4, 2)}, 2: {(4, 2, 6, 4)}}
    assert {(o, n, b) for o, n, b, _ in lams} == {(2, 2, 5.0), (4, 2, 5.0)}
    assert all(v == pytest.approx(5.0 * math.sqrt(o / n)) for o, n, _, v in lams)
    assert set(mrs) == {(2, 4), (4, 6)}
