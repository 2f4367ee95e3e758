"""Shared fixtures of the core suite: tiny CPU configs, in-process end-to-end runs, a CLI runner.

Everything runs on CPU in a few minutes on 2 cores. Intra-op threads are pinned to 1: on a 2-core machine the
OpenMP pool of two threads spin-waits badly as soon as anything else runs (the DDP test's two ranks, a CLI
subprocess), which made single steps 10x slower; with one thread each process runs at full speed. Results are
deterministic for a given thread count (the resume tests compare runs inside one process).
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ configs
# A tiny learnable problem: 6 generated classes (8x8 images), 2 base classes + 2 phases of 2, 2 epochs per phase.
TINY = {
    "data.dataset": "synthetic",
    "data.synthetic_classes": 6,
    "data.synthetic_per_class": 30,
    "data.image_size": 8,
    "protocol.base_classes": 2,
    "protocol.num_phases": 2,
    "memory.per_class": 8,
    "train.epochs": 2,
    "train.batch_size": 16,
    "train.lr": 0.05,
    "train.milestones": [1],
    "train.eval_batch_size": 64,
    "run.progress": False,
    "run.tensorboard": False,
    "run.device": "cpu",
    "run.checkpoint_every": 0,
}


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return str(v)


def overrides(base: dict | None = None, **changes) -> list[str]:
    """Dotted override strings from TINY (or `base`) updated by `changes` (keys with '__' for '.')."""
    d = dict(TINY if base is None else base)
    for k, v in changes.items():
        d[k.replace("__", ".")] = v
    return [f"{k}={_fmt(v)}" for k, v in d.items()]


def tiny_config(output_dir, name: str = "tiny", **changes):
    from mnemonics_fast.config import load_config
    return load_config(None, overrides(**{"run.output_dir": str(output_dir), "run.name": name, **changes}))


@dataclass
class RunResult:
    trainer: object
    summary: dict
    stdout: str
    run_dir: Path


def run_trainer(cfg, dist_info=None) -> RunResult:
    """Run the Trainer in this process, capturing what it prints."""
    from mnemonics_fast.trainer import Trainer
    from mnemonics_fast.trainer.distributed import DistInfo

    tr = Trainer(cfg, dist_info or DistInfo())
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        summary = tr.run()
    if tr._log_file is not None:
        tr._log_file.close()
    return RunResult(tr, summary, buf.getvalue(), tr.run_dir)


# ------------------------------------------------------------------ shared end-to-end runs (computed once)
@pytest.fixture(scope="session")
def lucir_run(tmp_path_factory) -> RunResult:
    """LUCIR, herding, growing memory of 20 per class, 3 evaluations; checkpoints kept for inspection."""
    out = tmp_path_factory.mktemp("lucir_run")
    cfg = tiny_config(out, name="lucir", **{"memory.per_class": 20, "data.synthetic_per_class": 40,
                                           "run.tensorboard": True})
    return run_trainer(cfg)


@pytest.fixture(scope="session")
def icarl_run(tmp_path_factory) -> RunResult:
    """iCaRL, random selection, fixed memory (60 in total), weight transfer on, NME with the flipped view."""
    out = tmp_path_factory.mktemp("icarl_run")
    cfg = tiny_config(out, name="icarl", **{"method.name": "icarl", "memory.selection": "random",
                                           "memory.kind": "fixed", "memory.total": 60,
                                           "model.weight_transfer": True, "method.nme_view": "plain+flip",
                                           "protocol.num_phases": 4, "protocol.base_classes": 2,
                                           "train.epochs": 1, "train.milestones": []})
    return run_trainer(cfg)


# ------------------------------------------------------------------ CLI
def cli_env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def run_cli(args: list[str], cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m mnemonics_fast.train ARGS` as a subprocess (text output captured)."""
    return subprocess.run([sys.executable, "-m", "mnemonics_fast.train", *args], cwd=str(cwd), env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
