"""Plots of a run, written as PNG:

    python -m mnemonics_fast.plots curve --run runs/NAME [--compare runs/OTHER ...]
        accuracy per phase (CNN and NME) of one or several runs
    python -m mnemonics_fast.plots tsne --run runs/NAME_OF_A_MNEMONICS_RUN [--classes 5] [--phases 0 LAST]
        the paper's Figure 1: t-SNE of 5 classes' exemplars - random, herding and mnemonics - over the features of
        those classes' real training images, in two phases (features from each phase's checkpointed model)
    python -m mnemonics_fast.plots drift --run runs/NAME_OF_A_MNEMONICS_RUN [--compare runs/OTHER ...]
        per phase, how far each exemplar level moved the exemplars: pixels (uint8 levels) and features (cosine of
        each exemplar's and each class mean's features to where they started), new classes (b) and old classes (c)
    python -m mnemonics_fast.plots compare --json bench/results/digits_exemplars_cpu.json [MORE.json ...] [--out P]
        a comparison benchmark's runs (bench/tin100_experiments.py, bench/kernels_ab_train.py): accuracy per phase of
        each method or way, mean over seeds with the range between them shaded, CNN and NME side by side
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _accuracy_axes(ax) -> None:
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(plt, fig, out: Path, dpi: int, rect=None) -> Path:
    fig.tight_layout(rect=rect)   # rect: room kept free for a figure-level legend
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _metrics(run: Path) -> dict:
    """A run folder's metrics.json (written when its first phase completes), or a clear error."""
    f = run / "metrics.json"
    if not f.is_file():
        why = "is not a folder" if not run.is_dir() else "has no metrics.json: no phase of it has completed yet"
        raise SystemExit(f"error: run {run} {why} (give the run folder, runs/<run.name>)")
    return json.loads(f.read_text())


def plot_curve(runs: list[Path], out: Path) -> Path:
    from matplotlib.ticker import MaxNLocator
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = plt.get_cmap("tab10")
    for i, run in enumerate(runs):   # one colour per run: CNN solid, NME dashed
        m = _metrics(run)
        classes = [p["num_classes"] for p in m["phases"]]
        for kind, style in (("cnn", "-o"), ("nme", "--s")):
            avg = m["avg_incremental_acc"][kind]
            ax.plot(classes, m["top1"][kind], style, ms=3, color=colours(i % 10),
                    label=f"{run.name} {kind.upper()} (avg {avg:.2f})")
    ax.set_xlabel("number of classes seen")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _accuracy_axes(ax)
    return _save(plt, fig, out, 150)


def _compare_runs(obj, found: dict | None = None) -> dict[str, dict]:
    """Every run record under a "runs" key of a benchmark JSON, as {name: {"top1": {cnn: [...], nme: [...]}}}: runs
    written as top1 = {cnn, nme} (tin100_experiments.py, kernels_ab_train.py) or as top1_cnn / top1_nme lists (the
    summaries of runs cut short, e.g. tin100_compare_scaled_h100.json)."""
    found = {} if found is None else found
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "runs" and isinstance(v, dict):
                for n, r in v.items():
                    if not isinstance(r, dict):
                        continue
                    if isinstance(r.get("top1"), dict) and r["top1"].get("cnn"):
                        found[n] = r
                    elif r.get("top1_cnn") and r.get("top1_nme"):
                        found[n] = {**r, "top1": {"cnn": r["top1_cnn"], "nme": r["top1_nme"]}}
            else:
                _compare_runs(v, found)
    return found


def plot_compare(files: list[Path], out: Path) -> Path:
    """One row per JSON file; runs named METHOD or METHOD_s<seed> are grouped by METHOD ("lucir_" dropped)."""
    import re

    from matplotlib.ticker import MaxNLocator
    plt = _plt()
    fig, axes = plt.subplots(len(files), 2, figsize=(12, 4 * len(files)), squeeze=False)
    for row, f in zip(axes, files):
        runs = _compare_runs(json.loads(f.read_text()))
        if not runs:
            raise SystemExit(f"error: {f} holds no runs with per-phase accuracy (a tin100_experiments.py or "
                             f"kernels_ab_train.py result is expected)")
        groups: dict[str, list[dict]] = {}
        for name, r in sorted(runs.items()):
            groups.setdefault(re.sub(r"_s\d+$", "", name).removeprefix("lucir_"), []).append(r["top1"])
        for ax, kind in zip(row, ("cnn", "nme")):
            # The legend's averages cover the phases every run of the file finished, so that a run cut short is
            # compared over the same phases as the others (the curves still show all it did).
            common = min(len(t[kind]) for tops in groups.values() for t in tops)
            cut = any(len(t[kind]) > common for tops in groups.values() for t in tops)
            for method, tops in groups.items():
                n = min(len(t[kind]) for t in tops)   # phases every seed of this method finished
                acc = torch.tensor([t[kind][:n] for t in tops], dtype=torch.float64)
                mean = acc.mean(0)
                x = list(range(n))
                ax.plot(x, mean.tolist(), "-o", ms=3,
                        label=f"{method} (avg {float(mean[:common].mean()):.2f}, {len(tops)} "
                              f"seed{'s' if len(tops) > 1 else ''})")
                if len(tops) > 1:
                    ax.fill_between(x, acc.min(0).values.tolist(), acc.max(0).values.tolist(), alpha=0.15)
            ax.set_title(f"{f.name}: {kind.upper()}" + (f" (avg over phases 0-{common - 1}, which every run finished)"
                                                         if cut else ""), fontsize=9)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("phase")
            _accuracy_axes(ax)
    return _save(plt, fig, out, 130)


def plot_drift(runs: list[Path], out: Path) -> Path:
    """From metrics.json's per-phase "mnemonics" reports (trainer/mnemonics_stage.py)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    panels = (("pixel_change_uint8_levels", "mean |pixel change| (uint8 levels)"),
              ("exemplar_feature_cosine_mean", "exemplar features: cosine to start (mean)"),
              ("class_mean_cosine_mean", "NME class means: cosine to start (mean)"),
              ("classes_moved_past_nearest_neighbour", "classes whose mean moved past its nearest other class"))
    drawn: set[str] = set()
    for run in runs:
        phases = _metrics(run)["phases"]
        if not any("mnemonics" in p for p in phases):
            raise SystemExit(f"error: {run} has no exemplar-level reports in metrics.json (mnemonics.enabled was false, "
                             "or the run predates them)")
        for level, style in (("new", "-o"), ("old", "--s")):
            pts = [(p["phase"], p["mnemonics"][level]) for p in phases if level in p.get("mnemonics", {})]
            if not pts:
                continue
            for ax, (key, _) in zip(axes, panels):
                pts_k = [(ph, r[key]) for ph, r in pts if key in r]   # older runs lack the last panel's count
                if not pts_k:
                    continue
                drawn.add(key)
                ax.plot([ph for ph, _ in pts_k], [v for _, v in pts_k], style, ms=3,
                        label=f"{run.name} ({'b' if level == 'new' else 'c'}: {level} classes)")
    from matplotlib.ticker import MaxNLocator
    for ax, (key, title) in zip(axes, panels):
        ax.set_xlabel("phase")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key == "classes_moved_past_nearest_neighbour":   # a count of classes
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if key not in drawn:
            ax.text(0.5, 0.5, "not recorded in these runs", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(plt, fig, out, 150)


def plot_tsne(run: Path, out: Path, num_classes: int = 5, phases: list[int] | None = None, seed: int = 0) -> Path:
    """Needs a run with mnemonics enabled (pixels stored) and init=herding (rankings are the herding picks)."""
    from sklearn.manifold import TSNE

    from .config import load_config
    from .data import class_order, load_dataset
    from .models import build_model

    cfg = load_config(run / "config.yaml")
    if not cfg.mnemonics.enabled:
        raise SystemExit(f"error: {run} ran without mnemonics (mnemonics.enabled=false): the figure compares random, "
                         f"herding and mnemonics exemplars, so it needs a run with mnemonics.enabled=true")
    if cfg.mnemonics.init != "herding":
        # the stored ranking is what the run picked; drawn as "herding" it would mislabel random picks
        raise SystemExit(f"error: {run} picked its initial exemplars with mnemonics.init={cfg.mnemonics.init}, so its "
                         f"stored ranking is not herding; the figure needs a run with mnemonics.init=herding")
    ckpts = sorted((run / "checkpoints").glob("phase_*.pt"))
    if not ckpts:
        raise SystemExit(f"error: no checkpoints in {run / 'checkpoints'}")
    if phases is None:
        phases = sorted({0, len(ckpts) - 1})
    missing = [ph for ph in phases if not (run / "checkpoints" / f"phase_{ph:03d}.pt").is_file()]
    if missing:
        raise SystemExit(f"error: {run} has no checkpoint for phase(s) {missing} (it has {len(ckpts)}: "
                         f"{', '.join(p.stem for p in ckpts)})")
    ds = load_dataset(cfg.data, progress=False)
    order = class_order(ds.num_classes, cfg.protocol.class_order_seed)
    remap = torch.empty(ds.num_classes, dtype=torch.long)
    remap[torch.tensor(order)] = torch.arange(ds.num_classes)
    y = remap[ds.train.labels]
    if ds.train.images is None:
        raise SystemExit("error: tsne supports in-memory (small-image) datasets")
    images = ds.train.images.permute(0, 3, 1, 2).float() / 255.0
    plt = _plt()
    fig, axes = plt.subplots(len(phases), 3, figsize=(12, 4 * len(phases)), squeeze=False)
    colours = plt.get_cmap("tab10")
    g = torch.Generator().manual_seed(seed)
    classes = None   # the same classes in every row: the first phase's first `num_classes` (the paper's Figure 1)
    for row, ph in enumerate(phases):
        state = torch.load(run / "checkpoints" / f"phase_{ph:03d}.pt", map_location="cpu", weights_only=False)
        model = build_model(cfg.model.arch, ds.mean, ds.std, structure=state["structure"])
        model.load_state_dict(state["model"])
        model.eval()
        ranking, pixels = state["memory"]["ranking"], state["memory"]["pixels"]
        if classes is None:
            classes = sorted(ranking)[:num_classes]
            if len(classes) < num_classes:
                print(f"note: phase {ph} holds {len(classes)} classes; drawing those {len(classes)} in every row",
                      file=sys.stderr)
        if not all(c in pixels for c in classes):
            raise SystemExit(f"error: {run} phase {ph} has no mnemonics pixels for classes {classes}")
        with torch.no_grad():
            feats, kinds, labs = [], [], []
            for c in classes:
                idx = torch.nonzero(y == c).flatten()
                m = len(ranking[c])
                sets = {"real": images[idx], "herding": images[ranking[c]],
                        "random": images[idx[torch.randperm(len(idx), generator=g)[:m]]],
                        "mnemonics": pixels[c].float() / (255.0 if pixels[c].dtype == torch.uint8 else 1.0)}
                for kind, x in sets.items():
                    f = torch.cat([model.features(x[i:i + 512]) for i in range(0, len(x), 512)])
                    feats.append(torch.nn.functional.normalize(f, dim=1))
                    kinds += [kind] * len(x)
                    labs += [c] * len(x)
        emb = TSNE(n_components=2, init="pca", random_state=seed, perplexity=30).fit_transform(
            torch.cat(feats).numpy())
        kinds_t, labs_t = kinds, torch.tensor(labs)
        for col, kind in enumerate(("random", "herding", "mnemonics")):
            ax = axes[row][col]
            for j, c in enumerate(classes):
                real = [(k == "real" and int(l) == c) for k, l in zip(kinds_t, labs_t)]
                sel = [(k == kind and int(l) == c) for k, l in zip(kinds_t, labs_t)]
                ax.scatter(emb[real, 0], emb[real, 1], s=3, alpha=0.15, color=colours(j))
                ax.scatter(emb[sel, 0], emb[sel, 1], s=30, marker="*", edgecolor="k", linewidth=0.4, color=colours(j))
            ax.set_title(f"phase {ph}: {kind} exemplars (stars) over real data (dots)", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours(j), label=f"class {c}")
               for j, c in enumerate(classes)]
    fig.legend(handles=handles, loc="lower center", ncol=len(classes), fontsize=8, frameon=False)
    print(f"tsne: classes {classes} (positions in the class order) in phases {phases}", file=sys.stderr)
    return _save(plt, fig, out, 130, rect=(0, 0.045 / len(phases), 1, 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mnemonics_fast.plots", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("curve")
    c.add_argument("--run", required=True, type=Path)
    c.add_argument("--compare", nargs="*", type=Path, default=[])
    c.add_argument("--out", type=Path, default=None)
    d = sub.add_parser("drift")
    d.add_argument("--run", required=True, type=Path)
    d.add_argument("--compare", nargs="*", type=Path, default=[])
    d.add_argument("--out", type=Path, default=None)
    t = sub.add_parser("tsne")
    t.add_argument("--run", required=True, type=Path)
    t.add_argument("--classes", type=int, default=5)
    t.add_argument("--phases", type=int, nargs="*", default=None)
    t.add_argument("--out", type=Path, default=None)
    k = sub.add_parser("compare")
    k.add_argument("--json", required=True, nargs="+", type=Path)
    k.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.cmd == "compare":
        missing = [str(f) for f in a.json if not f.is_file()]
        if missing:
            print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
            return 2
        out = plot_compare(a.json, a.out or a.json[0].with_suffix(".png"))
        print(f"wrote {out}")
        return 0
    if not (a.run / "config.yaml").is_file():
        print(f"error: {a.run} is not a run directory (no config.yaml)", file=sys.stderr)
        return 2
    if a.cmd == "curve":
        out = plot_curve([a.run, *a.compare], a.out or a.run / "accuracy_curve.png")
    elif a.cmd == "drift":
        out = plot_drift([a.run, *a.compare], a.out or a.run / "exemplar_drift.png")
    else:
        out = plot_tsne(a.run, a.out or a.run / "tsne_exemplars.png", a.classes, a.phases)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
