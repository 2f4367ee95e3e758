"""`python -m mnemonics_fast.plots`: each command draws a real PNG from a real (tiny) run, and refuses what it
cannot draw with a message that names the run."""
from __future__ import annotations

import pytest

from conftest import run_trainer, tiny_config

pytest.importorskip("matplotlib")

MN = {"mnemonics.enabled": True, "mnemonics.outer_steps": 2, "mnemonics.old_outer_steps": 1,
      "mnemonics.query_batch_size": 8, "mnemonics.lr": 50.0, "mnemonics.old_lr": 50.0, "train.epochs": 1,
      "train.milestones": [1]}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("plots")
    mn = run_trainer(tiny_config(out, name="mn", **MN))
    plain = run_trainer(tiny_config(out, name="plain", **{"train.epochs": 1, "train.milestones": [1]}))
    return mn.run_dir, plain.run_dir


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def test_curve_draws_one_or_several_runs(runs, capsys):
    from mnemonics_fast.plots import main
    mn, plain = runs
    assert main(["curve", "--run", str(mn), "--compare", str(plain)]) == 0
    assert _is_png(mn / "accuracy_curve.png") and "wrote" in capsys.readouterr().out


def test_drift_draws_the_exemplar_levels_and_refuses_a_run_without_them(runs, tmp_path):
    from mnemonics_fast.plots import main
    mn, plain = runs
    out = tmp_path / "drift.png"
    assert main(["drift", "--run", str(mn), "--out", str(out)]) == 0
    assert _is_png(out)
    with pytest.raises(SystemExit, match=r"plain has no exemplar-level reports"):
        main(["drift", "--run", str(plain)])


def test_tsne_draws_figure_1(runs, tmp_path, capsys):
    pytest.importorskip("sklearn")
    from mnemonics_fast.plots import main
    mn, plain = runs
    out = tmp_path / "tsne.png"
    assert main(["tsne", "--run", str(mn), "--classes", "2", "--out", str(out)]) == 0
    assert _is_png(out)
    # the same classes in both rows (phase 0's first two), not each phase's own first classes
    assert "tsne: classes [0, 1] (positions in the class order) in phases [0, 2]" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="ran without mnemonics"):
        main(["tsne", "--run", str(plain), "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match=r"no checkpoint for phase\(s\) \[7\]"):
        main(["tsne", "--run", str(mn), "--phases", "0", "7", "--out", str(tmp_path / "y.png")])
    # a run whose exemplars started from random picks has no herding ranking to draw
    import shutil
    rnd = tmp_path / "rnd"
    shutil.copytree(mn, rnd)
    (rnd / "config.yaml").write_text((mn / "config.yaml").read_text().replace("init: herding", "init: random"))
    with pytest.raises(SystemExit, match="mnemonics.init=random"):
        main(["tsne", "--run", str(rnd), "--out", str(tmp_path / "z.png")])


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    from mnemonics_fast.plots import main
    assert main(["curve", "--run", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("name: x\n")     # a run that stopped before its first phase completed
    with pytest.raises(SystemExit, match="has no metrics.json: no phase of it has completed yet"):
        main(["curve", "--run", str(tmp_path)])


def test_exemplar_drift_script_reads_a_runs_checkpoints(runs, tmp_path):
    """bench/exemplar_drift.py (for runs that predate the trainer's drift report) agrees with what the trainer logged
    for the same level, and refuses a run without optimised pixels."""
    import importlib.util
    import json
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("exemplar_drift", root / "bench" / "exemplar_drift.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    mn, plain = runs
    out = tmp_path / "drift.json"
    assert tool.main(["--runs", str(mn), "--phase", "0", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    logged = json.loads((mn / "metrics.json").read_text())["phases"][0]["mnemonics"]["new"]
    assert row["classes"] == 2 and 0 <= row["classes_moved_past_nearest_neighbour"] <= 2
    assert abs(row["class_mean_cosine_mean"] - logged["class_mean_cosine_mean"]) < 1e-4
    assert abs(row["exemplar_feature_cosine_min"] - logged["exemplar_feature_cosine_min"]) < 1e-4
    assert abs(row["nearest_other_class_mean_cosine_mean"] - logged["nearest_other_class_mean_cosine_mean"]) < 1e-4
    assert row["classes_moved_past_nearest_neighbour"] == logged["classes_moved_past_nearest_neighbour"]
    with pytest.raises(SystemExit, match="no optimised pixels"):
        tool.main(["--runs", str(plain)])


def test_exemplar_objective_script_scores_herding_and_optimised_exemplars(runs, tmp_path):
    """bench/exemplar_objective.py redoes a herding run's exemplar level for a few beta1 and scores each result:
    beta 0 is the herding set itself (no pixel moved), a large beta moves pixels; both inner rules run; a run whose
    checkpoint already holds optimised pixels is refused."""
    import importlib.util
    import json
    import math
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("exemplar_objective", root / "bench" / "exemplar_objective.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    mn, plain = runs
    for rule, precisions in (("sgd", "fp32,bf16"), ("normalised", "fp32")):
        out = tmp_path / f"{rule}.json"
        assert tool.main(["--run", str(plain), "--phase", "1", "--betas", "0,50", "--outer-steps", "2",
                          "--finetune-steps", "2", "--inner-update", rule, "--precisions", precisions,
                          "--out", str(out)]) == 0
        res = json.loads(out.read_text())
        rows = res["rows"]
        assert res["inner_update"] == rule
        assert [(r["beta1"], r["precision"]) for r in rows] == [(0.0, "-"), (50.0, "fp32")] + (
            [(50.0, "bf16")] if "bf16" in precisions else [])
        still, moved = rows[:2]
        assert still["pixel_change_uint8_levels"] == 0 and moved["pixel_change_uint8_levels"] > 0
        assert 0 <= still["exemplar_acc"] <= 100 and still["grad_norm_E"] > 0
        assert -1 <= still["grad_cos_train"] <= 1
        assert all(math.isfinite(v) for r in rows for v in r.values() if not isinstance(v, str))
        if "bf16" in precisions:   # the bf16 level ran under autocast: its pixels differ from the fp32 level's
            assert -1 <= rows[2]["change_cos_vs_fp32"] <= 1 and rows[2]["change_rel_diff_vs_fp32"] > 0
        if rule == "sgd":
            float_change = moved["pixel_change_uint8_levels"]
    # --storage uint8 scores the exemplars as the trainer keeps them between phases: rounded to whole levels
    out = tmp_path / "uint8.json"
    assert tool.main(["--run", str(plain), "--phase", "1", "--betas", "50", "--outer-steps", "2",
                      "--finetune-steps", "2", "--inner-update", "sgd", "--storage", "uint8", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["storage"] == "uint8"
    assert res["rows"][0]["pixel_change_uint8_levels"] != pytest.approx(float_change, rel=1e-6)
    # --query-old K: old-class exemplars join every query batch, which changes where the level takes the pixels
    out = tmp_path / "query_old.json"
    assert tool.main(["--run", str(plain), "--phase", "1", "--betas", "50", "--outer-steps", "2",
                      "--finetune-steps", "2", "--inner-update", "sgd", "--query-old", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["query_old"] == 4
    assert res["rows"][0]["pixel_change_uint8_levels"] != pytest.approx(float_change, rel=1e-6)
    with pytest.raises(SystemExit, match="holds optimised pixels"):
        tool.main(["--run", str(mn), "--phase", "1", "--betas", "0"])


def test_compare_plot_from_committed_benchmark_results(tmp_path):
    """`plots compare` draws a comparison benchmark's JSON (the committed digits result: 3 methods x 3 seeds) and
    refuses a JSON without per-phase runs, naming the file."""
    import json
    from pathlib import Path

    from mnemonics_fast import plots
    src = Path(__file__).resolve().parents[1] / "bench" / "results" / "digits_exemplars_cpu.json"
    runs = plots._compare_runs(json.loads(src.read_text()))
    assert len(runs) == 9 and {n.rsplit("_s", 1)[0] for n in runs} == {"lucir_random", "lucir_herding",
                                                                         "lucir_mnemonics"}
    out = tmp_path / "cmp.png"
    assert plots.main(["compare", "--json", str(src), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="empty.json holds no runs"):
        plots.main(["compare", "--json", str(empty)])
    assert plots.main(["compare", "--json", str(tmp_path / "nope.json")]) == 2


def test_compare_plot_reads_summaries_of_runs_cut_short(tmp_path):
    """tin100_compare_scaled_h100.json stores top1_cnn / top1_nme lists (its mnemonics runs stopped at phase 8): the
    plot reads them, and its legend averages cover the phases every run finished."""
    import json
    from pathlib import Path

    from mnemonics_fast import plots
    src = Path(__file__).resolve().parents[1] / "bench" / "results" / "tin100_compare_scaled_h100.json"
    runs = plots._compare_runs(json.loads(src.read_text()))
    assert len(runs) == 6 and {len(r["top1"]["cnn"]) for r in runs.values()} == {9, 11}
    out = tmp_path / "cmp.png"
    assert plots.main(["compare", "--json", str(src), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
