"""Real-data experiments on the tin100a-32 development set (B50 + 10 phases of 5, LUCIR, 20 exemplars per class),
with a schedule shortened to fit a short GPU slot (every phase `--epochs` epochs, lr x0.1 at 50% and 75% of them,
instead of 160 with steps at 80/120):

1. sweep: the mnemonics exemplar-level hyperparameters (beta1 = mnemonics.lr, alpha = mnemonics.inner_lr) on the
   first `--sweep-phases` incremental phases, all branched (run.branch_from) from one shared phase-0 model: phase 0's
   exemplar level (herding selection, then mnemonics on the 50 base classes) is redone in every run,
   scored by the average CNN accuracy over those phases on the set's val split (development data only);
2. compare: LUCIR with random, herding and mnemonics exemplars (the sweep's best setting), full 10-phase runs, for
   each of `--seeds` (the three runs of a seed branch from one phase-0 model: paired; mean +- std over seeds);
3. project the wall time of the full 160-epoch schedule from each phase's measured per-epoch training time.

Runs go in parallel as separate processes on the one GPU (each is launch-bound): every seed's phase-0 model at once,
then the sweep together with the random and herding comparison runs (they do not depend on the sweep), then the
mnemonics runs with the sweep's best setting. So the measured wall times are those of a shared card; the herding run's projection is the one to quote for a dedicated card (`--solo-herding`).

    python bench/tin100_experiments.py --root ~/.cache/mnemonics_fast/tin100a-32 --out bench/results/tin100_h100.json

On SIGTERM (the `timeout` at the end of a device call) during the comparison it stops the runs and still writes the
JSON: marked `cut_short`, every run's finished phases, and the summary over the phases every run finished.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch


def launch(name: str, overrides: list[str], a, log_dir: Path, seed: int | None = None,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    """One training run as its own process (a.config, a.root, a.runs, a.epochs, a.seed, a.overrides; `env` adds to
    this process's environment); its console output goes to log_dir/name.log."""
    cmd = [sys.executable, "-m", "mnemonics_fast.train", "--config", a.config,
           *([f"data.root={a.root}"] if a.root else []), f"run.output_dir={a.runs}", f"run.name={name}", "run.progress=false", "run.tensorboard=false",
           f"train.epochs={a.epochs}", f"train.milestones=[{a.epochs // 2},{a.epochs * 3 // 4}]",
           f"seed={a.seed if seed is None else seed}", *a.overrides, *overrides]
    log = open(log_dir / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    _CHILDREN.append(proc)
    return proc


def wait_all(procs: dict[str, subprocess.Popen]) -> dict[str, int]:
    return {n: p.wait() for n, p in procs.items()}


def metrics(a, name: str) -> dict | None:
    f = Path(a.runs) / name / "metrics.json"
    return json.loads(f.read_text()) if f.is_file() else None


def pixel_change(a, name: str) -> dict:
    """How far mnemonics moved the pixels, per exemplar level, in uint8 levels (from the run's log.txt lines
    "mnemonics (b|c): ... (X uint8 levels)"): under half a level nothing survives uint8 storage."""
    f = Path(a.runs) / name / "log.txt"
    out: dict[str, list[float]] = {}
    for line in (f.read_text().splitlines() if f.is_file() else []):
        m = re.search(r"mnemonics \((b|c)\):.*\(([0-9.]+) uint8 levels\)", line)
        if m:
            out.setdefault(m.group(1), []).append(float(m.group(2)))
    return out


class Stopped(Exception):
    """SIGTERM (e.g. `timeout` at the end of a device call): stop the runs, write what they measured."""


def _on_sigterm(signum, frame):
    raise Stopped()


_CHILDREN: list[subprocess.Popen] = []


def stop_children(grace_s: float = 10.0) -> None:
    for p in _CHILDREN:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + grace_s
    for p in _CHILDREN:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()


def wait_or_stop(procs: dict[str, subprocess.Popen]) -> tuple[dict[str, int | None], bool]:
    """wait_all, unless SIGTERM comes first: then every run is stopped. Returns (exit codes, stopped)."""
    try:
        return wait_all(procs), False
    except Stopped:
        print("SIGTERM: stopping the runs; summarising the phases they finished", flush=True)
        stop_children()
        return {n: p.returncode for n, p in procs.items()}, True


def run_main(main_fn) -> None:
    """The scripts' entry: SIGTERM raises Stopped; one that arrives outside a wait_or_stop stops the runs and exits."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main_fn()
    except Stopped:
        stop_children()
        sys.exit(143)


def compare_summary(a, names: list[str], rcs: dict[str, int | None]) -> dict:
    """The comparison's runs, summarised from their metrics.json files; complete or not. Each run's own average
    covers the phases it finished; `common_phases` is the last phase every run with metrics reached, and
    `avg_incremental_acc_common` averages phases 1..common_phases in every run, so runs cut short by a time limit are
    still compared over the same phases (the summary uses it)."""
    comp, ms = {}, {}
    for name in names:
        m = metrics(a, name)
        comp[name] = {"rc": rcs.get(name)}
        if m and len(m["top1"]["cnn"]) > 1:
            ms[name] = m
            comp[name].update({
                "phases_done": len(m["phases"]),
                "avg_incremental_acc": m["avg_incremental_acc"], "last_acc": m["last_acc"], "top1": m["top1"],
                "forgetting": m["forgetting"], "pixel_change_uint8_levels": pixel_change(a, name),
                # per phase: pixel change and feature drift of the exemplar levels (b) "new" and (c) "old"
                "mnemonics_levels": [p.get("mnemonics") for p in m["phases"]],
                "phase_wall_s": [p["wall_s"] for p in m["phases"]],
                "phase_train_img_per_s": [p["train_img_per_s"] for p in m["phases"]],
                "total_wall_s": sum(p["wall_s"] for p in m["phases"]),
                "projected_full_schedule_s": projected_full_s(m, a.epochs)})
    common = min((len(m["top1"]["cnn"]) - 1 for m in ms.values()), default=0)
    for name, m in ms.items():
        comp[name]["avg_incremental_acc_common"] = {
            k: sum(m["top1"][k][1:common + 1]) / common for k in ("cnn", "nme")}
        print(f"{name:>20}: {comp[name]['phases_done']} phases, avg inc acc CNN "
              f"{m['avg_incremental_acc']['cnn']:.2f} NME {m['avg_incremental_acc']['nme']:.2f} | "
              f"{comp[name]['total_wall_s']:.0f} s (projected 160-epoch: "
              f"{comp[name]['projected_full_schedule_s'] / 60:.1f} min, shared GPU)", flush=True)
    summary = {}
    for method in ("random", "herding", "mnemonics", "mnemonics_normalised"):
        for kind in ("cnn", "nme"):
            xs = [r["avg_incremental_acc_common"][kind] for n, r in comp.items()
                  if (n == f"lucir_{method}" or re.fullmatch(f"lucir_{method}_s[0-9]+", n))
                  and "avg_incremental_acc_common" in r]
            if xs:
                mean = sum(xs) / len(xs)
                std = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else None
                summary.setdefault(method, {})[kind] = {"mean": mean, "std": std, "n": len(xs)}
    for method, k in summary.items():
        print(f"{method:>10} over {k['cnn']['n']} seed(s), phases 1..{common}: CNN {k['cnn']['mean']:.2f}"
              + (f" +- {k['cnn']['std']:.2f}" if k['cnn']['std'] is not None else "")
              + f"  NME {k['nme']['mean']:.2f}" + (f" +- {k['nme']['std']:.2f}" if k['nme']['std'] is not None else ""))
    complete = bool(rcs) and all(rc == 0 for rc in rcs.values())
    return {"runs": comp, "summary": summary, "common_phases": common, "complete": complete}


def projected_full_s(m: dict, epochs: int, full_epochs: int = 160) -> float:
    """Per phase: training time scaled to the full schedule + the phase's measured non-training time."""
    return sum(p["train_s"] * full_epochs / epochs + (p["wall_s"] - p["train_s"]) for p in m["phases"])


def _sweep_name(lr: float, alpha: float, scale: str, update: str = "sgd") -> str:
    return (f"sweep_lr{lr:g}_alpha{alpha:g}" + ("" if scale == "none" else f"_{scale}")
            + ("" if update == "sgd" else f"_{update}"))


def _mn_setting(lr, alpha, scale: str, update: str = "sgd") -> list[str]:
    """Overrides of one mnemonics setting. With lr_scale=exemplars beta2 (old_lr) is per exemplar too: it is set to
    beta1 / 2, the defaults' ratio (the default old_lr 0.5 would be multiplied by ~500 exemplars). update: the inner
    step (mnemonics.inner_update: sgd, the paper, or normalised)."""
    ov = [f"mnemonics.lr={lr}", f"mnemonics.inner_lr={alpha}", f"mnemonics.lr_scale={scale}",
          f"mnemonics.inner_update={update}"]
    return ov + ([f"mnemonics.old_lr={float(lr) / 2:g}"] if scale == "exemplars" else [])


def _parse_sweep_name(name: str) -> tuple[str, str, str, str]:
    """_sweep_name's inverse: (lr, alpha, lr_scale, inner_update) as strings."""
    lr, rest = name.removeprefix("sweep_lr").split("_alpha")
    alpha, _, rest = rest.partition("_")
    update = "normalised" if rest.endswith("normalised") else "sgd"
    scale = rest.removesuffix("normalised").rstrip("_")
    return lr, alpha, scale or "none", update


def _parse_best(text: str) -> tuple[str, str, str, str]:
    """--best / --best-normalised: 'lr,alpha[,lr_scale[,inner_update]]'."""
    lr, al, *rest = text.split(",")
    return lr, al, rest[0] if rest else "none", rest[1] if len(rest) > 1 else "sgd"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=None, help="data.root (the tin100a-32 tree; not needed for demo_digits)")
    ap.add_argument("--config", default="tin100_10phase",
                    help="bundled config of every run (demo_digits: the same experiment on the embedded digits, CPU)")
    ap.add_argument("--runs", default="/tmp/mf_runs")
    ap.add_argument("--out", required=True)
    ap.add_argument("--logs", default=None, help="folder for the runs' console logs (default: next to --out)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="seed of the sweep")
    ap.add_argument("--seeds", default=None, help="seeds of the comparison, e.g. 0,1,2 (default: --seed)")
    ap.add_argument("--sweep-phases", type=int, default=3)
    ap.add_argument("--lrs", default="0.3,1,3", help="beta1 grid (pixel space)")
    ap.add_argument("--inner-lrs", default="0.01", help="alpha grid (0.1 lost on both metrics in the CPU sweep)")
    ap.add_argument("--scaled-lrs", default="0.01",
                    help="beta1 values run with mnemonics.lr_scale=exemplars (beta per exemplar: 0.01 equals beta1 1 "
                         "at 100 exemplars, a tin100 incremental phase; beta2 = beta1 / 2), each with every alpha; "
                         "'' for none")
    ap.add_argument("--normalised-lrs", default="",
                    help="beta1 values run with mnemonics.inner_update=normalised and lr_scale=exemplars, each with "
                         "every --normalised-alphas (the step's length); the comparison then also runs the best of "
                         "them as lucir_mnemonics_normalised. '' for none")
    ap.add_argument("--normalised-alphas", default="0.02",
                    help="alpha for the normalised inner step: its length in parameter space (0.02 is the paper-step "
                         "alpha 0.01 times |g_E| ~ 2 of a tin100a-32 phase-1 model, bench/exemplar_objective.py)")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--sweep-only", action="store_true", help="stop after the sweep (e.g. a CPU sweep)")
    ap.add_argument("--best", default=None, help="lr,inner_lr[,lr_scale[,inner_update]] to use without a sweep")
    ap.add_argument("--best-normalised", default=None,
                    help="without a sweep: also compare lucir_mnemonics_normalised with lr,inner_lr[,lr_scale] "
                         "(inner_update=normalised)")
    ap.add_argument("--extra", nargs="*", default=[], help="extra overrides for every mnemonics run")
    ap.add_argument("--overrides", nargs="*", default=[], help="overrides for every run (e.g. a small smoke test)")
    a = ap.parse_args()
    t_start = time.time()
    log_dir = Path(a.logs or Path(a.out).parent)
    log_dir.mkdir(parents=True, exist_ok=True)
    Path(a.runs).mkdir(parents=True, exist_ok=True)
    result = {"bench": "tin100_experiments", "card": torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"cpu ({os.cpu_count()} cores)", "torch": torch.__version__, "epochs_per_phase": a.epochs,
              "schedule": f"{a.epochs} epochs per phase, lr 0.1 x0.1 at {a.epochs // 2} and {a.epochs * 3 // 4}",
              "protocol": ("tin100a-32, B50 + 10 phases of 5, growing memory 20/class, LUCIR, ResNet-32"
                           if a.config == "tin100_10phase" else f"config {a.config}"),
              "overrides": a.overrides, "mnemonics_extra": a.extra,
              "seed": a.seed}
    mn = ["mnemonics.enabled=true", "mnemonics.init=herding", *a.extra]

    # ---------------------------------------------------------------- 0. the phase-0 models, all at once
    # The sweep's (seed --seed) and one per other comparison seed: each seed's three comparison runs branch from its
    # own phase-0 model (paired: they differ only in the exemplars).
    seeds = [] if a.sweep_only else [int(x) for x in (a.seeds or str(a.seed)).split(",")]
    sweep = not a.skip_sweep
    base_name = {sd: ("sweep_phase0" if sweep and sd == a.seed else f"compare_phase0_s{sd}") for sd in seeds}
    if sweep:
        base_name.setdefault(a.seed, "sweep_phase0")
    base_procs = {name: launch(name, ["run.stop_after_phase=0"], a, log_dir, seed=sd) for sd, name in base_name.items()}
    base_rcs = wait_all(base_procs)
    bases = {sd: Path(a.runs) / name / "checkpoints" / "phase_000.pt" for sd, name in base_name.items()}
    # A seed whose phase-0 run failed still gets its runs (each then trains its own phase 0), but they are no longer
    # paired: say so here and in the JSON rather than let the result claim a shared phase 0.
    shared = {sd: bases[sd].is_file() for sd in bases}
    for sd, ok in shared.items():
        if not ok:
            print(f"WARNING: seed {sd}: phase-0 run {base_name[sd]} ended with rc={base_rcs[base_name[sd]]} and no "
                  f"{bases[sd]}; its runs train their own phase 0 (not paired)", file=sys.stderr, flush=True)

    def branch(sd):
        return [f"run.branch_from={bases[sd]}"] if bases[sd].is_file() else []

    def sfx(sd):
        return "" if len(seeds) == 1 else f"_s{sd}"

    # ---------------------------------------------------------------- 1. sweep, with random/herding running beside it
    # LUCIR with random and with herding exemplars does not depend on the sweep's outcome, so those comparison runs
    # start now and share the GPU with the sweep (each run is launch-bound); only the mnemonics runs wait for it.
    procs = {}
    sweep_procs = {}
    if sweep:
        alphas = [float(x) for x in a.inner_lrs.split(",")]
        grid = list(itertools.product([float(x) for x in a.lrs.split(",") if x], alphas, ["none"], ["sgd"]))
        grid += list(itertools.product([float(x) for x in a.scaled_lrs.split(",") if x], alphas, ["exemplars"],
                                       ["sgd"]))
        grid += list(itertools.product([float(x) for x in a.normalised_lrs.split(",") if x],
                                       [float(x) for x in a.normalised_alphas.split(",") if x], ["exemplars"],
                                       ["normalised"]))
        stop = f"run.stop_after_phase={a.sweep_phases}"
        for name, ov in [("sweep_herding", [stop])] + [
                (_sweep_name(*setting), [stop, *mn, *_mn_setting(*setting)]) for setting in grid]:
            # branch: phase 0's model level is shared, its exemplar level is redone under each setting
            sweep_procs[name] = launch(name, [*ov, *branch(a.seed)], a, log_dir, a.seed)
    for sd in seeds:
        procs[f"lucir_random{sfx(sd)}"] = launch(f"lucir_random{sfx(sd)}", ["memory.selection=random", *branch(sd)],
                                                 a, log_dir, sd)
        procs[f"lucir_herding{sfx(sd)}"] = launch(f"lucir_herding{sfx(sd)}", branch(sd), a, log_dir, sd)
    if sweep:
        rcs, stopped = wait_or_stop(sweep_procs)
        ms = {name: metrics(a, name) for name in rcs}
        # scored over the incremental phases every sweep run finished (all of them, unless a time limit cut it)
        k = min((len(m["top1"]["cnn"]) - 1 for m in ms.values() if m and len(m["top1"]["cnn"]) > 1), default=0)
        rows = []
        for name, rc in rcs.items():
            m = ms[name]
            inc = m["top1"]["cnn"][1:k + 1] if m and len(m["top1"]["cnn"]) > k else []
            rows.append({"name": name, "rc": rc, "incremental_cnn": m["top1"]["cnn"][1:] if m else [],
                         "incremental_nme": m["top1"]["nme"][1:] if m else [],
                         "score_avg_cnn": sum(inc) / len(inc) if inc else None,
                         "pixel_change_uint8_levels": pixel_change(a, name),
                         "mnemonics_levels": [p.get("mnemonics") for p in m["phases"]] if m else []})
            print(f"sweep {name:>28}: rc {rc}  avg CNN over phases 1..{k}: {rows[-1]['score_avg_cnn']}", flush=True)
        ok = [r for r in rows if r["name"] != "sweep_herding" and r["score_avg_cnn"] is not None]
        paper = [r for r in ok if _parse_sweep_name(r["name"])[3] == "sgd"]
        unit = [r for r in ok if _parse_sweep_name(r["name"])[3] == "normalised"]
        best = max(paper, key=lambda r: r["score_avg_cnn"]) if paper else None
        best_unit = max(unit, key=lambda r: r["score_avg_cnn"]) if unit else None
        result["sweep"] = {"phases": a.sweep_phases, "scored_phases": k,
                           "grid": {"lr": a.lrs, "inner_lr": a.inner_lrs, "lr_scale=exemplars lr": a.scaled_lrs,
                                    "inner_update=normalised lr": a.normalised_lrs,
                                    "inner_update=normalised inner_lr": a.normalised_alphas},
                           "rows": rows, "best": best["name"] if best else None,
                           "best_normalised": best_unit["name"] if best_unit else None}
        if best:
            a.best = ",".join(_parse_sweep_name(best["name"]))
        if best_unit:
            a.best_normalised = ",".join(_parse_sweep_name(best_unit["name"]))
        # written now too, so a run cut short by its time limit keeps the sweep
        if stopped:
            result["cut_short"] = "SIGTERM (time limit) during the sweep: scored over the phases every run finished"
            # the random/herding comparison runs started beside the sweep: what they finished
            result["compare"] = compare_summary(a, list(procs), {n: p.returncode for n, p in procs.items()})
        result["total_s"] = time.time() - t_start
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        if stopped:
            print(f"wrote {a.out} (sweep cut short) in {result['total_s']:.0f} s")
            return
    setting = _parse_best(a.best or "1,0.01")
    unit_setting = None
    if a.best_normalised:
        lr_u, al_u, sc_u, _ = _parse_best(a.best_normalised)
        unit_setting = (lr_u, al_u, sc_u, "normalised")
    if a.sweep_only:
        print(f"wrote {a.out} (sweep only) in {result['total_s']:.0f} s")
        return

    # ---------------------------------------------------------------- 2. random vs herding vs mnemonics
    for sd in seeds:
        procs[f"lucir_mnemonics{sfx(sd)}"] = launch(f"lucir_mnemonics{sfx(sd)}",
                                                    [*mn, *_mn_setting(*setting), *branch(sd)], a, log_dir, sd)
        if unit_setting:
            procs[f"lucir_mnemonics_normalised{sfx(sd)}"] = launch(
                f"lucir_mnemonics_normalised{sfx(sd)}", [*mn, *_mn_setting(*unit_setting), *branch(sd)], a, log_dir,
                sd)
    lr, al, scale, update = setting
    result["compare"] = {"mnemonics_setting": {"lr": float(lr), "inner_lr": float(al), "lr_scale": scale,
                                               "inner_update": update},
                         **({"mnemonics_normalised_setting": {"lr": float(unit_setting[0]),
                                                              "inner_lr": float(unit_setting[1]),
                                                              "lr_scale": unit_setting[2]}}
                            if unit_setting else {}),
                         "seeds": seeds, "shared_phase0_per_seed": {str(sd): shared[sd] for sd in seeds},
                         "note": "all runs shared one GPU concurrently; wall times include that contention"}
    rcs, stopped = wait_or_stop(procs)
    if stopped:
        result["cut_short"] = "SIGTERM (time limit): runs stopped; compared over the phases every run finished"
    result["compare"].update(compare_summary(a, list(procs), rcs))
    result["total_s"] = time.time() - t_start
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out} in {result['total_s']:.0f} s")


if __name__ == "__main__":
    run_main(main)
