"""Benchmark: what the autograd layer of cosine_linear costs per call, C++ (csrc/autograd.cpp) vs the
Python twin (torch.library.register_autograd), side by side in one process.

    python bench/bench_cosine_autograd.py [--out bench/results/cosine_autograd_<card>.json] [--device cpu|cuda]

One step = out = cosine_linear(x, w, sigma); torch.autograd.grad(out, (x, w, sigma), grad_out), called eagerly. The
backend kernels are the same in both columns (CUDA kernels on a GPU, the plain-PyTorch reference on CPU); only the
autograd kernel differs, so the difference is the host time the C++ autograd saves on every call. On CPU the tiny
sizes make that host time the whole cost; on a GPU the eager call is host-bound at the cosine head's sizes (issue 4).
The C++ column is measured first; then the Python twin is registered over it for the rest of the process.

The same for exemplar_sgd_step_'s version-bump (ADInplaceOrView) layer on the list form: N tensors of 48 floats
per list, one call per step, C++ layer vs the Python one (which converts the three lists to Python and back). The
kernel underneath is the same in both columns (on CPU the plain-PyTorch reference, a Python loop, so the absolute
times are the reference's; the difference is the layer's host cost per call).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bench_cosine_linear import default_out_dir, environment, safe_name, write_json  # noqa: E402

import mnemonics_fast.ops as ops  # noqa: E402
from mnemonics_fast.ops import cosine, exemplar_sgd  # noqa: E402

SIZES = [(2, 4, 3), (128, 64, 100), (256, 512, 1000)]
SGD_LISTS = [100, 1000, 10000]


def median_ms(step, sync, samples: int, sample_s: float, max_reps: int = 10 ** 6) -> float:
    """Median ms per call of `step` over `samples` samples of back-to-back calls, each about `sample_s` long
    (5 warm-up calls, then 5 timed ones to pick the repetitions per sample)."""
    for _ in range(5):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    sync()
    reps = max(3, min(max_reps, int(sample_s / ((time.perf_counter() - t0) / 5))))
    per = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        sync()
        per.append((time.perf_counter() - t0) / reps * 1e3)
    return statistics.median(per)


def time_step(device: str, B: int, D: int, C: int, reps: int, samples: int) -> tuple[float, str]:
    g = torch.Generator().manual_seed(B * 7 + C)
    x = torch.randn(B, D, generator=g).to(device).requires_grad_()
    w = torch.randn(C, D, generator=g).to(device).requires_grad_()
    s = torch.tensor(10.0, device=device, requires_grad=True)
    go = torch.randn(B, C, generator=g).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        out = ops.cosine_linear(x, w, s)
        return torch.autograd.grad(out, (x, w, s), go)

    name = node_name(ops.cosine_linear(x, w, s).grad_fn)
    return median_ms(step, sync, samples, sample_s=0.1, max_reps=reps), name


def node_name(fn) -> str:
    """The autograd node's name. A node from a Python autograd.Function refuses .name() on torch 2.11 (a "legacy
    access pattern" error; seen on the H200 test machine), so fall back to its class name."""
    try:
        return fn.name()
    except RuntimeError:
        return type(fn).__name__


def time_sgd(device: str, n: int, samples: int) -> float:
    g = torch.Generator().manual_seed(n)
    lists = [[(torch.rand(3, 4, 4, generator=g) * 0.5 + 0.25).to(device) for _ in range(n)] for _ in range(3)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():   # lr 0: the pixels stay inside [0, 1] however often it runs
        ops.exemplar_sgd_step_(lists[0], lists[1], lists[2], 0.0, 0.9, 0.0, 0.0, 1.0)

    return median_ms(step, sync, samples, sample_s=0.2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--samples", type=int, default=15)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not ops.kernels_available():
        print(f"the extension is not loaded ({ops.backend_info()['reason_unavailable']}): there is no C++ autograd "
              f"to compare; nothing measured")
        return 0
    torch.set_num_threads(1)
    rows = {}
    for B, D, C in SIZES:
        rows[f"{B}x{D}x{C}"] = {"cpp_ms": time_step(a.device, B, D, C, a.reps, a.samples)}
    sgd = {n: {"cpp_ms": time_sgd(a.device, n, a.samples)} for n in SGD_LISTS}
    cosine.use_python_autograd()
    for B, D, C in SIZES:
        rows[f"{B}x{D}x{C}"]["python_ms"] = time_step(a.device, B, D, C, a.reps, a.samples)
    exemplar_sgd.use_python_inplace_layer()
    calls = []
    real = exemplar_sgd._increment_versions
    exemplar_sgd._increment_versions = lambda ts: (calls.append(len(ts)), real(ts))
    for n in SGD_LISTS:
        sgd[n]["python_ms"] = time_sgd(a.device, n, a.samples)
    exemplar_sgd._increment_versions = real
    assert calls, "the Python version-bump layer was not in the dispatch path"
    print(f"cosine_linear fwd+bwd per eager call on {a.device} ({environment()['card']}), ms (median):")
    print(f"{'B x D x C':>16} {'C++ autograd':>14} {'Python autograd':>16} {'saved':>8} {'ratio':>7}")
    out = {}
    for k, r in rows.items():
        (cpp, cname), (py, pname) = r["cpp_ms"], r["python_ms"]
        assert "CosineLinearFunction" in cname and "CosineLinearFunction" not in pname, (cname, pname)
        out[k] = {"cpp_autograd_ms": cpp, "python_autograd_ms": py, "saved_ms": py - cpp, "ratio": py / cpp}
        print(f"{k:>16} {cpp:>14.4f} {py:>16.4f} {py - cpp:>8.4f} {py / cpp:>6.2f}x")
    print(f"exemplar_sgd_step_ list form per call on {a.device}, ms (median); lists of N tensors of 3x4x4:")
    print(f"{'N':>16} {'C++ layer':>14} {'Python layer':>16} {'saved':>8} {'ratio':>7}")
    sgd_out = {}
    for n, r in sgd.items():
        cpp, py = r["cpp_ms"], r["python_ms"]
        sgd_out[str(n)] = {"cpp_layer_ms": cpp, "python_layer_ms": py, "saved_ms": py - cpp, "ratio": py / cpp,
                           "saved_us_per_tensor": (py - cpp) * 1e3 / n}
        print(f"{n:>16} {cpp:>14.4f} {py:>16.4f} {py - cpp:>8.4f} {py / cpp:>6.2f}x")
    res = {"bench": "cosine_autograd", "device": a.device, "threads": 1, "env": environment(),
           "backend": "CUDA kernels" if a.device == "cuda" else "plain-PyTorch reference (CPU)", "rows": out,
           "exemplar_sgd_list_layer": sgd_out}
    path = a.out or os.path.join(default_out_dir(), f"cosine_autograd_{safe_name(environment()['card']).lower()}.json")
    write_json(path, res)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
