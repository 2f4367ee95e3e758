"""Benchmark: cosine_linear forward + backward, our op vs the strongest cheap baselines, side by side in one process.

    python bench/bench_cosine_linear.py [--sizes 128x64x100,256x512x1000,4096x512x1000] [--dtypes float32,bfloat16]
                                        [--out bench/results] [--quick]

Per (B, D, C) and dtype, one "step" is out = f(x, w, sigma); torch.autograd.grad(out, (x, w, sigma), grad_out):
    eager reference          reference_cosine_linear, plain PyTorch
    torch.compile(reference) default inductor, static shapes
    CUDA graph of reference  the eager step captured once per input set, replayed
    ours (auto|fused|blas)   mnemonics_fast.ops.cosine_linear called eagerly (CPU launch overhead included)
    ours, CUDA graph         our step captured: the GPU time alone
Timing: CUDA events around `inner` steps, after warm-up; the median over many samples. Input sets rotate so that
the working set exceeds twice the L2 cache where one set does not already. Targets (issue 4, H100): <= 0.030 ms at
128x64x100, <= 0.050 ms at 256x512x1000, faster than every baseline at 4096x512x1000.

Writes <out>/bench_cosine_linear_<card>.json (or --out FILE.json). Without a GPU: a CPU sanity check, exit 0.
This file also holds the timing helpers that bench_exemplar_sgd.py imports.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

L2_BYTES = 50 * 2**20  # H100; only used to size the input rotation


# ---- shared helpers (also used by bench_exemplar_sgd.py) -------------------------------------------------------------
def card_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "unknown"


def environment() -> dict:
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
           "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "card": card_name()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    from mnemonics_fast import ops

    env["mnemonics_fast"] = ops.backend_info()
    return env


def n_rotations(set_bytes: int, cap: int = 8) -> int:
    """Input sets to cycle through so the working set is at least 2x L2 (no cheating from a warm cache)."""
    return max(1, min(cap, math.ceil(2 * L2_BYTES / max(set_bytes, 1))))


def cuda_time(step, *, warmup: int = 5, samples: int = 30, min_samples: int = 5, budget_s: float = 1.5,
              target_sample_ms: float = 1.0, max_inner: int = 200) -> dict:
    """Median milliseconds per call of step(i) (i counts calls, for rotating inputs), timed with CUDA events around
    `inner` back-to-back calls per sample. Stops after `samples` samples or once `budget_s` is spent (at least
    `min_samples`)."""
    i = 0
    for _ in range(warmup):
        step(i)
        i += 1
    torch.cuda.synchronize()
    # size `inner` so one sample lasts about target_sample_ms
    t0 = time.perf_counter()
    step(i)
    i += 1
    torch.cuda.synchronize()
    single_ms = (time.perf_counter() - t0) * 1e3
    inner = int(max(1, min(max_inner, target_sample_ms / max(single_ms, 1e-3))))
    times = []
    begin = time.perf_counter()
    while len(times) < samples:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            step(i)
            i += 1
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
        if len(times) >= min_samples and time.perf_counter() - begin > budget_s:
            break
    times.sort()
    return {"ms": statistics.median(times), "min_ms": times[0], "p90_ms": times[int(0.9 * (len(times) - 1))],
            "samples": len(times), "inner": inner}


def graph_steps(step_for_set, n_sets: int):
    """Capture step_for_set(k) into one CUDA graph per input set; returns a replaying step(i)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for k in range(n_sets):  # warm-up outside the capture (lazy init, cuBLAS handles, autotuning)
            step_for_set(k)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graphs = []
    for k in range(n_sets):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step_for_set(k)
        graphs.append(g)
    return lambda i: graphs[i % n_sets].replay()


def _exit_status(results: list[dict], checks: list[dict]) -> int:
    """1 when our op was wrong or failed to run: a table that quietly lost its 'ours' rows must not read as a pass."""
    bad = [c["method"] for c in checks if not c["ok"]] + [
        f"{r['method']}: {r['error']}" for r in results if r["method"].startswith("ours") and r.get("ms") is None
        and not str(r.get("error", "")).startswith("skipped")]
    for b in bad:
        print(f"FAILED: {b}", file=sys.stderr)
    return 1 if bad else 0


def default_out_dir() -> str:
    """Where results go without --out: $MNEMONICS_FAST_BENCH_OUT, else a folder in the temp dir. Never bench/results
    (a run would overwrite or litter the committed results; copy a file there, named with its card, on purpose)."""
    import tempfile
    return os.environ.get("MNEMONICS_FAST_BENCH_OUT") or os.path.join(tempfile.gettempdir(), "mnemonics_fast_bench")


def write_json(path, obj) -> None:
    """Atomically (a killed benchmark never leaves half a file), with default=str for dtypes and devices."""
    from mnemonics_fast.utils.io import atomic_write_text
    atomic_write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def output_path(out: str, name: str) -> str:
    if out.endswith(".json"):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        return out
    os.makedirs(out, exist_ok=True)
    return os.path.join(out, f"{name}_{safe_name(card_name())}.json")


def print_table(headers, rows) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(f"{h:<{w}}" for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(f"{str(c):<{w}}" for c, w in zip(r, widths)))


# ---- the benchmark ---------------------------------------------------------------------------------------------------
TARGET_MS = {(128, 64, 100): 0.030, (256, 512, 1000): 0.050}
CHECKS: list[dict] = []   # the in-run correctness checks of our op against the reference (bench_size)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_sets(B, D, C, dtype, n_sets):
    sets = []
    for k in range(n_sets):
        g = torch.Generator(device="cuda").manual_seed(k)
        x = torch.randn(B, D, device="cuda", generator=g).to(dtype).requires_grad_()
        w = torch.randn(C, D, device="cuda", generator=g).to(dtype).requires_grad_()
        s = torch.tensor(10.0 + k, device="cuda", requires_grad=True)  # LUCIR's sigma grows to ~10
        grad = torch.randn(B, C, device="cuda", generator=g).to(dtype)
        sets.append((x, w, s, grad))
    return sets


def bench_size(B, D, C, dtype, quick: bool) -> list[dict]:
    from mnemonics_fast import ops
    from mnemonics_fast.ops.reference import reference_cosine_linear

    elem = torch.finfo(dtype).bits // 8
    set_bytes = (B * D + C * D + 2 * B * C) * elem
    n_sets = n_rotations(set_bytes)
    sets = make_sets(B, D, C, dtype, n_sets)
    compiled = torch.compile(reference_cosine_linear, dynamic=False)
    kw = {"samples": 12, "budget_s": 0.5} if quick else {}

    def stepper(fn):
        def step_for_set(k):
            x, w, s, grad = sets[k]
            return torch.autograd.grad(fn(x, w, s), (x, w, s), grad)

        return step_for_set, (lambda i: step_for_set(i % n_sets))

    results = []

    def record(method, make_step, graphed=False):
        try:
            r = cuda_time(make_step(), **kw)
        except Exception as exc:  # a failing baseline is reported, not fatal
            r = {"ms": None, "error": f"{type(exc).__name__}: {exc}"[:300]}
        r.update(B=B, D=D, C=C, dtype=str(dtype).replace("torch.", ""), method=method, graphed=graphed,
                 n_sets=n_sets)
        results.append(r)
        shown = f"{r['ms']:.4f} ms" if r.get("ms") is not None else r["error"]
        print(f"  {B}x{D}x{C} {r['dtype']:<9} {method:<34} {shown}", flush=True)

    ref_set, ref_step = stepper(reference_cosine_linear)
    want = [t.float() for t in ref_set(0)]
    tol = 1e-3 if dtype == torch.float32 else 5e-2   # relative to each gradient's largest entry

    def checked(method, our_set):
        """Our gradients on set 0 against the reference's, in this run: a fast path that is wrong is reported as
        WRONG (and the script exits 1), never timed as if it were right."""
        got = [t.float() for t in our_set(0)]
        err = max(float((g - w).abs().max() / w.abs().max().clamp_min(1e-12)) for g, w in zip(got, want))
        CHECKS.append({"B": B, "D": D, "C": C, "dtype": str(dtype), "method": method, "max_rel_err": err,
                       "tol": tol, "ok": err <= tol})
        return err <= tol

    record("eager reference", lambda: ref_step)
    record("torch.compile(reference)", lambda: stepper(compiled)[1])
    record("CUDA graph of eager reference", lambda: graph_steps(ref_set, n_sets), graphed=True)
    for path in ("auto", "fused", "blas"):
        ops.set_cosine_linear_path(path)
        our_set, our_step = stepper(ops.cosine_linear)
        if not checked(f"ours ({path})", our_set):
            print(f"  {B}x{D}x{C} ours ({path}): WRONG gradients vs the reference (max rel err "
                  f"{CHECKS[-1]['max_rel_err']:.2e} > {tol}); not timed", flush=True)
            continue
        record(f"ours ({path})", lambda: our_step)
        record(f"ours ({path}), CUDA graph", lambda: graph_steps(our_set, n_sets), graphed=True)
    ops.set_cosine_linear_path("auto")
    return results


def summarize(results) -> list[list]:
    rows = []
    keys = sorted({(r["B"], r["D"], r["C"], r["dtype"]) for r in results}, key=lambda k: (k[3], k[0] * k[1] * k[2]))
    for key in keys:
        rs = {r["method"]: r for r in results if (r["B"], r["D"], r["C"], r["dtype"]) == key}
        ms = {m: r["ms"] for m, r in rs.items() if r.get("ms") is not None}
        base = {m: v for m, v in ms.items() if not m.startswith("ours")}
        best_base = min(base.values()) if base else None
        eager = ms.get("eager reference")
        target = TARGET_MS.get(key[:3])
        for m, v in ms.items():
            note = ""
            if m.startswith("ours"):
                if target is not None:
                    note = f"target {target} ms: {'met' if v <= target else 'MISSED'}"
                elif best_base is not None:
                    note = f"vs best baseline: {'faster' if v < best_base else 'SLOWER'}"
            rows.append([f"{key[0]}x{key[1]}x{key[2]}", key[3], m, f"{v:.4f}",
                         f"{eager / v:.1f}x" if eager else "-", f"{best_base / v:.2f}x" if best_base else "-", note])
    return rows


def cpu_sanity() -> None:
    from mnemonics_fast import ops
    from mnemonics_fast.ops.reference import reference_cosine_linear

    x, w, s = torch.randn(16, 8, requires_grad=True), torch.randn(5, 8), torch.tensor(2.0)
    torch.testing.assert_close(ops.cosine_linear(x, w, s), reference_cosine_linear(x, w, s))
    ops.cosine_linear(x, w, s).sum().backward()
    print("bench_cosine_linear: needs a CUDA GPU to time anything (torch.cuda.is_available() is False). "
          "CPU sanity check of the op: ok.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128x64x100,256x512x1000,4096x512x1000", help="BxDxC,...")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", default=None, help="directory or FILE.json (default: see default_out_dir)")
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        cpu_sanity()
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, for every method alike
    env = environment()
    print(f"card {env['card']} | torch {env['torch']} (CUDA {env['torch_cuda']}) | driver {env.get('driver')} | "
          f"kernels {'on' if env['mnemonics_fast']['kernels_available'] else 'OFF'}")
    results = []
    for dtype_name in args.dtypes.split(","):
        for size in args.sizes.split(","):
            B, D, C = (int(v) for v in size.lower().split("x"))
            results += bench_size(B, D, C, DTYPES[dtype_name.strip()], args.quick)
    rows = summarize(results)
    print()
    print(f"cosine_linear fwd+bwd, median ms per step | {env['card']} | torch {env['torch']} | "
          f"CUDA {env['torch_cuda']}")
    print_table(["BxDxC", "dtype", "method", "ms", "vs eager", "vs best baseline", "note"], rows)
    path = output_path(args.out or default_out_dir(), "bench_cosine_linear")
    write_json(path, {"benchmark": "cosine_linear fwd+bwd", "env": env, "results": results, "table": rows,
                      "correctness": CHECKS})
    print(f"\nwrote {path}")
    return _exit_status(results, CHECKS)


if __name__ == "__main__":
    sys.exit(main())
