"""Experiment YAML -> typed, validated config: `base:` inheritance, dotted overrides, no unknown keys.

An experiment file is read with `yaml.safe_load`, merged over the file its `base:` names (recursively,
relative to the file), then over command-line overrides in either form `train.lr=0.05` or
`--train.lr=0.05` (the form W&B sweep agents send). Every key is checked before any work starts: an
unknown key is an error with a "did you mean" suggestion, a wrong type names the key, the file and the
value. Keys follow the paper and arcface_torch where they exist (embedding_size, margin, s, m, alpha,
batch_size, lr, weight_decay).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Optional

import yaml

from distill.errors import ConfigError


@dataclass
class SyntheticConfig:
    """Procedural identities generated into `data.train` on first use (distill/data/synthetic.py)."""
    ids: int = 200                 # training identities
    images_per_id: int = 20
    holdout_ids: Optional[int] = None  # identities kept out of training for the pairs (default: generator picks)
    pairs: int = 2000              # verification pairs (half same, half different)
    size: int = 112                # image side
    seed: int = 0


@dataclass
class DataConfig:
    train: str = ""                # RecordIO folder / .rec file, or an identity-per-folder image tree
    val: list = field(default_factory=list)  # verification .bin files (LFW, CFP-FP, AgeDB-30 ...)
    input_size: int = 112          # images are resized when their size differs
    num_workers: int = 2
    synthetic: Optional[SyntheticConfig] = None


@dataclass
class StudentConfig:
    arch: str = "vargfacenet"
    embedding_size: int = 512
    group_size: int = 8            # channels per group S (1 = depthwise)
    se: bool = True
    act: str = "prelu"
    head: str = "vargfacenet"      # 'vargfacenet' (stride-1 conv) or 'vargnet'
    embedding: str = "vargfacenet" # 'vargfacenet' (7x7 group conv) or 'gap'
    multiplier: float = 1.25
    last_channels: int = 1024
    units: list = field(default_factory=lambda: [3, 7, 4])
    dropout: float = 0.0
    init: Optional[str] = None     # generation 1 starts from this student.pt instead of from scratch

    def kwargs(self, input_size: int) -> dict:
        """Constructor arguments of the student."""
        d = dataclasses.asdict(self)
        d.pop("arch"), d.pop("init")
        return {**d, "input_size": input_size}


@dataclass
class MarginConfig:
    """Margin head: ArcFace cos(m1*theta + m2) - m3 with s; arcface (m2=m), cosface (m3=m), combined."""
    margin: str = "arcface"
    s: float = 64.0
    m: float = 0.5
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    straight_through: bool = False  # arcface_torch's margin without gradient
    sample_rate: float = 1.0        # PartialFC class sampling


@dataclass
class DistillConfig:
    loss: str = "equivalent_angular"
    alpha: float = 7.0             # total = classification + alpha * distillation (paper: 7)


@dataclass
class TrainConfig:
    epochs: float = 1.0
    batch_size: int = 128          # per process
    lr: float = 0.1                # for a total batch of lr_batch_size, scaled linearly with the batch
    lr_batch_size: int = 512
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4     # not applied to BatchNorm and biases
    scheduler: str = "poly"        # poly | cosine | step
    warmup_epochs: float = 0.0
    poly_power: float = 2.0
    decay_epochs: list = field(default_factory=list)  # for scheduler 'step'
    decay_rate: float = 0.1
    min_lr: float = 0.0
    amp: str = "auto"              # auto (bf16 on CUDA) | bf16 | fp16 | off
    clip_grad: Optional[float] = None
    accumulate: int = 1            # gradient accumulation steps
    eval_every: int = 0            # steps between verification runs (0: only at the end)
    log_every: int = 20
    checkpoint_every: int = 200    # steps between last.pt writes
    max_steps: Optional[int] = None


@dataclass
class TeacherConfig:
    kind: str = "iresnet"          # iresnet | timm | onnx
    depth: int = 100               # iresnet
    name: Optional[str] = None     # timm model name
    checkpoint: Optional[str] = None
    embedding_size: int = 512
    input_size: int = 112
    cache: bool = True             # embeddings computed once (original + flip); false: online teacher
    train: Optional[TrainConfig] = None  # recipe to train the teacher as stage 0 when checkpoint is missing
    student: Optional[StudentConfig] = None  # kind 'facedistill': the teacher's architecture, as for a student

    def spec(self) -> dict:
        """The dict `teachers.build_teacher` takes."""
        spec = {"kind": self.kind, "checkpoint": self.checkpoint}
        if self.kind == "iresnet":
            spec.update(depth=self.depth, embedding_size=self.embedding_size, input_size=self.input_size)
        elif self.kind == "timm":
            spec.update(name=self.name, embedding_size=self.embedding_size, input_size=self.input_size)
        elif self.kind == "facedistill":
            arch = self.student or StudentConfig()
            spec.update(arch=arch.arch, model_kwargs=arch.kwargs(self.input_size),
                        embedding_size=arch.embedding_size, input_size=self.input_size)
        return spec


@dataclass
class TrackingConfig:
    wandb: str = "auto"            # auto (offline unless credentials exist) | online | offline | disabled
    project: str = "facedistill"
    entity: Optional[str] = None


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda
    deterministic: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    teacher: Optional[TeacherConfig] = None   # no teacher: plain training
    student: StudentConfig = field(default_factory=StudentConfig)
    margin: MarginConfig = field(default_factory=MarginConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    baseline: bool = True          # also train the student without distillation, same budget
    generations: int = 2
    init_head_from_previous: bool = False
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ------------------------------------------------------------------------------------------ loading

def read_yaml_mapping(path: str, what: str = "experiment file") -> dict:
    """A YAML file that must hold a mapping, read with safe_load; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _load_with_bases(path: str, seen: tuple = ()) -> tuple[dict, dict]:
    """Merged raw dict and, for every top-level key path, the file it came from (for error messages)."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself ({' -> '.join(seen)})")
    data = read_yaml_mapping(path)
    base = data.pop("base", None)
    merged, origin = {}, {}
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: key 'base' must be a file name, got {base!r}")
        base_path = os.path.join(os.path.dirname(path), base)
        if not os.path.exists(base_path):
            raise ConfigError(f"{path}: key 'base': base file {base_path} not found")
        merged, origin = _load_with_bases(base_path, seen + (path,))
    merged = _merge(merged, data)
    origin.update({k: path for k in _key_paths(data)})
    return merged, origin


def _key_paths(d: dict, prefix: str = "") -> list:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, dict):
            out += _key_paths(v, key + ".")
    return out


def parse_overrides(args: list) -> dict:
    """`a.b=1` / `--a.b=1` (values parsed as YAML scalars) -> nested dict."""
    out: dict = {}
    for arg in args:
        text = arg[2:] if arg.startswith("--") else arg
        if "=" not in text:
            raise ConfigError(f"override {arg!r}: expected key.sub=value (or --key.sub=value)")
        key, raw = text.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r}: {p!r} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------------------- validation

def _unwrap_optional(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _check_value(value, tp, key: str, where: str):
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: key '{key}' must not be empty (null)")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' must be a section (mapping), got {value!r}")
        return _build(tp, value, key + ".", where)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif tp is list or typing.get_origin(tp) is list:
        ok = isinstance(value, list)
    else:
        ok = True
    if not ok:
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{where}: key '{key}' must be {name}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls, data: dict, prefix: str, where):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for k, v in data.items():
        src = where(prefix + k) if callable(where) else where
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{src}: unknown key '{prefix}{k}'{hint}")
        values[k] = _check_value(v, hints[k], prefix + k, src)
    return cls(**values)


def build_config(raw: dict, source: str = "<config>", origin: dict | None = None) -> ExperimentConfig:
    origin = origin or {}

    def where(key):
        top = key
        while top not in origin and "." in top:
            top = top.rsplit(".", 1)[0]
        return origin.get(top, source)

    cfg = _build(ExperimentConfig, raw, "", where)
    _check_semantics(cfg, where)
    return cfg


def _check_semantics(cfg: ExperimentConfig, where) -> None:
    choices = {
        "margin.margin": (cfg.margin.margin, ("arcface", "cosface", "combined", "softmax")),
        "train.scheduler": (cfg.train.scheduler, ("poly", "cosine", "step")),
        "train.amp": (cfg.train.amp, ("auto", "bf16", "fp16", "off")),
        "device": (cfg.device, ("auto", "cpu", "cuda")),
        "tracking.wandb": (cfg.tracking.wandb, ("auto", "online", "offline", "disabled")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{where(key)}: key '{key}' must be one of {', '.join(allowed)}, got {value!r}")
    positive = {"train.batch_size": cfg.train.batch_size, "train.lr": cfg.train.lr,
                "train.accumulate": cfg.train.accumulate, "data.input_size": cfg.data.input_size,
                "student.embedding_size": cfg.student.embedding_size}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where(key)}: key '{key}' must be positive, got {value!r}")
    if cfg.generations < 0:
        raise ConfigError(f"{where('generations')}: key 'generations' must be >= 0, got {cfg.generations}")
    if cfg.distill.alpha < 0:
        raise ConfigError(f"{where('distill.alpha')}: key 'distill.alpha' must be >= 0, got {cfg.distill.alpha}")
    if not cfg.data.train:
        raise ConfigError(f"{where('data.train')}: key 'data.train' is required (RecordIO folder or image tree)")


def load_config(path: str, overrides: list | None = None) -> ExperimentConfig:
    """Read, merge (base, overrides) and validate an experiment file; raises ConfigError naming key and file."""
    raw, origin = _load_with_bases(path)
    over = parse_overrides(overrides or [])
    raw = _merge(raw, over)
    origin.update({k: "command-line override" for k in _key_paths(over)})
    # Relative data/checkpoint paths stay relative to the working directory, as for every CLI tool.
    return build_config(raw, source=path, origin=origin)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


def config_from_dict(d: dict) -> ExperimentConfig:
    """Rebuild a config saved in a checkpoint or run directory (already validated once)."""
    return build_config(d, source="saved config")

