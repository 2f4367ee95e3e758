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


def test_tsne_draws_figure_1(runs, tmp_path):
    pytest.importorskip("sklearn")
    from mnemonics_fast.plots import main
    mn, plain = runs
    out = tmp_path / "tsne.png"
    assert main(["tsne", "--run", str(mn), "--classes", "2", "--out", str(out)]) == 0
    assert _is_png(out)
    with pytest.raises(SystemExit, match="no mnemonics pixels"):
        main(["tsne", "--run", str(plain), "--out", str(tmp_path / "x.png")])


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    from mnemonics_fast.plots import main
    assert main(["curve", "--run", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
