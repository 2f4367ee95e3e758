"""What the bilevel exemplar objective rewards, measured: takes a run's phase checkpoint (a herding run), redoes the
new classes' exemplar level (b) for several beta1, and scores every resulting exemplar set the same ways.

Why this exists. On tin100a-32, mnemonics exemplars lowered NME and CNN accuracy (docs/mnemonics.md). The objective
of (b) is J(E) = L(theta - alpha * grad_theta L(theta; E); query). For T = 1 a first-order expansion gives

    J(E) ~= L(theta; query) - alpha * <g_query, g_E>,     g_S = grad_theta L(theta; S)

so the level raises the inner product <g_query, g_E> = |g_query| |g_E| cos(g_query, g_E). It can do that by aligning
the exemplars' gradient with the real data's (what one hopes) or by making |g_E| larger, i.e. by making the exemplars
*harder*: a larger loss under the current model. Nothing in J stops the second. This script separates the two and
checks what the change buys on data the level never saw:

- `objective_*`: J(E) (the run's alpha and T) on the new classes' whole training set (what the queries were drawn
  from, un-augmented) and on their val split, next to L(theta) (no inner step). `gain` = L(theta) - J(E).
- `exemplar_loss` / `exemplar_acc`: the exemplars' own cross-entropy / accuracy under the current model.
- `grad_norm_E`, `grad_cos_train`: |g_E| and cos(g_E, g_train), both at theta.
- `finetune_*`: a copy of the model trained on the exemplars alone (`--finetune-steps` full-batch SGD steps,
  `--finetune-lr`, momentum 0.9, BN in eval mode as in the level): the val accuracy over all seen classes and over
  the new ones. The objective's promise, carried past its one step.
- `nme_*`: NME val accuracy with the new classes' means taken from E (old classes keep their stored exemplars).

    python bench/exemplar_objective.py --run runs/sweep_herding --phase 1 --betas 0,1,10,100 --out obj.json

beta 0 is the herding exemplars themselves. `--storage uint8` rounds every optimised set to whole uint8 levels
before scoring it, as the trainer keeps exemplars between phases with mnemonics.storage=uint8. `--query-old K`
appends K of the stored old-class exemplars to every query batch (not the paper: its query holds new-class data
only, so the level can lower it by biasing the inner step towards the new classes, docs/mnemonics.md).
`--inner-update normalised` runs and scores the unit-gradient inner step (mnemonics.inner_update), the variant that
takes |g_E| out of the objective. Deterministic for a given checkpoint, seed and machine.

`--precisions fp32,bf16` runs every beta's level twice, with the level's forward passes in fp32 and under bf16
autocast (mnemonics.bf16; the scoring stays fp32). Each bf16 row also gives `change_cos_vs_fp32` and
`change_rel_diff_vs_fp32`: the cosine and the relative L2 distance between its pixel change and the fp32 level's.
The question it answers: bf16 puts a 27-28% error on each exemplar gradient (float64 oracle, CPU and H100 alike);
does that change what the exemplars become, and what they score?
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mnemonics_fast.config import load_config  # noqa: E402
from mnemonics_fast.data.resident import ResidentTrainLoader  # noqa: E402
from mnemonics_fast.exemplars.nme import class_mean  # noqa: E402
from mnemonics_fast.methods.mnemonics import _inner_direction, optimise_exemplars, quantise_uint8  # noqa: E402
from mnemonics_fast.models import build_model  # noqa: E402
from mnemonics_fast.trainer.loop import Trainer  # noqa: E402
from mnemonics_fast.trainer.mnemonics_stage import _cycle  # noqa: E402


def _trainable(model) -> tuple[list[str], list[torch.Tensor]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def _batched_loss_grad(model, names, theta, x, y, batch: int = 500, need_grad: bool = True):
    """Mean cross-entropy over (x, y) at parameters theta, and its gradient in theta (summed over batches)."""
    total, grads, correct = 0.0, None, 0
    th = [t.detach().requires_grad_(need_grad) for t in theta]
    for s in range(0, len(y), batch):
        with torch.set_grad_enabled(need_grad):
            logits = functional_call(model, dict(zip(names, th)), (x[s:s + batch],))
            loss = F.cross_entropy(logits, y[s:s + batch], reduction="sum") / len(y)
        correct += int((logits.argmax(1) == y[s:s + batch]).sum())
        total += float(loss.detach())
        if need_grad:
            g = torch.autograd.grad(loss, th)
            grads = list(g) if grads is None else [a + b for a, b in zip(grads, g)]
    return total, grads, correct / len(y) * 100


def _with_old_exemplars(batches, tr, num_old: int, k: int, seed: int):
    """Query batches with k stored old-class exemplars appended to each (`--query-old`; not the paper)."""
    if num_old == 0:
        raise SystemExit("error: --query-old needs a phase with old classes (phase >= 1)")
    x_old = torch.cat([tr.exemplar_pixels(c) for c in range(num_old)])
    y_old = torch.cat([torch.full((len(tr.memory.ranking[c]),), c, dtype=torch.long) for c in range(num_old)])
    g = torch.Generator().manual_seed(seed)
    for x, y in batches:
        i = torch.randint(len(y_old), (k,), generator=g)
        yield torch.cat([x, x_old[i].to(x.device, x.dtype)]), torch.cat([y, y_old[i].to(y.device)])


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _inner(model, names, params, ex, ey, alpha: float, steps: int, normalised: bool) -> list[torch.Tensor]:
    theta = [p.detach() for p in params]
    for _ in range(steps):
        _, g, _ = _batched_loss_grad(model, names, theta, ex, ey)
        theta = [t - alpha * gi for t, gi in zip(theta, _inner_direction(g, normalised))]
    return theta


def _finetune(model, names, params, ex, ey, lr: float, steps: int) -> list[torch.Tensor]:
    theta = [p.detach().clone() for p in params]
    buf = [torch.zeros_like(t) for t in theta]
    for _ in range(steps):
        _, g, _ = _batched_loss_grad(model, names, theta, ex, ey)
        buf = [0.9 * b + gi for b, gi in zip(buf, g)]
        theta = [t - lr * b for t, b in zip(theta, buf)]
    return theta


@torch.no_grad()
def _accuracy(model, names, theta, x, y, classes: slice | None = None) -> float:
    out = []
    for s in range(0, len(y), 500):
        logits = functional_call(model, dict(zip(names, theta)), (x[s:s + 500],))
        if classes is not None:
            logits = logits[:, classes]
        out.append(logits.argmax(1) + (classes.start if classes is not None else 0))
    return float((torch.cat(out) == y).float().mean() * 100)


@torch.no_grad()
def _nme(model, means: torch.Tensor, x, y) -> float:
    f = torch.cat([F.normalize(model.features(x[s:s + 500]), dim=1) for s in range(0, len(y), 500)])
    return float(((f @ means.T).argmax(1) == y).float().mean() * 100)


def score(model, names, params, ex, ey, sets: dict, alpha: float, steps: int, normalised: bool, ft_steps: int,
          means_old, new: range, g_train, ft_lr: float) -> dict:
    """Every measurement of one exemplar set (see the module docstring). The objective uses the level's inner rule."""
    out = {}
    theta_T = _inner(model, names, params, ex, ey, alpha, steps, normalised)
    for key, (x, y) in sets.items():
        base, _, _ = _batched_loss_grad(model, names, params, x, y, need_grad=False)
        j, _, acc = _batched_loss_grad(model, names, theta_T, x, y, need_grad=False)
        out[f"objective_{key}"] = j
        out[f"gain_{key}"] = base - j
        out[f"acc_after_inner_{key}"] = acc
    loss_e, g_e, acc_e = _batched_loss_grad(model, names, params, ex, ey)
    out["exemplar_loss"], out["exemplar_acc"] = loss_e, acc_e
    ge, gt = _flat(g_e), _flat(g_train)
    out["grad_norm_E"] = float(ge.norm())
    out["grad_cos_train"] = float(ge @ gt / (ge.norm() * gt.norm()))
    out["first_order_gain_train"] = alpha * float(ge @ gt)
    xv, yv = sets["val"]
    if ft_steps:
        ft = _finetune(model, names, params, ex, ey, ft_lr, ft_steps)
        out["finetune_val_acc_all"] = _accuracy(model, names, ft, xv, yv)
        newv = (yv >= new.start) & (yv < new.stop)
        out["finetune_val_acc_new"] = _accuracy(model, names, ft, xv[newv], yv[newv], slice(new.start, new.stop))
    with torch.no_grad():
        fe = F.normalize(model.features(ex), dim=1)
    means = torch.cat([means_old, torch.stack([class_mean(fe[ey == c]) for c in new])])
    out["nme_val_acc_all"] = _nme(model, means, xv, yv)
    newv = (yv >= new.start) & (yv < new.stop)
    out["nme_val_acc_new"] = _nme(model, means[new.start:new.stop], xv[newv], yv[newv] - new.start)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a run folder with checkpoints/phase_NNN.pt (herding)")
    ap.add_argument("--phase", type=int, default=1)
    ap.add_argument("--betas", default="0,1,10,100", help="beta1 values (mnemonics.lr, lr_scale none); 0 = herding")
    ap.add_argument("--outer-steps", type=int, default=None, help="K (default: the run's mnemonics.outer_steps)")
    ap.add_argument("--inner-lr", type=float, default=None, help="alpha (default: the run's mnemonics.inner_lr)")
    ap.add_argument("--inner-update", choices=("sgd", "normalised"), default=None,
                    help="the inner step (default: the run's mnemonics.inner_update, else sgd)")
    ap.add_argument("--finetune-steps", type=int, default=50)
    ap.add_argument("--finetune-lr", type=float, default=0.01)
    ap.add_argument("--precisions", default="fp32",
                    help="comma list of fp32, bf16: the exemplar level's forward passes (bf16 = autocast)")
    ap.add_argument("--storage", choices=("float", "uint8"), default=None,
                    help="how the optimised exemplars are kept before scoring (default: the run's mnemonics.storage);"
                         " uint8 rounds, as the trainer does between phases")
    ap.add_argument("--query-old", type=int, default=0, metavar="K",
                    help="append K old-class exemplars (seeded random draw, not augmented) to every query batch of"
                         " the level: NOT the paper, whose query batches hold new-class data only")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    ckpt = a.run / "checkpoints" / f"phase_{a.phase:03d}.pt"
    if not ckpt.is_file():
        raise SystemExit(f"error: {ckpt} does not exist")
    tmp = tempfile.mkdtemp(prefix="exemplar_objective_")
    cfg = load_config(a.run / "config.yaml", [f"run.output_dir={tmp}", "run.device=cpu", "run.progress=false",
                                              "run.tensorboard=false", "run.resume=never"])
    mn = cfg.mnemonics
    alpha = a.inner_lr if a.inner_lr is not None else mn.inner_lr
    K = a.outer_steps if a.outer_steps is not None else mn.outer_steps
    inner_update = a.inner_update or getattr(mn, "inner_update", "sgd")
    storage = a.storage or mn.storage
    tr = Trainer(cfg)
    tr.setup()
    if not tr.ds.resident:
        raise SystemExit("error: exemplar_objective supports in-memory (small-image) datasets")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if state["memory"]["pixels"]:
        raise SystemExit(f"error: {ckpt} holds optimised pixels; give a herding (mnemonics.enabled=false) run")
    model = build_model(cfg.model.arch, tr.ds.mean, tr.ds.std, structure=state["structure"])
    model.load_state_dict(state["model"])
    model.eval()
    if a.phase > 0:   # as in the live phase: the old head rows are frozen (LUCIR), so not part of theta'
        model.head.fc1.weight.requires_grad_(False)
    tr.memory.load_state_dict(state["memory"])
    new = tr.phases.new_classes(a.phase)
    n_seen = new.stop
    names, params = _trainable(model)

    new_idx = tr._new_class_indices(new)
    x_new = tr.x_train[new_idx].float() / 255.0
    y_new = tr.y_train[new_idx]
    val_idx = torch.nonzero(tr.y_test < n_seen).flatten()
    sets = {"train": (x_new, y_new), "val_new": None, "val": (tr.x_test[val_idx].float() / 255.0, tr.y_test[val_idx])}
    vn = (sets["val"][1] >= new.start)
    sets["val_new"] = (sets["val"][0][vn], sets["val"][1][vn])
    _, g_train, _ = _batched_loss_grad(model, names, params, x_new, y_new)

    pixels = torch.cat([tr.exemplar_pixels(c) for c in new])
    labels = torch.cat([torch.full((len(tr.memory.ranking[c]),), c, dtype=torch.long) for c in new])
    with torch.no_grad():
        means_old = torch.stack([class_mean(F.normalize(model.features(tr.exemplar_pixels(c)), dim=1))
                                 for c in range(new.start)]) if new.start else torch.zeros(0, model.feature_dim)

    precisions = [p for p in a.precisions.split(",") if p]
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        raise SystemExit(f"error: --precisions takes fp32 and/or bf16, got {a.precisions!r}")
    rows = []
    seed = tr._phase_seed(a.phase)
    for beta, precision in [(float(b), p) for b in a.betas.split(",") for p in precisions]:
        if beta == 0 and precision != precisions[0]:
            continue   # herding: no level, nothing to run in another precision
        t0 = time.perf_counter()
        if beta == 0:
            ex = pixels
        else:
            q = ResidentTrainLoader(tr.x_train, new_idx, y_new, None, mn.query_batch_size, tr.device, 0, 1, seed + 3,
                                    pad=cfg.data.crop_padding, drop_last=True)
            batches = _cycle(q)
            if a.query_old:
                batches = _with_old_exemplars(batches, tr, new.start, a.query_old, seed + 5)
            ex = optimise_exemplars(model, pixels, labels, batches, mode=mn.mode, inner_lr=alpha,
                                    inner_steps=mn.inner_steps, outer_steps=K, lr=beta, momentum=mn.momentum,
                                    num_classes=n_seen, inner_update=inner_update,
                                    autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
            if storage == "uint8":
                ex = quantise_uint8(ex).float() / 255.0
        row = {"beta1": beta, "precision": "-" if beta == 0 else precision,
               "pixel_change_uint8_levels": float((ex - pixels).abs().mean()) * 255}
        ref = next((r for r in rows if r["beta1"] == beta and r["precision"] == "fp32"), None)
        if precision == "bf16" and ref is not None:
            d, d32 = (ex - pixels).flatten(), ref["_change"]
            row["change_cos_vs_fp32"] = float(d @ d32 / (d.norm() * d32.norm()).clamp_min(1e-30))
            row["change_rel_diff_vs_fp32"] = float((d - d32).norm() / d32.norm().clamp_min(1e-30))
        row["_change"] = (ex - pixels).flatten()
        row.update(score(model, names, params, ex, labels, sets, alpha, mn.inner_steps, inner_update == "normalised",
                         a.finetune_steps, means_old, new, g_train, a.finetune_lr))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        vs = (f" | change vs fp32: cos {row['change_cos_vs_fp32']:.3f}, rel diff {row['change_rel_diff_vs_fp32']:.3f}"
              if "change_cos_vs_fp32" in row else "")
        print(f"beta1 {beta:g} {row['precision']}: {row['pixel_change_uint8_levels']:.2f} levels{vs} | gain train "
              f"{row['gain_train']:.2e} "
              f"val_new {row['gain_val_new']:.2e} | exemplar loss {row['exemplar_loss']:.3f} acc "
              f"{row['exemplar_acc']:.1f} | |g_E| {row['grad_norm_E']:.3f} cos {row['grad_cos_train']:.3f} | "
              f"finetune val all/new {row.get('finetune_val_acc_all', float('nan')):.2f}/"
              f"{row.get('finetune_val_acc_new', float('nan')):.2f} | NME all/new {row['nme_val_acc_all']:.2f}/"
              f"{row['nme_val_acc_new']:.2f} | {row['seconds']:.0f} s", flush=True)
    out = {"bench": "exemplar_objective", "run": str(a.run), "phase": a.phase, "new_classes": [new.start, new.stop],
           "exemplars": len(labels), "mode": mn.mode, "inner_lr": alpha, "inner_steps": mn.inner_steps,
           "inner_update": inner_update, "query_old": a.query_old, "outer_steps": K, "lr_scale": "none",
           "storage": storage,
           "finetune_steps": a.finetune_steps, "finetune_lr": a.finetune_lr, "precisions": precisions,
           "torch": torch.__version__, "device": "cpu",
           "rows": [{k: v for k, v in r.items() if k != "_change"} for r in rows]}
    if a.out:
        a.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
