"""Exercise every kernel launch path once on small shapes, for compute-sanitizer (memcheck, racecheck):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
        python bench/sanitize_ops.py --tool memcheck

(without the caching allocator every tensor is its own allocation, so memcheck sees accesses past a tensor's end).
Covers: cosine_linear forward + backward on the fused and the cuBLAS path, fp32/bf16/fp16, odd sizes, zero rows,
a bf16 sigma; exemplar_sgd_step_ on a bank, a mixed list (tails, misaligned views), and a >64-tensor list (device
table). Results are compared loosely with the references, so a silent wrong answer also fails. Exits 0 when clean.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mnemonics_fast import ops  # noqa: E402
from mnemonics_fast.ops.reference import reference_cosine_linear, reference_exemplar_sgd_step_  # noqa: E402


def cosine_cases(dtypes):
    for path in ("fused", "blas"):
        ops.set_cosine_linear_path(path)
        for dtype in dtypes:
            for B, C, D in [(1, 2, 1), (7, 5, 100), (33, 45, 64), (70, 3, 65)]:
                g = torch.Generator(device="cuda").manual_seed(B * C * D)
                x = torch.randn(B, D, device="cuda", generator=g).to(dtype).requires_grad_()
                w = torch.randn(C, D, device="cuda", generator=g).to(dtype).requires_grad_()
                s = torch.tensor(1.5, device="cuda", dtype=torch.bfloat16 if B == 70 else torch.float32,
                                 requires_grad=True)
                if B > 2 and dtype == torch.float32:
                    with torch.no_grad():
                        x[1] = 0.0
                out = ops.cosine_linear(x, w, s)
                out.backward(torch.randn_like(out))
                ref = reference_cosine_linear(x.detach().float(), w.detach().float(), s.detach().float())
                torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
                assert all(torch.isfinite(t.grad).all() for t in (w, s))
    ops.set_cosine_linear_path("auto")


def bad_input_cases():
    """Every bad input must fail in the host checks, before any pointer reaches a kernel: under memcheck a kernel
    launched on a host pointer (e.g. a CPU sigma) or a wrong shape would be reported here."""
    x, w, s = torch.randn(4, 8, device="cuda"), torch.randn(3, 8, device="cuda"), torch.tensor(1.0, device="cuda")
    g = torch.randn(4, 3, device="cuda")
    fwd = torch.ops.mnemonics_fast.cosine_linear.default
    bwd = torch.ops.mnemonics_fast.cosine_linear_backward.default
    cases = [lambda: fwd(x, w.half(), s), lambda: fwd(x, torch.randn(3, 9, device="cuda"), s),
             lambda: fwd(x, w, torch.tensor(1.0)), lambda: fwd(x, w, s.reshape(1)),
             lambda: bwd(g, g, x, w, torch.tensor(1.0)), lambda: bwd(g.t(), g, x, w, s)]
    for i, case in enumerate(cases):
        try:
            case()
        except RuntimeError:
            continue
        raise AssertionError(f"bad input case {i} did not raise")
    torch.cuda.synchronize()


def sgd_cases():
    def lists(shapes, misalign=False):
        def make(shape):
            n = 1
            for d in shape:
                n *= d
            base = torch.randn(n + int(misalign), device="cuda")
            return base[int(misalign):].view(shape)
        return [make(s) for s in shapes], [make(s) for s in shapes], [make(s) for s in shapes]

    for shapes, misalign in [([(64, 3, 32, 32)], False), ([(3, 32, 32), (7,), (0,), (4097,), (1,)], False),
                             ([(3, 32, 32), (7,), (4097,)], True), ([(13,)] * 69 + [(5000,)], False)]:
        p, g, b = lists(shapes, misalign)
        p2, b2 = [t.clone() for t in p], [t.clone() for t in b]
        ops.exemplar_sgd_step_(p, g, b, 0.1, 0.9, 5e-4, -1.0, 1.0)
        reference_exemplar_sgd_step_(p2, g, b2, 0.1, 0.9, 5e-4, -1.0, 1.0)
        for a, c in zip(p + b, p2 + b2):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tool", default="memcheck",
                        help="racecheck (shared-memory hazards) gets fp32 and bf16 only: the smem code is dtype-blind")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("sanitize_ops: needs a CUDA GPU")
        return 0
    if not ops.kernels_available():
        print(f"sanitize_ops: kernels unavailable: {ops.backend_info()['reason_unavailable']}")
        return 1
    dtypes = [torch.float32, torch.bfloat16]
    if args.tool != "racecheck":
        dtypes.append(torch.float16)
    cosine_cases(dtypes)
    sgd_cases()
    bad_input_cases()  # last: on the H200 (2026-11-26) a raising check crashed the process, which hid sgd_cases
    torch.cuda.synchronize()
    print("sanitize_ops: all launch paths ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
