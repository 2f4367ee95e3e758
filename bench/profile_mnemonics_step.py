"""Where the time of one mnemonics outer step goes: a torch.profiler table of the eager `full` step (ResNet-32,
M exemplars, T=1, 128 query images; the bench_mnemonics.py problem), next to a plain training step (forward +
backward, no second order) on the same M + 128 images for scale.

    python bench/profile_mnemonics_step.py [--m 100] [--rows 25] [--out profile.txt]

On a GPU the table is sorted by device time (kernels), on CPU by CPU time. It exists because the graphed outer step
measured on an H100 (41.6 ms for M=100) was far above its FLOP count; the table says which kernels to attack.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mnemonics import make_problem  # noqa: E402

from mnemonics_fast.methods.mnemonics import ExemplarOptimiser  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=100)
    ap.add_argument("--query", type=int, default=128)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    model, bank, labels, qx, qy = make_problem(a.m, 32, a.query, dev)
    opt = ExemplarOptimiser(model, bank, labels, mode="full", inner_lr=0.01, inner_steps=1, lr=1.0, momentum=0.9)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def train_step():
        x = torch.cat([bank, qx])
        y = torch.cat([labels, qy])
        loss = F.cross_entropy(model(x), y)
        torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    lines = [f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, M={a.m}, "
             f"query={a.query}, ResNet-32 32x32, mode full, T=1"]
    for name, fn in (("plain train step (fwd+bwd on M+query)", train_step), ("mnemonics outer step", lambda:
                                                                             opt.step(qx, qy))):
        for _ in range(3):
            fn()
        sync()
        t = time.perf_counter()
        n = 10 if cuda else 2
        for _ in range(n):
            fn()
        sync()
        lines.append(f"{name}: {(time.perf_counter() - t) / n * 1e3:.2f} ms (eager, wall)")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        opt.step(qx, qy)
        sync()
    ev = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    lines.append(f"\nprofile of one outer step, top {a.rows} by {sort}:")
    lines.append(ev.table(sort_by=sort, row_limit=a.rows, max_name_column_width=60))
    if cuda:
        kernels = [e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA]
        lines.append(f"CUDA kernels launched: {sum(e.count for e in kernels)}; device time "
                     f"{sum(e.self_device_time_total for e in kernels) / 1e3:.2f} ms")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    opt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
