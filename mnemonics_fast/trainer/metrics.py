"""Class-incremental metrics (SPEC §1) and the run's logs: console table, metrics.json, CSV, TensorBoard."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..utils.io import atomic_write_json, atomic_write_text


class Metrics:
    """acc[kind][i][j] = top-1 % of the model after phase i on the test images of class group j (j <= i), where
    group 0 is the base classes and group j the classes added in phase j. `top1[kind][i]` is the accuracy on all
    classes seen after phase i (what LUCIR prints)."""

    KINDS = ("cnn", "nme")

    def __init__(self):
        self.top1 = {k: [] for k in self.KINDS}
        self.top5 = {k: [] for k in self.KINDS}
        self.acc_matrix = {k: [] for k in self.KINDS}
        self.phases: list[dict] = []

    def add_phase(self, phase: int, results: dict, info: dict) -> None:
        for k in self.KINDS:
            self.top1[k].append(results[k]["top1"])
            self.top5[k].append(results[k]["top5"])
            self.acc_matrix[k].append(results[k]["groups"])
        self.phases.append({"phase": phase, **info})

    @staticmethod
    def _mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    def summary(self) -> dict:
        forgetting = {k: (self.acc_matrix[k][0][0] - self.acc_matrix[k][-1][0]) if self.acc_matrix[k] else None
                      for k in self.KINDS}
        return {
            # Plain mean over all phases, phase 0 included (SPEC §1).
            "avg_incremental_acc": {k: self._mean(self.top1[k]) for k in self.KINDS},
            "avg_incremental_acc_top5": {k: self._mean(self.top5[k]) for k in self.KINDS},
            "last_acc": {k: self.top1[k][-1] if self.top1[k] else None for k in self.KINDS},
            "top1": self.top1,
            "top5": self.top5,
            "acc_matrix": self.acc_matrix,
            # Paper's definition: phase-0 model on phase-0 classes minus final model on them (lower is better).
            "forgetting": forgetting,
            "phases": self.phases,
        }

    def state_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "acc_matrix": self.acc_matrix, "phases": self.phases}

    def load_state_dict(self, s: dict) -> None:
        self.top1, self.top5, self.acc_matrix, self.phases = s["top1"], s["top5"], s["acc_matrix"], s["phases"]


class RunLog:
    """Writes metrics.json, metrics.csv and TensorBoard scalars (when tensorboard is installed) on the main rank."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.run_dir, self.enabled = run_dir, enabled
        self.tb = None
        self.tb_missing = False
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.tb_missing = True

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(tag, value, step)

    def write(self, metrics: Metrics, extra: dict) -> None:
        if not self.enabled:
            return
        summary = {**extra, **metrics.summary()}
        atomic_write_json(self.run_dir / "metrics.json", summary)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["phase", "classes", "top1_cnn", "top1_nme", "top5_cnn", "top5_nme", "wall_s", "train_img_per_s",
                    "peak_mem_mb", "memory_exemplars"])
        for i, p in enumerate(metrics.phases):
            w.writerow([p["phase"], p["num_classes"], f"{metrics.top1['cnn'][i]:.2f}", f"{metrics.top1['nme'][i]:.2f}",
                        f"{metrics.top5['cnn'][i]:.2f}", f"{metrics.top5['nme'][i]:.2f}", f"{p['wall_s']:.1f}",
                        f"{p['train_img_per_s']:.0f}", f"{p['peak_mem_mb']:.0f}", p["memory_exemplars"]])
        atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def format_table(metrics: Metrics) -> str:
    lines = ["phase  classes   CNN top-1   NME top-1    wall s    img/s"]
    for i, p in enumerate(metrics.phases):
        lines.append(f"{p['phase']:>5}  {p['num_classes']:>7}  {metrics.top1['cnn'][i]:>9.2f}   "
                     f"{metrics.top1['nme'][i]:>9.2f}  {p['wall_s']:>8.1f}  {p['train_img_per_s']:>7.0f}")
    s = metrics.summary()
    lines.append(f"average incremental accuracy: CNN {s['avg_incremental_acc']['cnn']:.2f}  "
                 f"NME {s['avg_incremental_acc']['nme']:.2f}")
    lines.append(f"last-phase accuracy:          CNN {s['last_acc']['cnn']:.2f}  NME {s['last_acc']['nme']:.2f}")
    if s["forgetting"]["cnn"] is not None:
        lines.append(f"forgetting (phase-0 classes): CNN {s['forgetting']['cnn']:.2f}  NME {s['forgetting']['nme']:.2f}")
    return "\n".join(lines)
