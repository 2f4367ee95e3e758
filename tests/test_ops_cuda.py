"""GPU tests of the custom ops (skipped without CUDA; run by bench/device_check.sh on the GPU machine).

Tolerance rule (flash-attention's): the kernel's max error against a high-precision reference (float64 for float32
inputs, float32 for bfloat16/float16 inputs, computed from the same rounded inputs) must be at most 2x the error of
PyTorch computing the same reference in the kernel's dtype (3x for gradients), plus an absolute floor of
(4 u_in + 8 u_fp32) * S + u_out * max|ref|: u_in / u_out the unit roundoff of the input / stored dtype (2^-24, 2^-8,
2^-11 for fp32, bf16, fp16), S the root-sum-square of the quantity's summands (|sigma| sqrt(sum_d (xn wn)^2) for an
output, sqrt(sum (g xn wn)^2) for dsigma; see summand_magnitudes). Without the floor the rule compares two single rounding errors whenever the compared quantity
has one or two elements (dsigma always; the output at B*C = 2) or sums with cancellation (dsigma = sum g * cos), and
PyTorch's error there can be arbitrarily close to 0 by luck: 18 such flaky failures on the first H100 run
(docs/kernels.md). Outputs are poisoned (NaN-filled memory handed back to the caching allocator) before each kernel
call.
"""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys

import pytest
import torch

import mnemonics_fast.ops as ops
from mnemonics_fast.ops.reference import (
    NORM_EPS,
    reference_cosine_linear,
    reference_cosine_linear_backward,
    reference_exemplar_sgd_step_,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEV = "cuda"
BS = [1, 7, 128, 1000, 4096]
DS = [64, 512, 100]
CS = [2, 37, 100, 1003]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PATHS = ["fused", "blas"]


@pytest.fixture(autouse=True)
def _setup():
    if not ops.kernels_available():
        pytest.fail(f"CUDA is available but the kernels are not: {ops.backend_info()['reason_unavailable']}")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references must be real fp32
    ops.set_cosine_linear_path("auto")
    yield
    ops.set_cosine_linear_path("auto")
    torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.fixture
def path(request):
    ops.set_cosine_linear_path(request.param)
    return request.param


def poison(*shapes_dtypes):
    """Fill fresh blocks of the output sizes with NaN and free them: the caching allocator hands the same blocks to
    the next allocations of those sizes, so an output element the kernel forgets to write reads as NaN."""
    keep = [torch.full(s, float("nan"), dtype=d, device=DEV) for s, d in shapes_dtypes]
    del keep


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# Unit roundoff (half an ulp at 1) of the input dtypes.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11,
                 torch.float64: 2.0 ** -53}
# Floor = (FLOOR_INPUT * u_in + FLOOR_ACCUM * u_fp32) * S + u_out * max|ref| (S: summand_magnitudes). The first term is
# the rounding of low-precision operands (the blas path rounds the normalised x and weight to the input dtype for the
# tensor cores, exactly as PyTorch's own F.normalize + F.linear do), the second fp32 accumulation over up to ~1000
# terms, the third the final rounding to the stored dtype. Calibrated in the CPU restatement of both paths over
# 1800+ input sets of the test's shapes: the kernels never needed more than ~1.6 (half) / ~5.4 (fp32) units.
FLOOR_INPUT, FLOOR_ACCUM = 4.0, 8.0


def summand_magnitudes(x, w, sigma, grad):
    """Per quantity, the largest root-sum-square of its summands: e.g. dsigma = sum_{b,c,d} g[b,c] xn[b,d] wn[c,d] has
    sqrt(sum (g xn wn)^2), out[b,c] has |sigma| sqrt(sum_d (xn wn)^2). Independent rounding errors of relative size u
    in the operands or partial sums add up to about u times this, however much the sum itself cancels (dsigma =
    sum g * cos, or a cosine near 0), which is where PyTorch's own error can be arbitrarily small by luck. (The worst
    case |A||B| of the GEMM error bound would be ~sqrt(D) times larger and too loose for dsigma.)"""
    xd, wd, gd = x.double(), w.double(), grad.double()
    s = abs(float(sigma))
    ix = 1.0 / xd.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    iw = 1.0 / wd.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    xn2, wn2, g2 = (xd * ix).square(), (wd * iw).square(), gd.square()
    cos2 = xn2 @ wn2.t()  # [B, C]: sum_d (xn wn)^2
    go2 = g2 * (s * s) * cos2  # (g * out) summands, squared

    def amax(t):
        return t.max().sqrt().item() if t.numel() else 0.0

    return {"out": s * amax(cos2),
            "dx": amax(ix.square() * (s * s * (g2 @ wn2) + xn2 * go2.sum(dim=1, keepdim=True))),
            "dweight": amax(iw.square() * (s * s * (g2.t() @ xn2) + wn2 * go2.sum(dim=0).unsqueeze(1))),
            "dsigma": (g2 * cos2).sum().sqrt().item()}


def check_rule(name, got, ref, pt, factor, unit_roundoff, magnitude):
    """err(kernel) <= factor * err(PyTorch in the same dtype) + floor (see the module docstring)."""
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    ref_max = ref.abs().max().item() if ref.numel() else 0.0
    floor = (FLOOR_INPUT * unit_roundoff + FLOOR_ACCUM * UNIT_ROUNDOFF[torch.float32]) * magnitude \
        + UNIT_ROUNDOFF[got.dtype] * ref_max
    err, err_pt = max_err(got, ref), max_err(pt, ref)
    assert err <= factor * err_pt + floor, \
        f"{name}: kernel error {err:.3e} > {factor} x PyTorch {err_pt:.3e} + floor {floor:.2e} (|ref| {ref_max:.3e})"


def make_inputs(B, C, D, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(B, D, device=DEV, generator=g).to(dtype)
    w = torch.randn(C, D, device=DEV, generator=g).to(dtype)
    grad = torch.randn(B, C, device=DEV, generator=g).to(dtype)
    sigma = torch.tensor(1.7, device=DEV)
    return x, w, sigma, grad


def run_op(x, w, sigma, grad):
    xs, ws, ss = (t.detach().requires_grad_() for t in (x, w, sigma))  # detach keeps the strides
    poison(((x.shape[0], w.shape[0]), x.dtype))
    out = ops.cosine_linear(xs, ws, ss)
    poison((tuple(x.shape), x.dtype), (tuple(w.shape), w.dtype))
    grads = torch.autograd.grad(out, (xs, ws, ss), grad)
    return out.detach(), grads


def run_reference(x, w, sigma, grad, dtype):
    """The reference's output and gradients with x and weight in `dtype`; sigma in float64 for a float64 reference,
    at least float32 for a float32 one, and as given for the low-precision run."""
    xs, ws = (t.detach().to(dtype).requires_grad_() for t in (x, w))
    if dtype == torch.float64:
        sigma_dtype = torch.float64
    elif dtype == torch.float32:
        sigma_dtype = torch.promote_types(sigma.dtype, torch.float32)
    else:
        sigma_dtype = sigma.dtype
    ss = sigma.detach().to(sigma_dtype).requires_grad_()
    out = reference_cosine_linear(xs, ws, ss)
    grads = torch.autograd.grad(out, (xs, ws, ss), grad.to(out.dtype))
    return out.detach(), grads


def check_against_rule(x, w, sigma, grad):
    dtype = x.dtype
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    out, grads = run_op(x, w, sigma, grad)
    out_ref, grads_ref = run_reference(x, w, sigma, grad, hi)
    out_pt, grads_pt = run_reference(x, w, sigma, grad, dtype)
    assert out.dtype == dtype and grads[0].dtype == dtype and grads[2].dtype == sigma.dtype
    u, mags = UNIT_ROUNDOFF[dtype], summand_magnitudes(x, w, sigma, grad)
    check_rule("out", out, out_ref, out_pt, 2, u, mags["out"])
    for name, a, r, p in zip(("dx", "dweight", "dsigma"), grads, grads_ref, grads_pt):
        check_rule(name, a, r, p, 3, u, mags[name])


# ---- cosine_linear: values and gradients ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D,C", list(itertools.product(BS, DS, CS)))
def test_cosine_linear_matches_reference(B, D, C, dtype, path):
    check_against_rule(*make_inputs(B, C, D, dtype, seed=B + C + D))


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_cosine_linear_sigma_dtypes(path):
    for sigma_dtype in (torch.float32, torch.bfloat16, torch.float64):
        x, w, _, grad = make_inputs(33, 20, 64, torch.bfloat16)
        check_against_rule(x, w, torch.tensor(2.5, device=DEV, dtype=sigma_dtype), grad)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cosine_linear_non_contiguous(dtype, path):
    B, C, D = 70, 45, 100
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(D, B, device=DEV, generator=g).to(dtype).t()  # transposed
    w = torch.randn(C, 2 * D, device=DEV, generator=g).to(dtype)[:, ::2]  # strided columns
    grad = torch.randn(C, B, device=DEV, generator=g).to(dtype).t()
    assert not (x.is_contiguous() or w.is_contiguous() or grad.is_contiguous())
    check_against_rule(x, w, torch.tensor(0.8, device=DEV), grad)
    # expanded (stride-0) incoming gradient, as from out.sum().backward()
    xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ops.cosine_linear(xs, ws, torch.tensor(0.8, device=DEV)).sum().backward()
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    reference_cosine_linear(xr, wr, torch.tensor(0.8, device=DEV)).sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(xs.grad.float(), xr.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_cosine_linear_zero_rows_and_tiny_sizes(path):
    for B, C, D in [(1, 1, 1), (5, 3, 1), (9, 4, 33)]:
        x, w, sigma, grad = make_inputs(B, C, D, torch.float32)
        x[0] = 0.0
        w[-1] = 0.0
        out, grads = run_op(x, w, sigma, grad)
        out_ref = reference_cosine_linear(x.double(), w.double(), sigma.double())
        grads_ref = reference_cosine_linear_backward(grad.double(), out_ref, x.double(), w.double(), sigma.double())
        torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-6)
        for a, r in zip(grads, grads_ref):
            scale = r.abs().reshape(r.shape[0] if r.dim() else 1, -1).amax(1).clamp_min(0.1)
            err = (a.double() - r).abs().reshape(scale.shape[0], -1).amax(1) / scale
            assert err.max() < 1e-4, err


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_cosine_linear_empty(path):
    x, w, s = torch.randn(0, 8, device=DEV), torch.randn(5, 8, device=DEV), torch.tensor(1.0, device=DEV)
    assert ops.cosine_linear(x, w, s).shape == (0, 5)
    xs, ws, ss = (t.clone().requires_grad_() for t in (torch.randn(4, 0, device=DEV), torch.randn(3, 0, device=DEV), s))
    out = ops.cosine_linear(xs, ws, ss)
    assert out.shape == (4, 3) and (out == 0).all()
    out.sum().backward()
    assert ss.grad.item() == 0.0


def test_cosine_linear_float64_routes_to_reference():
    x, w = torch.randn(5, 7, device=DEV, dtype=torch.float64), torch.randn(3, 7, device=DEV, dtype=torch.float64)
    s = torch.tensor(1.5, device=DEV, dtype=torch.float64)
    torch.testing.assert_close(ops.cosine_linear(x, w, s), reference_cosine_linear(x, w, s))


# Each bad input runs in its own interpreter, so that a crash (the 2026-11-26 H100 run segfaulted in the single test
# that held all four cases, taking the session and every failure message with it) fails only its own case, with the
# exit status and the native/Python stack from faulthandler. The child also synchronises after the error, so a
# kernel launched on a bad pointer would surface there as a CUDA error instead of passing silently.
_BAD_INPUT_PRELUDE = """
import faulthandler, sys
faulthandler.enable()
import torch
import mnemonics_fast.ops as ops
assert ops.kernels_available(), ops.backend_info()["reason_unavailable"]
fwd = torch.ops.mnemonics_fast.cosine_linear.default
bwd = torch.ops.mnemonics_fast.cosine_linear_backward.default
x, w, s = torch.randn(4, 8, device="cuda"), torch.randn(3, 8, device="cuda"), torch.tensor(1.0, device="cuda")
g, o = torch.randn(4, 3, device="cuda"), torch.randn(4, 3, device="cuda")
try:
    CALL
except RuntimeError as exc:
    torch.cuda.synchronize()
    print("RAISED:", str(exc).strip().splitlines()[0])
    sys.exit(0)
torch.cuda.synchronize()
print("NO ERROR")
sys.exit(3)
"""

BAD_INPUT_CASES = {  # name: (call, expected message)
    "weight_dtype": ("fwd(x, w.half(), s)", "same dtype"),
    "weight_shape": ("fwd(x, torch.randn(3, 9, device='cuda'), s)", "weight must be"),
    "sigma_on_cpu": ("fwd(x, w, torch.tensor(1.0))", "one device|CUDA tensors"),
    "sigma_shape": ("fwd(x, w, s.reshape(1))", "0-dim"),
    "x_1d": ("fwd(x[0], w, s)", "x must be 2-D"),
    "x_int": ("fwd(x.int(), w.int(), s)", "float32, float16 or bfloat16"),
    "sigma_int": ("fwd(x, w, torch.tensor(1, device='cuda'))", "floating-point"),
    "bwd_sigma_on_cpu": ("bwd(g, o, x, w, torch.tensor(1.0))", "one device|CUDA tensors"),
    "bwd_grad_shape": ("bwd(g.t(), o, x, w, s)", "grad_out must be"),
    "bwd_grad_on_cpu": ("bwd(g.cpu(), o, x, w, s)", "grad_out and out must be on"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT_CASES))
def test_cosine_linear_bad_inputs_raise_readable_errors(case):
    call, pattern = BAD_INPUT_CASES[case]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, "-c", _BAD_INPUT_PRELUDE.replace("CALL", call)], capture_output=True,
                          text=True, cwd=root, env=env, timeout=180)
    detail = f"case {case}: {call}\nrc={proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, detail
    assert re.search(pattern, proc.stdout), detail


def test_autocast_cuda():
    x = torch.randn(64, 32, device=DEV, requires_grad=True)
    w = torch.randn(10, 32, device=DEV, requires_grad=True)
    s = torch.tensor(3.0, device=DEV, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ops.cosine_linear(x, w, s)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert x.grad.dtype == w.grad.dtype == s.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), reference_cosine_linear(x, w, s).detach(), rtol=2e-2, atol=5e-2)


def test_double_backward_matches_reference():
    x = torch.randn(6, 9, device=DEV, dtype=torch.float32, requires_grad=True)
    w = torch.randn(4, 9, device=DEV, requires_grad=True)
    s = torch.tensor(1.3, device=DEV, requires_grad=True)

    def second_order(fn):
        (gw,) = torch.autograd.grad(fn(x, w, s).square().sum(), (w,), create_graph=True)
        return torch.autograd.grad(gw.square().sum(), (x, w, s))

    for a, b in zip(second_order(ops.cosine_linear), second_order(reference_cosine_linear)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_cosine_linear_cuda(dtype, path):
    for B, C, D in [(70, 45, 100)]:
        x, w, s, grad = make_inputs(B, C, D, dtype)
        torch.library.opcheck(torch.ops.mnemonics_fast.cosine_linear.default,
                              (x.requires_grad_(), w.requires_grad_(), s.requires_grad_()))
        out = ops.cosine_linear(x.detach(), w.detach(), s.detach())
        torch.library.opcheck(torch.ops.mnemonics_fast.cosine_linear_backward.default,
                              (grad, out, x.detach(), w.detach(), s.detach()))


def test_compile_fullgraph_reduce_overhead():
    """torch.compile(fullgraph=True) in reduce-overhead mode (CUDA graphs): catches kernels launched off the current
    stream and host syncs."""
    x, w, s, _ = make_inputs(128, 100, 64, torch.float32)
    args = [t.requires_grad_() for t in (x, w, s)]

    def f(x, w, s):
        return ops.cosine_linear(x, w, s).square().sum()

    want = torch.autograd.grad(f(*args), args)
    compiled = torch.compile(f, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        torch.compiler.cudagraph_mark_step_begin()
        got = [g.clone() for g in torch.autograd.grad(compiled(*args), args)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_cuda_graph_capture_cosine(path):
    x, w, s, grad = make_inputs(256, 100, 64, torch.float32)
    xs, ws, ss = (t.clone().requires_grad_() for t in (x, w, s))
    want_out, want_grads = run_op(x, w, s, grad)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture
        torch.autograd.grad(ops.cosine_linear(xs, ws, ss), (xs, ws, ss), grad)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.cosine_linear(xs, ws, ss)
        grads = torch.autograd.grad(out, (xs, ws, ss), grad)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want_out)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)


# ---- exemplar_sgd_step_ ---------------------------------------------------------------------------------------------
def _sgd_case(shapes, seed=0, misalign=False):
    g = torch.Generator(device=DEV).manual_seed(seed)

    def make(s):
        n = 1
        for d in s:
            n *= d
        if misalign:  # a view one float past a 16-byte boundary: the scalar (non-float4) path
            return torch.randn(n + 1, device=DEV, generator=g)[1:].view(s)
        return torch.randn(s, device=DEV, generator=g)

    return [make(s) for s in shapes], [make(s) for s in shapes], [make(s) for s in shapes]


SGD_CASES = {
    "bank": [(1000, 3, 32, 32)],
    "bank_odd": [(1, 3, 7, 7)],
    "mixed": [(3, 32, 32), (7,), (1,), (0,), (4097,), (3, 5, 5), (2, 3, 224, 224)],
    "table_70": [(13,)] * 69 + [(9000,)],
    "table_1000": [(3, 32, 32)] * 1000,
}


@pytest.mark.parametrize("misalign", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_exemplar_sgd_matches_reference(case, misalign):
    params, grads, bufs = _sgd_case(SGD_CASES[case], misalign=misalign)
    want_p, want_b = [p.clone() for p in params], [b.clone() for b in bufs]
    grads_before = [g.clone() for g in grads]
    for step, (lr, momentum, wd) in enumerate([(0.1, 0.9, 5e-4), (0.05, 0.0, 0.0), (0.2, 0.5, 1e-2)]):
        reference_exemplar_sgd_step_(want_p, grads, want_b, lr, momentum, wd, -1.0, 1.0)
        ops.exemplar_sgd_step_(params, grads, bufs, lr, momentum, wd, -1.0, 1.0)
        for a, b in zip(params + bufs, want_p + want_b):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_before))


def test_exemplar_sgd_opcheck_cuda():
    for case in ("bank", "mixed", "table_70"):
        params, grads, bufs = _sgd_case(SGD_CASES[case])
        torch.library.opcheck(torch.ops.mnemonics_fast.exemplar_sgd_step_.default,
                              (params, grads, bufs, 0.1, 0.9, 5e-4, -1.0, 1.0))


def test_exemplar_sgd_cuda_graph_capture():
    params, grads, bufs = _sgd_case([(500, 3, 32, 32), (7,)])
    want_p, want_b = [p.clone() for p in params], [b.clone() for b in bufs]
    warm = _sgd_case([(8,)], seed=1)
    ops.exemplar_sgd_step_(*warm, 0.1, 0.9, 5e-4, -1.0, 1.0)  # first-call set-up outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        ops.exemplar_sgd_step_(params, grads, bufs, 0.1, 0.9, 5e-4, -1.0, 1.0)
    for _ in range(2):
        graph.replay()
        reference_exemplar_sgd_step_(want_p, grads, want_b, 0.1, 0.9, 5e-4, -1.0, 1.0)
    torch.cuda.synchronize()
    for a, b in zip(params + bufs, want_p + want_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # long lists upload a table from host memory: refused during capture, with advice
    params, grads, bufs = _sgd_case(SGD_CASES["table_70"])
    with pytest.raises(RuntimeError, match="bank"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=stream):
            ops.exemplar_sgd_step_(params, grads, bufs, 0.1, 0.9, 5e-4, -1.0, 1.0)


def test_exemplar_sgd_bad_inputs():
    p, g, b = _sgd_case([(4, 4)])
    with pytest.raises(RuntimeError, match="float32"):
        ops.exemplar_sgd_step_([p[0].half()], [g[0].half()], [b[0].half()], 0.1, 0.9, 0.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.exemplar_sgd_step_([p[0].t()], [g[0]], [b[0]], 0.1, 0.9, 0.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="is on cpu|device"):
        ops.exemplar_sgd_step_([p[0]], [g[0].cpu()], [b[0]], 0.1, 0.9, 0.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="shape"):
        ops.exemplar_sgd_step_([p[0]], [g[0].reshape(16)], [b[0]], 0.1, 0.9, 0.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="distinct"):
        ops.exemplar_sgd_step_([p[0]], [g[0]], [p[0]], 0.1, 0.9, 0.0, 0.0, 1.0)
