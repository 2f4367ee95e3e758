"""Mnemonics Training's exemplar level (Liu et al., CVPR 2020; SPEC §5): exemplar pixels learnt by a bilevel loop.

The exemplars are parameters: a contiguous bank [M, 3, H, W] of pixels in [0, 1] (the model normalises its input as
its first op), clipped back to [0, 1] after every update. One outer step (SPEC §5 (b)):

    theta_0 = the model's trainable parameters (requires_grad=True; frozen old head rows and buffers stay fixed)
    for t in 1..T:   theta_t = theta_{t-1} - alpha * grad_theta L(theta_{t-1}; E)      (graph kept: second order)
    L_val = L(theta_T; query batch of real data)
    E <- SGD(momentum) step of lr beta on dL_val/dE, then clamp to [0, 1]

L is cross-entropy on the sigma-scaled cosine logits over all classes seen so far: the paper's base classification
loss without LUCIR's distillation terms (less-forget and margin ranking compare the model to its frozen predecessor
and involve no exemplar pixel in a way the inner step could use). The inner step is plain gradient descent (no
momentum, no weight decay) on the mean loss over all exemplars of the call. See docs/mnemonics.md for the modes, the
memory accounting and what differs from the released code.

inner_update="normalised" (not the paper; a labelled option) takes the inner step along the unit gradient,
theta_t = theta_{t-1} - alpha * g / |g| (|g| the L2 norm over all of theta'). For T = 1,
L_val(theta - alpha g_E) ~= L_val(theta) - alpha <g_val, g_E>: the paper's objective can be lowered by making |g_E|
larger, i.e. by making the exemplars harder for the current model, and on tin100a-32 that is what it did
(bench/exemplar_objective.py). With the unit step only the direction of g_E counts: -alpha |g_val| cos(g_val, g_E).

Pixel-space SGD: x_norm = (x - mean_c) / std_c, so dL/dx = dL/dx_norm / std_c and a step of lr beta in pixel space
moves x_norm by -beta / std_c^2 * dL/dx_norm: pixel lr beta == normalised-space lr beta / std_c^2 per channel
(equivalently, a normalised-space lr b corresponds to the pixel lr b * std_c^2). Momentum is linear, so it carries
over; weight decay does not (here it pulls pixels to 0, there to the channel mean), hence its default of 0.

Public API: `optimise_exemplars` (the exemplar level for the new classes), `adjust_old_exemplars` (SPEC §5 (c)),
`ExemplarOptimiser` (one outer step at a time; what the two functions and the benchmark drive), `proto_loss` (the
released code's single-level surrogate), and the helpers `quantise_uint8`, `dequantise`,
`init_exemplars_from_indices`, `stack_class_exemplars`, `split_halves`.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .. import ops
from .compiled_grad import COMPILABLE_MODES, COMPILE_MODES, CompiledExemplarGrad
from .lean_conv import lean_second_order_convs

MODES = ("full", "head", "first_order", "proto")
SHARDABLE_MODES = ("full", "first_order")  # the modes whose inner loop shard_inner can split over the ranks
LR_SCALES = ("none", "exemplars")
INNER_UPDATES = ("sgd", "normalised")  # the paper's inner SGD step; the unit-gradient step (module docstring)
Batch = tuple[torch.Tensor, torch.Tensor]

__all__ = ["MODES", "LR_SCALES", "INNER_UPDATES", "ExemplarOptimiser", "optimise_exemplars", "adjust_old_exemplars",
           "proto_loss", "quantise_uint8", "dequantise", "init_exemplars_from_indices", "stack_class_exemplars",
           "split_halves"]


# ======================================================================================================================
# Pixel storage and initialisation
# ======================================================================================================================

def quantise_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 levels round(x * 255), clamped to 0..255 (NaN -> 0).

    Rounds to the nearest level (ties to even); the released code truncated (`astype('uint8')` after `* 255`), which
    darkens every stored pixel by half a level on average and moves an exactly-representable 128/255 to 127.
    """
    x = torch.nan_to_num(pixels.detach().float(), nan=0.0) * 255.0
    return x.round_().clamp_(0.0, 255.0).to(torch.uint8)


def dequantise(u8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 levels -> floats in [0, 1] (level / 255). `dequantise(quantise_uint8(x))` is within 0.5/255 of clip(x)."""
    if u8.dtype != torch.uint8:
        raise TypeError(f"dequantise expects uint8, got {u8.dtype}")
    return u8.to(dtype) / 255.0


def init_exemplars_from_indices(class_images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """One class's initial exemplars: copies of `class_images[indices]` as float32 pixels in [0, 1].

    class_images: [n, 3, H, W], uint8 (0..255) or float in [0, 1]: the class's un-augmented training images.
    indices: LongTensor [m] of DISTINCT positions (a herding ranking, `exemplars.herding.herding`, or
    `exemplars.herding.random_selection`). Duplicates are an error: the earlier code's "20 exemplars" that were
    copies of one image (SPEC §7). Returns a new contiguous tensor [m, 3, H, W] (never a view of `class_images`).
    """
    if class_images.dim() != 4:
        raise ValueError(f"class_images must be [n, 3, H, W], got shape {tuple(class_images.shape)}")
    idx = torch.as_tensor(indices).long().flatten().cpu()
    n = class_images.shape[0]
    if idx.numel() == 0:
        raise ValueError("init_exemplars_from_indices: no indices given")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise IndexError(f"exemplar indices must lie in [0, {n}), got min {int(idx.min())} max {int(idx.max())}")
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError("exemplar indices repeat an image: each of a class's m exemplars must be a distinct image")
    picked = class_images[idx.to(class_images.device)]
    if picked.dtype == torch.uint8:
        return dequantise(picked).contiguous()
    if not picked.is_floating_point():
        raise TypeError(f"class_images must be uint8 or float, got {picked.dtype}")
    return picked.to(torch.float32).clone(memory_format=torch.contiguous_format)


def stack_class_exemplars(per_class: Sequence[torch.Tensor], class_labels: Sequence[int]) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """Concatenate per-class exemplar tensors into one contiguous bank [M, 3, H, W] and its labels LongTensor [M].

    One bank means one launch per exemplar update (`ops.exemplar_sgd_step_` on [bank]).
    """
    if len(per_class) != len(class_labels):
        raise ValueError(f"{len(per_class)} exemplar tensors but {len(class_labels)} labels")
    bank = torch.cat([p.to(torch.float32) for p in per_class]).contiguous()
    labels = torch.cat([torch.full((p.shape[0],), int(c), dtype=torch.long) for p, c in zip(per_class, class_labels)])
    return bank, labels.to(bank.device)


def split_halves(labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded per-class split of a bank into halves A and B (SPEC §5 (c)); returns sorted index tensors (idx_a, idx_b).

    Each class's exemplars are permuted with `generator` (a CPU generator; classes in increasing label order) and the
    first ceil(n_c / 2) go to A, so a class with one exemplar has it in A and none in B.
    """
    lab = labels.detach().cpu()
    a, b = [], []
    for c in torch.unique(lab).tolist():
        idx = (lab == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        half = (idx.numel() + 1) // 2
        a.append(idx[:half])
        b.append(idx[half:])
    idx_a = torch.cat(a).sort().values if a else lab.new_zeros(0)
    idx_b = torch.cat(b).sort().values if b else lab.new_zeros(0)
    return idx_a.to(labels.device), idx_b.to(labels.device)


# ======================================================================================================================
# The released code's single-level surrogate (mode="proto")
# ======================================================================================================================

def _class_mean_matrix(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """avg [C, M] with avg[c, i] = 1/n_c where labels[i] == c (so avg @ f = per-class feature means, zero rows for
    absent classes), and present [C] bool."""
    onehot = F.one_hot(labels, num_classes).T.to(torch.float32)  # [C, M]
    counts = onehot.sum(1)
    return onehot / counts.clamp_min(1.0).unsqueeze(1), counts > 0


def _proto_loss_from_means(ex_features: torch.Tensor, avg: torch.Tensor, present: torch.Tensor,
                           class_means: torch.Tensor | None, query_features: torch.Tensor,
                           query_labels: torch.Tensor) -> torch.Tensor:
    means = avg.to(ex_features.dtype) @ ex_features  # [C, d]: raw (un-normalised) feature means, as released
    if class_means is not None:
        means = torch.where(present.unsqueeze(1), means, class_means.to(means.dtype))
    logits = F.linear(F.normalize(query_features, dim=1), F.normalize(means, dim=1))  # plain cosines: no sigma
    return F.cross_entropy(_upcast(logits), query_labels)


def proto_loss(exemplar_features: torch.Tensor, labels: torch.Tensor, query_features: torch.Tensor,
               query_labels: torch.Tensor, class_means: torch.Tensor | None = None,
               num_classes: int | None = None) -> torch.Tensor:
    """The released code's exemplar loss (yaoyao-liu/class-incremental-learning,
    mnemonics-training/1_train/trainer/mnemonics.py, the `mnemonics_total_epochs` loop).

    For every class c that has exemplars, its prototype is the MEAN of the exemplars' raw (un-normalised) features;
    classes without exemplars take the fixed row `class_means[c]` (the released code used its herding class means
    there, `current_means[:, :, 0]`). logits = cos(query feature, prototype) with no sigma;
    loss = cross-entropy(logits, query labels). Single level: no inner loop, the model is never updated.

    exemplar_features: [M, d] (with graph to the pixels); labels: [M]; query_features: [B, d]; query_labels: [B];
    class_means: [C, d] or None (then every class in range(C) must have exemplars); C = num_classes, else
    class_means.shape[0], else labels.max() + 1.
    """
    if num_classes is None:
        num_classes = class_means.shape[0] if class_means is not None else int(labels.max()) + 1
    avg, present = _class_mean_matrix(labels, num_classes)
    if class_means is None and not bool(present.all()):
        raise ValueError("proto_loss: some classes have no exemplars; pass class_means for them")
    return _proto_loss_from_means(exemplar_features, avg, present, class_means, query_features, query_labels)


# ======================================================================================================================
# One outer step's exemplar gradient (pure: no side effects, so it can be captured in a CUDA graph)
# ======================================================================================================================

def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Losses in at least float32 (autocast's bf16 logits are upcast; float64 stays float64 for the tests)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP: its hooks must not see our inner-loop gradients (and they are not needed here)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _ranges(n: int, chunk: int | None) -> list[tuple[int, int]]:
    if n <= 0:
        return []
    step = n if not chunk else max(1, int(chunk))
    return [(s, min(s + step, n)) for s in range(0, n, step)]


class _AllReduceSum(torch.autograd.Function):
    """SUM all-reduce with a gradient: the backward of y = sum_r x_r (y on every rank) is the SUM all-reduce of the
    ranks' output gradients. Used once per inner step by the sharded unrolled engine; never differentiated twice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, gy):
        gx = gy.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(gx, op=dist.ReduceOp.SUM, group=ctx.group)
        return gx, None


def _allreduce_list(ts: Sequence[torch.Tensor], group, differentiable: bool = False) -> list[torch.Tensor]:
    """SUM over ranks of a list of tensors in ONE collective (flattened), shapes restored."""
    flat = torch.cat([t.reshape(-1) for t in ts])
    if differentiable:
        flat = _AllReduceSum.apply(flat, group)
    else:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in ts]), ts)]


def _global_norm(g: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm over all tensors of g (one vector: theta'), kept off zero."""
    return torch.sqrt(sum((gi * gi).sum() for gi in g)).clamp_min(torch.finfo(g[0].dtype).tiny)


def _inner_direction(g: Sequence[torch.Tensor], normalised: bool) -> list[torch.Tensor]:
    """The direction of one inner step: the gradient itself (the paper), or the gradient over its L2 norm taken over
    all of theta' (inner_update="normalised"). Differentiable: the engines keep its graph where they keep g's."""
    if not normalised:
        return list(g)
    norm = _global_norm(g)
    return [gi / norm for gi in g]


class _ExemplarGrad:
    """dL_val / dE for a fixed model, fixed exemplar labels and fixed settings: `self(bank, qx, qy) -> (grad, loss)`.

    Engines (all exact for their mode's definition; docs/mnemonics.md):
      full / first_order, exemplar_chunk None: unrolled autograd through the T inner steps (create_graph=True).
      full / first_order, exemplar_chunk set:  reverse sweep through the unrolled inner loop, one chunk's
        second-order graph alive at a time (same numbers, memory O(chunk) instead of O(T * M)).
      head: exemplar features with graph through the fixed backbone; the bilevel part on the head only.
      proto: the released single-level prototype loss.
    """

    def __init__(self, model: nn.Module, labels: torch.Tensor, *, mode: str, inner_lr: float, inner_steps: int,
                 num_classes: int | None, fixed: Batch | None, class_means: torch.Tensor | None,
                 chunk: int | None, autocast_dtype: torch.dtype | None, lean_conv: bool = True,
                 shard: tuple | None = None, inner_update: str = "sgd"):
        self.model, self.mode, self.chunk = model, mode, chunk
        self.normalised = inner_update == "normalised"
        self.lean_conv = bool(lean_conv)
        # shard = (group, rank, world): full/first_order split the inner loss's exemplars over the ranks (contiguous
        # slices), all-reducing the inner gradient; each rank then returns dL/dE for its own rows only (zeros
        # elsewhere) of the SUM over ranks of the validation losses, so the caller's SUM/world all-reduce completes it.
        self.shard = shard
        self.alpha, self.T = float(inner_lr), int(inner_steps)
        self.M = labels.numel()
        self.fixed_x = None if fixed is None else fixed[0].detach()
        self.y_all = labels if fixed is None else torch.cat([labels, fixed[1].to(labels.device)])
        self.N = self.y_all.numel()
        self.device_type = labels.device.type
        self.autocast_dtype = autocast_dtype
        if mode in ("full", "first_order"):
            self.module = model
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        elif mode == "head":
            self.module = model.head
            named = [(n, p) for n, p in model.head.named_parameters() if p.requires_grad]
        else:
            self.module, named = None, []
        if mode != "proto" and not named:
            raise ValueError(f"mnemonics mode {mode!r}: the model has no trainable parameters to form theta'")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.fixed_f = None
        if mode in ("head", "proto") and self.fixed_x is not None:
            self.fixed_f = self._features_nograd(self.fixed_x)  # the backbone is fixed in these modes: compute once
        if mode == "proto":
            d = getattr(model, "feature_dim", None)
            if class_means is not None and (class_means.shape[0] != num_classes
                                            or (d is not None and class_means.shape[1] != d)):
                raise ValueError(f"mode='proto': class_means must be [num_classes={num_classes}, d] (every seen "
                                 f"class; rows of the optimised classes are ignored), got "
                                 f"{tuple(class_means.shape)}")
            self.avg, self.present = _class_mean_matrix(self.y_all, num_classes)
            if class_means is None and not bool(self.present.all()):
                missing = (~self.present).nonzero().flatten().tolist()
                raise ValueError(f"mode='proto': classes {missing[:10]}... have no exemplars; pass class_means")
            self.class_means = None if class_means is None else class_means.detach().to(labels.device)

    # ---- building blocks ----
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # cache_enabled=False: the autocast weight cache is not allowed inside CUDA-graph capture.
        return torch.autocast(self.device_type, dtype=self.autocast_dtype, cache_enabled=False)

    def _call(self, theta: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return _upcast(functional_call(self.module, dict(zip(self.names, theta)), (x,)))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model.features(x)

    def _features_nograd(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self._features(x[s:e]) for s, e in _ranges(x.shape[0], self.chunk)])

    def _own(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice of n rows (all of them when not sharded)."""
        if self.shard is None:
            return 0, n
        _, rank, world = self.shard
        return rank * n // world, (rank + 1) * n // world

    def _sources(self, bank: torch.Tensor) -> list[tuple[torch.Tensor, int, int, bool]]:
        """(tensor, start, end, is_bank) chunks over the exemplars of the inner loss: the bank, then the fixed ones
        (this rank's rows only when sharded)."""
        bs, be = self._own(self.M)
        out = [(bank, bs + s, bs + e, True) for s, e in _ranges(be - bs, self.chunk)]
        if self.fixed_x is not None:
            fs, fe = self._own(self.fixed_x.shape[0])
            out += [(self.fixed_x, fs + s, fs + e, False) for s, e in _ranges(fe - fs, self.chunk)]
        return out

    def _y(self, is_bank: bool, s: int, e: int) -> torch.Tensor:
        return self.y_all[s:e] if is_bank else self.y_all[self.M + s:self.M + e]

    # ---- engines ----
    def __call__(self, bank: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "head":
            return self._head(bank, qx, qy)
        if self.mode == "proto":
            return self._proto(bank, qx, qy)
        # full / first_order differentiate every convolution's backward: lean_conv.py says why this is cheaper
        with lean_second_order_convs(self.module, self.lean_conv):
            if self.chunk is None:
                return self._full_unrolled(bank, qx, qy)
            return self._full_reverse(bank, qx, qy)

    def _full_unrolled(self, bank, qx, qy):
        if self.shard is None:
            x, y = (bank if self.fixed_x is None else torch.cat([bank, self.fixed_x])), self.y_all
        else:  # this rank's rows; the inner loss is a sum over exemplars / N, completed by the all-reduce below
            parts = [(src[s:e], self._y(is_bank, s, e)) for src, s, e, is_bank in self._sources(bank)]
            parts = parts or [(bank[:0], self.y_all[:0])]  # more ranks than rows: this one adds nothing
            x, y = torch.cat([p for p, _ in parts]), torch.cat([q for _, q in parts])
        theta = self.params
        for t in range(self.T):
            # first_order: the inner gradient is taken at a detached theta_{t-1} (no d theta_t / d theta_{t-1}
            # Hessian terms) but keeps its graph to E (the mixed term, the only path from E to theta').
            at = theta if (self.mode == "full" or t == 0) else [p.detach().requires_grad_() for p in theta]
            if self.shard is None:
                loss = F.cross_entropy(self._call(at, x), y)
            else:
                loss = F.cross_entropy(self._call(at, x), y, reduction="sum") / self.N
            g = torch.autograd.grad(loss, at, create_graph=True, materialize_grads=True)
            if self.shard is not None:
                g = _allreduce_list(g, self.shard[0], differentiable=True)
            theta = torch._foreach_add(theta, _inner_direction(g, self.normalised), alpha=-self.alpha)
        loss_val = F.cross_entropy(self._call(theta, qx), qy)
        (grad,) = torch.autograd.grad(loss_val, bank, materialize_grads=True)
        return grad, loss_val.detach()

    def _chunk_inner_grad(self, at, src, s, e, is_bank, leaf=None, create_graph=False):
        xc = leaf if leaf is not None else src[s:e]
        loss = F.cross_entropy(self._call(at, xc), self._y(is_bank, s, e), reduction="sum") / self.N
        return torch.autograd.grad(loss, at, create_graph=create_graph, materialize_grads=True)

    def _full_reverse(self, bank, qx, qy):
        """Reverse-mode through theta_t = theta_{t-1} - alpha g(theta_{t-1}, E), chunk by chunk:
        v_T = dL_val/dtheta_T; for t = T..1: dE += -alpha d<v_t, g(theta_{t-1}, E)>/dE,
        v_{t-1} = v_t - alpha d<v_t, g(theta_{t-1}, E)>/dtheta (full only; first_order keeps v = v_T).
        g is a sum over chunks, so both terms are too: one chunk's double-backward graph is alive at a time.
        inner_update="normalised" (step -alpha g/|g|): the Jacobian of g/|g| is P = (I - g^ g^T)/|g|, symmetric, so
        both terms take u_t = P v_t in place of v_t (v_{t-1} = v_t - alpha H u_t); g^ and |g| kept per step."""
        sources = self._sources(bank.detach())
        thetas = [[p.detach() for p in self.params]]
        units: list[tuple[list[torch.Tensor], torch.Tensor]] = []  # (g^, |g|) of every step, normalised only
        for _ in range(self.T):  # forward sweep: theta_1..theta_T, first-order gradients only
            at = [p.requires_grad_() for p in (q.detach() for q in thetas[-1])]
            g = None
            for src, s, e, is_bank in sources:
                gc = self._chunk_inner_grad(at, src, s, e, is_bank)
                g = list(gc) if g is None else torch._foreach_add(g, gc)
            if g is None:  # a rank whose slice is empty
                g = [torch.zeros_like(p) for p in at]
            if self.shard is not None:
                g = _allreduce_list(g, self.shard[0])
            if self.normalised:
                norm = _global_norm(g)
                g = [gi / norm for gi in g]
                units.append((g, norm))
            thetas.append(torch._foreach_add(thetas[-1], g, alpha=-self.alpha))
        at = [p.detach().requires_grad_() for p in thetas[-1]]
        loss_val = F.cross_entropy(self._call(at, qx), qy)
        v = list(torch.autograd.grad(loss_val, at, materialize_grads=True))
        if self.shard is not None:  # the sharded engines differentiate the SUM of the ranks' validation losses
            v = _allreduce_list(v, self.shard[0])
        grad = torch.zeros_like(bank)
        for t in reversed(range(self.T)):  # step t maps thetas[t] -> thetas[t + 1]
            need_theta = self.mode == "full" and t > 0
            at = [p.detach().requires_grad_() for p in thetas[t]]
            u = v
            if self.normalised:  # u = P v = (v - g^ <g^, v>) / |g|
                unit, norm = units[t]
                dot = sum((a * b).sum() for a, b in zip(unit, v))
                u = [(vi - ui * dot) / norm for vi, ui in zip(v, unit)]
            hv = None
            for src, s, e, is_bank in sources:
                if not (is_bank or need_theta):
                    continue
                leaf = src[s:e].detach().requires_grad_() if is_bank else None
                gc = self._chunk_inner_grad(at, src, s, e, is_bank, leaf=leaf, create_graph=True)
                inputs = ([leaf] if is_bank else []) + (at if need_theta else [])
                pairs = [(gi, ui) for gi, ui in zip(gc, u) if gi.requires_grad]
                outs = torch.autograd.grad([gi for gi, _ in pairs], inputs, grad_outputs=[vi for _, vi in pairs],
                                           materialize_grads=True)
                if is_bank:
                    grad[s:e].add_(outs[0], alpha=-self.alpha)
                    outs = outs[1:]
                if need_theta:
                    hv = list(outs) if hv is None else torch._foreach_add(hv, outs)
            if need_theta:
                if hv is None:
                    hv = [torch.zeros_like(p) for p in v]
                if self.shard is not None:
                    hv = _allreduce_list(hv, self.shard[0])
                v = torch._foreach_add(v, hv, alpha=-self.alpha)
        return grad, loss_val.detach()

    def _exemplar_features(self, bank):
        """(features to differentiate against, graph handle): unchunked keeps the backbone graph from the bank;
        chunked computes features without graph and recomputes them chunk by chunk in `_backbone_vjp`."""
        if self.chunk is None:
            f = self._features(bank)
            return f.detach().requires_grad_(), f
        return self._features_nograd(bank).requires_grad_(), None

    def _backbone_vjp(self, bank, f, gf):
        if f is not None:
            (grad,) = torch.autograd.grad(f, bank, gf)
            return grad
        grad = torch.empty_like(bank)
        for s, e in _ranges(self.M, self.chunk):
            leaf = bank[s:e].detach().requires_grad_()
            (grad[s:e],) = torch.autograd.grad(self._features(leaf), leaf, gf[s:e])
        return grad

    def _head(self, bank, qx, qy):
        with torch.no_grad():
            qf = self._features(qx)  # the backbone is fixed: query features once per batch, no graph
        fd, f = self._exemplar_features(bank)
        f_all = fd if self.fixed_f is None else torch.cat([fd, self.fixed_f])
        theta = self.params
        for _ in range(self.T):  # second order within the head (tiny)
            loss = F.cross_entropy(self._call(theta, f_all), self.y_all)
            g = torch.autograd.grad(loss, theta, create_graph=True, materialize_grads=True)
            theta = torch._foreach_add(theta, _inner_direction(g, self.normalised), alpha=-self.alpha)
        loss_val = F.cross_entropy(self._call(theta, qf), qy)
        (gf,) = torch.autograd.grad(loss_val, fd)
        return self._backbone_vjp(bank, f, gf), loss_val.detach()

    def _proto(self, bank, qx, qy):
        with torch.no_grad():
            qf = self._features(qx)
        fd, f = self._exemplar_features(bank)
        f_all = fd if self.fixed_f is None else torch.cat([fd, self.fixed_f])
        loss_val = _proto_loss_from_means(_upcast(f_all), self.avg, self.present, self.class_means, _upcast(qf), qy)
        (gf,) = torch.autograd.grad(loss_val, fd)
        return self._backbone_vjp(bank, f, gf), loss_val.detach()


class _GraphedGrad:
    """A CUDA graph of one `_ExemplarGrad` call with static shapes. The bank is read in place (the update writes it
    in place), the query batch is copied into static buffers, and the outputs live in the graph's private pool."""

    def __init__(self, fn: _ExemplarGrad, bank: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor, warmup: int = 3):
        self.qx, self.qy = qx.clone(), qy.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (cuDNN autotuning, lazy inits); results discarded
            for _ in range(warmup):
                fn(bank, self.qx, self.qy)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(bank, self.qx, self.qy)

    def matches(self, qx: torch.Tensor, qy: torch.Tensor) -> bool:
        return (qx.shape == self.qx.shape and qx.dtype == self.qx.dtype and qy.shape == self.qy.shape
                and qx.device == self.qx.device)

    def __call__(self, qx: torch.Tensor, qy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.qx.copy_(qx, non_blocking=True)
        self.qy.copy_(qy, non_blocking=True)
        self.graph.replay()
        return self.out


# ======================================================================================================================
# The outer loop
# ======================================================================================================================

def _resolve_group(process_group) -> tuple[object | None, int]:
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return None, 1
    group = process_group if process_group is not None else dist.group.WORLD
    return group, dist.get_world_size(group)


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    """A configuration notice printed once per process (exemplar optimisers are created several times a phase)."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)


def _debug_enabled(debug: bool) -> bool:
    return debug or os.environ.get("MNEMONICS_FAST_DEBUG", "0") not in ("", "0")


@contextlib.contextmanager
def tf32_precision(allow: bool | None):
    """allow_tf32 of the exemplar level. None: leave torch's global flags as they are. True/False: set cuDNN's and
    cuBLAS's TF32 flags (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) for the block and
    restore them after. Why it matters: PyTorch runs fp32 convolutions in TF32 by default, and the exemplar gradient
    (a second-order quantity) is then 9% off the float64 oracle on an H100, against 0.13% in full fp32
    (bench/results/mnemonics_step_h100_2026-11-27b.json). CPU results do not depend on it."""
    if allow is None:
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(allow)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class ExemplarOptimiser:
    """Holds a bank of exemplar pixels and takes outer steps on it; `optimise_exemplars` is a loop over `step`.

    Puts the model in eval mode (BN uses and keeps its running statistics) for its lifetime and restores every
    module's training flag on `close()` (use it as a context manager). Arguments as in `optimise_exemplars`.

    step(qx, qy): one outer step on a query batch: local exemplar gradient, all-reduced (averaged) across the process
      group if any, then ONE `ops.exemplar_sgd_step_` launch on the whole bank (momentum buffer kept across steps),
      clamped to [0, 1]. Returns the local L_val (a 0-dim tensor, not synchronised).
    grad(qx, qy): the local (this rank's) dL_val/dE and L_val, no update (tests, benchmarks).
    finish(): broadcast from the group's rank 0 (a safety net; with `debug` first asserts the banks are already
      bit-identical) and return the pixels, detached.
    """

    def __init__(self, model: nn.Module, exemplars: torch.Tensor, labels: torch.Tensor, *, mode: str = "full",
                 inner_lr: float, inner_steps: int, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 num_classes: int | None = None, fixed_exemplars: Batch | None = None,
                 class_means: torch.Tensor | None = None, exemplar_chunk: int | None = None,
                 cuda_graph: bool = False, autocast_dtype: torch.dtype | None = None, process_group=None,
                 lr_scale: str = "none", debug: bool = False, lean_conv: bool = True, shard_inner: bool = False,
                 compile_mode: str = "none", inner_update: str = "sgd", allow_tf32: bool | None = None):
        if mode not in MODES:
            raise ValueError(f"mnemonics mode must be one of {MODES}, got {mode!r}")
        if lr_scale not in LR_SCALES:
            raise ValueError(f"lr_scale must be one of {LR_SCALES}, got {lr_scale!r}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        if inner_update not in INNER_UPDATES:
            raise ValueError(f"inner_update must be one of {INNER_UPDATES}, got {inner_update!r}")
        if inner_update != "sgd" and mode == "proto":
            raise ValueError("inner_update='normalised' changes the inner step of the bilevel modes (full, head, "
                             "first_order); proto has no inner step")
        if lr_scale != "none" and mode == "proto":
            raise ValueError("lr_scale='exemplars' is defined for the bilevel modes (full, head, first_order), not "
                             "proto (no inner loss to count exemplars in)")
        if exemplars.dim() != 4 or not exemplars.is_floating_point():
            raise ValueError(f"exemplars must be float [M, 3, H, W], got {exemplars.dtype} {tuple(exemplars.shape)}")
        if labels.dim() != 1 or labels.numel() != exemplars.shape[0] or labels.dtype != torch.long:
            raise ValueError(f"labels must be a LongTensor [{exemplars.shape[0]}], got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        if mode != "proto" and (inner_steps is None or int(inner_steps) < 1):
            raise ValueError(f"inner_steps must be >= 1 for mode {mode!r}, got {inner_steps}")
        if exemplar_chunk is not None and int(exemplar_chunk) < 1:
            raise ValueError(f"exemplar_chunk must be a positive int or None, got {exemplar_chunk}")
        self.model = _unwrap(model)
        if fixed_exemplars is not None and fixed_exemplars[0].shape[0] == 0:
            fixed_exemplars = None
        if num_classes is None:
            num_classes = getattr(getattr(self.model, "head", None), "num_classes", None)
        if num_classes is None:
            num_classes = (class_means.shape[0] if class_means is not None else
                           int(torch.cat([labels] + ([fixed_exemplars[1]] if fixed_exemplars else [])).max()) + 1)
        all_labels = labels if fixed_exemplars is None else torch.cat([labels, fixed_exemplars[1].to(labels.device)])
        if int(all_labels.min()) < 0 or int(all_labels.max()) >= num_classes:
            raise ValueError(f"exemplar labels must lie in [0, {num_classes}) (remapped label space)")
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.allow_tf32 = None if allow_tf32 is None else bool(allow_tf32)
        self.cuda_graph = bool(cuda_graph) and exemplars.is_cuda
        if cuda_graph and not exemplars.is_cuda:
            warnings.warn("mnemonics: cuda_graph=True ignored for exemplars not on a CUDA device", stacklevel=2)
        self.debug = _debug_enabled(debug)
        self.group, self.world = _resolve_group(process_group)
        shard = None
        if shard_inner and self.world > 1 and mode in SHARDABLE_MODES:
            shard = (self.group, dist.get_rank(self.group), self.world)
            if self.cuda_graph:
                # collectives inside a captured graph are not supported on every backend; keep the eager path
                warnings.warn("mnemonics: cuda_graph=True ignored with shard_inner (collectives in the inner loop)",
                              stacklevel=2)
                self.cuda_graph = False
        self._flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            # The bank: a private contiguous copy (the caller's init tensor is never written), a leaf the gradient
            # is taken against, and the single tensor the fused update writes.
            self.bank = exemplars.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True)
            self.buf = torch.zeros_like(self.bank, requires_grad=False)
            self._fn = _ExemplarGrad(self.model, labels.detach().to(self.bank.device), mode=mode, inner_lr=inner_lr,
                                     inner_steps=inner_steps if inner_steps is not None else 1,
                                     num_classes=num_classes, fixed=fixed_exemplars, class_means=class_means,
                                     chunk=exemplar_chunk, autocast_dtype=autocast_dtype, lean_conv=lean_conv,
                                     shard=shard, inner_update=inner_update)
            self._eager_fn = self._fn
            if compile_mode != "none":
                self._use_compiled(compile_mode, mode, shard)
        except BaseException:
            for m, flag in self._flags:   # a bad argument must not leave the caller's model in eval mode
                m.training = flag
            raise
        self._graph: _GraphedGrad | None = None
        self._warned_shape = False
        # lr_scale="exemplars": beta is per exemplar. dL_val/dE_j carries the inner loss's 1/N (N exemplars in its
        # mean), so with a fixed beta a pixel's step shrinks as the memory grows (phase 0's 1000 base exemplars move
        # 10x less than a later phase's 100). Multiplying beta by N undoes that: the same beta moves pixels alike at
        # any memory size or phase size (docs/mnemonics.md). "none" is the paper's plain SGD on dL_val/dE.
        self.step_lr = self.lr * (self._fn.N if lr_scale == "exemplars" else 1)

    def _use_compiled(self, compile_mode: str, mode: str, shard) -> None:
        """Switch to the torch.compile'd engine (methods/compiled_grad.py) where it applies; else say why, once."""
        from ..trainer.compile import compile_unavailable
        why = None
        if mode not in COMPILABLE_MODES:
            why = f"mode {mode!r} has no second-order pass through the backbone to compile"
        elif self._fn.chunk is not None:
            why = "exemplar_chunk runs the chunked reverse engine (the memory option)"
        elif shard is not None:
            why = "shard_inner puts collectives in the inner loop"
        else:
            why = compile_unavailable(self.bank.device)
        if why is not None:
            _warn_once(f"mnemonics: compile={compile_mode!r} not used ({why}); the eager engine runs")
            return
        f = self._fn
        self._fn = CompiledExemplarGrad(f.module, f.names, f.params, f.y_all, f.fixed_x, mode=mode, inner_lr=f.alpha,
                                        inner_steps=f.T, autocast_dtype=f.autocast_dtype, compile_mode=compile_mode,
                                        inner_update="normalised" if f.normalised else "sgd")
        if self.cuda_graph and compile_mode in ("reduce-overhead", "max-autotune"):
            _warn_once(f"mnemonics: cuda_graph=True not used with compile={compile_mode!r}, which captures its own "
                       f"CUDA graphs (compile='default' + cuda_graph=True captures the compiled kernels instead)")
            self.cuda_graph = False

    def _call_fn(self, qx: torch.Tensor, qy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self._fn(self.bank, qx, qy)
        except torch._dynamo.exc.TorchDynamoException as exc:
            if self._fn is self._eager_fn:
                raise
            # Compilation itself failed (a torch/inductor limitation here, not a wrong input): say so once and stay
            # correct on the eager engine, which computes the same gradient.
            _warn_once(f"mnemonics: the compiled exemplar gradient failed to build ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}); the eager engine runs")
            self._fn = self._eager_fn
            return self._fn(self.bank, qx, qy)

    def grad(self, qx: torch.Tensor, qy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the TF32 flags hold while the gradient is computed, a CUDA graph's capture (which fixes its kernels) included
        with tf32_precision(self.allow_tf32):
            return self._grad(qx, qy)

    def _grad(self, qx: torch.Tensor, qy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qx = qx.to(self.bank.device, non_blocking=True)
        qy = qy.to(self.bank.device, non_blocking=True)
        if not self.cuda_graph:
            return self._call_fn(qx, qy)
        if self._graph is None:
            try:
                self._graph = _GraphedGrad(self._fn, self.bank, qx, qy)
            except Exception as exc:  # noqa: BLE001 - any capture failure: say so once, stay correct
                warnings.warn(f"mnemonics: CUDA-graph capture failed ({type(exc).__name__}: {exc}); running the "
                              f"eager path for this call", stacklevel=2)
                self.cuda_graph = False
                return self._call_fn(qx, qy)  # a compile failure inside the warm-up is handled there
        if self._graph.matches(qx, qy):
            return self._graph(qx, qy)
        if not self._warned_shape:
            warnings.warn("mnemonics: query batch shape changed; running it eagerly (use fixed-size query batches, "
                          "drop_last=True, to stay on the CUDA graph)", stacklevel=2)
            self._warned_shape = True
        return self._call_fn(qx, qy)

    def step(self, qx: torch.Tensor, qy: torch.Tensor) -> torch.Tensor:
        grad, loss = self.grad(qx, qy)
        grad = grad.contiguous()  # the fused kernel and the collective want dense memory (a no-op as a rule)
        if self.world > 1:
            # By hand rather than DDP: the gradient is the exemplars', which DDP does not know about. SUM then divide
            # (gloo has no AVG); every rank receives the same reduced bits, so the banks stay identical.
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=self.group)
            grad.div_(self.world)
        ops.exemplar_sgd_step_([self.bank.detach()], [grad], [self.buf], self.step_lr, self.momentum,
                               self.weight_decay, 0.0, 1.0)
        return loss

    @property
    def exemplars(self) -> torch.Tensor:
        return self.bank.detach()

    def finish(self) -> torch.Tensor:
        out = self.bank.detach().clone()
        if self.world > 1:
            src = dist.get_global_rank(self.group, 0) if self.group is not dist.group.WORLD else 0
            if self.debug:
                ref = out.clone()
                dist.broadcast(ref, src=src, group=self.group)
                same = torch.tensor([1 if torch.equal(ref, out) else 0], device=out.device)
                dist.all_reduce(same, op=dist.ReduceOp.MIN, group=self.group)
                if int(same) != 1:
                    raise RuntimeError("mnemonics: exemplar banks diverged across ranks before the final broadcast")
            dist.broadcast(out, src=src, group=self.group)
        return out

    def close(self) -> None:
        for m, flag in self._flags:
            m.training = flag
        self._graph = None

    def __enter__(self) -> "ExemplarOptimiser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _batch_source(query) -> Callable[[], Batch]:
    """query: a fixed (x, y) tuple of tensors; an iterator (next() per step, running out is an error); a
    zero-argument callable returning (x, y); or an iterable such as a DataLoader (cycled, re-iterated when done)."""
    if isinstance(query, tuple) and len(query) == 2 and all(isinstance(t, torch.Tensor) for t in query):
        return lambda: query
    if isinstance(query, Iterator):
        def nxt():
            try:
                return next(query)
            except StopIteration:
                raise RuntimeError("mnemonics: the query iterator ran out; pass a callable or an iterable "
                                   "(re-iterated when exhausted) for more outer steps") from None
        return nxt
    if callable(query):
        return query
    if isinstance(query, Iterable):
        state = {"it": iter(query)}

        def cycled():
            try:
                return next(state["it"])
            except StopIteration:
                state["it"] = iter(query)
                return next(state["it"])
        return cycled
    raise TypeError(f"query must be an (x, y) tuple, an iterator, a callable or an iterable, got {type(query)}")


def optimise_exemplars(model: nn.Module, exemplars: torch.Tensor, labels: torch.Tensor, query, *,
                       mode: str = "full", inner_lr: float, inner_steps: int, outer_steps: int, lr: float,
                       momentum: float = 0.9, weight_decay: float = 0.0, num_classes: int | None = None,
                       process_group=None, progress: bool = False, fixed_exemplars: Batch | None = None,
                       class_means: torch.Tensor | None = None, exemplar_chunk: int | None = None,
                       cuda_graph: bool = False, autocast_dtype: torch.dtype | None = None,
                       lr_scale: str = "none", debug: bool = False, lean_conv: bool = True,
                       shard_inner: bool = False, compile_mode: str = "none",
                       inner_update: str = "sgd", allow_tf32: bool | None = None) -> torch.Tensor:
    """Mnemonics exemplar level (SPEC §5 (b)): `outer_steps` bilevel steps on the exemplar pixels; returns new pixels.

    model: IncrementalNet (or DDP around one; the inner module is used). Any nn.Module whose forward(x) returns the
      logits over all seen classes works for full/first_order; head/proto also need model.features(x) and
      model.head(f). Switched to eval mode for the call (BN running stats are used, never changed), restored after.
    exemplars: float [M, 3, H, W] pixels in [0, 1], the init (herding or random images); never modified in place.
    labels: LongTensor [M], remapped labels; the exemplars keep them (only pixels change).
    query: the source of REAL training batches of the phase, float [B, 3, H, W] in [0, 1] (augmented as in training
      is the intended use) and labels [B]: a zero-argument callable returning the next (x, y) (preferred), an
      iterator, an iterable (cycled), or one fixed (x, y) tuple. Batches are moved to the exemplars' device. Under
      torch.distributed each rank passes its own shard; keep B fixed (drop_last) for cuda_graph.
    mode: "full" (theta' = all trainable parameters, exact second order), "head" (theta' = the head's trainable
      parameters, i.e. the new rows and sigma; backbone fixed), "first_order" (full without the Hessian terms in
      theta; identical to full when inner_steps == 1), "proto" (the released code's single-level prototype loss;
      inner_lr and inner_steps are ignored). Exact definitions: docs/mnemonics.md.
    inner_lr (alpha), inner_steps (T), outer_steps (K), lr (beta, pixel units), momentum, weight_decay (pixel space:
      decays toward black, keep 0): SGD of the pixels, torch.optim.SGD semantics, then clamp to [0, 1].
    lr_scale: "none" (the paper: SGD on dL_val/dE) or "exemplars" (bilevel modes: the step uses lr * N, N the number
      of exemplars in the inner loss, fixed ones included, so one lr moves pixels alike at any memory size).
    inner_update: "sgd" (the paper: theta_t = theta_{t-1} - alpha g) or "normalised" (bilevel modes, not the paper:
      theta_t = theta_{t-1} - alpha g / |g|, alpha then the step's length; removes the objective's reward for making
      the exemplars harder, see the module docstring). Every engine supports both.
    num_classes: classes seen so far (default: model.head.num_classes); the range the labels are checked against and
      the number of class prototypes in proto mode.
    process_group: torch.distributed group (default: WORLD if initialised). The exemplar gradient is all-reduced
      (mean) before every update, and rank 0's bank is broadcast at the end (debug: first asserted bit-identical).
    fixed_exemplars: optional (x, y) exemplars that enter the inner loss (and proto's class means) but are not
      updated (used by `adjust_old_exemplars`).
    class_means: [C, d] fixed prototypes for classes without exemplars in proto mode (e.g. the NME class means).
    exemplar_chunk: process the exemplars in chunks of this many images: same result, peak memory of one chunk's
      second-order graph instead of all M x T (see docs/mnemonics.md; use it for 224 x 224 exemplars).
    cuda_graph: capture one outer step's gradient computation in a CUDA graph (static shapes: fixed query batch
      size), replayed per step; the eager path is the oracle. autocast_dtype: e.g. torch.bfloat16 for the model's
      forward passes (off by default; the loss and the pixels stay float32).
    lean_conv: full/first_order differentiate through nn.Conv2d backwards written so that the second-order pass skips
      the weight-gradient convolutions it does not need (methods/lean_conv.py; same numbers up to rounding).
    shard_inner: under torch.distributed, full/first_order split the inner loss's exemplars over the ranks (each
      rank's slice through the T unrolled steps, the inner gradient all-reduced): the inner work per rank drops to
      1/world instead of being replicated; same result up to float summation order (docs/mnemonics.md, DDP).
    compile_mode: "none" (eager engine) or a torch.compile mode ("default", "reduce-overhead", ...): full/first_order
      compute the whole outer-step gradient as one torch.func function compiled by torch.compile
      (methods/compiled_grad.py; same numbers up to rounding). Not with exemplar_chunk or shard_inner (said once).
    allow_tf32: None (default) leaves torch's global TF32 flags; False computes the exemplar gradients in full fp32
      on CUDA (0.13% from a float64 oracle on an H100, against 9% with PyTorch's default TF32 convolutions), True
      allows TF32 (faster); the flags are restored after each gradient (`tf32_precision`). No effect on the CPU.
    progress: a tqdm bar with the latest validation loss. Returns the optimised pixels [M, 3, H, W] (detached).
    """
    next_batch = _batch_source(query)
    with ExemplarOptimiser(model, exemplars, labels, mode=mode, inner_lr=inner_lr, inner_steps=inner_steps, lr=lr,
                           momentum=momentum, weight_decay=weight_decay, num_classes=num_classes,
                           fixed_exemplars=fixed_exemplars, class_means=class_means, exemplar_chunk=exemplar_chunk,
                           cuda_graph=cuda_graph, autocast_dtype=autocast_dtype, process_group=process_group,
                           lr_scale=lr_scale, debug=debug, lean_conv=lean_conv, shard_inner=shard_inner,
                           compile_mode=compile_mode, inner_update=inner_update, allow_tf32=allow_tf32) as opt:
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=outer_steps, desc=f"mnemonics[{mode}]", leave=False, disable=None)  # off without a tty
        for k in range(int(outer_steps)):
            qx, qy = next_batch()
            loss = opt.step(qx, qy)
            if bar is not None:
                bar.update(1)
                if k % 10 == 0 or k == outer_steps - 1:
                    bar.set_postfix(val_loss=f"{float(loss):.4f}")  # a sync, only with progress
        if bar is not None:
            bar.close()
        return opt.finish()


def _shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, rank: int,
                      world: int) -> Iterator[Batch]:
    """Endless batches of (x, y): one global stream of batches of `batch_size` (reshuffled every pass with `seed`,
    identical on all ranks, drop_last so every batch has the same size), each split into `world` equal per-rank
    slices; rank r yields slice r. The all-reduced mean gradient is then the gradient on the global batch."""
    gen = torch.Generator().manual_seed(seed)
    n = y.numel()
    per = max(1, min(int(batch_size), n) // world)
    bs = per * world
    if bs > n:
        raise ValueError(f"adjust_old_exemplars: {n} validation exemplars cannot feed {world} ranks")
    while True:
        perm = torch.randperm(n, generator=gen).to(x.device)
        for b in range(n // bs):
            idx = perm[b * bs + rank * per:b * bs + (rank + 1) * per]
            yield x[idx], y[idx]


def adjust_old_exemplars(model: nn.Module, bank: torch.Tensor, labels: torch.Tensor, *, mode: str = "full",
                         inner_lr: float, inner_steps: int, outer_steps: int, lr: float, momentum: float = 0.9,
                         weight_decay: float = 0.0, generator: torch.Generator,
                         update_mask: torch.Tensor | None = None, query_batch_size: int = 128,
                         num_classes: int | None = None, class_means: torch.Tensor | None = None,
                         process_group=None, exemplar_chunk: int | None = None, cuda_graph: bool = False,
                         autocast_dtype: torch.dtype | None = None, progress: bool = False,
                         lr_scale: str = "none", debug: bool = False, lean_conv: bool = True,
                         shard_inner: bool = False, compile_mode: str = "none",
                         inner_update: str = "sgd", allow_tf32: bool | None = None) -> torch.Tensor:
    """SPEC §5 (c): adjust exemplars of earlier classes with the exemplars themselves as the validation set.

    bank [M, 3, H, W] / labels [M]: ALL seen classes' exemplars (the new classes' too, for balance). Every class is
    split into halves A and B (`split_halves`, seeded by `generator`, which must be seeded identically on all ranks).
    Pass 1: the inner loss runs on all of A, the query batches come from B (shuffled, un-augmented, a global batch
    of `query_batch_size` split evenly over the ranks), and the rows of A flagged by `update_mask` are updated with
    lr beta2 (`lr`) for `outer_steps` steps. Pass 2 swaps the roles (validated on the already-updated A). Unflagged
    rows enter the inner loss but never change.

    update_mask: bool [M]. Default: the old classes only (labels < model.head.num_old), the paper's reading: the
    new classes' exemplars were just optimised against the full new data in (b), and (c) exists because the old
    classes' exemplars cannot see their own real data any more. Returns the new bank (labels unchanged).
    """
    net = _unwrap(model)
    if update_mask is None:
        num_old = getattr(getattr(net, "head", None), "num_old", None)
        if num_old is None:
            raise ValueError("adjust_old_exemplars: model.head has no num_old (phase 0?); pass update_mask")
        update_mask = labels < num_old
    update_mask = update_mask.to(labels.device).bool()
    if update_mask.shape != labels.shape:
        raise ValueError(f"update_mask must be bool [{labels.numel()}], got {tuple(update_mask.shape)}")
    group, world = _resolve_group(process_group)
    rank = dist.get_rank(group) if world > 1 else 0
    idx_a, idx_b = split_halves(labels, generator)
    seeds = torch.randint(0, 2 ** 62, (2,), generator=generator).tolist()  # per-pass query streams, rank-independent
    out = bank.detach().clone(memory_format=torch.contiguous_format)
    for (train, val), seed in zip(((idx_a, idx_b), (idx_b, idx_a)), seeds):
        flag = update_mask[train]
        upd, fix = train[flag], train[~flag]
        if upd.numel() == 0 or val.numel() == 0:
            continue
        query = _shuffled_batches(out[val], labels[val], query_batch_size, int(seed), rank, world)
        fixed = (out[fix], labels[fix]) if fix.numel() else None
        out[upd] = optimise_exemplars(
            net, out[upd], labels[upd], query, mode=mode, inner_lr=inner_lr, inner_steps=inner_steps,
            outer_steps=outer_steps, lr=lr, momentum=momentum, weight_decay=weight_decay, num_classes=num_classes,
            process_group=group if world > 1 else None, progress=progress, fixed_exemplars=fixed,
            class_means=class_means, exemplar_chunk=exemplar_chunk, cuda_graph=cuda_graph,
            autocast_dtype=autocast_dtype, lr_scale=lr_scale, debug=debug, lean_conv=lean_conv,
            shard_inner=shard_inner, compile_mode=compile_mode, inner_update=inner_update, allow_tf32=allow_tf32)
    return out
