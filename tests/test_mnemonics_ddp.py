"""Mnemonics under torch.distributed (2 gloo ranks on CPU): the exemplar banks must end bit-identical on every rank
even though each rank sees a different query shard (SPEC §7: exemplar sets are global, never per-rank)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mnemonics_fast.methods.mnemonics import adjust_old_exemplars, optimise_exemplars
from mnemonics_fast.models import IncrementalNet

WORLD, HW, NUM_OLD, NUM_NEW, STEPS = 2, 8, 4, 2, 3
MEAN, STD = (0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)


def _setup(seed: int = 0):
    """Model and data identical on every rank (same seeds); the query batch is split into per-rank shards."""
    torch.manual_seed(seed)
    model = IncrementalNet("resnet32", NUM_OLD, MEAN, STD)
    model.grow(NUM_NEW)
    g = torch.Generator().manual_seed(seed + 1)
    ex = torch.rand(6, 3, HW, HW, generator=g) * 0.8 + 0.1
    ey = torch.tensor([4, 4, 4, 5, 5, 5])
    qx = torch.rand(WORLD * 8, 3, HW, HW, generator=g)
    qy = torch.randint(0, NUM_OLD + NUM_NEW, (WORLD * 8,), generator=g)
    bank = torch.rand(24, 3, HW, HW, generator=g) * 0.8 + 0.1
    labels = torch.arange(NUM_OLD + NUM_NEW).repeat_interleave(4)
    return model, ex, ey, qx, qy, bank, labels


KW = dict(mode="full", inner_lr=0.5, inner_steps=2, lr=0.05, momentum=0.9)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model, ex, ey, qx, qy, bank, labels = _setup()
        shard = (qx[rank::WORLD].contiguous(), qy[rank::WORLD].contiguous())  # a different shard per rank
        out = optimise_exemplars(model, ex, ey, shard, outer_steps=STEPS, debug=True, **KW)
        adj = adjust_old_exemplars(model, bank, labels, outer_steps=2, generator=torch.Generator().manual_seed(3),
                                   query_batch_size=4, debug=True, **KW)
        torch.save({"out": out, "adj": adj}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_gloo_exemplars_bit_identical(tmp_path):
    init_file = tmp_path / "init"
    mp.spawn(_worker, args=(str(init_file), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert torch.equal(res[0]["out"], res[1]["out"]), "exemplars differ across ranks"
    assert torch.equal(res[0]["adj"], res[1]["adj"]), "adjusted exemplars differ across ranks"

    # The averaged gradient of equal-size shards is the gradient on the whole batch: one process, whole batch.
    torch.set_num_threads(1)
    model, ex, ey, qx, qy, bank, labels = _setup()
    whole = optimise_exemplars(model, ex, ey, (qx, qy), outer_steps=STEPS, **KW)
    torch.testing.assert_close(res[0]["out"], whole, rtol=1e-5, atol=1e-6)
    # adjust_old_exemplars: the global query batch is split over the ranks, so one process sees the same batches
    adj_whole = adjust_old_exemplars(model, bank, labels, outer_steps=2, generator=torch.Generator().manual_seed(3),
                                     query_batch_size=4, **KW)
    torch.testing.assert_close(res[0]["adj"], adj_whole, rtol=1e-5, atol=1e-6)
    assert not torch.equal(adj_whole, bank)
    assert not torch.equal(whole, ex)
    # and it is not what a single shard alone would give (the all-reduce really happened)
    alone = optimise_exemplars(model, ex, ey, (qx[0::WORLD], qy[0::WORLD]), outer_steps=STEPS, **KW)
    assert (alone - res[0]["out"]).abs().max() > 1e-4


# ---- shard_inner: the inner loop's exemplars split over the ranks ----------------------------------------------
SHARD_CASES = {  # name: (function, kwargs); float64, so "same result up to summation order" is checked to 1e-9
    "unrolled_T2": ("opt", dict(mode="full", inner_steps=2, m=5)),
    "reverse_T2_chunk2": ("opt", dict(mode="full", inner_steps=2, m=6, exemplar_chunk=2)),
    "first_order_T2": ("opt", dict(mode="first_order", inner_steps=2, m=6)),
    "unrolled_one_exemplar": ("opt", dict(mode="full", inner_steps=2, m=1)),          # rank 0 owns no row
    "reverse_one_exemplar": ("opt", dict(mode="full", inner_steps=2, m=1, exemplar_chunk=1)),
    "unrolled_T2_normalised": ("opt", dict(mode="full", inner_steps=2, m=5, inner_update="normalised")),
    "reverse_T2_chunk2_normalised": ("opt", dict(mode="full", inner_steps=2, m=6, exemplar_chunk=2,
                                                 inner_update="normalised")),
    "adjust_old_T1": ("adj", dict(mode="full", inner_steps=1)),
    "adjust_old_T2_chunk3": ("adj", dict(mode="full", inner_steps=2, exemplar_chunk=3)),
}


def _shard_run(name, rank, world, shard_inner):
    fn, kw = SHARD_CASES[name]
    kw = dict(kw)
    m = kw.pop("m", 6)
    model, ex, ey, qx, qy, bank, labels = _setup()
    model, ex, qx, bank = model.double(), ex.double(), qx.double(), bank.double()
    common = dict(inner_lr=0.5, lr=0.05, momentum=0.9, shard_inner=shard_inner, **kw)
    if fn == "opt":
        q = (qx[rank::world].contiguous(), qy[rank::world].contiguous()) if world > 1 else (qx, qy)
        return optimise_exemplars(model, ex[:m], ey[:m], q, outer_steps=STEPS, **common)
    return adjust_old_exemplars(model, bank, labels, outer_steps=2, generator=torch.Generator().manual_seed(3),
                                query_batch_size=4, **common)


def _shard_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        res = {name: _shard_run(name, rank, WORLD, True) for name in SHARD_CASES}
        # the local gradient covers this rank's own rows only: the work really was split
        from mnemonics_fast.methods.mnemonics import ExemplarOptimiser
        model, ex, ey, qx, qy, *_ = _setup()
        with ExemplarOptimiser(model.double(), ex.double(), ey, mode="full", inner_lr=0.5, inner_steps=1, lr=0.05,
                               shard_inner=True) as opt:
            res["local_grad"] = opt.grad(qx.double()[rank::WORLD], qy[rank::WORLD])[0]
        torch.save(res, os.path.join(out_dir, f"shard_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_shard_inner_matches_one_process_and_ranks_agree(tmp_path):
    mp.spawn(_shard_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"shard_rank{r}.pt") for r in range(WORLD)]
    torch.set_num_threads(1)
    for name in SHARD_CASES:
        assert torch.equal(res[0][name], res[1][name]), f"{name}: exemplars differ across ranks"
        whole = _shard_run(name, 0, 1, False)
        torch.testing.assert_close(res[0][name], whole, rtol=1e-9, atol=1e-12, msg=f"{name}: sharded != one process")
        _, ex, _, _, _, bank, _ = _setup()
        init = ex[:whole.shape[0]] if SHARD_CASES[name][0] == "opt" else bank
        assert (whole - init.double()).abs().max() > 1e-6, f"{name}: nothing moved"
    for r in range(WORLD):
        g = res[r]["local_grad"]
        own = slice(r * 6 // WORLD, (r + 1) * 6 // WORLD)
        other = torch.ones(6, dtype=torch.bool)
        other[own] = False
        assert g[own].abs().amax() > 0 and g[other].abs().amax() == 0, f"rank {r} computed rows it does not own"
