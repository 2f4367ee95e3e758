"""The exemplar level of Mnemonics Training inside a phase (SPEC §5): after the model level has trained Theta_i,
(b) optimise the new classes' exemplar pixels against the phase's real data, then (c) adjust the old classes'
exemplars with the A/B half-split. The algorithm lives in methods/mnemonics.py; this file only wires the trainer's
data and memory to it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.resident import ResidentTrainLoader
from ..exemplars.nme import class_mean
from ..methods.mnemonics import adjust_old_exemplars, optimise_exemplars, quantise_uint8


def _cycle(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for x, y in loader:
            yield x, y
        epoch += 1


def _store(trainer, bank: torch.Tensor, labels: torch.Tensor, classes) -> None:
    uint8 = trainer.cfg.mnemonics.storage == "uint8"
    for c in classes:
        px = bank[labels == c].detach()
        # uint8 storage is rounded, never truncated (the released code truncates, which darkens images)
        trainer.memory.pixels[c] = quantise_uint8(px).cpu() if uint8 else px.float().cpu()


def _change(new: torch.Tensor, old: torch.Tensor) -> tuple[str, float]:
    """How far the pixels moved, also in uint8 levels: under half a level nothing survives uint8 storage, and a
    bilevel gradient's size scales with 1/(number of exemplars in the inner loss), so one beta moves the 1000 base
    exemplars of phase 0 far less than the 100 of a later phase (docs/mnemonics.md; mnemonics.lr_scale=exemplars
    evens that out). Returns (log text, uint8 levels)."""
    d = float((new - old).abs().mean())
    return f"mean |change| {d:.2e} ({d * 255:.2f} uint8 levels)", d * 255


@torch.no_grad()
def _normalised_features(trainer, model, pixels: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    f = F.normalize(trainer.pixel_features(model, pixels), dim=1)
    model.train(was_training)
    return f


def _feature_drift(trainer, model, before: dict, after: torch.Tensor, labels: torch.Tensor, classes,
                   seen_means: torch.Tensor) -> tuple[str, dict]:
    """How far the exemplar level moved the exemplars where it matters: in the model's feature space, which the NME
    class means and the next phases' training see. A few uint8 levels along a gradient direction can move a network's
    features a lot (the tin100a-32 runs lost NME that way; docs/mnemonics.md). Cosine of each exemplar's normalised
    features before/after, and of each class's NME mean (single view) before/after; for scale, how many classes'
    means moved further than the distance from their start to the nearest other seen class's mean (`seen_means`).
    And the share of the exemplars the model's own classifier gets right, before and after: the paper's one-step
    objective can be lowered by making exemplars harder (docs/mnemonics.md, "What the objective rewards"), and a
    falling share is that happening.
    `before`: class -> normalised features at the start of the exemplar level; `after`: the stored pixels of
    `classes`, in class order. Same pixels on every rank, so the same numbers; no collective."""
    classes = list(classes)
    fa = _normalised_features(trainer, model, after)
    labels = labels.to(fa.device)
    per = torch.cat([(before[c] * fa[labels == c]).sum(1) for c in classes])
    means = torch.stack([class_mean(before[c]) @ class_mean(fa[labels == c]) for c in classes])
    sim = seen_means @ seen_means.T
    sim.fill_diagonal_(-2.0)
    nearest = sim.max(1).values[classes] if len(seen_means) > 1 else torch.full_like(means, -1.0)
    # the cosine head's prediction: argmax of cos(f, w_c) (sigma > 0 scales every logit alike)
    w = F.normalize(model.head.full_weight().detach().float(), dim=1).to(fa.device)
    acc_before = torch.cat([(before[c] @ w.T).argmax(1) == c for c in classes]).float().mean() * 100
    acc_after = ((fa @ w.T).argmax(1) == labels).float().mean() * 100
    out = {"exemplar_feature_cosine_mean": float(per.mean()), "exemplar_feature_cosine_min": float(per.min()),
           "class_mean_cosine_mean": float(means.mean()), "class_mean_cosine_min": float(means.min()),
           "nearest_other_class_mean_cosine_mean": float(nearest.mean()),
           "classes_moved_past_nearest_neighbour": int((means < nearest).sum()),
           "exemplar_accuracy_before": float(acc_before), "exemplar_accuracy_after": float(acc_after)}
    return (f"features vs before: exemplar cosine {out['exemplar_feature_cosine_mean']:.4f} (min "
            f"{out['exemplar_feature_cosine_min']:.4f}), class mean cosine {out['class_mean_cosine_mean']:.5f} (min "
            f"{out['class_mean_cosine_min']:.5f}; nearest other class {out['nearest_other_class_mean_cosine_mean']:.4f},"
            f" {out['classes_moved_past_nearest_neighbour']} of {len(classes)} moved further); exemplars classified "
            f"correctly {out['exemplar_accuracy_before']:.1f}% -> {out['exemplar_accuracy_after']:.1f}%"), out


def run_mnemonics(trainer, model, info, new_idx: torch.Tensor, seed: int) -> dict:
    """Runs (b) and (c); returns what they did, for the phase's metrics: per level, the pixel change in uint8 levels
    and the feature drift of `_feature_drift`."""
    cfg = trainer.cfg.mnemonics
    num_seen = info.num_old + info.num_new
    new = list(range(info.num_old, num_seen))
    common = dict(mode=cfg.mode, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, momentum=cfg.momentum,
                  num_classes=num_seen, exemplar_chunk=cfg.exemplar_chunk or None,
                  cuda_graph=cfg.cuda_graph and trainer.device.type == "cuda",
                  # bf16 autocast on any device: CPUs with bf16 units (AVX512-BF16, AMX) run it faster too
                  autocast_dtype=torch.bfloat16 if cfg.bf16 else None,
                  progress=trainer.cfg.run.progress and trainer.dist.is_main, lr_scale=cfg.lr_scale,
                  inner_update=cfg.inner_update,
                  lean_conv=cfg.lean_conv_grad, shard_inner=cfg.shard_inner, compile_mode=cfg.compile,
                  allow_tf32=cfg.tf32)

    # proto (the released code's surrogate) needs every seen class's mean under the CURRENT model, as that code did
    means = trainer.compute_class_means(model, num_seen) if cfg.mode == "proto" else None

    # (b) new classes: bilevel steps against augmented batches of the phase's real new-class data
    pixels = torch.cat([trainer.exemplar_pixels(c) for c in new]).to(trainer.device)
    # every seen class's exemplar features before the exemplar level, for the drift report (old classes one at a
    # time: their pixels are not needed here)
    before = {c: _normalised_features(trainer, model, trainer.exemplar_pixels(c)) for c in range(info.num_old)}
    f_new = _normalised_features(trainer, model, pixels)
    labels_cpu = torch.cat([torch.full((len(trainer.memory.ranking[c]),), c, dtype=torch.long) for c in new])
    before.update({c: f_new[(labels_cpu == c).to(f_new.device)] for c in new})
    seen_means = torch.stack([class_mean(before[c]) for c in range(num_seen)])
    labels = labels_cpu.to(trainer.device)
    q_labels = trainer.y_train[new_idx]
    if trainer.ds.resident:
        qloader = ResidentTrainLoader(trainer.x_train, new_idx, q_labels, None, cfg.query_batch_size, trainer.device,
                                      trainer.dist.rank, trainer.dist.world, seed + 3,
                                      pad=trainer.cfg.data.crop_padding, drop_last=True)  # fixed shape: CUDA graph
    else:
        qloader = trainer._train_loader(new_idx, q_labels, None, seed + 3, cfg.query_batch_size)
    new_px = optimise_exemplars(model, pixels, labels, _cycle(qloader), outer_steps=cfg.outer_steps, lr=cfg.lr,
                                class_means=means, **common)
    _store(trainer, new_px, labels, new)
    scaled = cfg.lr_scale == "exemplars"
    text, levels = _change(new_px, pixels)
    stored = torch.cat([trainer.exemplar_pixels(c) for c in new]).to(trainer.device)  # as kept (uint8: rounded)
    drift_text, drift = _feature_drift(trainer, model, before, stored, labels, new, seen_means)
    trainer.log(f"mnemonics (b): {len(labels)} exemplars of {len(new)} new classes, {cfg.outer_steps} outer steps, "
                f"beta1 {cfg.lr:g}" + (f" x {len(labels)} exemplars" if scaled else "") + f", {text}; {drift_text}")
    report = {"new": {"pixel_change_uint8_levels": levels, **drift}}

    # (c) old classes: every class split in halves A/B, each validated on the other (new classes included for balance)
    if cfg.adjust_old and info.num_old > 0 and cfg.old_outer_steps > 0:
        seen = list(range(num_seen))
        parts = [trainer.exemplar_pixels(c).to(trainer.device) for c in seen]
        bank = torch.cat(parts)
        lab = torch.cat([torch.full((len(p),), c, dtype=torch.long, device=trainer.device)
                         for c, p in zip(seen, parts)])
        g = torch.Generator().manual_seed(seed + 4)   # same seed on every rank: identical split
        out = adjust_old_exemplars(model, bank, lab, outer_steps=cfg.old_outer_steps, lr=cfg.old_lr, generator=g,
                                   query_batch_size=cfg.query_batch_size, class_means=means,
                                   update_mask=lab < info.num_old, **common)
        _store(trainer, out, lab, range(info.num_old))
        text, levels = _change(out, bank)
        old = lab < info.num_old
        stored = torch.cat([trainer.exemplar_pixels(c) for c in range(info.num_old)]).to(trainer.device)
        drift_text, drift = _feature_drift(trainer, model, before, stored, lab[old], range(info.num_old),
                                           seen_means)
        trainer.log(f"mnemonics (c): adjusted {int(old.sum())} old-class exemplars, beta2 "
                    f"{cfg.old_lr:g}" + (f" x about {len(lab) // 2} exemplars (one half)" if scaled else "")
                    + f", {text}; {drift_text}")
        report["old"] = {"pixel_change_uint8_levels": levels, **drift}
    return report
