"""SPEC §4 and §7: herding, random selection, NME, the memory; exemplars of a real run point at their class."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mnemonics_fast.exemplars import ExemplarMemory, class_mean, herding, nme_predict, random_selection


# ------------------------------------------------------------------ herding vs an independent re-implementation
def reference_herding(features: np.ndarray, m: int, max_iter: int = 1000, exclude_picked: bool = False):
    """iCaRL herding written out in float64 numpy. Returns (ranking, number of re-selections of picked samples).

    exclude_picked=True is the *wrong* variant (argmax over not-yet-picked samples only), kept to show that the test
    tells the two apart.
    """
    f = features.astype(np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    n = len(f)
    mu = f.mean(axis=0)
    w = mu.copy()
    picked: list[int] = []
    reselected = 0
    it = 0
    while len(picked) < min(m, n) and it < max_iter:
        scores = f @ w
        if exclude_picked:
            scores[picked] = -np.inf
        i = int(np.argmax(scores))
        if i in picked:
            reselected += 1
        else:
            picked.append(i)
        w = w + mu - f[i]
        it += 1
    return picked, reselected


HERDING_CASES = [(30, 8, 20), (50, 64, 20), (10, 4, 10), (200, 16, 50), (5, 3, 10), (100, 2, 40), (64, 32, 64)]


@pytest.mark.parametrize("n,d,m", HERDING_CASES)
def test_herding_equals_reference(n, d, m):
    rng = np.random.RandomState(n * 1000 + d * 10 + m)
    feats = rng.randn(n, d) * rng.uniform(0.5, 3.0, size=(n, 1)) + 0.3   # varied norms: normalisation matters
    got = herding(torch.from_numpy(feats).float(), m)
    ref, _ = reference_herding(feats.astype(np.float32), m)
    assert got.dtype == torch.long
    assert got.tolist() == ref
    assert len(got) == min(m, n)
    assert len(set(got.tolist())) == len(got)                                   # distinct
    # The first pick is the sample closest (in cosine) to the class mean.
    fn = feats.astype(np.float32).astype(np.float64)
    fn = fn / np.linalg.norm(fn, axis=1, keepdims=True)
    assert int(got[0]) == int(np.argmax(fn @ fn.mean(0)))


def test_herding_reselects_already_picked_samples():
    """Over all samples, already-picked ones included, as the reference code; that differs from excluding them."""
    total_reselected, differs = 0, 0
    for n, d, m in HERDING_CASES:
        rng = np.random.RandomState(n * 1000 + d * 10 + m)
        feats = (rng.randn(n, d) * rng.uniform(0.5, 3.0, size=(n, 1)) + 0.3).astype(np.float32)
        ref, reselected = reference_herding(feats, m)
        total_reselected += reselected
        differs += ref != reference_herding(feats, m, exclude_picked=True)[0]
        assert herding(torch.from_numpy(feats), m).tolist() == ref
    assert total_reselected > 0      # the cases exercise the re-selection path
    assert differs > 0               # and the library follows the re-selecting variant, not the excluding one


@pytest.mark.parametrize("max_iter", [1, 7, 25])
def test_herding_max_iter(max_iter):
    # d=2: many re-selections, so m distinct samples take far more than m iterations.
    rng = np.random.RandomState(max_iter)
    feats = rng.randn(100, 2).astype(np.float32)
    got = herding(torch.from_numpy(feats), 60, max_iter=max_iter)
    ref, _ = reference_herding(feats, 60, max_iter=max_iter)
    assert got.tolist() == ref
    assert 1 <= len(got) <= max_iter < 60


def test_herding_default_max_iter_is_1000():
    rng = np.random.RandomState(3)
    feats = rng.randn(300, 2).astype(np.float32)
    ref, reselected = reference_herding(feats, 300, max_iter=1000)
    assert len(ref) < 300 and reselected > 0        # the 1000-step cap binds
    assert herding(torch.from_numpy(feats), 300).tolist() == ref


def test_herding_rejects_bad_shape():
    with pytest.raises(ValueError):
        herding(torch.rand(5), 2)


# ------------------------------------------------------------------ random selection
def test_random_selection_seeded_distinct():
    a = random_selection(50, 20, torch.Generator().manual_seed(1))
    b = random_selection(50, 20, torch.Generator().manual_seed(1))
    c = random_selection(50, 20, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(a) == 20 and len(set(a.tolist())) == 20
    assert int(a.min()) >= 0 and int(a.max()) < 50
    assert sorted(random_selection(7, 20, torch.Generator().manual_seed(3)).tolist()) == list(range(7))
    # Uniform: over many draws every index is picked about equally often.
    g = torch.Generator().manual_seed(4)
    counts = torch.zeros(10)
    for _ in range(2000):
        counts[random_selection(10, 3, g)] += 1
    assert counts.min() > 500 and counts.max() < 700          # expected 600 each


# ------------------------------------------------------------------ NME
def test_class_mean_and_nme_predict():
    g = torch.Generator().manual_seed(5)
    f = torch.randn(9, 6, generator=g) * torch.rand(9, 1, generator=g) * 5
    fn = f / f.norm(dim=1, keepdim=True)
    expected = fn.mean(0) / fn.mean(0).norm()
    assert torch.allclose(class_mean(f), expected, atol=1e-6)
    f2 = torch.randn(9, 6, generator=g)
    both = torch.cat([fn, f2 / f2.norm(dim=1, keepdim=True)]).mean(0)
    assert torch.allclose(class_mean(f, f2), both / both.norm(), atol=1e-6)
    means = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    x = torch.randn(20, 6, generator=g)
    xn = F.normalize(x, dim=1)
    nearest = torch.cdist(xn, means).argmin(1)              # Euclidean nearest mean on normalised features
    assert torch.equal(nme_predict(x, means), nearest)


# ------------------------------------------------------------------ the memory
def test_memory_trim_index_and_state():
    mem = ExemplarMemory()
    mem.set_class(1, torch.tensor([5, 3, 9, 7]))
    mem.set_class(0, torch.tensor([2, 8, 4]))
    assert mem.classes == [0, 1] and len(mem) == 7
    idx, lab = mem.index_exemplars()
    assert idx.tolist() == [2, 8, 4, 5, 3, 9, 7] and lab.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert mem.nbytes(3 * 8 * 8) == 7 * 192
    mem.trim(2)                                              # top of the ranking survives
    assert mem.ranking[1].tolist() == [5, 3] and mem.ranking[0].tolist() == [2, 8]
    mem.pixels[1] = torch.rand(2, 3, 8, 8)
    idx, lab = mem.index_exemplars()
    assert idx.tolist() == [2, 8] and lab.tolist() == [0, 0]
    px, plab = mem.pixel_exemplars()
    assert px.shape == (2, 3, 8, 8) and plab.tolist() == [1, 1]
    assert mem.nbytes(192) == 2 * 192 + 2 * 3 * 8 * 8 * 4
    other = ExemplarMemory()
    other.load_state_dict(mem.state_dict())
    assert other.ranking.keys() == mem.ranking.keys() and torch.equal(other.pixels[1], mem.pixels[1])


# ------------------------------------------------------------------ a real run (SPEC §7)
def _ckpt(run, phase):
    return torch.load(run.run_dir / "checkpoints" / f"phase_{phase:03d}.pt", weights_only=False)


@pytest.mark.parametrize("which", ["lucir_run", "icarl_run"])
def test_exemplars_belong_to_their_class_and_are_distinct(which, request):
    run = request.getfixturevalue(which)
    tr = run.trainer
    assert tr.memory.classes == list(range(tr.ds.num_classes))
    for c, r in tr.memory.ranking.items():
        assert len(r) > 1
        assert torch.all(tr.y_train[r] == c), f"class {c}: exemplar labels do not match their images"
        # The original label of the source image is the class at position c of the class order.
        assert torch.all(tr.ds.train.labels[r] == tr.order[c])
        assert len(set(r.tolist())) == len(r), f"class {c}: repeated exemplar indices"
        pixels = tr.x_train[r].flatten(1)
        assert len(torch.unique(pixels, dim=0)) == len(r), f"class {c}: exemplars are copies of one image"


def test_growing_memory_holds_20_per_class(lucir_run):
    tr = lucir_run.trainer
    assert all(len(r) == 20 for r in tr.memory.ranking.values())
    assert [p["memory_exemplars"] for p in lucir_run.summary["phases"]] == [40, 80, 120]


def test_herding_selection_in_a_run_matches_reference(lucir_run):
    """Rankings stored by the trainer == reference herding on eval-mode, un-augmented features of that phase's model."""
    from mnemonics_fast.models import build_model

    tr = lucir_run.trainer
    for phase in range(len(tr.phases)):
        state = _ckpt(lucir_run, phase)
        model = build_model("resnet32", tr.ds.mean, tr.ds.std, structure=state["structure"])
        model.load_state_dict(state["model"])
        model.eval()
        new = tr.phases.new_classes(phase)
        new_idx = torch.nonzero((tr.y_train >= new.start) & (tr.y_train < new.stop)).flatten()
        bs = tr.cfg.train.eval_batch_size   # same batches as the trainer: bitwise-identical features
        with torch.no_grad():
            feats = torch.cat([model.features(tr.x_train[new_idx[s:s + bs]].float() / 255)
                               for s in range(0, len(new_idx), bs)])
        for c in new:
            mask = tr.y_train[new_idx] == c
            ref, _ = reference_herding(feats[mask].numpy(), 20)
            expected = new_idx[mask][ref]
            assert state["memory"]["ranking"][c].tolist() == expected.tolist(), f"phase {phase} class {c}"


def test_fixed_memory_trims_by_ranking(icarl_run):
    tr = icarl_run.trainer
    total = tr.cfg.memory.total
    first = _ckpt(icarl_run, 0)["memory"]["ranking"]
    last = tr.memory.ranking
    seen = tr.ds.num_classes
    for c in range(seen):
        assert len(last[c]) == total // seen
    for c in first:                                  # old classes keep the top of their stored ranking
        assert last[c].tolist() == first[c][: total // seen].tolist()
    for p in icarl_run.summary["phases"]:
        assert p["memory_exemplars"] <= total
        assert p["memory_exemplars"] == (total // p["num_classes"]) * p["num_classes"]


def test_random_selection_in_a_run_is_not_herding(icarl_run):
    """memory.selection=random: rankings are the seeded random draw (seed*1000+phase+1), not a herding order."""
    tr = icarl_run.trainer
    state = _ckpt(icarl_run, 0)
    g = torch.Generator().manual_seed(tr.cfg.seed * 1000 + 0 + 1)
    new_idx = torch.nonzero(tr.y_train < tr.phases.base).flatten()
    labs = tr.y_train[new_idx]
    m = tr.cfg.memory.total // tr.phases.base
    for c in range(tr.phases.base):
        cidx = new_idx[labs == c]
        assert state["memory"]["ranking"][c].tolist() == cidx[random_selection(len(cidx), m, g)].tolist()


@pytest.mark.parametrize("which", ["lucir_run", "icarl_run"])
def test_class_means_recomputed(which, request):
    """NME class means of the final model == normalize(mean normalize(f)) of each class's exemplars."""
    run = request.getfixturevalue(which)
    tr = run.trainer
    model = tr.model.eval()
    flip = tr.cfg.method.nme_view == "plain+flip"
    with torch.no_grad():
        for c, r in tr.memory.ranking.items():
            x = tr.x_train[r].float() / 255
            f = F.normalize(model.features(x), dim=1)
            if flip:
                f = torch.cat([f, F.normalize(model.features(x.flip(3)), dim=1)])
            mean = F.normalize(f.mean(0), dim=0)
            assert torch.allclose(tr.class_means[c], mean, atol=1e-4), f"class {c}"
