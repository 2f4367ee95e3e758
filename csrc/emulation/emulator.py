"""Run the CUDA kernels' source on the CPU (tests only): compile emulate_kernels.cpp with the host compiler and call
it through ctypes on CPU tensors. See cuda_host_shim.h for what this does and does not check.

    from emulator import load            # tests put csrc/emulation on sys.path
    emu = load()                         # None when no C++20 compiler / torch headers; compiled once, cached
    out = emu.cosine_forward(x, w, sigma, fused=True)

Buffers passed to the kernels sit inside NaN-filled guard zones, so a read past the end shows up as NaN in the
result and a write past the end as a changed guard (checked after every call).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.dirname(HERE)
ROOT = os.path.dirname(CSRC)
GUARD = 67  # elements of NaN before and after every buffer

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_SIGMA_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _sources() -> list[str]:
    names = ["emulation/emulate_kernels.cpp", "emulation/cuda_host_shim.h", "common.cuh", "cosine_linear_kernels.cuh",
             "exemplar_sgd_kernels.cuh"]
    return [os.path.join(CSRC, n) for n in names]


def build() -> str:
    """Compile (if the sources changed) and return the path of the shared library."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    digest = hashlib.sha256()
    for path in _sources():
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(torch.__version__.encode())
    out_dir = os.path.join(ROOT, "build", "emulation")
    lib = os.path.join(out_dir, f"libmf_emulate_{digest.hexdigest()[:16]}.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out_dir, exist_ok=True)
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    tmp = f"{lib}.{os.getpid()}.tmp"
    cmd = [cxx, "-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-w", "-x", "c++",
           "-I", include, os.path.join(HERE, "emulate_kernels.cpp"), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling the kernel emulation failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    os.replace(tmp, lib)
    return lib


class _Guarded:
    """A contiguous copy of `t` inside NaN guard zones."""

    def __init__(self, t: torch.Tensor):
        self.shape, self.n = t.shape, t.numel()
        self.buf = torch.full((self.n + 2 * GUARD,), float("nan"), dtype=t.dtype)
        self.buf[GUARD:GUARD + self.n] = t.reshape(-1)
        self.ptr = ctypes.c_void_p(self.buf.data_ptr() + GUARD * self.buf.element_size())

    def tensor(self) -> torch.Tensor:
        return self.buf[GUARD:GUARD + self.n].reshape(self.shape).clone()

    def check_guards(self, name: str) -> None:
        head, tail = self.buf[:GUARD], self.buf[GUARD + self.n:]
        if not (torch.isnan(head.float()).all() and torch.isnan(tail.float()).all()):
            raise AssertionError(f"kernel wrote outside {name}")


class Emulator:
    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        i64, vp, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        self.lib.mf_emu_cosine_forward.argtypes = [i32, i32, vp, vp, vp, i32, vp, i64, i64, i64]
        self.lib.mf_emu_cosine_backward.argtypes = [i32, i32, vp, vp, vp, vp, vp, i32, vp, vp, vp, i64, i64, i64]
        self.lib.mf_emu_exemplar_sgd_step.argtypes = [i64, vp, vp, vp, vp, f32, f32, f32, f32, f32, i64]

    def cosine_forward(self, x, w, sigma, fused: bool) -> torch.Tensor:
        B, D = x.shape
        C = w.shape[0]
        gx, gw, gs = _Guarded(x), _Guarded(w), _Guarded(sigma.reshape(1))
        out = _Guarded(torch.full((B, C), float("nan"), dtype=x.dtype))
        rc = self.lib.mf_emu_cosine_forward(_DTYPES[x.dtype], int(fused), gx.ptr, gw.ptr, gs.ptr,
                                            _SIGMA_KINDS[sigma.dtype], out.ptr, B, C, D)
        assert rc == 0
        for name, g in (("out", out), ("x", gx), ("weight", gw), ("sigma", gs)):
            g.check_guards(name)
        return out.tensor()

    def cosine_backward(self, grad, out, x, w, sigma, fused: bool):
        B, D = x.shape
        C = w.shape[0]
        ins = [_Guarded(t) for t in (grad, out, x, w, sigma.reshape(1))]
        gx = _Guarded(torch.full((B, D), float("nan"), dtype=x.dtype))
        gw = _Guarded(torch.full((C, D), float("nan"), dtype=w.dtype))
        gs = _Guarded(torch.full((1,), float("nan"), dtype=sigma.dtype))
        rc = self.lib.mf_emu_cosine_backward(_DTYPES[x.dtype], int(fused), *(g.ptr for g in ins),
                                             _SIGMA_KINDS[sigma.dtype], gx.ptr, gw.ptr, gs.ptr, B, C, D)
        assert rc == 0
        for name, g in zip(("grad_x", "grad_weight", "grad_sigma", "grad_out", "out", "x", "weight", "sigma"),
                           (gx, gw, gs, *ins)):
            g.check_guards(name)
        return gx.tensor(), gw.tensor(), gs.tensor().reshape(sigma.shape)

    def exemplar_sgd_step_(self, params, grads, bufs, lr, momentum, weight_decay, clamp_min, clamp_max,
                           max_grid: int = 3, misalign: bool = False):
        """In place on CPU float32 tensors. misalign=True shifts every buffer by one element (scalar path)."""
        shift = 1 if misalign else 0
        guarded = []
        for ts in (params, grads, bufs):
            gs = []
            for t in ts:
                g = _Guarded(torch.cat([t.new_zeros(shift), t.reshape(-1)]) if shift else t)
                if shift:
                    g.ptr = ctypes.c_void_p(g.ptr.value + shift * 4)
                gs.append(g)
            guarded.append(gs)
        n = len(params)
        arr = lambda gs: (ctypes.c_void_p * n)(*(g.ptr for g in gs))  # noqa: E731
        numels = (ctypes.c_int64 * n)(*(t.numel() for t in params))
        rc = self.lib.mf_emu_exemplar_sgd_step(n, arr(guarded[0]), arr(guarded[1]), arr(guarded[2]), numels, lr,
                                               momentum, weight_decay, clamp_min, clamp_max, max_grid)
        assert rc == 0
        for ts, gs in zip((params, grads, bufs), guarded):
            for t, g in zip(ts, gs):
                g.check_guards("an sgd buffer")
                t.copy_(g.tensor().reshape(-1)[shift:].reshape(t.shape))


_cached: Emulator | None = None


def load() -> Emulator:
    global _cached
    if _cached is None:
        _cached = Emulator(build())
    return _cached
