"""Config (STYLE §5): keys equal field names; unknown keys, wrong types and bad choices name the dotted key;
overrides; every bundled YAML loads; the resolved config is saved with the run."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from mnemonics_fast.config import CONFIG_DIR, Config, ConfigError, apply_overrides, load_config, to_dict
from mnemonics_fast.data import Phases

REPO = Path(__file__).resolve().parents[1]


def _all_yaml() -> list[Path]:
    """Every YAML in configs/ (the repo's top-level folder and the package's bundled one; deduplicated)."""
    found = {}
    for d in (REPO / "configs", CONFIG_DIR):
        for p in sorted(d.glob("*.yaml")) + sorted(d.glob("*.yml")):
            found.setdefault(p.resolve(), p)
    return sorted(found.values(), key=lambda p: p.name)


ALL_YAML = _all_yaml()
NUM_CLASSES = {"cifar100": 100, "imagenet_subset": 100, "imagenet_subset_sorted": 100, "imagenet1k": 1000,
               "digits": 10}


def test_some_configs_are_bundled():
    assert any(p.name == "demo_digits.yaml" for p in ALL_YAML)


@pytest.mark.parametrize("path", ALL_YAML, ids=[p.name for p in ALL_YAML])
def test_every_bundled_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    raw = yaml.safe_load(path.read_text())
    # Every key written in the file ends up in the config (nothing silently dropped).
    resolved = to_dict(cfg)
    for section, values in raw.items():
        if isinstance(values, dict):
            for k, v in values.items():
                got = resolved[section][k]
                assert got == v or (isinstance(v, str) and isinstance(got, float) and got == float(v)), \
                    f"{path.name}: {section}.{k}"
        else:
            assert resolved[section] == values
    # The bundled name resolves too (python -m mnemonics_fast.train --config <name>).
    if path.parent.resolve() == CONFIG_DIR.resolve():
        assert to_dict(load_config(path.stem)) == resolved
    # The protocol splits the dataset's classes (a config that cannot run its own protocol fails here, not later).
    n = NUM_CLASSES.get(cfg.data.dataset) or (cfg.data.synthetic_classes if cfg.data.dataset == "synthetic" else None)
    if n is not None:
        ph = Phases(n, cfg.protocol.base_classes, cfg.protocol.num_phases)
        assert ph.classes_up_to(len(ph) - 1) == n


def test_defaults_are_the_paper_setting():
    cfg = load_config(None)
    assert cfg.protocol.class_order_seed == 1993 and cfg.protocol.base_classes == 50
    assert cfg.memory.kind == "growing" and cfg.memory.per_class == 20 and cfg.memory.total == 2000
    assert cfg.method.margin == 0.5 and cfg.method.top_k == 2 and cfg.method.lambda_base == 5.0
    assert cfg.method.kd_temperature == 2.0
    assert cfg.train.epochs == 160 and cfg.train.milestones == [80, 120] and cfg.train.lr == 0.1
    assert cfg.train.momentum == 0.9 and cfg.train.weight_decay == 5e-4 and cfg.train.batch_size == 128


def test_overrides():
    cfg = load_config("demo_digits", ["train.epochs=3", "train.milestones=[1, 2]", "train.lr=1", "run.progress=false",
                                      "memory.kind=fixed", "run.name=", "method.lambda_base=2.5", "seed=7"])
    assert cfg.train.epochs == 3 and cfg.train.milestones == [1, 2]
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)        # int accepted for a float key
    assert cfg.run.progress is False and cfg.memory.kind == "fixed" and cfg.run.name == ""
    assert cfg.method.lambda_base == 2.5 and cfg.seed == 7
    # Untouched keys keep the file's values.
    assert cfg.data.image_size == 16 and cfg.protocol.base_classes == 4
    # Later overrides win.
    assert load_config(None, ["train.epochs=3", "train.epochs=4"]).train.epochs == 4


def test_exponent_floats():
    """PyYAML reads `5e-4` (no dot) as a string; a float key must still accept it, in overrides and in files."""
    assert load_config(None, ["train.weight_decay=5e-4"]).train.weight_decay == pytest.approx(5e-4)
    assert load_config(None, ["train.lr=1E-2"]).train.lr == pytest.approx(1e-2)
    with pytest.raises(ConfigError, match=r"'train\.lr'"):
        load_config(None, ["train.lr=fast"])


def test_exponent_floats_in_a_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  weight_decay: 1e-4\n  lr: 5e-2\n")
    cfg = load_config(p)
    assert cfg.train.weight_decay == pytest.approx(1e-4) and cfg.train.lr == pytest.approx(5e-2)


@pytest.mark.parametrize("override,key", [
    ("train.epochz=3", "train.epochz"),
    ("trian.epochs=3", "trian"),
    ("data.foo.bar=1", "data.foo"),
    ("mnemonics.inner_lr_x=0.1", "mnemonics.inner_lr_x"),
])
def test_unknown_key_names_the_dotted_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'".replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("override,key", [
    ("train.epochs=abc", "train.epochs"),
    ("train.epochs=2.5", "train.epochs"),
    ("train.epochs=true", "train.epochs"),       # bool is not an int here
    ("train.lr=true", "train.lr"),
    ("run.progress=1", "run.progress"),          # int is not a bool
    ("train.milestones=5", "train.milestones"),
    ("train.milestones=[1, x]", r"train.milestones[1]"),
    ("data.dataset=[1]", "data.dataset"),
    ("train=3", "train"),
    ("seed=zero", "seed"),
])
def test_wrong_type_names_the_dotted_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"'{key}'" in str(e.value)


@pytest.mark.parametrize("override,key", [
    ("memory.kind=huge", "memory.kind"),
    ("memory.selection=kmeans", "memory.selection"),
    ("method.name=der", "method.name"),
    ("model.arch=resnet50", "model.arch"),
    ("data.dataset=mnist", "data.dataset"),
    ("run.resume=maybe", "run.resume"),
    ("mnemonics.mode=second_order", "mnemonics.mode"),
    ("mnemonics.lr_scale=per_pixel", "mnemonics.lr_scale"),
    ("mnemonics.inner_update=adam", "mnemonics.inner_update"),
    ("train.compile=fast", "train.compile"),
    ("mnemonics.compile=fast", "mnemonics.compile"),
])
def test_bad_choice_names_the_key_and_choices(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"'{key}'" in msg
    section, name = key.split(".")
    default = getattr(getattr(Config(), section), name)
    assert repr(default) in msg                # the allowed values are listed


@pytest.mark.parametrize("override,key", [
    ("train.epochs=0", "train.epochs"),
    ("train.batch_size=-1", "train.batch_size"),
    ("memory.per_class=0", "memory.per_class"),
    ("protocol.num_phases=-2", "protocol.num_phases"),
    ("train.lr=-1", "train.lr"),
    ("data.crop_padding=-3", "data.crop_padding"),
    ("mnemonics.lr=-0.5", "mnemonics.lr"),
    ("train.phase0_epochs=0", "train.phase0_epochs"),
    ("method.cbf_epochs=0", "method.cbf_epochs"),
])
def test_out_of_range_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'".replace(".", r"\.")):
        load_config(None, [override])


def test_tf32_is_off_by_default_and_checked():
    assert load_config(None, []).mnemonics.tf32 is False    # exact fp32 exemplar gradients unless asked
    assert load_config(None, ["mnemonics.tf32=true"]).mnemonics.tf32 is True
    with pytest.raises(ConfigError, match=r"'mnemonics\.tf32'"):
        load_config(None, ["mnemonics.tf32=fast"])


def test_inner_update_needs_a_bilevel_mode():
    assert load_config(None, []).mnemonics.inner_update == "sgd"   # the paper's inner step by default
    assert load_config(None, ["mnemonics.inner_update=normalised"]).mnemonics.inner_update == "normalised"
    with pytest.raises(ConfigError, match=r"'mnemonics\.inner_update'.*proto"):
        load_config(None, ["mnemonics.inner_update=normalised", "mnemonics.mode=proto"])


def test_lr_scale_needs_a_bilevel_mode():
    assert load_config(None, ["mnemonics.lr_scale=exemplars"]).mnemonics.lr_scale == "exemplars"
    with pytest.raises(ConfigError, match=r"'mnemonics\.lr_scale'.*proto"):
        load_config(None, ["mnemonics.lr_scale=exemplars", "mnemonics.mode=proto"])


def test_malformed_overrides():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="seed"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_yaml_file_errors(tmp_path):
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("train:\n  epochs: 2\n  lr_schedule: cosine\n")
    with pytest.raises(ConfigError, match=r"'train\.lr_schedule'"):
        load_config(bad_key)
    bad_type = tmp_path / "bad_type.yaml"
    bad_type.write_text("memory:\n  per_class: twenty\n")
    with pytest.raises(ConfigError, match=r"'memory\.per_class'"):
        load_config(bad_type)
    not_yaml = tmp_path / "not_yaml.yaml"
    not_yaml.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not_yaml.yaml"):
        load_config(not_yaml)
    a_list = tmp_path / "a_list.yaml"
    a_list.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="a_list.yaml"):
        load_config(a_list)
    with pytest.raises(ConfigError, match="no_such_config"):
        load_config("no_such_config")
    # An override fixes a bad file value? No: the file's unknown key is still an error.
    with pytest.raises(ConfigError, match="lr_schedule"):
        load_config(bad_key, ["train.epochs=1"])


def test_every_config_field_is_documented_in_to_dict():
    d = to_dict(Config())
    for f in dataclasses.fields(Config):
        assert f.name in d


def test_resolved_config_saved_in_run_dir(lucir_run):
    saved = lucir_run.run_dir / "config.yaml"
    assert saved.is_file()
    raw = yaml.safe_load(saved.read_text())
    assert raw == to_dict(lucir_run.trainer.cfg)
    # It loads back into the same config (re-runnable as is).
    assert to_dict(load_config(saved)) == to_dict(lucir_run.trainer.cfg)
    # Overrides given to the run are in it.
    assert raw["train"]["epochs"] == 2 and raw["data"]["dataset"] == "synthetic" and raw["memory"]["per_class"] == 20


def test_zero_exemplar_lr_is_a_valid_control():
    assert load_config(None, ["mnemonics.lr=0", "mnemonics.old_lr=0"]).mnemonics.lr == 0


def test_cli_errors_are_one_line_and_overrides_may_come_first(capsys, tmp_path):
    """Bad settings found after parsing (no CUDA device for run.device=cuda, a fixed memory smaller than the class
    count) end with one 'error:' line and exit 2, and overrides are accepted on either side of --config."""
    import torch

    from mnemonics_fast.train import main
    if not torch.cuda.is_available():
        assert main(["run.device=cuda", f"run.output_dir={tmp_path}"]) == 2
        assert "'run.device'" in capsys.readouterr().err
    assert main(["memory.kind=fixed", "--config", "demo_digits", "memory.total=5", "run.progress=false",
                 f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config key 'memory.total': 5 exemplars cannot hold one per class") and \
        err.count("\n") == 1
