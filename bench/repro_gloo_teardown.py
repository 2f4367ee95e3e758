"""Reproduces the torch/gloo abort at process exit that `mnemonics_fast.trainer.distributed.exit_process` avoids.

A 2-process torchrun job (gloo, CPU) with torch alone: DDP around a Linear layer, a few steps, one collective, a
barrier, destroy_process_group(), then the script ends - ordinarily, or through exit_process. On torch 2.14 the
ordinary ending aborts now and then ("terminate called without an active exception", a rank killed by SIGABRT): the
DDP reducer keeps the process group, and so its worker threads, alive past destroy_process_group(), and a worker
thread may drop the last reference to the barrier's work while the interpreter finalises (core dump: the aborting
thread is ProcessGroupGloo::runLoop in ~AsyncBarrierWork, taking the GIL in a tensor's decref).

    python bench/repro_gloo_teardown.py --runs 100 [--out bench/results/gloo_teardown_cpu.json]

Prints the failure count of each ending. Run it after a torch upgrade: if "plain" no longer fails, exit_process's
workaround can go. Not a test: the failure is rare (a few percent of runs) and depends on timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORKER = """
import datetime, sys, torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
m = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
for _ in range(5):
    m(torch.randn(3, 4)).sum().backward()
t = torch.ones(10)
dist.all_reduce(t)
dist.barrier()
if sys.argv[1] == "exit_process":
    from mnemonics_fast.trainer.distributed import exit_process
    exit_process(0)
dist.destroy_process_group()
"""


def run_many(ending: str, runs: int, script: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    fails, first = 0, None
    t0 = time.time()
    for i in range(runs):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(script), ending], env=env, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            fails += 1
            first = first or r.stderr.strip().splitlines()[0][:200]
        print(f"\r{ending:>12}: {i + 1}/{runs} runs, {fails} failed", end="", flush=True)
    print()
    return {"runs": runs, "failed": fails, "first_error_line": first, "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50, help="torchrun launches per ending")
    ap.add_argument("--endings", default="plain,exit_process")
    ap.add_argument("--out", default=None, help="write the counts as JSON here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER)
        res = {e: run_many(e, a.runs, script) for e in a.endings.split(",")}
    out = {"bench": "repro_gloo_teardown", "torch": torch.__version__, "python": platform.python_version(),
           "machine": f"cpu ({os.cpu_count()} cores)", "job": "torchrun --standalone --nproc_per_node=2, gloo, "
           "DDP(Linear) 5 steps, all_reduce, barrier, then the ending", "results": res}
    print(json.dumps(out["results"], indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
