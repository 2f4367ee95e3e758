"""The trainer with the CUDA kernels against the trainer on the plain-PyTorch references
(MNEMONICS_FAST_FORCE_REFERENCE=1): the same runs, both ways, for several seeds, all at once on one GPU. The question
is whether the kernels change what training learns. `--compare bf16` / `--compare tf32` ask the same of the exemplar
level's speed options (mnemonics.bf16 / mnemonics.tf32 against full fp32), with the exemplar level on. The two ways
round differently, so the runs are not bit-identical; the test is that each seed's difference between the two
(paired) stays within the spread between seeds.

    python bench/kernels_ab_train.py --root /path/to/tin100a-32 --epochs 4 --seeds 0,1,2 --out ab.json

Every run's log names the path its ops took ("ops: ..."); the JSON keeps that line, so a run that silently fell back
would show. With --mnemonics the exemplar level runs too (exemplar_sgd_step_ and the head's double backward). On
SIGTERM (a time limit) it stops the runs and writes what they finished, marked cut_short.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tin100_experiments import launch, metrics, run_main, wait_or_stop  # noqa: E402

# --compare: the two ways of each A/B, (name, environment, overrides), the one under test first; the paired
# difference is first minus second. bf16/tf32 change only the exemplar level's arithmetic (mnemonics.bf16,
# mnemonics.tf32), so they run it (--mnemonics implied); tf32 is a no-op on a CPU.
COMPARES = {
    "kernels": (("kernels", {}, []), ("reference", {"MNEMONICS_FAST_FORCE_REFERENCE": "1"}, [])),
    "bf16": (("bf16", {}, ["mnemonics.bf16=true"]), ("fp32", {}, [])),
    "tf32": (("tf32", {}, ["mnemonics.tf32=true"]), ("fp32", {}, [])),
}
WAYS = tuple(w[0] for w in COMPARES["kernels"])


def ops_line(a, name: str) -> str | None:
    f = Path(a.runs) / name / "log.txt"
    for line in (f.read_text().splitlines() if f.is_file() else []):
        if "ops: " in line:
            return line.split("ops: ", 1)[1]
    return None


def summarise(a, seeds: list[int], rcs: dict[str, int | None], ways: tuple[str, str] = WAYS) -> dict:
    """Per seed and way: average incremental accuracy over the phases both ways of that seed finished; per seed the
    paired difference ways[0] - ways[1] (kernels - reference); over seeds the mean difference with its standard
    error, next to the standard deviation between seeds of each way."""
    runs, pairs = {}, []
    for sd in seeds:
        ms = {w: metrics(a, f"{w}_s{sd}") for w in ways}
        for w, m in ms.items():
            runs[f"{w}_s{sd}"] = {"rc": rcs.get(f"{w}_s{sd}"), "ops": ops_line(a, f"{w}_s{sd}"),
                                  "top1": m["top1"] if m else None}
        if not all(m and m["top1"]["cnn"] for m in ms.values()):
            continue
        n = min(len(m["top1"]["cnn"]) for m in ms.values())   # phases both ways finished (phase 0 included)
        avg = {w: {k: sum(m["top1"][k][:n]) / n for k in ("cnn", "nme")} for w, m in ms.items()}
        pairs.append({"seed": sd, "phases": n, **avg,
                      "diff": {k: avg[ways[0]][k] - avg[ways[1]][k] for k in ("cnn", "nme")}})

    def stats(xs):
        if not xs:
            return None
        mean = sum(xs) / len(xs)
        sd = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else None
        return {"mean": mean, "std": sd, "se": sd / len(xs) ** 0.5 if sd is not None else None, "n": len(xs)}

    summary = {k: {"diff": stats([p["diff"][k] for p in pairs]),
                   **{w: stats([p[w][k] for p in pairs]) for w in ways}} for k in ("cnn", "nme")}
    return {"runs": runs, "pairs": pairs, "summary": summary,
            "complete": bool(rcs) and all(rc == 0 for rc in rcs.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="data.root (not needed for demo_digits)")
    ap.add_argument("--config", default="tin100_10phase")
    ap.add_argument("--runs", default="/tmp/mf_ab_runs")
    ap.add_argument("--out", required=True)
    ap.add_argument("--logs", default=None, help="folder for the runs' console logs (default: next to --out)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--mnemonics", action="store_true", help="also run the exemplar level (mnemonics.enabled=true)")
    ap.add_argument("--compare", choices=sorted(COMPARES), default="kernels",
                    help="kernels: CUDA kernels vs MNEMONICS_FAST_FORCE_REFERENCE=1; bf16 / tf32: the exemplar level "
                         "in bf16 autocast / with TF32 allowed vs in full fp32 (implies --mnemonics)")
    ap.add_argument("--overrides", nargs="*", default=[], help="overrides for every run")
    a = ap.parse_args()
    a.seed = 0
    ways = COMPARES[a.compare]
    names = (ways[0][0], ways[1][0])
    a.mnemonics = a.mnemonics or a.compare != "kernels"
    if a.mnemonics:
        a.overrides = ["mnemonics.enabled=true", *a.overrides]
    t0 = time.time()
    log_dir = Path(a.logs or Path(a.out).parent)
    log_dir.mkdir(parents=True, exist_ok=True)
    Path(a.runs).mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    import torch
    result = {"bench": "kernels_ab_train", "card": torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"cpu ({os.cpu_count()} cores)", "torch": torch.__version__, "config": a.config,
              "epochs_per_phase": a.epochs, "mnemonics": a.mnemonics, "overrides": a.overrides, "seeds": seeds,
              "compare": a.compare, "ways": {w: {"env": env, "overrides": ov} for w, env, ov in ways},
              "note": "all runs shared one device concurrently"}
    procs = {f"{w}_s{sd}": launch(f"{w}_s{sd}", ov, a, log_dir, sd, env=env) for sd in seeds for w, env, ov in ways}
    rcs, stopped = wait_or_stop(procs)
    if stopped:
        result["cut_short"] = "SIGTERM (time limit): runs stopped; each seed compared over the phases both ways finished"
    result.update(summarise(a, seeds, rcs, names))
    result["total_s"] = time.time() - t0
    w0, w1 = names
    for p in result["pairs"]:
        print(f"seed {p['seed']} ({p['phases']} phases): {w0} CNN {p[w0]['cnn']:.2f} NME {p[w0]['nme']:.2f} | "
              f"{w1} CNN {p[w1]['cnn']:.2f} NME {p[w1]['nme']:.2f}")
    for k, s in result["summary"].items():
        if s["diff"]:
            spread = s[w0]["std"]
            print(f"{k.upper()}: {w0} - {w1} {s['diff']['mean']:+.2f}"
                  + (f" +- {s['diff']['se']:.2f} (SE)" if s["diff"]["se"] is not None else "")
                  + (f"; seed-to-seed std {spread:.2f}" if spread is not None else ""))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out} in {result['total_s']:.0f} s")


if __name__ == "__main__":
    run_main(main)
