"""CPU tests of the custom ops (CI; no GPU needed, well under a minute).

- the references agree with naive formulas (explicit loops, torch.optim.SGD + clamp);
- the ops (CPU = reference implementation) pass torch.library.opcheck, gradcheck and gradgradcheck in float64;
- the extension, if built, imports and defines the same schemas as the Python fallback; the env switches work;
- the CUDA kernels' *source* runs on the CPU through csrc/emulation and matches the reference (every launch path,
  odd sizes, guard zones around every buffer). That is the only execution of kernel code this machine can do.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mnemonics_fast.ops as ops
from mnemonics_fast.ops import _extension as ext
from mnemonics_fast.ops.reference import (
    NORM_EPS,
    reference_cosine_linear,
    reference_cosine_linear_backward,
    reference_exemplar_sgd_step_,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ODD_SHAPES = [(1, 1, 1), (3, 5, 7), (7, 2, 100), (16, 33, 64)]  # (B, C, D)


def _randn(*shape, dtype=torch.float64, requires_grad=False, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else hash(shape) % 2**31)
    t = torch.randn(*shape, dtype=dtype, generator=g)
    return t.requires_grad_(requires_grad)


def _sigma(value=1.7, dtype=torch.float64, requires_grad=False):
    return torch.tensor(value, dtype=dtype, requires_grad=requires_grad)


def _run(code: str, env_update: dict | None = None, drop=("MNEMONICS_FAST_FORCE_REFERENCE",)):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_update or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


# ---- references vs naive formulas ---------------------------------------------------------------------------------
def _naive_cosine_linear(x, w, sigma):
    B, C = x.shape[0], w.shape[0]
    out = torch.empty(B, C, dtype=x.dtype)
    for b in range(B):
        nx = max(math.sqrt(sum(float(v) ** 2 for v in x[b])), NORM_EPS)
        for c in range(C):
            nw = max(math.sqrt(sum(float(v) ** 2 for v in w[c])), NORM_EPS)
            out[b, c] = float(sigma) * sum(float(a) * float(e) for a, e in zip(x[b], w[c])) / (nx * nw)
    return out


@pytest.mark.parametrize("B,C,D", ODD_SHAPES)
def test_reference_cosine_linear_matches_loops(B, C, D):
    x, w = _randn(B, D), _randn(C, D)
    if B > 1:
        x[1] = 0.0  # a zero row stays zero (eps), like F.normalize
    torch.testing.assert_close(reference_cosine_linear(x, w, _sigma()), _naive_cosine_linear(x, w, _sigma()))


@pytest.mark.parametrize("B,C,D", ODD_SHAPES + [(6, 4, 9)])
@pytest.mark.parametrize("zero_rows", [False, True])
def test_reference_backward_matches_autograd(B, C, D, zero_rows):
    x, w = _randn(B, D, requires_grad=True), _randn(C, D, requires_grad=True)
    s = _sigma(requires_grad=True)
    if zero_rows:
        with torch.no_grad():
            x[0] = 0.0
            w[-1] = 0.0
    out = reference_cosine_linear(x, w, s)
    g = _randn(B, C, seed=1)
    expected = torch.autograd.grad(out, (x, w, s), g)
    got = reference_cosine_linear_backward(g, out.detach(), x.detach(), w.detach(), s.detach())
    for e, a in zip(expected, got):
        torch.testing.assert_close(a, e)
        assert a.is_contiguous() and a.dtype == e.dtype and a.shape == e.shape


def _sgd_lists(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    return params, grads


SGD_SHAPES = [(3, 32, 32), (7,), (1,), (0,), (4097,), (3, 5, 5)]


def test_reference_sgd_matches_torch_optim_sgd_plus_clamp():
    lr, momentum, wd, lo, hi = 0.05, 0.9, 5e-4, -1.0, 1.0
    params, _ = _sgd_lists(SGD_SHAPES)
    ours = [p.clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]  # zero buffers: the first step equals SGD's buf = d_p
    theirs = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.SGD(theirs, lr=lr, momentum=momentum, weight_decay=wd, foreach=False)
    for step in range(4):
        _, grads = _sgd_lists(SGD_SHAPES, seed=step + 1)
        reference_exemplar_sgd_step_(ours, grads, bufs, lr, momentum, wd, lo, hi)
        for t, g in zip(theirs, grads):
            t.grad = g.clone()
        opt.step()
        with torch.no_grad():
            for t in theirs:
                t.clamp_(lo, hi)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-6)


# ---- the ops on CPU --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,C,D", ODD_SHAPES)
def test_cpu_op_is_the_reference(B, C, D):
    x, w, s = _randn(B, D, dtype=torch.float32), _randn(C, D, dtype=torch.float32), _sigma(dtype=torch.float32)
    assert torch.equal(ops.cosine_linear(x, w, s), reference_cosine_linear(x, w, s))


@pytest.mark.parametrize("B,C,D", [(3, 5, 7), (7, 2, 10)])
def test_gradcheck_and_gradgradcheck_float64(B, C, D):
    x, w, s = _randn(B, D, requires_grad=True), _randn(C, D, requires_grad=True), _sigma(requires_grad=True)
    assert torch.autograd.gradcheck(ops.cosine_linear, (x, w, s))
    assert torch.autograd.gradgradcheck(ops.cosine_linear, (x, w, s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("B,C,D", [(3, 5, 7), (16, 33, 64)])
def test_opcheck_cosine_linear(B, C, D, dtype, requires_grad):
    args = (_randn(B, D, dtype=dtype, requires_grad=requires_grad),
            _randn(C, D, dtype=dtype, requires_grad=requires_grad), _sigma(dtype=dtype, requires_grad=requires_grad))
    torch.library.opcheck(torch.ops.mnemonics_fast.cosine_linear.default, args)


def test_opcheck_cosine_linear_backward():
    x, w, s = _randn(5, 7), _randn(3, 7), _sigma()
    out = reference_cosine_linear(x, w, s)
    torch.library.opcheck(torch.ops.mnemonics_fast.cosine_linear_backward.default, (_randn(5, 3), out, x, w, s))


@pytest.mark.parametrize("shapes", [[(3, 32, 32)], SGD_SHAPES])
def test_opcheck_exemplar_sgd_step(shapes):
    params, grads = _sgd_lists(shapes)
    bufs = [torch.randn_like(p) for p in params]
    torch.library.opcheck(torch.ops.mnemonics_fast.exemplar_sgd_step_.default,
                          (params, grads, bufs, 0.1, 0.9, 5e-4, -1.0, 1.0))


def test_exemplar_sgd_step_wrapper():
    params, grads = _sgd_lists(SGD_SHAPES)
    bufs = [torch.randn_like(p) for p in params]
    want_p, want_b = [p.clone() for p in params], [b.clone() for b in bufs]
    reference_exemplar_sgd_step_(want_p, grads, want_b, 0.1, 0.9, 5e-4, -0.5, 0.5)
    versions = [p._version for p in params]
    grads_before = [g.clone() for g in grads]
    ops.exemplar_sgd_step_(params, grads, bufs, 0.1, 0.9, 5e-4, -0.5, 0.5)
    for a, b in zip(params + bufs, want_p + want_b):
        assert torch.equal(a, b)
    assert all(g.equal(h) for g, h in zip(grads, grads_before))
    assert all(p._version > v for p, v in zip(params, versions))  # autograd sees the in-place update
    # a single bank tensor is accepted for a one-element list; leaves that require grad are fine (no_grad inside)
    bank = torch.randn(4, 3, 8, 8, requires_grad=True)
    ops.exemplar_sgd_step_(bank, torch.randn(4, 3, 8, 8), torch.zeros(4, 3, 8, 8), 0.1, 0.9, 0.0, 0.0, 1.0)
    assert bank.min() >= 0.0 and bank.max() <= 1.0
    ops.exemplar_sgd_step_([], [], [], 0.1, 0.9, 0.0, 0.0, 1.0)  # empty: no-op
    with pytest.raises(ValueError, match="same length"):
        ops.exemplar_sgd_step_(params, grads[:-1], bufs, 0.1, 0.9, 0.0, 0.0, 1.0)


def test_cpu_cosine_ops_check_their_inputs_like_the_fake():
    """The CPU kernels refuse what the fake (torch.compile) and CUDA kernels refuse, with the op's own message,
    instead of broadcasting (a sigma of shape [1], a grad_out or out of the wrong shape) or failing inside ATen."""
    fwd, bwd = torch.ops.mnemonics_fast.cosine_linear.default, torch.ops.mnemonics_fast.cosine_linear_backward.default
    x, w, s = torch.randn(3, 7), torch.randn(5, 7), torch.tensor(2.0)
    for args, msg in (((x, w, torch.tensor([2.0])), "0-dim"), ((x[0], w, s), "2-D"),
                      ((x, torch.randn(5, 6), s), "weight must be"), ((x, w, torch.tensor(2)), "floating"),
                      ((x, w.double(), s), "same dtype")):
        with pytest.raises(RuntimeError, match=msg):
            fwd(*args)
    out = fwd(x, w, s)
    with pytest.raises(RuntimeError, match=r"grad_out and out must be \[B, C\]"):
        bwd(torch.randn(3, 5), out[:, :1], x, w, s)
    dx, dw, ds = bwd(torch.randn(3, 5), out, x, w, s)
    assert dx.shape == x.shape and dw.shape == w.shape and ds.shape == ()


def test_raw_exemplar_sgd_op_checks_its_inputs_like_the_kernel():
    """The CPU op (and the fake) refuse what the CUDA kernel refuses, instead of broadcasting a wrong-shaped grad,
    skipping the tail of unequal lists, or writing a tensor that autograd tracks."""
    op = torch.ops.mnemonics_fast.exemplar_sgd_step_.default
    p, b = torch.randn(3, 4), torch.randn(3, 4)
    cases = [(([p], [torch.randn(1)], [b]), "shapes differ"),
             (([p, p.clone()], [torch.randn(3, 4)], [b, b.clone()]), "same length"),
             (([p], [torch.randn(3, 4, dtype=torch.float64)], [b]), "one floating type"),
             (([p], [p], [b]), "distinct"),
             (([p, p], [torch.randn(3, 4), torch.randn(3, 4)], [b, b.clone()]), "appear once")]
    for k, (args, msg) in enumerate(cases):
        # (opcheck copies its arguments, so the identity cases are checked on the real op only)
        calls = [op] + ([lambda *a: torch.library.opcheck(op, a, test_utils=("test_faketensor",))] if k < 3 else [])
        for call in calls:
            with pytest.raises(Exception, match=msg):
                call(*args, 0.1, 0.9, 0.0, -1.0, 1.0)
    leaf = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        op([leaf], [torch.randn(3, 4)], [b], 0.1, 0.9, 0.0, -1.0, 1.0)
    with torch.no_grad():
        op([leaf], [torch.randn(3, 4)], [b], 0.1, 0.9, 0.0, -1.0, 1.0)


def test_exemplar_sgd_momentum_zero_never_reads_the_buffer_and_nan_bounds_propagate():
    p, g = torch.rand(5), torch.randn(5)
    buf = torch.full((5,), float("nan"))
    ops.exemplar_sgd_step_([p], [g], [buf], 0.1, 0.0, 0.0, 0.0, 1.0)
    assert torch.isfinite(p).all() and torch.equal(buf, g)
    for lo, hi in ((float("nan"), 1.0), (0.0, float("nan"))):
        q = torch.rand(5)
        ops.exemplar_sgd_step_([q], [torch.randn(5)], [torch.zeros(5)], 0.1, 0.9, 0.0, lo, hi)
        assert torch.isnan(q).all()                       # as torch.clamp with a NaN bound


def test_exemplar_sgd_step_invalidates_graphs_that_saved_the_pixels():
    """The version bump (C++ ADInplaceOrView kernel with the extension, Python twin without) is what lets autograd
    refuse a backward through a graph that saved exemplar pixels the step has since overwritten."""
    bank = [torch.rand(2, 3, 4, 4, requires_grad=True) for _ in range(70)]   # > 64: the pointer-table list form
    loss = sum((p * p).sum() for p in bank)                                   # saves every p for backward
    before = [p._version for p in bank]
    ops.exemplar_sgd_step_(bank, [torch.randn_like(p) for p in bank], [torch.zeros_like(p) for p in bank],
                           0.1, 0.9, 0.0, 0.0, 1.0)
    assert all(p._version > v for p, v in zip(bank, before))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_compile_aot_eager_fullgraph_cpu():
    x, w, s = _randn(6, 9, requires_grad=True), _randn(4, 9, requires_grad=True), _sigma(requires_grad=True)

    def f(x, w, s):
        return ops.cosine_linear(x, w, s).square().sum()

    want = torch.autograd.grad(f(x, w, s), (x, w, s))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, w, s), (x, w, s))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)

    def step(p, g, b):
        ops.exemplar_sgd_step_([p], [g], [b], 0.1, 0.9, 1e-3, -1.0, 1.0)
        return p.sum()

    p, g, b = _randn(2, 3, 4, dtype=torch.float32), _randn(2, 3, 4, dtype=torch.float32, seed=3), torch.zeros(2, 3, 4)
    p2, b2 = p.clone(), b.clone()
    torch.compile(step, backend="aot_eager", fullgraph=True)(p, g, b)
    reference_exemplar_sgd_step_([p2], [g], [b2], 0.1, 0.9, 1e-3, -1.0, 1.0)
    assert torch.equal(p, p2) and torch.equal(b, b2)


def test_autocast_cpu_casts_to_autocast_dtype():
    x, w = _randn(4, 6, dtype=torch.float32, requires_grad=True), _randn(3, 6, dtype=torch.float32, requires_grad=True)
    s = _sigma(dtype=torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.cosine_linear(x, w, s)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == s.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), reference_cosine_linear(x, w, s).detach(), atol=0.05, rtol=0.02)


def test_fake_tensor_shapes_and_checks():
    out = ops.cosine_linear(torch.empty(5, 7, device="meta"), torch.empty(3, 7, device="meta"),
                            torch.empty((), device="meta"))
    assert out.shape == (5, 3) and out.device.type == "meta"
    with pytest.raises(RuntimeError, match="sigma must be 0-dim"):
        ops.cosine_linear(torch.empty(5, 7, device="meta"), torch.empty(3, 7, device="meta"),
                          torch.empty(1, device="meta"))
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.cosine_linear(torch.empty(5, 7, device="meta"), torch.empty(3, 8, device="meta"),
                          torch.empty((), device="meta"))


def test_model_head_uses_the_op():
    from mnemonics_fast.models.cosine import CosineLinear

    head = CosineLinear(9, 4).double()
    x = _randn(5, 9)
    logits, cos = head(x, return_cos=True)
    torch.testing.assert_close(logits, reference_cosine_linear(x, head.weight, head.sigma))
    torch.testing.assert_close(cos, F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).t())
    logits.sum().backward()
    assert head.weight.grad is not None and head.sigma.grad is not None


# ---- extension, environment switches, info ---------------------------------------------------------------------------
def test_python_list_limit_matches_the_kernel_header():
    """exemplar_sgd_step_ refuses long lists under CUDA graph capture in Python, before the kernel: its limit must be
    the kernel's argument-table size."""
    import re

    from mnemonics_fast.ops.exemplar_sgd import MAX_ARG_TENSORS
    with open(os.path.join(ROOT, "csrc", "exemplar_sgd_kernels.cuh")) as f:
        m = re.search(r"constexpr int kMaxArgTensors = (\d+);", f.read())
    assert m and int(m.group(1)) == MAX_ARG_TENSORS


def _top_level_args(call: str) -> list[str]:
    """Split a macro's argument text at its top-level commas (not inside (), [], {} or string literals)."""
    args, depth, cur, quote, i = [], 0, "", None, 0
    while i < len(call):
        c = call[i]
        if quote:
            cur += c
            if c == "\\":
                cur += call[i + 1]
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote, cur = c, cur + c
        elif c in "([{":
            depth, cur = depth + 1, cur + c
        elif c in ")]}":
            depth, cur = depth - 1, cur + c
        elif c == "," and depth == 0:
            args, cur = args + [cur.strip()], ""
        else:
            cur += c
        i += 1
    return args + [cur.strip()]


# A message part that is already a string: adjacent literals, the op/list name (const char*), or a conversion.
_STRING_PART = re.compile(r'^(("([^"\\]|\\.)*"\s*)+|op|list|std::to_string\(.*\)|shape_str\(.*\)|'
                          r'c10::toString\(.*\)|[\w.()]+\.str\(\))$', re.S)


def test_cuda_sources_stream_only_strings_into_checks():
    """Every TORCH_CHECK message part in the .cu files is a string (see csrc/mnemonics_fast.h): on the GPU test
    machines (torch 2.11, CUDA 13.0) checks that streamed an IntArrayRef (H200, 2026-11-26) or an int64_t / size_t
    (H100, 2026-11-27) crashed the process while raising instead of raising."""
    assert _top_level_args('a == f(1, 2), "x, y", n') == ["a == f(1, 2)", '"x, y"', "n"]
    assert _STRING_PART.match("std::to_string(x.size(1))") and not _STRING_PART.match("x.size(1)")
    checked = 0
    for name in ("cosine_linear.cu", "exemplar_sgd.cu"):
        with open(os.path.join(ROOT, "csrc", name)) as f:
            text = f.read()
        for call in re.findall(r"TORCH_CHECK\((.*?)\);", text, flags=re.S):
            for part in _top_level_args(call)[1:]:
                assert _STRING_PART.match(part), f"{name}: TORCH_CHECK streams {part!r}, not a string: {call}"
                checked += 1
    assert checked > 40, checked


def test_python_schemas_match_the_extension():
    if not ext._so_files():
        pytest.skip("extension not built")
    code = ("import torch, mnemonics_fast.ops as o\n"
            "from mnemonics_fast.ops import _extension as e\n"
            "assert o.kernels_available(), e.UNAVAILABLE_REASON\n"
            "import mnemonics_fast._C as C\n"
            "info = C.build_info(); assert {'torch_version', 'arch_list', 'torch_cuda_version'} <= set(info), info\n"
            "for name, schema in e.SCHEMAS.items():\n"
            "    got = str(getattr(torch.ops.mnemonics_fast, name).default._schema)\n"
            "    assert got == 'mnemonics_fast::' + schema, (got, schema)\n"
            "print('ok', info['torch_version'])\n")
    proc = _run(code)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_autograd_is_cpp_with_the_extension_and_python_without():
    """One autograd kernel is live: the C++ one (csrc/autograd.cpp) when the extension is loaded, the
    Python twin otherwise; both pass gradcheck, gradgradcheck and opcheck (the C++ one in this process when built, the
    Python one in a forced-reference interpreter)."""
    x = _randn(4, 6, requires_grad=True)
    out = ops.cosine_linear(x, _randn(3, 6), _sigma())
    cpp = "CosineLinearFunction" in out.grad_fn.name()
    python_forced = ext._env_flag("MNEMONICS_FAST_PYTHON_AUTOGRAD")   # the A/B switch
    assert cpp == (ops.kernels_available() and not python_forced), out.grad_fn.name()
    code = ("import torch, mnemonics_fast.ops as o\n"
            "assert not o.kernels_available()\n"
            "torch.manual_seed(0)\n"
            "x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)\n"
            "w = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)\n"
            "s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)\n"
            "out = o.cosine_linear(x, w, s)\n"
            "assert 'CosineLinearFunction' not in out.grad_fn.name(), out.grad_fn.name()\n"
            "assert torch.autograd.gradcheck(o.cosine_linear, (x, w, s))\n"
            "assert torch.autograd.gradgradcheck(o.cosine_linear, (x, w, s))\n"
            "torch.library.opcheck(torch.ops.mnemonics_fast.cosine_linear.default, (x, w, s))\n"
            "print('ok')\n")
    proc = _run(code, {"MNEMONICS_FAST_FORCE_REFERENCE": "1"})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("zero_row", [False, True])
def test_double_backward_matches_the_reference_composite(zero_row):
    """The unrolled inner step of mnemonics differentiates through the op's backward: second-order gradients through
    whichever autograd kernel is live equal those of the plain composite formula; at an all-zero row the op stays
    finite where the composite's double backward is NaN."""
    x, w, s = _randn(5, 7, requires_grad=True), _randn(4, 7, requires_grad=True), _sigma(requires_grad=True)
    if zero_row:
        with torch.no_grad():
            x[2] = 0.0
    v = _randn(5, 4, seed=7)

    def second_order(f):
        gx, gw, gs = torch.autograd.grad((f(x, w, s) * v).sum(), (x, w, s), create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gw.sin().sum() + gs * 3.0, (x, w, s))

    ours, composite = second_order(ops.cosine_linear), second_order(reference_cosine_linear)
    if zero_row:
        # The composite's double backward is NaN through the zero row's norm; the op's formula stays finite there.
        assert all(torch.isfinite(t).all() for t in ours) and not torch.isfinite(composite[0][2]).all()
        keep = [0, 1, 3, 4]
        torch.testing.assert_close(ours[0][keep], composite[0][keep], rtol=1e-10, atol=1e-12)
        return
    for a, b in zip(ours, composite):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_force_reference_env():
    code = ("import torch, mnemonics_fast.ops as o\n"
            "i = o.backend_info()\n"
            "assert not o.kernels_available() and i['force_reference'], i\n"
            "assert 'FORCE_REFERENCE' in i['reason_unavailable']\n"
            "assert i['ops']['cosine_linear']['cuda'] == 'reference'\n"
            "x = torch.randn(3, 4); w = torch.randn(2, 4); s = torch.tensor(2.0)\n"
            "assert torch.equal(o.cosine_linear(x, w, s), o.reference_cosine_linear(x, w, s))\n"
            "print('ok')\n")
    proc = _run(code, {"MNEMONICS_FAST_FORCE_REFERENCE": "1"})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_missing_extension_warns_once_and_falls_back():
    code = ("import importlib, warnings\n"
            "real = importlib.import_module\n"
            "def fake(name, *a, **k):\n"
            "    if name == 'mnemonics_fast._C':\n"
            "        raise OSError('undefined symbol: _ZN3c10 (simulated)')\n"
            "    return real(name, *a, **k)\n"
            "importlib.import_module = fake\n"
            "import torch, mnemonics_fast.ops as o\n"
            "from mnemonics_fast.ops import cosine\n"
            "assert not o.kernels_available()\n"
            "r = o.backend_info()['reason_unavailable']\n"
            "assert ('failed to load' in r and 'simulated' in r) or 'not built' in r, r\n"
            "x = torch.randn(3, 4); w = torch.randn(2, 4); s = torch.tensor(2.0)\n"
            "with warnings.catch_warnings(record=True) as rec:\n"
            "    warnings.simplefilter('always')\n"
            "    for _ in range(3):\n"
            "        y = cosine._cosine_linear_cuda_fallback(x, w, s)  # what a CUDA call would run\n"
            "assert len(rec) == 1 and 'reference' in str(rec[0].message), [str(m.message) for m in rec]\n"
            "assert torch.equal(y, o.reference_cosine_linear(x, w, s))\n"
            "print('ok')\n")
    proc = _run(code)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_info_module(capsys):
    from mnemonics_fast.info import main

    assert main(["--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"kernels_available", "ops", "gpu", "dali", "build", "compile"} <= set(info)
    assert info["kernels_available"] == ops.kernels_available()
    assert set(info["compile"]) == ({"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"})
    proc = subprocess.run([sys.executable, "-m", "mnemonics_fast.info"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0 and "mnemonics_fast._C" in proc.stdout and "DALI" in proc.stdout, proc.stderr[-3000:]


def test_info_notes_an_extension_from_another_checkout():
    """An editable install of another checkout can map mnemonics_fast._C to its own tree: `info` says so."""
    from mnemonics_fast.info import collect, format_info

    info = collect()
    info["kernels_available"], info["extension_module"] = True, "/elsewhere/mnemonics_fast/_C.so"
    assert "built from another checkout's sources" in format_info(info)
    info["extension_module"] = os.path.join(ROOT, "mnemonics_fast", "_C.so")
    assert "another checkout" not in format_info(info)


def test_import_is_cheap_and_does_not_touch_cuda():
    code = ("import time, torch\n"
            "t = time.perf_counter(); import mnemonics_fast.ops; dt = time.perf_counter() - t\n"
            "assert not torch.cuda.is_initialized()\n"
            "print(dt)\n")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 2.0


# ---- the CUDA kernels' source, emulated on the CPU -------------------------------------------------------------------
@pytest.fixture(scope="module")
def emu():
    sys.path.insert(0, os.path.join(ROOT, "csrc", "emulation"))
    try:
        import emulator
    finally:
        sys.path.pop(0)
    try:
        emulator.build()
    except RuntimeError as exc:
        if "no C++ compiler" in str(exc):
            pytest.skip(str(exc))
        raise
    return emulator.load()


EMU_SHAPES = [(1, 2, 1), (7, 5, 100), (33, 45, 64), (70, 33, 65), (40, 100, 37)]


def _rel_err(a, b):
    """Largest error relative to the magnitude of its row (zero rows make some rows ~1e12 times larger than others).
    Rows below 0.1 (e.g. D = 1, where the gradient is zero up to rounding) are compared against 0.1: the inputs are
    O(1), so an indexing bug shows up as an O(1) error either way."""
    a, b = a.double().reshape(b.shape[0] if b.dim() else 1, -1), b.double().reshape(b.shape[0] if b.dim() else 1, -1)
    scale = b.abs().amax(dim=1, keepdim=True).clamp_min(0.1)
    return ((a - b).abs() / scale).max().item()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "blas"])
@pytest.mark.parametrize("B,C,D", EMU_SHAPES)
def test_emulated_kernels_fp32(emu, B, C, D, fused):
    x, w, s = _randn(B, D), _randn(C, D), _sigma()
    if B > 2:
        x[1] = 0.0  # zero rows take the eps branch in every kernel
        w[0] = 0.0
    g = _randn(B, C, seed=7)
    out_ref = reference_cosine_linear(x, w, s)
    grads_ref = reference_cosine_linear_backward(g, out_ref, x, w, s)
    f = torch.float32
    out = emu.cosine_forward(x.to(f), w.to(f), s.to(f), fused)
    grads = emu.cosine_backward(g.to(f), out_ref.to(f), x.to(f), w.to(f), s.to(f), fused)
    assert out.dtype == f and _rel_err(out, out_ref) < 1e-5
    for name, got, want in zip(("dx", "dw", "dsigma"), grads, grads_ref):
        assert torch.isfinite(got).all(), name
        assert _rel_err(got, want) < 1e-5, (name, _rel_err(got, want))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "blas"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_kernels_low_precision(emu, dtype, fused):
    """The flash-attention rule: error vs the float64 reference at most 2x (outputs) / 3x (gradients) the error of
    PyTorch computing the reference in `dtype` (here on the CPU)."""
    B, C, D = 40, 37, 70
    # inputs representable in `dtype`, so that the float64 reference sees exactly what the kernel sees
    x, w, g = (_randn(B, D).to(dtype).double(), _randn(C, D).to(dtype).double(),
               _randn(B, C, seed=5).to(dtype).double())
    s = _sigma(dtype=torch.float32)  # a float32 sigma with half inputs: the autocast case
    out_ref = reference_cosine_linear(x, w, s.double())
    grads_ref = reference_cosine_linear_backward(g, out_ref, x, w, s.double())
    xl, wl, sl = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), s.clone().requires_grad_()
    out_pt = reference_cosine_linear(xl, wl, sl)
    grads_pt = torch.autograd.grad(out_pt, (xl, wl, sl), g.to(dtype))

    out = emu.cosine_forward(x.to(dtype), w.to(dtype), s, fused)
    assert out.dtype == dtype
    assert _rel_err(out, out_ref) <= 2 * _rel_err(out_pt, out_ref) + 1e-6
    grads = emu.cosine_backward(g.to(dtype), out_ref.to(dtype), x.to(dtype), w.to(dtype), s, fused)
    assert grads[2].dtype == torch.float32
    for name, got, pt, want in zip(("dx", "dw", "dsigma"), grads, grads_pt, grads_ref):
        assert _rel_err(got, want) <= 3 * _rel_err(pt, want) + 1e-6, (name, _rel_err(got, want), _rel_err(pt, want))


def test_emulated_exemplar_sgd_edge_semantics(emu):
    """The kernel source: momentum 0 never reads the buffer (a NaN one stays harmless), a NaN clamp bound gives NaN,
    clamp_min > clamp_max gives clamp_max - all as the reference."""
    for momentum, lo, hi, buf_fill in ((0.0, -1.0, 1.0, float("nan")), (0.9, float("nan"), 1.0, 0.5),
                                       (0.9, -1.0, float("nan"), 0.5), (0.9, 0.7, 0.2, 0.5)):
        params, grads = _sgd_lists([(4097,), (3, 5, 5)])
        bufs = [torch.full_like(p, buf_fill) for p in params]
        want_p, want_b = [p.clone() for p in params], [b.clone() for b in bufs]
        reference_exemplar_sgd_step_(want_p, grads, want_b, 0.1, momentum, 5e-4, lo, hi)
        emu.exemplar_sgd_step_(params, grads, bufs, 0.1, momentum, 5e-4, lo, hi, max_grid=3, misalign=False)
        for a, b in zip(params + bufs, want_p + want_b):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)
        assert torch.isfinite(params[0]).all() == (lo == lo and hi == hi)


@pytest.mark.parametrize("case", ["bank", "mixed", "misaligned", "table", "no_weight_decay"])
def test_emulated_exemplar_sgd(emu, case):
    shapes = {"bank": [(5, 3, 32, 32)], "mixed": SGD_SHAPES + [(3, 32, 32)] * 3,
              "misaligned": [(3, 32, 32), (7,), (4097,)], "table": [(13,)] * 70 + [(9000,)],
              "no_weight_decay": [(6, 3, 8, 8)]}[case]
    params, grads = _sgd_lists(shapes)
    bufs = [torch.randn_like(p) for p in params]
    want_p, want_b = [p.clone() for p in params], [b.clone() for b in bufs]
    wd = 0.0 if case == "no_weight_decay" else 5e-4
    reference_exemplar_sgd_step_(want_p, grads, want_b, 0.1, 0.9, wd, -1.0, 1.0)
    emu.exemplar_sgd_step_(params, grads, bufs, 0.1, 0.9, wd, -1.0, 1.0, max_grid=3,
                           misalign=case == "misaligned")
    for a, b in zip(params + bufs, want_p + want_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
