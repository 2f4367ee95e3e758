"""How far a mnemonics run's exemplar level moved its exemplars in feature space, from the run's checkpoints: for runs
made before the trainer reported it (trainer/mnemonics_stage.py now logs it for every level), and with one more
number for scale, how close each class's NME mean already was to its nearest other class.

For each class with stored (optimised) pixels in the phase's checkpoint, under that phase's model: the features of
the class's original images (its ranking: the herding or random picks the level started from) against those of the
stored pixels. Reports the mean pixel change (uint8 levels), the cosine of each exemplar's normalised features
before/after, the cosine of each class's NME mean (single view) before/after, and the cosine from each class's
original mean to the nearest other class's. A class mean that moves further than the distance to its nearest
neighbour can change NME's predictions.

    python bench/exemplar_drift.py --runs runs/A runs/B [--phase 0] --out drift.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mnemonics_fast.config import load_config  # noqa: E402
from mnemonics_fast.data import load_dataset  # noqa: E402
from mnemonics_fast.exemplars.nme import class_mean  # noqa: E402
from mnemonics_fast.models import build_model  # noqa: E402


@torch.no_grad()
def drift(run: Path, phase: int, images_cache: dict) -> dict:
    cfg = load_config(run / "config.yaml")
    ckpt = run / "checkpoints" / f"phase_{phase:03d}.pt"
    if not ckpt.is_file():
        raise SystemExit(f"error: {ckpt} does not exist (the run kept no checkpoint for phase {phase})")
    key = (str(cfg.data.dataset), str(cfg.data.root))
    if key not in images_cache:
        ds = load_dataset(cfg.data, progress=False)
        if ds.train.images is None:
            raise SystemExit("error: exemplar_drift supports in-memory (small-image) datasets")
        images_cache[key] = (ds, ds.train.images.permute(0, 3, 1, 2).float() / 255.0)
    ds, images = images_cache[key]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model = build_model(cfg.model.arch, ds.mean, ds.std, structure=state["structure"])
    model.load_state_dict(state["model"])
    model.eval()
    ranking, pixels = state["memory"]["ranking"], state["memory"]["pixels"]
    if not pixels:
        raise SystemExit(f"error: {ckpt} holds no optimised pixels (mnemonics.enabled was false)")
    per_exemplar, mean_cos, change, means_before = [], [], [], []
    for c in sorted(pixels):
        before = images[ranking[c]]
        after = pixels[c].float() / (255.0 if pixels[c].dtype == torch.uint8 else 1.0)
        fb = F.normalize(model.features(before), dim=1)
        fa = F.normalize(model.features(after), dim=1)
        per_exemplar.append((fb * fa).sum(1))
        mb = class_mean(fb)
        means_before.append(mb)
        mean_cos.append(float(mb @ class_mean(fa)))
        change.append(float((after - before).abs().mean()) * 255)
    ex = torch.cat(per_exemplar)
    cm = torch.tensor(mean_cos)
    sim = torch.stack(means_before) @ torch.stack(means_before).T
    sim.fill_diagonal_(-2.0)
    nearest = sim.max(1).values
    return {"run": run.name, "phase": phase, "classes": len(pixels),
            "pixel_change_uint8_levels": sum(change) / len(change),
            "exemplar_feature_cosine_mean": float(ex.mean()), "exemplar_feature_cosine_min": float(ex.min()),
            "class_mean_cosine_mean": float(cm.mean()), "class_mean_cosine_min": float(cm.min()),
            "nearest_other_class_mean_cosine_mean": float(nearest.mean()),
            "classes_moved_past_nearest_neighbour": int((cm < nearest).sum())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", type=Path, required=True)
    ap.add_argument("--phase", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    cache: dict = {}
    rows = [drift(run, a.phase, cache) for run in a.runs]
    for r in rows:
        print(f"{r['run']:>24} phase {r['phase']}: {r['pixel_change_uint8_levels']:.2f} uint8 levels | exemplar cosine "
              f"{r['exemplar_feature_cosine_mean']:.4f} (min {r['exemplar_feature_cosine_min']:.4f}) | class mean "
              f"cosine {r['class_mean_cosine_mean']:.4f} (min {r['class_mean_cosine_min']:.4f}) | nearest other "
              f"class {r['nearest_other_class_mean_cosine_mean']:.4f} | {r['classes_moved_past_nearest_neighbour']}"
              f" of {r['classes']} classes moved further than that")
    if a.out:
        a.out.write_text(json.dumps({"bench": "exemplar_drift", "rows": rows}, indent=2) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
