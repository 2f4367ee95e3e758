"""mnemonics.shard_inner: one outer step with the inner loop replicated on every rank vs split over the ranks,
side by side in one process group (torch.distributed, gloo on CPU / nccl on GPUs), same problem, same query shards.

Each rank holds the whole bank of M exemplars and its own query shard. Replicated: every rank unrolls the T inner
steps over all M exemplars. Sharded: over M/W of them, plus one all-reduce of the parameter gradient per inner step
(and one in the backward). Prints ms per outer step (median over --repeats after --warmup, the slowest rank's time),
the ratio, and whether both give the same bank (max abs difference after the timed steps).

    python bench/bench_shard_inner.py --world 2 --out bench/results/shard_inner_cpu.json     # CPU, 1 thread a rank
    torchrun --nproc_per_node=8 bench/bench_shard_inner.py --out ...                          # GPUs (untested here)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_mnemonics import make_problem  # noqa: E402

from mnemonics_fast.methods.mnemonics import ExemplarOptimiser  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(rank: int, world: int, a) -> dict | None:
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}") if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    rows = []
    for steps in [int(t) for t in a.steps.split(",")]:
        banks = {}
        for shard in (False, True):
            model, bank, labels, qx, qy = make_problem(a.m, a.image, a.query * world, device)
            q = (qx[rank::world].contiguous(), qy[rank::world].contiguous())
            with ExemplarOptimiser(model, bank, labels, mode="full", inner_lr=0.01, inner_steps=steps, lr=1.0,
                                   exemplar_chunk=a.chunk or None, shard_inner=shard) as opt:
                for _ in range(a.warmup):
                    opt.step(*q)
                times = []
                for _ in range(a.repeats):
                    dist.barrier()
                    _sync(device)
                    t0 = time.perf_counter()
                    opt.step(*q)
                    _sync(device)
                    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
                    dist.all_reduce(dt, op=dist.ReduceOp.MAX)   # a step lasts as long as its slowest rank
                    times.append(float(dt) * 1e3)
                banks[shard] = opt.exemplars.clone()
            rows.append({"T": steps, "shard_inner": shard, "ms": statistics.median(times), "ms_all": times})
        diff = float((banks[True] - banks[False]).abs().max())
        rep, sh = rows[-2]["ms"], rows[-1]["ms"]
        rows[-1]["speedup_vs_replicated"] = rep / sh
        rows[-1]["max_abs_bank_diff_vs_replicated"] = diff
        if rank == 0:
            print(f"T={steps}: replicated {rep:9.1f} ms | sharded {sh:9.1f} ms | x{rep / sh:.2f} | "
                  f"bank max |diff| {diff:.1e}", flush=True)
    if rank != 0:
        return None
    return {"bench": "shard_inner", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({os.cpu_count()} cores, {a.threads} thread(s) per rank)", "world": world,
            "backend": dist.get_backend(), "torch": torch.__version__, "python": platform.python_version(),
            "setting": f"ResNet-32 mode full, M={a.m} exemplars of {a.image}x{a.image}, query {a.query} per rank, "
                       f"chunk {a.chunk or 'none'}, median of {a.repeats} after {a.warmup} warm-up",
            "rows": rows}


def _spawned(rank: int, world: int, init: str, a) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        res = run(rank, world, a)
        if res is not None and a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
            print(f"wrote {a.out}")
    finally:
        dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2, help="ranks to spawn (ignored under torchrun)")
    ap.add_argument("--m", type=int, default=64, help="exemplars in the bank")
    ap.add_argument("--image", type=int, default=32)
    ap.add_argument("--query", type=int, default=32, help="query images per rank")
    ap.add_argument("--steps", default="1,2", help="T values")
    ap.add_argument("--chunk", type=int, default=0, help="exemplar_chunk (0: unrolled engine)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        try:
            res = run(dist.get_rank(), dist.get_world_size(), a)
            if res is not None and a.out:
                Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
        finally:
            dist.destroy_process_group()
        return 0
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_spawned, args=(a.world, os.path.join(d, "init"), a), nprocs=a.world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
