"""Mnemonics exemplar level (methods/mnemonics.py): gradients, modes, pixel handling, the released surrogate."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from mnemonics_fast import ops
from mnemonics_fast.exemplars.herding import herding, random_selection
from mnemonics_fast.methods.mnemonics import (ExemplarOptimiser, adjust_old_exemplars, dequantise,
                                              init_exemplars_from_indices, optimise_exemplars, proto_loss,
                                              quantise_uint8, split_halves, stack_class_exemplars)
from mnemonics_fast.models import IncrementalNet

MEAN, STD = (0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)
NUM_OLD, NUM_NEW, HW = 4, 2, 8


def make_model(dtype=torch.float64, seed=0, smooth=False) -> IncrementalNet:
    """A phase-1 LUCIR model: ResNet-32 on 8x8 inputs, split head (4 frozen old rows + 2 new), non-trivial BN stats.

    smooth: ReLU -> SiLU, for finite differences. With ReLU the bilevel objective is only piecewise smooth in the
    pixels AND discontinuous: the inner gradient holds ReLU masks, so theta' jumps when a pre-activation crosses 0,
    and a central difference over a step of 1e-5 already straddles such jumps."""
    torch.manual_seed(seed)
    m = IncrementalNet("resnet32", NUM_OLD, MEAN, STD)
    m.grow(NUM_NEW)
    if smooth:
        for mod in m.modules():
            if hasattr(mod, "relu"):
                mod.relu = torch.nn.SiLU()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
        m.head.sigma.fill_(4.0)
    return m.to(dtype)


def make_data(dtype=torch.float64, m=6, b=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ex = torch.rand(m, 3, HW, HW, generator=g, dtype=dtype) * 0.8 + 0.1
    ey = torch.arange(m) % (NUM_OLD + NUM_NEW)
    qx = torch.rand(b, 3, HW, HW, generator=g, dtype=dtype)
    qy = torch.randint(0, NUM_OLD + NUM_NEW, (b,), generator=g)
    return ex, ey, qx, qy


def val_loss(model, ex, ey, qx, qy, *, mode, alpha, steps, inner_update="sgd"):
    """L_val(theta_T(E)) restated directly (values only, first-order autograd): the finite-difference oracle.
    inner_update="normalised": each inner step moves alpha along the unit gradient (L2 norm over all of theta')."""
    module = model if mode == "full" else model.head
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    inp = (lambda x: x) if mode == "full" else model.features
    for _ in range(steps):
        leaf = {n: v.clone().requires_grad_() for n, v in params.items()}
        loss = F.cross_entropy(functional_call(module, leaf, (inp(ex),)), ey)
        grads = torch.autograd.grad(loss, list(leaf.values()))
        if inner_update == "normalised":
            norm = torch.sqrt(sum((g * g).sum() for g in grads))
            grads = [g / norm for g in grads]
        params = {n: v - alpha * g for (n, v), g in zip(params.items(), grads)}
    return F.cross_entropy(functional_call(module, params, (inp(qx),)), qy)


def exemplar_grad(model, ex, ey, qx, qy, **kw):
    with ExemplarOptimiser(model, ex, ey, lr=0.0, **kw) as opt:
        return opt.grad(qx, qy)


# ---------------------------------------------------------------------------------------------------------------------
# gradients reach the pixels, and are the true derivative
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,steps,inner_update", [("full", 1, "sgd"), ("full", 2, "sgd"), ("head", 1, "sgd"),
                                                     ("head", 2, "sgd"), ("full", 1, "normalised"),
                                                     ("full", 2, "normalised"), ("head", 2, "normalised")])
def test_exemplar_gradient_matches_finite_differences(mode, steps, inner_update):
    model = make_model(smooth=True).eval()
    ex, ey, qx, qy = make_data()
    alpha = 0.1
    grad, loss = exemplar_grad(model, ex, ey, qx, qy, mode=mode, inner_lr=alpha, inner_steps=steps,
                               inner_update=inner_update)
    assert grad.shape == ex.shape and grad.abs().sum() > 0, "no gradient reached the exemplar pixels"
    ref_loss = val_loss(model, ex, ey, qx, qy, mode=mode, alpha=alpha, steps=steps, inner_update=inner_update)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-10, atol=1e-12)

    def fd(u, eps=1e-7):  # float64 central difference; truncation error ~ eps^2, rounding ~ 1e-16 / eps
        lp = val_loss(model, ex + eps * u, ey, qx, qy, mode=mode, alpha=alpha, steps=steps, inner_update=inner_update)
        lm = val_loss(model, ex - eps * u, ey, qx, qy, mode=mode, alpha=alpha, steps=steps, inner_update=inner_update)
        return ((lp - lm) / (2 * eps)).detach()

    g = torch.Generator().manual_seed(7)
    dirs = [torch.randn(ex.shape, generator=g, dtype=ex.dtype) for _ in range(2)]
    onehot = torch.zeros(ex.numel(), dtype=ex.dtype)
    onehot[grad.abs().flatten().argmax()] = 1.0  # the largest-gradient pixel on its own
    dirs.append(onehot.view_as(ex))
    fds = [fd(u) for u in dirs]
    for u, f in zip(dirs, fds):
        torch.testing.assert_close((grad * u).sum(), f, rtol=1e-6, atol=1e-8)
    if mode == "full" and steps == 2:  # the check is sharp enough to see the second-order terms
        g_fo, _ = exemplar_grad(model, ex, ey, qx, qy, mode="first_order", inner_lr=alpha, inner_steps=steps,
                                inner_update=inner_update)
        worst = max(float(((g_fo * u).sum() - f).abs() / f.abs()) for u, f in zip(dirs, fds))
        assert worst > 1e-4, worst


def test_first_order_definition():
    """first_order = full without the d theta_t / d theta_{t-1} Hessian terms: equal to full at T=1, non-zero, and
    at T=2 equal to the restated sum of mixed terms: dE = -alpha * sum_t d<v_T, g(theta_{t-1}, E)>/dE."""
    model = make_model().eval()
    ex, ey, qx, qy = make_data()
    alpha = 0.5
    g_full1, _ = exemplar_grad(model, ex, ey, qx, qy, mode="full", inner_lr=alpha, inner_steps=1)
    g_fo1, _ = exemplar_grad(model, ex, ey, qx, qy, mode="first_order", inner_lr=alpha, inner_steps=1)
    torch.testing.assert_close(g_fo1, g_full1, rtol=1e-12, atol=1e-14)
    g_full2, _ = exemplar_grad(model, ex, ey, qx, qy, mode="full", inner_lr=alpha, inner_steps=2)
    g_fo2, _ = exemplar_grad(model, ex, ey, qx, qy, mode="first_order", inner_lr=alpha, inner_steps=2)
    assert g_fo2.abs().sum() > 0
    assert (g_fo2 - g_full2).abs().max() > 1e-8, "first_order should drop the Hessian terms at T=2"

    # restatement
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    thetas = [[p.detach() for n, p in model.named_parameters() if p.requires_grad]]
    for _ in range(2):
        leaf = [p.clone().requires_grad_() for p in thetas[-1]]
        loss = F.cross_entropy(functional_call(model, dict(zip(names, leaf)), (ex,)), ey)
        thetas.append([p - alpha * gi for p, gi in zip(thetas[-1], torch.autograd.grad(loss, leaf))])
    leaf = [p.clone().requires_grad_() for p in thetas[-1]]
    v = torch.autograd.grad(F.cross_entropy(functional_call(model, dict(zip(names, leaf)), (qx,)), qy), leaf)
    total = torch.zeros_like(ex)
    for t in range(2):
        e = ex.clone().requires_grad_()
        params_t = [p.requires_grad_() for p in (q.detach() for q in thetas[t])]
        loss = F.cross_entropy(functional_call(model, dict(zip(names, params_t)), (e,)), ey)
        g = torch.autograd.grad(loss, params_t, create_graph=True)
        dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
        total -= alpha * torch.autograd.grad(dot, e)[0]
    torch.testing.assert_close(g_fo2, total, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode,steps,inner_update", [("full", 2, "sgd"), ("first_order", 2, "sgd"),
                                                     ("head", 2, "sgd"), ("proto", 1, "sgd"),
                                                     ("full", 3, "normalised"), ("first_order", 2, "normalised")])
def test_chunked_equals_unchunked(mode, steps, inner_update):
    """The chunked reverse engine (its own recursion, with u = P v for the normalised step) against autograd."""
    model = make_model().eval()
    ex, ey, qx, qy = make_data(m=5)
    fixed = (torch.rand(3, 3, HW, HW, dtype=ex.dtype), torch.tensor([0, 1, 5]))
    kw = dict(mode=mode, inner_lr=0.5, inner_steps=steps, fixed_exemplars=fixed, inner_update=inner_update,
              class_means=torch.randn(NUM_OLD + NUM_NEW, 64, dtype=ex.dtype) if mode == "proto" else None)
    g0, l0 = exemplar_grad(model, ex, ey, qx, qy, **kw)
    g1, l1 = exemplar_grad(model, ex, ey, qx, qy, exemplar_chunk=2, **kw)
    assert g0.abs().sum() > 0
    torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------------
# the outer loop: labels, shapes, range, no side effects on the model
# ---------------------------------------------------------------------------------------------------------------------

def test_optimise_keeps_labels_shapes_range_and_init():
    model = make_model(torch.float32)
    ex, ey, qx, qy = make_data(torch.float32)
    ex0, ey0 = ex.clone(), ey.clone()
    out = optimise_exemplars(model, ex, ey, (qx, qy), mode="full", inner_lr=0.1, inner_steps=1, outer_steps=3,
                             lr=1e4)  # a huge lr drives pixels into the clamp
    assert out.shape == ex.shape and out.dtype == ex.dtype and not out.requires_grad
    assert torch.equal(ex, ex0) and torch.equal(ey, ey0), "the init tensors must not be modified"
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert ((out == 0.0) | (out == 1.0)).float().mean() > 0.5, "clamping to [0, 1] not exercised"
    assert out.data_ptr() != ex.data_ptr()


@pytest.mark.parametrize("mode", ["full", "head", "proto"])
def test_model_state_and_train_flags_unchanged(mode):
    model = make_model(torch.float32)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ex, ey, qx, qy = make_data(torch.float32)
    optimise_exemplars(model, ex, ey, (qx, qy), mode=mode, inner_lr=0.1, inner_steps=1, outer_steps=2, lr=0.1,
                       class_means=torch.randn(NUM_OLD + NUM_NEW, 64))
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed (BN running stats must stay fixed: eval mode)"
    assert all(m.training for m in model.modules()), "training flags must be restored"
    assert all(p.grad is None for p in model.parameters()), "the exemplar level must not leave .grad on the model"


def test_bad_arguments_leave_the_train_flags_alone():
    """A call refused while setting up (here: no trainable parameter for theta') restores the model's modes."""
    model = make_model(torch.float32)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    ex, ey, qx, qy = make_data(torch.float32)
    with pytest.raises(ValueError, match="no trainable parameters"):
        optimise_exemplars(model, ex, ey, (qx, qy), mode="full", inner_lr=0.1, inner_steps=1, outer_steps=1, lr=0.1)
    assert all(m.training for m in model.modules()), "training flags must be restored after a refused call"


def test_validation_loss_decreases():
    model = make_model(torch.float32)
    ex, ey, qx, qy = make_data(torch.float32, m=6, b=16)
    kw = dict(mode="full", inner_lr=0.5, inner_steps=1)
    _, before = exemplar_grad(model, ex, ey, qx, qy, **kw)
    out = optimise_exemplars(model, ex, ey, (qx, qy), outer_steps=10, lr=0.02, **kw)
    _, after = exemplar_grad(model, out, ey, qx, qy, **kw)
    assert after < before


@pytest.mark.parametrize("mode", ["full", "head"])
def test_lr_scale_exemplars_makes_the_step_independent_of_memory_size(mode):
    """Every exemplar stored twice leaves the inner loss (a mean) and so L_val unchanged, and halves dL_val/dE_j per
    copy. lr_scale="none" (the paper's SGD): each copy moves half as far. lr_scale="exemplars" (lr * N): each copy
    moves exactly as far as the single exemplar did."""
    model = make_model()
    ex, ey, qx, qy = make_data()
    ex2, ey2 = torch.cat([ex, ex]), torch.cat([ey, ey])
    kw = dict(mode=mode, inner_lr=0.5, inner_steps=1, outer_steps=1, lr=1e-3, momentum=0.0)
    for scale, ratio in (("none", 0.5), ("exemplars", 1.0)):
        one = optimise_exemplars(model, ex, ey, (qx, qy), lr_scale=scale, **kw) - ex
        two = optimise_exemplars(model, ex2, ey2, (qx, qy), lr_scale=scale, **kw) - ex2
        assert one.abs().max() > 0 and not torch.any((ex + one <= 0) | (ex + one >= 1)), "clamp must not be hit"
        torch.testing.assert_close(two[:len(ex)], ratio * one, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(two[len(ex):], ratio * one, rtol=1e-9, atol=1e-12)
    # the scale is N, not a constant: lr_scale="exemplars" with lr equals "none" with lr * N
    a = optimise_exemplars(model, ex, ey, (qx, qy), lr_scale="exemplars", **kw)
    b = optimise_exemplars(model, ex, ey, (qx, qy), lr_scale="none", **{**kw, "lr": kw["lr"] * len(ex)})
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_lr_scale_checked():
    model = make_model(torch.float32)
    ex, ey, qx, qy = make_data(torch.float32)
    with pytest.raises(ValueError, match="lr_scale must be one of"):
        ExemplarOptimiser(model, ex, ey, inner_lr=0.1, inner_steps=1, lr=1.0, lr_scale="per_pixel")
    with pytest.raises(ValueError, match="bilevel modes"):
        ExemplarOptimiser(model, ex, ey, mode="proto", inner_lr=0.1, inner_steps=1, lr=1.0, lr_scale="exemplars",
                          class_means=torch.randn(NUM_OLD + NUM_NEW, 64))


def test_inner_update_checked_and_normalised_is_a_unit_step():
    model = make_model()
    ex, ey, qx, qy = make_data()
    with pytest.raises(ValueError, match="inner_update must be one of"):
        ExemplarOptimiser(model, ex, ey, inner_lr=0.1, inner_steps=1, lr=1.0, inner_update="adam")
    with pytest.raises(ValueError, match="proto has no inner step"):
        ExemplarOptimiser(model, ex, ey, mode="proto", inner_lr=0.1, inner_steps=1, lr=1.0, inner_update="normalised",
                          class_means=torch.randn(NUM_OLD + NUM_NEW, 64, dtype=ex.dtype))
    # the step's length is alpha whatever |g| is: a larger inner gradient (harder exemplars) cannot buy a larger step
    from mnemonics_fast.methods.mnemonics import _inner_direction
    g = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    unit = _inner_direction(g, True)
    torch.testing.assert_close(torch.sqrt(sum((u * u).sum() for u in unit)), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(_inner_direction([2.5 * t for t in g], True)[0], unit[0])
    assert _inner_direction(g, False)[0] is g[0]


def test_pixel_sgd_step_equals_normalised_space_step():
    """Documented equivalence: pixel lr beta == normalised-space lr beta / std_c^2 (no clamp hit, no weight decay)."""
    model = make_model().eval()
    ex, ey, qx, qy = make_data()
    beta = 1e-3
    kw = dict(mode="full", inner_lr=0.5, inner_steps=1)
    grad, _ = exemplar_grad(model, ex, ey, qx, qy, **kw)
    out = optimise_exemplars(model, ex, ey, (qx, qy), outer_steps=1, lr=beta, momentum=0.9, **kw)
    std = model.input_std
    z = ((ex - model.input_mean) / std).requires_grad_()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    pix = z * std + model.input_mean  # the exemplars as normalised-space parameters z
    g = torch.autograd.grad(F.cross_entropy(model(pix), ey), params, create_graph=True)
    fast = dict(zip(names, [p - 0.5 * gi for p, gi in zip(params, g)]))
    gz, = torch.autograd.grad(F.cross_entropy(functional_call(model, fast, (qx,)), qy), z)
    torch.testing.assert_close(gz, grad * std, rtol=1e-9, atol=1e-12)  # chain rule
    z_new = z.detach() - (beta / std ** 2) * gz
    torch.testing.assert_close(out, z_new * std + model.input_mean, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# the released code's surrogate
# ---------------------------------------------------------------------------------------------------------------------

def released_proto_loss(feature_model, mnemonics, q_feature, q_targets, current_means_new, nb_cl, is_start):
    """A direct re-statement of the released exemplar loss (class-incremental-learning/mnemonics-training/1_train/
    trainer/mnemonics.py): mnemonics is [n_new_classes, m, 3, H, W]; per-class means of raw features; old rows are
    the fixed class means; plain cosine logits; cross-entropy."""
    total = torch.stack([torch.squeeze(torch.mean(feature_model(mnemonics[i]), dim=0)) for i in range(len(mnemonics))])
    if is_start:
        all_cls_means = total
    else:
        all_cls_means = current_means_new.clone()
        all_cls_means[-nb_cl:] = total
    logits = F.linear(F.normalize(torch.squeeze(q_feature), p=2, dim=1), F.normalize(all_cls_means, p=2, dim=1))
    return F.cross_entropy(logits, q_targets)


@pytest.mark.parametrize("is_start", [False, True])
def test_proto_matches_released_objective(is_start):
    model = make_model().eval()
    per_class = 3
    classes = list(range(NUM_OLD + NUM_NEW)) if is_start else list(range(NUM_OLD, NUM_OLD + NUM_NEW))
    g = torch.Generator().manual_seed(3)
    mnemonics = torch.rand(len(classes), per_class, 3, HW, HW, generator=g, dtype=torch.float64)
    ex = mnemonics.flatten(0, 1)
    ey = torch.tensor(classes).repeat_interleave(per_class)
    _, _, qx, qy = make_data()
    means = torch.nn.functional.normalize(torch.randn(NUM_OLD + NUM_NEW, 64, generator=g, dtype=torch.float64), dim=1)
    class_means = None if is_start else means
    with torch.no_grad():
        qf = model.features(qx)
    # the loss value: public proto_loss == restatement
    ref = released_proto_loss(model.features, mnemonics, qf, qy, means, NUM_NEW, is_start)
    ours = proto_loss(model.features(ex), ey, qf, qy, class_means=class_means, num_classes=NUM_OLD + NUM_NEW)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    # two optimiser steps: ours (pixel space, clamp never hit at this lr) == torch.optim.SGD on the restatement
    lr, mom = 1e-3, 0.9
    out = optimise_exemplars(model, ex, ey, (qx, qy), mode="proto", inner_lr=0.0, inner_steps=1, outer_steps=2,
                             lr=lr, momentum=mom, class_means=class_means)
    p = torch.nn.Parameter(mnemonics.clone())
    opt = torch.optim.SGD([p], lr=lr, momentum=mom)
    for _ in range(2):
        opt.zero_grad()
        released_proto_loss(model.features, p, qf, qy, means, NUM_NEW, is_start).backward()
        opt.step()
    torch.testing.assert_close(out, p.detach().flatten(0, 1), rtol=1e-10, atol=1e-13)


def test_proto_needs_means_for_absent_classes():
    model = make_model()
    ex, _, qx, qy = make_data(m=2)
    with pytest.raises(ValueError, match="class_means"):
        optimise_exemplars(model, ex, torch.tensor([4, 5]), (qx, qy), mode="proto", inner_lr=0.0, inner_steps=1,
                           outer_steps=1, lr=0.1)


# ---------------------------------------------------------------------------------------------------------------------
# pixels, init, split, adjustment
# ---------------------------------------------------------------------------------------------------------------------

def test_quantise_rounds_and_clips():
    x = torch.tensor([128 / 255, 0.5019, 0.50196, 127.4 / 255, 1.3, -0.2, 1.0, 0.0, float("nan")])
    q = quantise_uint8(x)
    assert q.dtype == torch.uint8
    assert q.tolist() == [128, 128, 128, 127, 255, 0, 255, 0, 0]
    assert int(quantise_uint8(torch.tensor([0.50196]))) != int(torch.tensor(0.50196 * 255).to(torch.uint8)), \
        "truncation would give 127"
    r = torch.rand(1000)
    assert (dequantise(quantise_uint8(r)) - r).abs().max() <= 0.5 / 255 + 1e-7
    assert torch.equal(quantise_uint8(dequantise(q)), q)
    with pytest.raises(TypeError):
        dequantise(r)


def test_initial_exemplars_are_distinct_images():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(50, 3, HW, HW, generator=g) * 255).round().to(torch.uint8)
    feats = torch.randn(50, 16, generator=g)
    for idx in (herding(feats, 20), random_selection(50, 20, g)):
        ex = init_exemplars_from_indices(images, idx)
        assert ex.shape == (20, 3, HW, HW) and ex.dtype == torch.float32
        assert ex.min() >= 0 and ex.max() <= 1
        flat = ex.flatten(1)
        assert torch.unique(flat, dim=0).shape[0] == 20, "the m exemplars of a class must be distinct images"
        torch.testing.assert_close(ex, dequantise(images[idx]))
    fl = torch.rand(10, 3, HW, HW, generator=g)
    ex = init_exemplars_from_indices(fl, torch.tensor([3, 1]))
    ex += 1
    assert fl.max() <= 1, "init must copy, not view"
    with pytest.raises(ValueError, match="distinct"):
        init_exemplars_from_indices(images, torch.tensor([1, 2, 1]))
    with pytest.raises(IndexError):
        init_exemplars_from_indices(images, torch.tensor([50]))
    bank, labels = stack_class_exemplars([fl[:2], fl[2:5]], [7, 3])
    assert bank.is_contiguous() and labels.tolist() == [7, 7, 3, 3, 3]


def test_split_halves_is_per_class_seeded_and_balanced():
    labels = torch.tensor([0] * 5 + [1] * 4 + [2] * 1)
    a, b = split_halves(labels, torch.Generator().manual_seed(5))
    a2, b2 = split_halves(labels, torch.Generator().manual_seed(5))
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert sorted(torch.cat([a, b]).tolist()) == list(range(10))
    assert [int((labels[a] == c).sum()) for c in range(3)] == [3, 2, 1]
    assert [int((labels[b] == c).sum()) for c in range(3)] == [2, 2, 0]


def test_adjust_old_exemplars_updates_only_old_classes():
    model = make_model(torch.float32)
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(NUM_OLD + NUM_NEW).repeat_interleave(4)
    bank = torch.rand(labels.numel(), 3, HW, HW, generator=g) * 0.8 + 0.1
    bank0 = bank.clone()
    kw = dict(mode="full", inner_lr=0.5, inner_steps=1, outer_steps=2, lr=0.05, query_batch_size=6)
    out = adjust_old_exemplars(model, bank, labels, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(bank, bank0)
    changed = (out != bank).flatten(1).any(1)
    old = labels < NUM_OLD
    assert changed[old].all(), "every old exemplar (in A, then in B) should move"
    assert not changed[~old].any(), "new-class exemplars only balance the split; they are not updated"
    out2 = adjust_old_exemplars(model, bank, labels, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(out, out2), "seeded: the same generator state gives the same result"
    only_first = torch.zeros_like(old)
    only_first[0] = True
    out3 = adjust_old_exemplars(model, bank, labels, generator=torch.Generator().manual_seed(0),
                                update_mask=only_first, **kw)
    assert (out3 != bank).flatten(1).any(1).tolist() == only_first.tolist()


@pytest.mark.parametrize("kind", ["callable", "iterator", "iterable", "tuple"])
def test_query_sources(kind):
    model = make_model(torch.float32)
    ex, ey, qx, qy = make_data(torch.float32)
    batches = [(qx[:4], qy[:4]), (qx[4:], qy[4:])]
    if kind == "callable":
        it = iter(batches * 2)
        query = lambda: next(it)  # noqa: E731
    elif kind == "iterator":
        query = iter(batches * 2)
    elif kind == "iterable":
        query = batches
    else:
        query = batches[0]
    out = optimise_exemplars(model, ex, ey, query, mode="head", inner_lr=0.1, inner_steps=1, outer_steps=3, lr=0.1)
    assert out.shape == ex.shape
    # Every source yields the batches in the same order (b0, b1, b0), so they give the same pixels; the fixed tuple
    # repeats b0 three times, which gives other pixels.
    ref = optimise_exemplars(model, ex, ey, iter([batches[0], batches[1], batches[0]]), mode="head", inner_lr=0.1,
                             inner_steps=1, outer_steps=3, lr=0.1)
    assert torch.equal(out, ref) != (kind == "tuple")
    if kind == "iterator":
        with pytest.raises(RuntimeError, match="ran out"):
            optimise_exemplars(model, ex, ey, iter(batches), mode="head", inner_lr=0.1, inner_steps=1,
                               outer_steps=3, lr=0.1)


def test_update_is_one_fused_launch_on_the_bank(monkeypatch):
    calls = []
    real = ops.exemplar_sgd_step_

    def spy(params, grads, bufs, *args):
        calls.append((len(params), params[0].shape, args))
        return real(params, grads, bufs, *args)

    monkeypatch.setattr(ops, "exemplar_sgd_step_", spy)
    model = make_model(torch.float32)
    ex, ey, qx, qy = make_data(torch.float32)
    optimise_exemplars(model, ex, ey, (qx, qy), mode="head", inner_lr=0.1, inner_steps=1, outer_steps=2, lr=0.1,
                       momentum=0.5, weight_decay=1e-4)
    assert calls == [(1, ex.shape, (0.1, 0.5, 1e-4, 0.0, 1.0))] * 2


# ---------------------------------------------------------------------------------------------------------------------
# fast paths: autocast plumbing (CPU) and CUDA graphs (GPU only)
# ---------------------------------------------------------------------------------------------------------------------

def _rel_l2(a, b):
    return float((a - b).norm() / b.norm())


def test_autocast_path_runs_and_points_the_same_way():
    """bf16 autocast is an experimental speed option: float32 gradient out, same direction, not the same numbers
    (about 20-30% relative L2 on this tiny random model: the exemplar gradient is a second-order quantity)."""
    model = make_model(torch.float32)
    ex, ey, qx, qy = make_data(torch.float32)
    kw = dict(mode="full", inner_lr=0.5, inner_steps=1)
    g32, _ = exemplar_grad(model, ex, ey, qx, qy, **kw)
    g16, loss = exemplar_grad(model, ex, ey, qx, qy, autocast_dtype=torch.bfloat16, **kw)
    assert g16.dtype == torch.float32 and loss.dtype == torch.float32 and torch.isfinite(g16).all()
    assert F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.8


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@cuda
@pytest.mark.parametrize("mode,steps,chunk", [("full", 1, None), ("full", 2, None), ("full", 2, 3),
                                              ("first_order", 2, None), ("head", 2, None), ("proto", 1, None)])
def test_cuda_graph_matches_eager(mode, steps, chunk):
    dev = torch.device("cuda")
    model = make_model(torch.float32).to(dev)
    ex, ey, qx, qy = (t.to(dev) for t in make_data(torch.float32, m=6, b=8))
    kw = dict(mode=mode, inner_lr=0.5, inner_steps=steps, exemplar_chunk=chunk,
              class_means=torch.randn(NUM_OLD + NUM_NEW, 64, device=dev))
    g_eager, l_eager = exemplar_grad(model, ex, ey, qx, qy, **kw)
    with ExemplarOptimiser(model, ex, ey, lr=0.0, cuda_graph=True, **kw) as opt:
        g_graph, l_graph = opt.grad(qx, qy)
        assert opt.cuda_graph, "capture failed and fell back to eager"
        g_again, _ = opt.grad(qx + 0.0, qy)  # a replay
    assert _rel_l2(g_graph, g_eager) < 1e-3 and _rel_l2(g_again, g_eager) < 1e-3
    torch.testing.assert_close(l_graph, l_eager, rtol=1e-4, atol=1e-6)
    # whole outer loops agree too (the bank is read in place by the graph)
    a = optimise_exemplars(model, ex, ey, (qx, qy), outer_steps=3, lr=0.05, **kw)
    b = optimise_exemplars(model, ex, ey, (qx, qy), outer_steps=3, lr=0.05, cuda_graph=True, **kw)
    assert _rel_l2(b - ex, a - ex) < 1e-2


def test_proto_rejects_class_means_of_the_wrong_size():
    model = make_model()
    ex, _, qx, qy = make_data(m=2)
    with pytest.raises(ValueError, match="num_classes"):
        optimise_exemplars(model, ex, torch.tensor([4, 5]), (qx, qy), mode="proto", inner_lr=0.0, inner_steps=1,
                           outer_steps=1, lr=0.1, class_means=torch.randn(NUM_OLD, 64, dtype=ex.dtype))


# ---- lean_conv: the second-order pass without the unneeded weight-gradient convolutions -------------------------
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from mnemonics_fast.methods.lean_conv import lean_conv2d, lean_second_order_convs  # noqa: E402


@pytest.mark.parametrize("stride,padding,groups,bias,size", [(1, 1, 1, True, 7), (2, 1, 2, False, 9),
                                                              (2, 0, 1, True, 8)])
def test_lean_conv2d_gradcheck_and_gradgradcheck(stride, padding, groups, bias, size):
    """Odd and even sizes with stride 2 exercise the output_padding of the transposed convolution."""
    g = torch.Generator().manual_seed(size)
    x = torch.randn(3, 4, size, size, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4 // groups, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    f = lambda x, w, *b: lean_conv2d(x, w, b[0] if b else None, stride, padding, 1, groups)  # noqa: E731
    args = (x, w) + ((b,) if bias else ())
    torch.testing.assert_close(f(*args), F.conv2d(x, w, b, stride, padding, 1, groups), rtol=0, atol=0)
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("mode,steps,chunk", [("full", 1, None), ("full", 2, None), ("full", 2, 4),
                                              ("first_order", 2, None)])
def test_lean_conv_exemplar_gradient_equals_torchs(mode, steps, chunk):
    model = make_model()
    ex, ey, qx, qy = make_data(m=7)
    grads = []
    for lean in (False, True):
        with ExemplarOptimiser(model, ex, ey, mode=mode, inner_lr=0.05, inner_steps=steps, lr=1.0, lean_conv=lean,
                               exemplar_chunk=chunk) as opt:
            grads.append(opt.grad(qx, qy)[0])
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-14)
    assert not any("_conv_forward" in m.__dict__ for m in model.modules()), "the switch must be undone"


class _BigKernelConvs(TorchDispatchMode):
    """Counts aten.convolution calls whose kernel is as large as its input: the [C, M, H, W] weight-gradient
    convolutions of torch's conv double backward."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.convolution.default, torch.ops.aten._convolution.default):
            x, w = args[0], args[1]
            if w.dim() == 4 and w.shape[2] > 3 and w.shape[2:] == x.shape[2:]:
                self.n += 1
        return func(*args, **(kwargs or {}))


def test_lean_conv_skips_the_weight_gradient_convolutions():
    model = make_model(dtype=torch.float32)
    ex, ey, qx, qy = make_data(dtype=torch.float32, m=5)
    counts = {}
    for lean in (False, True):
        with ExemplarOptimiser(model, ex, ey, mode="full", inner_lr=0.05, inner_steps=1, lr=1.0,
                               lean_conv=lean) as opt, _BigKernelConvs() as seen:
            opt.grad(qx, qy)
        counts[lean] = seen.n
    assert counts[False] > 0 and counts[True] == 0, counts


def test_lean_conv_under_autocast_keeps_float32_gradients():
    model = make_model(dtype=torch.float32)
    ex, ey, qx, qy = make_data(dtype=torch.float32, m=5)
    with lean_second_order_convs(model) as n:
        assert n == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    grads = []
    for lean in (False, True):
        with ExemplarOptimiser(model, ex, ey, mode="full", inner_lr=0.05, inner_steps=2, lr=1.0, lean_conv=lean,
                               autocast_dtype=torch.bfloat16) as opt:
            grads.append(opt.grad(qx, qy)[0])
    assert grads[1].dtype == torch.float32 and torch.isfinite(grads[1]).all()
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 0.05


def test_lean_conv_covers_weight_transfer_convs():
    """With model.weight_transfer the convs are TransferConv2d (frozen kernel x learnable scale): lean there too."""
    from mnemonics_fast.models.transfer import TransferConv2d, apply_weight_transfer
    model = make_model()
    assert apply_weight_transfer(model.backbone if hasattr(model, "backbone") else model) > 0
    ex, ey, qx, qy = make_data(m=5)
    with lean_second_order_convs(model) as n:
        assert n == sum(isinstance(m, TransferConv2d) for m in model.modules()) > 0
    grads, counts = [], []
    for lean in (False, True):
        with ExemplarOptimiser(model, ex, ey, mode="full", inner_lr=0.05, inner_steps=2, lr=1.0,
                               lean_conv=lean) as opt, _BigKernelConvs() as seen:
            grads.append(opt.grad(qx, qy)[0])
        counts.append(seen.n)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-14)
    assert counts[0] > 0 and counts[1] == 0, counts


# ---------------------------------------------------------------------------------------------------------------------
# compile_mode: the outer step as one torch.func function compiled by torch.compile (methods/compiled_grad.py)
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,steps,fixed,transfer,inner_update", [
    ("full", 1, False, False, "sgd"), ("full", 2, True, False, "sgd"), ("first_order", 2, True, False, "sgd"),
    ("full", 2, False, True, "sgd"), ("full", 2, True, False, "normalised"),
    ("first_order", 2, False, False, "normalised")])
def test_functional_outer_grad_equals_the_autograd_engine(mode, steps, fixed, transfer, inner_update):
    """The torch.func formulation the compiled engine traces, run as is: the eager engine's gradient and loss."""
    from mnemonics_fast.methods.compiled_grad import make_outer_grad
    from mnemonics_fast.models.transfer import apply_weight_transfer
    from mnemonics_fast.ops.cosine import plain_torch
    model = make_model()
    if transfer:
        apply_weight_transfer(model.backbone)
    ex, ey, qx, qy = make_data(m=7)
    fx, fy = make_data(m=4, seed=5)[:2] if fixed else (None, None)
    with ExemplarOptimiser(model, ex, ey, mode=mode, inner_lr=0.05, inner_steps=steps, lr=1.0,
                           fixed_exemplars=(fx, fy) if fixed else None, inner_update=inner_update) as opt:
        want, want_loss = opt.grad(qx, qy)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        fn = make_outer_grad(model, [n for n, _ in named], mode=mode, inner_lr=0.05, inner_steps=steps,
                             autocast_dtype=None, device_type="cpu", inner_update=inner_update)
        y_all = ey if fy is None else torch.cat([ey, fy])
        with torch.no_grad(), plain_torch():
            got, loss = fn(ex, fx, tuple(p.detach() for _, p in named), y_all, qx, qy)
    scale = float(want.abs().max())
    assert scale > 0
    # float64; the eager engine's lean convolutions sum in another order (weight transfer: ~1e-10 of the max)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * scale)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=0)


def _small_model():
    """make_model with a ResNet-8 backbone (one block per stage): the same layer types, a fraction of the compile time."""
    from mnemonics_fast.models.resnet_cifar import ResNetCifar
    model = make_model()
    torch.manual_seed(3)
    model.backbone = ResNetCifar(blocks_per_stage=1).double()
    return model


@pytest.mark.skipif(__import__("mnemonics_fast.trainer.compile", fromlist=["x"]).compile_unavailable(
    torch.device("cpu")) is not None, reason="inductor cannot compile on this machine")
def test_compiled_engine_equals_eager_and_follows_the_model():
    """compile_mode='default' on CPU (inductor C++), float64: the eager engine's gradient, loss and update; the
    parameters are read at every call (the model level moves them between exemplar levels), not baked in."""
    model = _small_model()
    ex, ey, qx, qy = make_data(m=7)
    fixed = make_data(m=4, seed=5)[:2]
    kw = dict(mode="full", inner_lr=0.05, inner_steps=2, lr=0.5, momentum=0.9, fixed_exemplars=fixed)
    with ExemplarOptimiser(model, ex, ey, **kw) as eager, \
            ExemplarOptimiser(model, ex, ey, compile_mode="default", **kw) as comp:
        assert type(comp._fn).__name__ == "CompiledExemplarGrad"
        for _ in range(2):
            g_e, l_e = eager.grad(qx, qy)
            g_c, l_c = comp.grad(qx, qy)
            torch.testing.assert_close(g_c, g_e, rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(l_c, l_e, rtol=1e-12, atol=0)
            eager.step(qx, qy)
            comp.step(qx, qy)
            torch.testing.assert_close(comp.exemplars, eager.exemplars, rtol=0, atol=1e-12)
            with torch.no_grad():  # the model level moves theta between two exemplar levels
                for p in model.parameters():
                    p.mul_(1.01)
    assert comp._fn is not comp._eager_fn, "the compiled engine must not have fallen back"


def test_compile_mode_where_it_does_not_apply_says_why_and_stays_exact(recwarn):
    from mnemonics_fast.methods import mnemonics as mn
    mn._WARNED.clear()
    model = make_model()
    ex, ey, qx, qy = make_data(m=5)
    with pytest.raises(ValueError, match="compile_mode"):
        ExemplarOptimiser(model, ex, ey, inner_lr=0.05, inner_steps=1, lr=1.0, compile_mode="fast")
    grads = []
    for cm in ("none", "default", "default"):
        with ExemplarOptimiser(model, ex, ey, mode="full", inner_lr=0.05, inner_steps=1, lr=1.0, compile_mode=cm,
                               exemplar_chunk=2) as opt:
            grads.append(opt.grad(qx, qy)[0])
    said = [str(w.message) for w in recwarn if "compile='default' not used" in str(w.message)]
    assert len(said) == 1 and "exemplar_chunk" in said[0], said   # once per process, naming the reason
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    with ExemplarOptimiser(model, ex, ey, mode="head", inner_lr=0.05, inner_steps=1, lr=1.0,
                           compile_mode="reduce-overhead") as opt:
        assert type(opt._fn).__name__ == "_ExemplarGrad"
    assert any("mode 'head'" in str(w.message) for w in recwarn)


def test_compile_failure_says_so_once_and_runs_the_eager_engine(monkeypatch, recwarn):
    """A Dynamo/inductor failure while building the compiled function is not the caller's error: said once, then the
    eager engine (the same gradient) runs. A real error in the inputs still raises (it is not a Dynamo exception)."""
    from mnemonics_fast.methods import compiled_grad, mnemonics as mn
    from mnemonics_fast.trainer import compile as tc
    mn._WARNED.clear()
    monkeypatch.setattr(tc, "compile_unavailable", lambda device: None)

    def boom(self, bank, qx, qy):
        raise torch._dynamo.exc.TorchDynamoException("inductor could not build it")
    monkeypatch.setattr(compiled_grad.CompiledExemplarGrad, "__call__", boom)
    model = make_model()
    ex, ey, qx, qy = make_data(m=5)
    with ExemplarOptimiser(model, ex, ey, mode="full", inner_lr=0.05, inner_steps=1, lr=1.0) as opt:
        want = opt.grad(qx, qy)[0]
    with ExemplarOptimiser(model, ex, ey, mode="full", inner_lr=0.05, inner_steps=1, lr=1.0,
                           compile_mode="default") as opt:
        got = [opt.grad(qx, qy)[0] for _ in range(2)]
        assert opt._fn is opt._eager_fn
    said = [str(w.message) for w in recwarn if "failed to build" in str(w.message)]
    assert len(said) == 1 and "inductor could not build it" in said[0], said
    for g in got:
        torch.testing.assert_close(g, want, rtol=0, atol=0)


def test_tf32_precision_sets_and_restores_the_flags():
    """allow_tf32 of the exemplar level: None leaves torch's flags; True/False hold inside the block only, also when
    the block raises."""
    from mnemonics_fast.methods.mnemonics import tf32_precision
    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    saved = flags()
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False  # torch's defaults
        with tf32_precision(None):
            assert flags() == (True, False)
        with tf32_precision(False):
            assert flags() == (False, False)
        assert flags() == (True, False)
        with pytest.raises(RuntimeError, match="inside"):
            with tf32_precision(True):
                assert flags() == (True, True)
                raise RuntimeError("inside")
        assert flags() == (True, False)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("allow", [None, False, True])
def test_exemplar_gradient_runs_under_the_requested_tf32_flags(allow):
    """The flags are what the gradient computation sees (a forward hook records them), and are restored after."""
    model = make_model(dtype=torch.float32).eval()
    ex, ey, qx, qy = make_data(dtype=torch.float32)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(torch.backends.cudnn.allow_tf32))
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    out = optimise_exemplars(model, ex, ey, (qx, qy), mode="full", inner_lr=0.1, inner_steps=1, outer_steps=2,
                             lr=1.0, allow_tf32=allow)
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
    assert seen and set(seen) == {before[0] if allow is None else allow}
    assert not torch.equal(out, ex)  # the pixels moved: the level ran
