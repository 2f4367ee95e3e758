"""Run configuration: dataclasses loaded from YAML (SPEC and STYLE §5).

Keys equal field names; an unknown key or a value of the wrong type is an error naming the dotted key; command-line
overrides are dotted (`train.epochs=2`); the resolved config is saved with every run.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad configuration: the message names the key (or file) at fault."""


@dataclass
class DataConfig:
    dataset: str = "digits"        # digits | synthetic | cifar100 | imagefolder | imagenet_subset | imagenet_subset_sorted | imagenet1k
    root: str = ""                 # dataset root; for ImageNet variants MNEMONICS_FAST_IMAGENET is used when empty
    download: bool = False         # torchvision CIFAR-100 only: fetch it when missing
    loader: str = "auto"           # auto | resident | torchvision | dali (imagefolder + dali/torchvision: the
                                   # ImageNet file pipeline on that tree instead of the in-memory small-image path)
    image_size: int = 32           # training/eval crop (32 for CIFAR-like, 224 for ImageNet)
    crop_padding: int = 4          # small images: zero-pad then random crop (CIFAR/LUCIR: 4 on 32x32)
    resize: int = 0                # file loaders' eval resize (shorter side) before the centre crop; 0: image_size *
                                   # 256/224 (256 for 224, the papers'; 37 for 32), so the crop keeps the same share
    cache_dir: str = "~/.cache/mnemonics_fast"  # decoded uint8 caches of small-image ImageFolder trees
    num_workers: int = 4           # file loaders only
    synthetic_classes: int = 20    # synthetic dataset only
    synthetic_per_class: int = 60  # synthetic dataset only (train images per class; test gets a third)


@dataclass
class ProtocolConfig:
    class_order_seed: int = 1993   # SPEC §1: separate from the training seed
    base_classes: int = 50
    num_phases: int = 10


@dataclass
class MemoryConfig:
    kind: str = "growing"          # growing (20 per seen class, LUCIR/paper) | fixed (`total` split over seen classes)
    per_class: int = 20
    total: int = 2000
    selection: str = "herding"     # herding | random


@dataclass
class ModelConfig:
    arch: str = "resnet32"         # resnet32 | resnet18
    weight_transfer: bool = False  # mnemonics paper's frozen-kernel x learnable-scale transfer from phase 1 on


@dataclass
class MethodConfig:
    name: str = "lucir"            # lucir | icarl
    lambda_base: float = 5.0       # LUCIR less-forget base weight (5 CIFAR, 10 ImageNet); scaled by sqrt(old/new)
    margin: float = 0.5            # margin ranking m, on unscaled cosines
    top_k: int = 2                 # margin ranking: hardest new classes per old-class sample
    mr_weight: float = 1.0
    kd_temperature: float = 2.0    # iCaRL-style KD
    kd_weight: float = 1.0
    nme_view: str = "plain"        # plain | plain+flip (the released code averages a second, flipped view)
    class_balanced_finetune: bool = False  # LUCIR ImageNet option
    cbf_epochs: int = 20
    cbf_lr: float = 0.01
    cbf_milestones: list[int] = field(default_factory=lambda: [10])


@dataclass
class TrainConfig:
    epochs: int = 160
    batch_size: int = 128          # global batch size (split over DDP ranks)
    lr: float = 0.1
    milestones: list[int] = field(default_factory=lambda: [80, 120])
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eval_batch_size: int = 512
    amp: bool = True               # bf16 autocast on CUDA while training (ignored on CPU)
    amp_eval: bool = False         # also bf16 for evaluation, herding, imprinting and NME features; off: those run
                                   # in fp32, so reported accuracies and exemplar picks do not depend on `amp`
    channels_last: bool = True     # CUDA only
    cudnn_benchmark: bool = True   # CUDA only: let cuDNN pick the fastest conv algorithms (shapes are fixed)
    phase0_epochs: int = -1        # -1: same as `epochs`
    compile: str = "none"          # none | default | reduce-overhead | max-autotune[-no-cudagraphs]: torch.compile
                                   # the backbone while the model level trains (mnemonics_fast/trainer/compile.py)


@dataclass
class MnemonicsConfig:
    enabled: bool = False
    mode: str = "full"             # full | head | first_order | proto
    init: str = "herding"          # herding | random
    inner_lr: float = 0.01         # alpha: inner SGD step on the exemplars
    inner_steps: int = 1           # T: unrolled inner steps
    outer_steps: int = 50          # K: exemplar updates per phase (new classes)
    lr: float = 1.0                # beta1: exemplar lr in [0, 1] pixel space (normalised-space equivalent: beta/std^2,
                                   # docs/mnemonics.md). Provisional, from 4-epoch models
                                   # (mnemonics_sweep_cpu_branch.json); at phase 1 of a 30-epoch model it moves the
                                   # new exemplars ~2 uint8 levels and hurts NME
                                   # (exemplar_objective_tin100_30ep_cpu.json)
    old_lr: float = 0.5            # beta2: exemplar lr for the old-class A/B adjustment
    lr_scale: str = "none"         # none (the paper) | exemplars: beta1 and beta2 are per exemplar, multiplied by the
                                   # number of exemplars in the inner loss (set both small: docs/mnemonics.md)
    inner_update: str = "sgd"      # sgd (the paper) | normalised: inner step -alpha * g/|g|, so the objective cannot
                                   # gain by making exemplars harder (not the paper; docs/mnemonics.md)
    momentum: float = 0.9
    adjust_old: bool = True        # SPEC §5 (c)
    old_outer_steps: int = 20      # K for each A/B direction
    query_batch_size: int = 128    # real images per outer step (global; split over ranks)
    storage: str = "float"         # float | uint8 (rounded) between phases
    exemplar_chunk: int = 0        # 0: whole exemplar batch at once; else chunk size (224x224 memory)
    bf16: bool = False             # bf16 autocast for the exemplar level's forward passes (CUDA or CPU; it moved the
                                   # pixels as fp32 did where measured: docs/mnemonics.md)
    cuda_graph: bool = False       # CUDA: replay one outer step's gradient computation as a CUDA graph
    lean_conv_grad: bool = True    # full/first_order: conv backwards whose 2nd-order pass skips unneeded weight-grad
                                   # convolutions (methods/lean_conv.py); same numbers up to rounding, false = torch's
    shard_inner: bool = False      # DDP, full/first_order: split the inner loop's exemplars over the ranks (inner
                                   # gradient all-reduced) instead of replicating it; same result up to rounding
    compile: str = "none"          # full/first_order: the outer-step gradient as one torch.func function through
                                   # torch.compile(mode=...) (methods/compiled_grad.py); same numbers up to rounding
    tf32: bool = False             # CUDA: allow TF32 convolutions/matmuls in the exemplar level (faster; the exemplar
                                   # gradient is then ~9% off a float64 oracle, full fp32 0.13%: docs/mnemonics.md)


@dataclass
class RunConfig:
    output_dir: str = "runs"
    name: str = ""                 # run folder name; default: the config's name
    resume: str = "auto"           # auto (continue from the last complete phase) | never
    stop_after_phase: int = -1     # end cleanly after this phase (-1: run all)
    device: str = "auto"           # auto | cpu | cuda
    tensorboard: bool = True       # when tensorboard is installed
    progress: bool = True          # tqdm bars (drawn only when stderr is a terminal)
    deterministic: bool = False
    checkpoint_every: int = 10     # epochs between mid-phase checkpoints (0: only at phase ends)
    # Start from another run's phase-0 checkpoint: its trained base model is taken as is and phase 0's exemplar level
    # (selection, mnemonics), class means and evaluation are redone under this config. For exemplar-strategy sweeps
    # and ablations from one base model, as the paper's are; data/protocol/model/method/train must match it.
    branch_from: str = ""


@dataclass
class Config:
    name: str = "demo_digits"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mnemonics: MnemonicsConfig = field(default_factory=MnemonicsConfig)
    run: RunConfig = field(default_factory=RunConfig)


CHOICES = {
    "data.dataset": {"digits", "synthetic", "cifar100", "imagefolder", "imagenet_subset", "imagenet_subset_sorted",
                     "imagenet1k"},
    "data.loader": {"auto", "resident", "torchvision", "dali"},
    "memory.kind": {"growing", "fixed"},
    "memory.selection": {"herding", "random"},
    "model.arch": {"resnet32", "resnet18"},
    "method.name": {"lucir", "icarl"},
    "method.nme_view": {"plain", "plain+flip"},
    "mnemonics.mode": {"full", "head", "first_order", "proto"},
    "mnemonics.init": {"herding", "random"},
    "mnemonics.storage": {"float", "uint8"},
    "mnemonics.lr_scale": {"none", "exemplars"},
    "mnemonics.inner_update": {"sgd", "normalised"},
    "run.resume": {"auto", "never"},
    "train.compile": {"none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"},
    "mnemonics.compile": {"none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"},
    "run.device": {"auto", "cpu", "cuda"},
}

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_type(key: str, value, tp):
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {type(value).__name__} ({value!r})")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)   # PyYAML (YAML 1.1) reads `5e-4`, without a dot, as a string
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)     # `run.name=2024`: YAML reads a number; a name or path that looks like one is still a name
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool) \
            or not isinstance(value, tp):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {type(value).__name__} ({value!r})")
    return value


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key '{full}' (known in this section: {', '.join(sorted(fields))})")
        tp = hints[key]
        kwargs[key] = _build(tp, value, full + ".") if dataclasses.is_dataclass(tp) else _check_type(full, value, tp)
    obj = cls(**kwargs)
    return obj


def validate(cfg: Config) -> Config:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {sorted(allowed)}")
    positive = ["train.epochs", "train.batch_size", "train.eval_batch_size", "memory.per_class", "memory.total",
                "protocol.base_classes", "data.image_size", "mnemonics.inner_steps", "mnemonics.query_batch_size",
                "train.lr", "train.gamma", "method.cbf_epochs", "method.cbf_lr", "method.kd_temperature", "method.top_k"]
    # 0 is meaningful for these (e.g. mnemonics.lr=0 keeps the initial exemplars: a control run), a negative is not
    non_negative = ["data.crop_padding", "data.num_workers", "train.momentum", "train.weight_decay",
                    "method.lambda_base", "method.margin", "method.mr_weight", "method.kd_weight",
                    "mnemonics.inner_lr", "mnemonics.lr", "mnemonics.old_lr", "mnemonics.momentum",
                    "mnemonics.outer_steps", "mnemonics.old_outer_steps", "mnemonics.exemplar_chunk",
                    "run.checkpoint_every"]
    for keys, bad, says in ((positive, lambda v: v <= 0, "> 0"), (non_negative, lambda v: v < 0, ">= 0")):
        for key in keys:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            if bad(value):
                raise ConfigError(f"config key '{key}': must be {says}, got {value!r}")
    if cfg.data.resize != 0 and cfg.data.resize < cfg.data.image_size:
        raise ConfigError(f"config key 'data.resize': {cfg.data.resize} is smaller than data.image_size="
                          f"{cfg.data.image_size}, so the centre crop would not fit (0 picks image_size * 256/224)")
    if cfg.train.phase0_epochs == 0 or cfg.train.phase0_epochs < -1:
        raise ConfigError(f"config key 'train.phase0_epochs': must be > 0, or -1 for train.epochs; got "
                          f"{cfg.train.phase0_epochs}")
    if cfg.protocol.num_phases < 0:
        raise ConfigError("config key 'protocol.num_phases': must be >= 0")
    if cfg.mnemonics.lr_scale != "none" and cfg.mnemonics.mode == "proto":
        raise ConfigError("config key 'mnemonics.lr_scale': 'exemplars' needs a bilevel mnemonics.mode (full, head, "
                          "first_order); proto has no inner loss")
    if cfg.mnemonics.inner_update != "sgd" and cfg.mnemonics.mode == "proto":
        raise ConfigError("config key 'mnemonics.inner_update': 'normalised' needs a bilevel mnemonics.mode (full, "
                          "head, first_order); proto has no inner step")
    return cfg


def _parse_value(text: str):
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`a.b=value` strings (YAML-parsed values) applied onto a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
        node[parts[-1]] = _parse_value(text)
    return raw


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A path to a YAML file, or a bare name (`imagenet_10phase` / `imagenet_10phase.yaml`) of a bundled config."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    name = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    for candidate in (CONFIG_DIR / name, Path(__file__).resolve().parents[1] / "configs" / name):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {str(path)!r} not found (neither a path nor a bundled config in {CONFIG_DIR})")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    raw: dict = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    return validate(_build(Config, raw))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    from .utils.io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
