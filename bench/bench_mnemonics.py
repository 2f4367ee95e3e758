"""One mnemonics outer step (exemplar gradient + update), side by side in one process on one card:

  naive       : the straightforward eager implementation (`naive_outer_step` below, ~30 lines): dict-based
                functional_call, create_graph unrolling, an SGD update in separate ops. What the 87 ms probe measured.
  eager       : mnemonics_fast.methods.mnemonics.ExemplarOptimiser, the default-correct oracle path.
  eager+chunk : the same with exemplar_chunk (reverse sweep, one chunk's second-order graph alive): the memory option.
  graph       : cuda_graph=True: the whole gradient computation of one outer step captured once and replayed.
  graph+nolean: graph with mnemonics.lean_conv_grad=false: PyTorch's own conv double backward, which also computes
                the (unused) weight-gradient convolutions with [C, M, H, W] kernels (methods/lean_conv.py).
  graph+bf16  : cuda_graph=True, autocast_dtype=bfloat16 for the model's forward passes.
  compiled    : compile_mode="default" (mnemonics.compile): the whole outer-step gradient as one torch.func function
                (grad of a function that takes a grad) compiled by torch.compile/inductor (methods/compiled_grad.py).
                +graph: that compiled code captured in our CUDA graph; +ro: mode="reduce-overhead" (inductor's own
                CUDA graphs); +bf16 as above. Compilation happens in the first call, reported as first_call_s.

Setting: ResNet-32, CIFAR-100 B50 phase 1 (50 old frozen rows + 10 new), exemplars of the 10 new classes (M in
--sizes), T inner steps (--steps), query batch of --query real-sized images, modes full and head. Inputs are random
pixels (timing does not depend on content). Per cell: median ms over --repeats timed steps after --warmup steps
(CUDA events; the graph capture happens in the warm-up), the peak of torch.cuda.max_memory_allocated above the
model+data baseline, and the max relative difference of the first gradient to the naive one. torch.compile is not a
baseline of the autograd engines: AOTAutograd does not support double backward (create_graph through a compiled
graph); the `compiled` variants avoid it by tracing torch.func's transforms instead (full/first_order only).

    python bench/bench_mnemonics.py --out bench/results/mnemonics_h100.json          # on the GPU
    python bench/bench_mnemonics.py --quick                                           # CPU sanity run (seconds)
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from mnemonics_fast import ops
from mnemonics_fast.utils.io import atomic_write_text
from mnemonics_fast.methods.mnemonics import ExemplarOptimiser
from mnemonics_fast.models import build_model

MEAN, STD = (0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)
NUM_OLD, NUM_NEW = 50, 10


def naive_outer_step(model, bank, labels, qx, qy, buf, *, mode, inner_lr, inner_steps, lr, momentum):
    """The straightforward eager outer step. Returns (new bank, exemplar gradient)."""
    model.eval()
    bank = bank.detach().requires_grad_(True)
    module = model if mode == "full" else model.head
    fast = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if mode == "head":
        x_in = model.features(bank)
        with torch.no_grad():
            q_in = model.features(qx)
    else:
        x_in, q_in = bank, qx
    for _ in range(inner_steps):
        loss = F.cross_entropy(functional_call(module, fast, (x_in,)), labels)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {n: w - inner_lr * g for (n, w), g in zip(fast.items(), grads)}
    loss_val = F.cross_entropy(functional_call(module, fast, (q_in,)), qy)
    (g_bank,) = torch.autograd.grad(loss_val, bank)
    with torch.no_grad():
        buf.mul_(momentum).add_(g_bank)
        new = (bank - lr * buf).clamp_(0.0, 1.0)
    return new, g_bank


def fp64_grad(mode, m, steps, args, device):
    """The exemplar gradient of the naive step in float64: the oracle every fp32/TF32/bf16 path is measured against.
    rel err vs naive compares two rounded paths (they may share their rounding, or both be off); this one does not."""
    model, bank, labels, qx, qy = make_problem(m, args.image, args.query, device, args.arch)
    model.double()
    kw = dict(inner_lr=args.inner_lr, inner_steps=steps, lr=args.lr, momentum=0.9)
    bank = bank.double()
    g = naive_outer_step(model, bank, labels, qx.double(), qy, torch.zeros_like(bank), mode=mode, **kw)[1]
    del model
    return g.float()


def make_problem(m: int, hw: int, query: int, device, arch: str = "resnet32"):
    torch.manual_seed(0)
    model = build_model(arch, MEAN, STD, num_classes=NUM_OLD).to(device)
    model.grow(NUM_NEW)
    model.to(device)
    g = torch.Generator(device="cpu").manual_seed(1)
    bank = torch.rand(m, 3, hw, hw, generator=g).to(device)
    labels = (NUM_OLD + torch.arange(m) % NUM_NEW).to(device)
    qx = torch.rand(query, 3, hw, hw, generator=g).to(device)
    qy = torch.randint(0, NUM_OLD + NUM_NEW, (query,), generator=g).to(device)
    return model, bank, labels, qx, qy


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, warmup: int, repeats: int) -> list[float]:
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(repeats):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                out.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t) * 1e3)
        return out


def run_variant(name, mode, m, steps, args, device, ref_grad, fp64_ref=None):
    model, bank, labels, qx, qy = make_problem(m, args.image, args.query, device, args.arch)
    kw = dict(inner_lr=args.inner_lr, inner_steps=steps, lr=args.lr, momentum=0.9)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    row = {"variant": name, "mode": mode, "M": m, "T": steps, "query": args.query, "image": args.image,
           "arch": args.arch}
    try:
        if name == "naive":
            state = {"bank": bank, "buf": torch.zeros_like(bank)}
            first = naive_outer_step(model, bank, labels, qx, qy, torch.zeros_like(bank), mode=mode, **kw)[1]

            def fn():
                state["bank"], _ = naive_outer_step(model, state["bank"], labels, qx, qy, state["buf"], mode=mode,
                                                    **kw)
            times = Timer(device)(fn, args.warmup, args.repeats)
            opt = None
        else:
            compile_mode = ("reduce-overhead" if "+ro" in name else "default") if "compiled" in name else "none"
            opt = ExemplarOptimiser(model, bank, labels, mode=mode, cuda_graph="graph" in name,
                                    autocast_dtype=torch.bfloat16 if "bf16" in name else None,
                                    exemplar_chunk=args.chunk if "chunk" in name else None,
                                    lean_conv="nolean" not in name, compile_mode=compile_mode, **kw)
            t0 = time.perf_counter()
            first = opt.grad(qx, qy)[0].clone()
            row["first_call_s"] = time.perf_counter() - t0
            if compile_mode != "none":
                # False where the compiled engine does not apply (head) or failed to build (said on stderr)
                row["compiled_active"] = opt._fn is not opt._eager_fn
            times = Timer(device)(lambda: opt.step(qx, qy), args.warmup, args.repeats)
            row["graph_active"] = opt.cuda_graph  # False if the capture failed and it fell back to eager
            opt.close()
        row["ms"] = statistics.median(times)
        row["ms_min"] = min(times)
        if ref_grad is not None:
            # Relative L2, not max: with ReLU the exact exemplar gradient is discontinuous (a pre-activation within
            # rounding of 0 flips its mask), so fp32 paths that round differently (chunking, cuDNN algorithms) can
            # differ by ~1e-2 on single pixels while agreeing in norm. Exactness is tested in float64 (tests/).
            row["rel_err_vs_naive"] = float((first - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30))
        if fp64_ref is not None:
            diff = first.float() - fp64_ref
            row["rel_err_vs_fp64"] = float(diff.norm() / fp64_ref.norm().clamp_min(1e-30))
            # ReLU kinks (docs/mnemonics.md): a pre-activation rounded across 0 changes a few exemplars' gradients a
            # lot and leaves the rest alone. The median exemplar's error and the share of the squared error in the
            # worst 1% of pixels tell such flips (large share) from a path that is inaccurate everywhere.
            per = diff.flatten(1).norm(dim=1) / fp64_ref.flatten(1).norm(dim=1).clamp_min(1e-30)
            sq = diff.flatten().square().sort(descending=True).values
            row["rel_err_vs_fp64_median_exemplar"] = float(per.median())
            row["sq_err_share_top1pct_pixels"] = float(sq[:max(1, sq.numel() // 100)].sum() / sq.sum().clamp_min(1e-30))
        if cuda:
            torch.cuda.synchronize()
            row["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        return row, first
    except torch.cuda.OutOfMemoryError:
        row["ms"] = None
        row["error"] = "OOM"
        return row, None
    except Exception as exc:  # noqa: BLE001 - keep the rest of the table
        row["ms"] = None
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"  {name} {mode} M={m} T={steps} failed: {row['error']}", flush=True)
        return row, None
    finally:
        model = None  # free it before the next variant (the timing closure refers to it)
        if cuda:
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny CPU sanity run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="100,1000", help="exemplar counts M")
    ap.add_argument("--steps", default="1,5", help="inner steps T")
    ap.add_argument("--modes", default="full,head")
    ap.add_argument("--variants", default="naive,eager,eager+chunk,graph,graph+nolean,graph+bf16",
                    help="+chunk: exemplar_chunk; +bf16: autocast; +nolean: torch's own conv double backward "
                         "(mnemonics.lean_conv_grad=false) for the A/B")
    ap.add_argument("--query", type=int, default=128)
    ap.add_argument("--image", type=int, default=32)
    ap.add_argument("--arch", default="resnet32", choices=["resnet32", "resnet18"],
                    help="resnet18 with --image 224: the ImageNet-size memory check (use +chunk variants)")
    ap.add_argument("--chunk", type=int, default=250, help="exemplar_chunk of the +chunk variant")
    ap.add_argument("--inner-lr", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-fp64", action="store_true",
                    help="skip the float64 oracle (rel err vs fp64 column; one extra float64 step per setting)")
    ap.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                    help="TF32 for fp32 convolutions and matmuls in every variant: torch's default (convolutions "
                         "TF32, matmuls not), on, or off (full fp32: the paths then agree with the float64 oracle; "
                         "the trainer's mnemonics.tf32=false)")
    ap.add_argument("--out", default=None, help="JSON path (default: mnemonics_<card>_<time>.json in a folder of the "
                    "temp dir, or $MNEMONICS_FAST_BENCH_OUT)")
    args = ap.parse_args()
    if args.quick:
        args.device, args.sizes, args.steps, args.query, args.image = "cpu", "20", "1,2", 16, 16
        args.warmup, args.repeats, args.chunk = 1, 2, 8
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.tf32 != "default":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    variants = [v for v in args.variants.split(",")
                if device.type == "cuda" or ("graph" not in v and "+ro" not in v)]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    header = {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "device": str(device),
              "threads": torch.get_num_threads(), "ops": ops.backend_info(), "args": vars(args),
              "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
              "setting": f"{args.arch}, {NUM_OLD} old + {NUM_NEW} new classes, query {args.query}, "
                         f"{args.image}x{args.image} pixels"}
    print(f"# mnemonics outer step | {card} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
          f"{header['setting']} | TF32 convolutions {header['tf32']['cudnn']}, matmuls {header['tf32']['matmul']} | "
          f"median of {args.repeats} after {args.warmup} warm-up")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_cosine_linear import default_out_dir   # the benchmarks' one rule for where results go
    out = Path(args.out) if args.out else Path(default_out_dir()) / (
        f"mnemonics_{card.replace(' ', '_').replace('/', '_')}_{datetime.datetime.now():%Y%m%d_%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'mode':5} {'M':>5} {'T':>2}  {'variant':12} {'ms':>9} {'x naive':>8} {'peak MB':>9} {'rel err':>9} "
          f"{'vs fp64':>9}")
    for mode in args.modes.split(","):
        for m in (int(s) for s in args.sizes.split(",")):
            for steps in (int(s) for s in args.steps.split(",")):
                ref, naive_ms = None, None
                oracle = None
                if not args.no_fp64:
                    try:
                        oracle = fp64_grad(mode, m, steps, args, device)
                    except torch.cuda.OutOfMemoryError:
                        print(f"  float64 oracle {mode} M={m} T={steps}: out of memory, column left empty")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                for v in variants:
                    row, grad = run_variant(v, mode, m, steps, args, device, ref, oracle)
                    if v == "naive":
                        ref, naive_ms = grad, row.get("ms")
                    if naive_ms and row.get("ms"):
                        row["speedup_vs_naive"] = naive_ms / row["ms"]
                    rows.append(row)
                    ms = f"{row['ms']:9.2f}" if row.get("ms") else f"{row.get('error', '-')[:9]:>9}"
                    sp = f"{row['speedup_vs_naive']:7.1f}x" if "speedup_vs_naive" in row else f"{'-':>8}"
                    pk = f"{row['peak_mb']:9.0f}" if "peak_mb" in row else f"{'-':>9}"
                    er = f"{row['rel_err_vs_naive']:9.1e}" if "rel_err_vs_naive" in row else f"{'-':>9}"
                    er += f" {row['rel_err_vs_fp64']:9.1e}" if "rel_err_vs_fp64" in row else f" {'-':>9}"
                    if "rel_err_vs_fp64" in row:
                        er += (f"  (median exemplar {row['rel_err_vs_fp64_median_exemplar']:.1e}, worst 1% of pixels "
                               f"{100 * row['sq_err_share_top1pct_pixels']:.0f}% of it)")
                    note = "  (capture failed: eager)" if row.get("graph_active") is False and "graph" in v else ""
                    if row.get("compiled_active") is False:
                        note += "  (not compiled: eager)"
                    elif row.get("compiled_active"):
                        note += f"  (first call {row['first_call_s']:.0f} s: compile)"
                    print(f"{mode:5} {m:5d} {steps:2d}  {v:12} {ms} {sp} {pk} {er}{note}", flush=True)
                    # rewritten after every row: a run cut off by a time limit keeps what it measured
                    atomic_write_text(out, json.dumps({"header": header, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
