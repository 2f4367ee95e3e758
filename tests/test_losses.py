"""SPEC §3: LUCIR's adaptive lambda, less-forget, margin ranking; iCaRL's KD."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mnemonics_fast.config import MethodConfig
from mnemonics_fast.methods import ICaRL, LUCIR, PhaseInfo, build_method
from mnemonics_fast.methods.icarl import kd_loss
from mnemonics_fast.methods.lucir import less_forget_lambda, less_forget_loss, margin_ranking_loss
from mnemonics_fast.models import NetOutput, build_model


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ lambda
def test_lambda_follows_sqrt_old_over_new():
    assert less_forget_lambda(50, 10, 5.0) == pytest.approx(5 * math.sqrt(5))
    assert less_forget_lambda(50, 5, 5.0) == pytest.approx(5 * math.sqrt(10))
    assert less_forget_lambda(50, 2, 5.0) == pytest.approx(25.0)
    assert less_forget_lambda(500, 50, 10.0) == pytest.approx(10 * math.sqrt(10))
    # Later phases: more old classes, larger lambda.
    lams = [less_forget_lambda(50 + 10 * p, 10, 5.0) for p in range(5)]
    assert lams == sorted(lams) and lams[0] < lams[-1]
    assert lams[3] == pytest.approx(5 * math.sqrt(8))
    with pytest.raises(ValueError):
        less_forget_lambda(0, 10, 5.0)


def test_lucir_uses_the_adaptive_lambda():
    """The total loss carries exactly lambda(old, new) * LF (not a constant lambda_base)."""
    g = _gen(0)
    f, f_old = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    for num_old, num_new in ((5, 2), (3, 4)):
        cos = torch.rand(6, num_old + num_new, generator=g) * 2 - 1
        out, teacher = NetOutput(f, 3 * cos, cos), NetOutput(f_old, 3 * cos, cos)
        y = torch.randint(num_old, num_old + num_new, (6,), generator=g)  # new classes only: MR is 0
        total, parts = LUCIR(MethodConfig(lambda_base=5.0)).loss(out, y, teacher, PhaseInfo(1, num_old, num_new))
        ce = F.cross_entropy(out.logits, y)
        lf = (1 - F.cosine_similarity(f, f_old, dim=1)).mean()
        assert float(parts["mr"]) == 0.0
        assert float(total) == pytest.approx(float(ce + 5.0 * math.sqrt(num_old / num_new) * lf), rel=1e-5)


def _mr_direct(cos, y, num_old, k, m):
    """LUCIR's margin ranking, written out: for each old-class sample, its ground-truth cosine against each of its k
    highest new-class cosines, max(0, m - gt + neg), averaged over those pairs."""
    terms = []
    for i in range(len(y)):
        if int(y[i]) < num_old:
            gt = float(cos[i, y[i]])
            for neg in sorted(cos[i, num_old:].tolist(), reverse=True)[:k]:
                terms.append(max(0.0, m - gt + neg))
    return sum(terms) / len(terms) if terms else 0.0


def test_lucir_takes_every_weight_from_its_config():
    """lambda_base, top_k, margin and mr_weight reach the loss (the other tests use their defaults, which a loss
    that ignored the config would also pass): here 10, 3, 0.7 and 2, against the loss written out."""
    g = _gen(11)
    num_old, num_new = 4, 5
    f, f_old = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    cos = torch.rand(8, num_old + num_new, generator=g) * 2 - 1
    y = torch.tensor([0, 1, 2, 3, 4, 6, 8, 1])
    cfg = MethodConfig(lambda_base=10.0, top_k=3, margin=0.7, mr_weight=2.0)
    out, teacher = NetOutput(f, 4 * cos, cos), NetOutput(f_old, 4 * cos, cos)
    total, parts = LUCIR(cfg).loss(out, y, teacher, PhaseInfo(1, num_old, num_new))
    ce = float(F.cross_entropy(4 * cos, y))
    lf = float((1 - F.cosine_similarity(f, f_old, dim=1)).mean())
    mr = _mr_direct(cos, y, num_old, 3, 0.7)
    assert mr > 0 and float(parts["mr"]) == pytest.approx(mr, rel=1e-5)
    assert float(total) == pytest.approx(ce + 10.0 * math.sqrt(num_old / num_new) * lf + 2.0 * mr, rel=1e-5)


def test_less_forget_loss():
    g = _gen(1)
    f, f_old = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    expected = sum(1 - float(f[i] @ f_old[i] / (f[i].norm() * f_old[i].norm())) for i in range(5)) / 5
    assert float(less_forget_loss(f, f_old)) == pytest.approx(expected, rel=1e-5)
    assert float(less_forget_loss(f, 2.5 * f)) == pytest.approx(0.0, abs=1e-6)     # scale-invariant


# ------------------------------------------------------------------ margin ranking
# Classes 0, 1 old; 2, 3, 4 new.
MR_COS = torch.tensor([
    [0.90, 0.10, 0.70, 0.20, 0.50],    # label 0: top-2 new 0.7, 0.5 -> 0.5-(0.9-0.7)=0.3, 0.5-(0.9-0.5)=0.1
    [0.30, 0.20, -0.10, 0.60, 0.00],   # label 1: top-2 new 0.6, 0.0 -> 0.5-(0.2-0.6)=0.9, 0.5-(0.2-0.0)=0.3
    [0.10, 0.20, 0.30, 0.90, 0.10],    # label 3: new class, ignored
    [0.95, 0.00, 0.10, 0.20, 0.30],    # label 0: 0.5-0.65 < 0, 0.5-0.75 < 0 -> 0, 0
])
MR_Y = torch.tensor([0, 1, 3, 0])


def test_margin_ranking_hand_computed():
    assert float(margin_ranking_loss(MR_COS, MR_Y, num_old=2, k=2, margin=0.5)) == pytest.approx(1.6 / 6, abs=1e-6)
    # k=3 (all new classes): extra pairs 0.5-(0.9-0.2)<0, 0.5-(0.2+0.1)=0.2, 0.5-(0.95-0.1)<0 -> 1.8 / 9.
    assert float(margin_ranking_loss(MR_COS, MR_Y, num_old=2, k=3, margin=0.5)) == pytest.approx(0.2, abs=1e-6)
    # K = min(k, #new): asking for 5 hardest among 3 new classes is the same as 3.
    assert float(margin_ranking_loss(MR_COS, MR_Y, num_old=2, k=5, margin=0.5)) == pytest.approx(0.2, abs=1e-6)
    # Another margin: 0.7 -> pairs 0.5, 0.3, 1.1, 0.5, 0.05, 0 -> 2.45 / 6.
    assert float(margin_ranking_loss(MR_COS, MR_Y, num_old=2, k=2, margin=0.7)) == pytest.approx(2.45 / 6, abs=1e-6)


def test_margin_ranking_matches_a_loop_on_random_scores():
    g = _gen(2)
    for num_old, num_new, k in ((5, 3, 2), (4, 1, 2), (10, 6, 4)):
        cos = torch.rand(12, num_old + num_new, generator=g, dtype=torch.float64) * 2 - 1
        y = torch.randint(0, num_old + num_new, (12,), generator=g)
        y[0] = 0
        pairs = []
        for i in range(12):
            if y[i] >= num_old:
                continue
            new = sorted(cos[i, num_old:].tolist(), reverse=True)[:min(k, num_new)]
            pairs += [max(0.0, 0.5 - (float(cos[i, y[i]]) - s)) for s in new]
        got = float(margin_ranking_loss(cos, y, num_old, k, 0.5))
        assert got == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)


def test_margin_ranking_exactly_zero_without_old_samples():
    cos = (torch.rand(6, 5, generator=_gen(3)) * 2 - 1).requires_grad_()
    y = torch.tensor([2, 3, 4, 2, 3, 4])
    loss = margin_ranking_loss(cos, y, num_old=2)
    assert loss.item() == 0.0
    loss.backward()                       # still part of the graph (DDP needs every rank to backward)
    assert torch.equal(cos.grad, torch.zeros_like(cos))
    # Same through the method.
    f = torch.randn(6, 8, generator=_gen(4))
    out = NetOutput(f, 4 * cos.detach(), cos.detach())
    _, parts = LUCIR(MethodConfig()).loss(out, y, NetOutput(f, out.logits, out.cos), PhaseInfo(1, 2, 3))
    assert parts["mr"].item() == 0.0


def test_margin_ranking_uses_unscaled_cosines():
    """LUCIR.loss must feed out.cos (unscaled) to MR, not the sigma-scaled logits."""
    sigma = 8.0
    f = torch.randn(4, 8, generator=_gen(5))
    out = NetOutput(f, sigma * MR_COS, MR_COS)
    teacher = NetOutput(f.clone(), sigma * MR_COS, MR_COS)
    total, parts = LUCIR(MethodConfig()).loss(out, MR_Y, teacher, PhaseInfo(1, 2, 3))
    assert float(parts["mr"]) == pytest.approx(1.6 / 6, abs=1e-6)
    assert float(parts["lf"]) == pytest.approx(0.0, abs=1e-6)
    assert float(total) == pytest.approx(float(F.cross_entropy(sigma * MR_COS, MR_Y)) + 1.6 / 6, rel=1e-5)
    # And the model really hands out cos = logits / sigma.
    torch.manual_seed(0)
    net = build_model("resnet32", (0.5,) * 3, (0.25,) * 3, num_classes=3).eval()
    net.grow(2)
    with torch.no_grad():
        net.head.sigma.fill_(sigma)
        o = net(torch.rand(3, 3, 8, 8, generator=_gen(6)), return_all=True)
    assert torch.allclose(o.logits, sigma * o.cos, atol=1e-5)
    assert o.cos.abs().max() <= 1 + 1e-6
    assert torch.allclose(o.cos, F.normalize(o.features, dim=1) @ F.normalize(net.head.full_weight(), dim=1).T,
                          atol=1e-5)


def test_lucir_phase0_is_plain_ce():
    cos = torch.rand(5, 4, generator=_gen(7))
    y = torch.tensor([0, 1, 2, 3, 0])
    out = NetOutput(torch.randn(5, 8, generator=_gen(8)), 6 * cos, cos)
    total, parts = LUCIR(MethodConfig()).loss(out, y, None, PhaseInfo(0, 0, 4))
    assert float(total) == pytest.approx(float(F.cross_entropy(6 * cos, y)), rel=1e-6)
    assert set(parts) == {"ce"}


# ------------------------------------------------------------------ iCaRL KD
def _kd_direct(logits, teacher_logits, num_old, t):
    s = logits[:, :num_old].double() / t
    q_logits = teacher_logits[:, :num_old].double() / t
    total = 0.0
    for i in range(len(s)):
        q = torch.exp(q_logits[i]) / torch.exp(q_logits[i]).sum()
        p = torch.exp(s[i]) / torch.exp(s[i]).sum()
        total += float((q * (q.log() - p.log())).sum())
    return total / len(s) * t * t


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_kd_equals_per_sample_kl_times_t2(t):
    g = _gen(9)
    logits = torch.randn(7, 9, generator=g) * 3
    teacher = torch.randn(7, 9, generator=g) * 3
    got = float(kd_loss(logits, teacher, num_old=6, temperature=t))
    assert got == pytest.approx(_kd_direct(logits, teacher, 6, t), rel=1e-5)
    assert got > 0
    assert float(kd_loss(teacher, teacher, 6, t)) == pytest.approx(0.0, abs=1e-6)


def test_icarl_loss_uses_only_old_class_logits():
    g = _gen(10)
    cfg = MethodConfig(name="icarl", kd_temperature=2.0, kd_weight=1.0)
    m = build_method(cfg)
    assert isinstance(m, ICaRL)
    f = torch.randn(5, 8, generator=g)
    logits, t_logits = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    y = torch.randint(0, 7, (5,), generator=g)
    info = PhaseInfo(1, 4, 3)
    total, parts = m.loss(NetOutput(f, logits, logits), y, NetOutput(f, t_logits, t_logits), info)
    expected = float(F.cross_entropy(logits, y)) + _kd_direct(logits, t_logits, 4, 2.0)
    assert float(total) == pytest.approx(expected, rel=1e-5)
    # The teacher's new-class columns (which it never trained) do not matter.
    t2 = t_logits.clone()
    t2[:, 4:] = 100.0
    total2, _ = m.loss(NetOutput(f, logits, logits), y, NetOutput(f, t2, t2), info)
    assert float(total2) == pytest.approx(float(total), rel=1e-6)
    # The temperature and weight come from the config (not the defaults 2 and 1).
    m4 = build_method(MethodConfig(name="icarl", kd_temperature=4.0, kd_weight=0.5))
    total4, _ = m4.loss(NetOutput(f, logits, logits), y, NetOutput(f, t_logits, t_logits), info)
    want4 = float(F.cross_entropy(logits, y)) + 0.5 * _kd_direct(logits, t_logits, 4, 4.0)
    assert float(total4) == pytest.approx(want4, rel=1e-5) and float(total4) != pytest.approx(expected, rel=1e-3)
    # Phase 0: CE only.
    t0, parts0 = m.loss(NetOutput(f, logits, logits), y, None, PhaseInfo(0, 0, 7))
    assert float(t0) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6) and set(parts0) == {"ce"}
