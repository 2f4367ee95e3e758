"""DDP on CPU (gloo, 2 processes): exemplars are selected globally (identical on every rank, drawn from the whole
class, not a rank's shard), every rank ends with the same model, and the result is close to the 1-process run."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import run_trainer, tiny_config

pytestmark = pytest.mark.slow

# Image size 16: at 8x8 the 4-pixel crop padding makes the tiny runs too noisy to compare two runs meaningfully.
DDP_CHANGES = {"data.image_size": 16, "train.epochs": 3, "train.milestones": [2], "memory.per_class": 10,
               "data.synthetic_per_class": 60, "train.lr": 0.02, "train.eval_batch_size": 256}


def _worker(rank: int, world: int, tmp: str, seed: int = 0, changes: dict | None = None) -> None:
    from mnemonics_fast.trainer import Trainer
    from mnemonics_fast.trainer.distributed import DistInfo

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        cfg = tiny_config(tmp, name="ddp", seed=seed, **{**DDP_CHANGES, **(changes or {})})
        tr = Trainer(cfg, DistInfo(rank=rank, world=world, local_rank=rank, device=torch.device("cpu")))
        summary = tr.run()
        torch.save({"summary": summary, "ranking": tr.memory.ranking, "class_means": tr.class_means,
                    "model": tr.model.state_dict(), "y_train": tr.y_train, "compile_mode": tr.compile_mode},
                   f"{tmp}/rank{rank}.pt")
        if tr._log_file is not None:
            tr._log_file.close()
    except BaseException:
        dist.destroy_process_group()
        raise
    # As the CLI does: end without the interpreter's teardown, where a gloo worker thread can abort the process
    # after DDP (mnemonics_fast.trainer.distributed.exit_process says why).
    from mnemonics_fast.trainer.distributed import exit_process
    exit_process(0)


@pytest.fixture(scope="module")
def ddp_result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(tmp)), nprocs=2, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = run_trainer(tiny_config(tmp_path_factory.mktemp("single"), name="single", **DDP_CHANGES))
    return ranks, single, tmp


def test_ranks_hold_identical_exemplars(ddp_result):
    (r0, r1), single, _ = ddp_result
    assert r0["ranking"].keys() == r1["ranking"].keys() == set(range(6))
    for c in r0["ranking"]:
        assert torch.equal(r0["ranking"][c], r1["ranking"][c]), f"class {c}: ranks selected different exemplars"
        assert len(r0["ranking"][c]) == 10
        assert torch.all(r0["y_train"][r0["ranking"][c]] == c)
    assert torch.equal(r0["class_means"], r1["class_means"])
    assert r0["summary"]["top1"] == r1["summary"]["top1"]


def test_exemplars_are_chosen_from_the_whole_class(ddp_result):
    """Rank r computes features of positions r, r+2, ... of the class's images; a rank-local selection would only
    ever pick from its own share. The global one picks from both shares."""
    (r0, _), _, _ = ddp_result
    y = r0["y_train"]
    mixed = 0
    for phase_classes in ((0, 1), (2, 3), (4, 5)):
        lo, hi = phase_classes[0], phase_classes[-1] + 1
        new_idx = torch.nonzero((y >= lo) & (y < hi)).flatten()
        position = {int(i): p for p, i in enumerate(new_idx)}
        for c in phase_classes:
            parities = {position[int(i)] % 2 for i in r0["ranking"][c]}
            mixed += parities == {0, 1}
    assert mixed == 6


def test_ranks_end_with_the_same_model(ddp_result):
    (r0, r1), _, _ = ddp_result
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), f"{k} differs between ranks"


def test_ddp_close_to_single_process(ddp_result):
    """Same global batches, gradients averaged: the runs differ only through BatchNorm statistics (8 vs 16 samples
    per batch) and float summation order. Measured on this setting over training seeds 0-5: the 1-process NME
    average incremental accuracy ranges 66-84 and the 2-process run lies 1.3-8.3 points from it (the smaller BN
    batches cost a little). 15 points allow for that; a broken DDP path (a rank training on half the data, wrong
    labels, per-rank exemplars or features) falls towards chance, (50 + 25 + 16.7) / 3 = 31%, which the floor of 50
    also catches."""
    (r0, _), single, _ = ddp_result
    s_ddp, s_one = r0["summary"], single.summary
    assert len(s_ddp["top1"]["nme"]) == len(s_one["top1"]["nme"]) == 3
    assert abs(s_ddp["avg_incremental_acc"]["nme"] - s_one["avg_incremental_acc"]["nme"]) <= 15
    assert s_ddp["avg_incremental_acc"]["nme"] > 50 and s_one["avg_incremental_acc"]["nme"] > 50


def test_only_rank0_writes(ddp_result):
    _, _, tmp = ddp_result
    run_dir = tmp / "ddp"
    assert (run_dir / "metrics.json").is_file()
    import json
    assert json.loads((run_dir / "metrics.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"phase_{i:03d}.pt" for i in range(3)]


def test_ddp_with_compiled_backbone(tmp_path):
    """train.compile under DDP (gloo, 2 processes): the compiled backward still feeds DDP's gradient all-reduce, so
    both ranks end with the same model and results, and the three phases complete (teacher compiled too)."""
    from mnemonics_fast.trainer.compile import compile_unavailable
    why = compile_unavailable(torch.device("cpu"))
    if why:
        pytest.skip(f"torch.compile cannot run here: {why}")
    changes = {"train.compile": "default", "train.epochs": 1, "train.milestones": []}
    mp.spawn(_worker, args=(2, str(tmp_path), 0, changes), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["compile_mode"] == r1["compile_mode"] == "default"
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), f"{k} differs between ranks"
    assert r0["summary"]["top1"] == r1["summary"]["top1"] and len(r0["summary"]["top1"]["nme"]) == 3
    for c in r0["ranking"]:
        assert torch.equal(r0["ranking"][c], r1["ranking"][c])


def test_torchrun_cli(tmp_path):
    """`torchrun --nproc_per_node=2 -m mnemonics_fast.train ...` (env-based init, gloo on CPU): exit 0, one set of
    console lines (rank 0 only), world_size 2 in metrics.json."""
    import json
    import subprocess
    import sys

    from conftest import cli_env, overrides

    out = tmp_path / "runs"
    args = overrides(**{"run.output_dir": str(out), "run.name": "trun", "train.epochs": 1, "train.milestones": []})
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "mnemonics_fast.train", *args], cwd=str(tmp_path), env=cli_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("top 1 accuracy CNN") == 3
    assert "world 2" in r.stdout
    metrics = json.loads((out / "trun" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["top1"]["nme"]) == 3


def test_torchrun_bad_data_is_one_error_line(tmp_path):
    """A data error found by rank 0 (which loads first) ends every rank with it: one 'error:' line, from rank 0, and
    no rank left in a collective to die with a gloo 'connection closed' traceback."""
    import subprocess
    import sys

    from conftest import cli_env, overrides

    args = overrides(**{"run.output_dir": str(tmp_path / "runs"), "data.dataset": "imagefolder",
                        "data.root": str(tmp_path / "no_tree")})
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "mnemonics_fast.train", *args], cwd=str(tmp_path), env=cli_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.count("error: data.root=") == 1, r.stderr[-3000:]
    assert "Connection closed" not in r.stderr and "Traceback" not in r.stderr.split("error: data.root=")[0]


def test_torchrun_mnemonics_shard_inner(tmp_path):
    """The trainer's mnemonics exemplar level with mnemonics.shard_inner under torchrun (2 gloo ranks): runs through
    (b) and (c) every phase; MNEMONICS_FAST_DEBUG=1 makes every optimisation assert the ranks' banks bit-identical
    before its final broadcast."""
    import json
    import subprocess
    import sys

    from conftest import cli_env, overrides

    out = tmp_path / "runs"
    args = overrides(**{"run.output_dir": str(out), "run.name": "shard", "train.epochs": 1, "train.milestones": [],
                        "mnemonics.enabled": True, "mnemonics.shard_inner": True, "mnemonics.inner_steps": 2,
                        "mnemonics.outer_steps": 2, "mnemonics.old_outer_steps": 1, "mnemonics.query_batch_size": 8})
    env = dict(cli_env(), MNEMONICS_FAST_DEBUG="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "mnemonics_fast.train", *args], cwd=str(tmp_path), env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mnemonics full (inner loop sharded over 2 ranks)" in r.stdout and r.stdout.count("mnemonics (b)") == 3
    metrics = json.loads((out / "shard" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["top1"]["nme"]) == 3


def test_exit_process_after_distributed(tmp_path):
    """exit_process after a gloo run with DDP: keeps the exit code, runs the atexit handlers and flushes what was
    printed (it skips only the interpreter's C-level teardown, where torch 2.14's gloo workers can abort)."""
    import subprocess
    import sys

    from conftest import cli_env

    script = f"""
import atexit, torch, torch.distributed as dist
from mnemonics_fast.trainer.distributed import exit_process
dist.init_process_group("gloo", init_method="file://{tmp_path}/rdv", rank=0, world_size=1)
m = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
m(torch.randn(4, 3)).sum().backward()
dist.barrier()
atexit.register(lambda: print("atexit ran", flush=True))
print("buffered line", end="")
exit_process(3)
print("not reached")
"""
    r = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "buffered line" in r.stdout and "atexit ran" in r.stdout and "not reached" not in r.stdout
