"""Benchmark: one exemplar SGD(momentum, weight decay) + clamp step, our op vs PyTorch's ways of doing it.

    python bench/bench_exemplar_sgd.py [--sizes 1000x3x32x32,10000x3x32x32,100000x3x32x32,1000x3x224x224]
                                       [--out bench/results] [--quick]

For N exemplars of shape S, two layouts:
    list  N separate tensors (views of one allocation, one per exemplar)
    bank  one contiguous [N, *S] tensor (the recommended layout)
Methods (list): python loop of the reference, torch._foreach_* (mul_, add_, add_, add_, clamp_min_, clamp_max_),
SGD(foreach=True) + foreach clamp, SGD(fused=True) + foreach clamp, ours. Methods (bank): torch ops on the bank (the
reference on a 1-element list), torch.compile of that update (one fused Triton kernel: the strongest cheap
baseline), SGD(fused=True) + clamp_, ours.

Bytes moved per step: read param, grad, buf + write param, buf = 20 bytes per element; compared with a measured
device-to-device copy (1 GiB, read + write counted). Targets (issue 4, H100): >= 80% of copy bandwidth from 1e4
exemplars of 3x32x32 up; >= 20x faster than torch._foreach at 1e3 and 1e4 exemplars. Timing helpers and JSON/table
output come from bench_cosine_linear.py. Without a GPU: a CPU sanity check, exit 0.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cosine_linear import (  # noqa: E402
    cuda_time,
    default_out_dir,
    environment,
    n_rotations,
    _exit_status,
    output_path,
    print_table,
    write_json,
)

CHECKS: list[dict] = []
LR, MOMENTUM, WD, LO, HI = 0.05, 0.9, 5e-4, -2.2, 2.7  # per-step hyperparameters; the range of normalised pixels
PYTHON_LOOP_MAX = 10_000  # the per-tensor Python loop launches 5 kernels per exemplar: skipped above this


def copy_bandwidth() -> dict:
    n = 2**28  # 1 GiB of float32
    src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    r = cuda_time(lambda i: dst.copy_(src), samples=20, budget_s=1.0)
    r["gbps"] = 2 * n * 4 / (r["ms"] * 1e-3) / 1e9
    src = dst = None  # free the 2 GiB now (not `del`: the timed lambda closes over them)
    torch.cuda.empty_cache()
    return r


def bench_size(N, shape, quick: bool, copy_gbps: float) -> list[dict]:
    from mnemonics_fast import ops
    from mnemonics_fast.ops.reference import reference_exemplar_sgd_step_

    numel = math.prod(shape)
    total = N * numel
    set_bytes = 3 * total * 4
    n_sets = n_rotations(set_bytes, cap=4)
    kw = {"warmup": 2, "min_samples": 3, "samples": 10 if quick else 20, "budget_s": 0.5 if quick else 1.0}
    results = []
    label = f"{N}x{'x'.join(map(str, shape))}"

    # state: n_sets independent (param, grad, buf) banks, and list views of them
    banks = []
    for k in range(n_sets):
        g = torch.Generator(device="cuda").manual_seed(k)
        p = torch.randn(N, *shape, device="cuda", generator=g)
        banks.append((p, torch.randn(N, *shape, device="cuda", generator=g) * 0.1, torch.zeros_like(p)))
    lists = [tuple(list(t.unbind(0)) for t in bank) for bank in banks]

    def record(layout, method, make_step, skip_reason=None):
        if skip_reason:
            r = {"ms": None, "error": f"skipped: {skip_reason}"}
        else:
            try:
                r = cuda_time(make_step(), **kw)
            except Exception as exc:
                r = {"ms": None, "error": f"{type(exc).__name__}: {exc}"[:300]}
        r.update(N=N, shape=list(shape), layout=layout, method=method, n_sets=n_sets)
        if r.get("ms"):
            r["gbps"] = 20 * total / (r["ms"] * 1e-3) / 1e9
            r["pct_of_copy"] = 100 * r["gbps"] / copy_gbps
        results.append(r)
        shown = f"{r['ms']:.4f} ms  {r['gbps']:.0f} GB/s" if r.get("ms") else r["error"]
        print(f"  {label:<18} {layout:<5} {method:<32} {shown}", flush=True)

    # ---- list layout
    record("list", "python loop (reference)",
           lambda: (lambda i: reference_exemplar_sgd_step_(*lists[i % n_sets], LR, MOMENTUM, WD, LO, HI)),
           skip_reason=f"N > {PYTHON_LOOP_MAX}" if N > PYTHON_LOOP_MAX else None)

    def foreach_step(i):
        p, g, b = lists[i % n_sets]
        torch._foreach_mul_(b, MOMENTUM)
        torch._foreach_add_(b, g)
        torch._foreach_add_(b, p, alpha=WD)
        torch._foreach_add_(p, b, alpha=-LR)
        torch._foreach_clamp_min_(p, LO)
        torch._foreach_clamp_max_(p, HI)

    record("list", "torch._foreach_*", lambda: foreach_step)

    def optimizer_step(flavour, layout):
        opts, params = [], []
        for k in range(n_sets):
            if layout == "list":
                ps, gs, _ = lists[k]
            else:
                ps, gs = [banks[k][0]], [banks[k][1]]
            for p, g in zip(ps, gs):
                p.grad = g
            opts.append(torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM, weight_decay=WD, **{flavour: True}))
            params.append(ps)

        def step(i):
            k = i % n_sets
            opts[k].step()
            if layout == "list":
                torch._foreach_clamp_min_(params[k], LO)
                torch._foreach_clamp_max_(params[k], HI)
            else:
                params[k][0].clamp_(LO, HI)

        return step

    record("list", "SGD(foreach=True) + clamp", lambda: optimizer_step("foreach", "list"))
    record("list", "SGD(fused=True) + clamp", lambda: optimizer_step("fused", "list"))
    # our op against the reference on a copy of set 0, in this run (a wrong kernel is never timed as if right)
    p0, g0, b0 = (t.clone() for t in banks[0])
    p1, b1 = p0.clone(), b0.clone()
    reference_exemplar_sgd_step_([p0], [g0], [b0], LR, MOMENTUM, WD, LO, HI)
    ops.exemplar_sgd_step_([p1], [g0], [b1], LR, MOMENTUM, WD, LO, HI)
    err = max(float((p1 - p0).abs().max()), float((b1 - b0).abs().max()))
    CHECKS.append({"N": N, "shape": list(shape), "method": "ours", "max_abs_err": err, "tol": 1e-5, "ok": err <= 1e-5})
    if err > 1e-5:
        print(f"  {label:<18} ours: WRONG vs the reference (max abs err {err:.2e}); not timed", flush=True)
        return results
    record("list", "ours", lambda: (lambda i: ops.exemplar_sgd_step_(*lists[i % n_sets], LR, MOMENTUM, WD, LO, HI)))
    for bank in banks:
        bank[0].grad = None

    # ---- bank layout
    record("bank", "torch ops (reference)",
           lambda: (lambda i: reference_exemplar_sgd_step_(*([t] for t in banks[i % n_sets]), LR, MOMENTUM, WD, LO,
                                                           HI)))

    def compiled_update(p, g, b):
        b.mul_(MOMENTUM).add_(g).add_(p, alpha=WD)
        p.add_(b, alpha=-LR).clamp_(LO, HI)

    compiled = torch.compile(compiled_update, dynamic=True)
    record("bank", "torch.compile(update)", lambda: (lambda i: compiled(*banks[i % n_sets])))
    record("bank", "SGD(fused=True) + clamp_", lambda: optimizer_step("fused", "bank"))
    record("bank", "ours", lambda: (lambda i: ops.exemplar_sgd_step_(*([t] for t in banks[i % n_sets]), LR, MOMENTUM,
                                                                     WD, LO, HI)))
    banks.clear()  # free this size's tensors before the next one (the lambdas close over these lists)
    lists.clear()
    torch.cuda.empty_cache()
    return results


def summarize(results, copy_gbps) -> list[list]:
    rows = []
    for label in dict.fromkeys(f"{r['N']}x{'x'.join(map(str, r['shape']))}" for r in results):
        rs = [r for r in results if f"{r['N']}x{'x'.join(map(str, r['shape']))}" == label]
        foreach = next((r["ms"] for r in rs if r["method"] == "torch._foreach_*" and r.get("ms")), None)
        for r in rs:
            if not r.get("ms"):
                rows.append([label, r["layout"], r["method"], "-", "-", "-", "-", r["error"][:40]])
                continue
            note = ""
            if r["method"] == "ours":
                big = r["N"] * math.prod(r["shape"]) >= 10_000 * 3072
                if big:
                    note = f"target >= 80% of copy: {'met' if r['pct_of_copy'] >= 80 else 'MISSED'}"
                if r["N"] <= 10_000 and foreach:
                    note += ("; " if note else "") + f">= 20x foreach: {'met' if foreach / r['ms'] >= 20 else 'MISSED'}"
            rows.append([label, r["layout"], r["method"], f"{r['ms']:.4f}", f"{r['gbps']:.0f}",
                         f"{r['pct_of_copy']:.0f}%", f"{foreach / r['ms']:.1f}x" if foreach else "-", note])
    return rows


def cpu_sanity() -> None:
    from mnemonics_fast import ops
    from mnemonics_fast.ops.reference import reference_exemplar_sgd_step_

    p, g = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    b, p2, b2 = torch.zeros_like(p), p.clone(), torch.zeros_like(p)
    ops.exemplar_sgd_step_([p], [g], [b], LR, MOMENTUM, WD, LO, HI)
    reference_exemplar_sgd_step_([p2], [g], [b2], LR, MOMENTUM, WD, LO, HI)
    assert torch.equal(p, p2) and torch.equal(b, b2)
    print("bench_exemplar_sgd: needs a CUDA GPU to time anything (torch.cuda.is_available() is False). "
          "CPU sanity check of the op: ok.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000x3x32x32,10000x3x32x32,100000x3x32x32,1000x3x224x224",
                        help="NxC,HxW,... (N exemplars of shape CxHxW)")
    parser.add_argument("--out", default=None, help="directory or FILE.json (default: a folder in the temp dir)")
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        cpu_sanity()
        return 0
    env = environment()
    print(f"card {env['card']} | torch {env['torch']} (CUDA {env['torch_cuda']}) | driver {env.get('driver')} | "
          f"kernels {'on' if env['mnemonics_fast']['kernels_available'] else 'OFF'}")
    copy = copy_bandwidth()
    print(f"device-to-device copy, 1 GiB: {copy['gbps']:.0f} GB/s (read + write)")
    results = []
    for size in args.sizes.split(","):
        dims = [int(v) for v in size.lower().split("x")]
        results += bench_size(dims[0], tuple(dims[1:]), args.quick, copy["gbps"])
    rows = summarize(results, copy["gbps"])
    print()
    print(f"exemplar SGD + clamp step, median ms | {env['card']} | torch {env['torch']} | CUDA {env['torch_cuda']} | "
          f"copy {copy['gbps']:.0f} GB/s")
    print_table(["exemplars", "layout", "method", "ms", "GB/s", "% copy", "vs foreach", "note"], rows)
    path = output_path(args.out or default_out_dir(), "bench_exemplar_sgd")
    write_json(path, {"benchmark": "exemplar SGD + clamp step", "env": env, "copy": copy, "results": results,
                      "table": rows, "correctness": CHECKS})
    print(f"\nwrote {path}")
    return _exit_status(results, CHECKS)


if __name__ == "__main__":
    sys.exit(main())
