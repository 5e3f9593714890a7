"""Experiment YAML -> typed, validated config: `base:` inheritance, dotted overrides, no unknown keys.

An experiment file is read with `yaml.safe_load`, merged over the file its `base:` names (recursively,
relative to the file), then over command-line overrides in either form `train.lr=0.05` or
`--train.lr=0.05` (the form W&B sweep agents send). Every key is checked before any work starts: an
unknown key is an error with a "did you mean" suggestion, a wrong type names the key, the file and the
value. Keys follow the paper and arcface_torch where they exist (embedding_size, margin, s, m, alpha,
batch_size, lr, weight_decay). Reading files, `base:` chains and overrides is distill/config/files.py.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types
import typing
import warnings
from dataclasses import dataclass, field

import yaml

from distill.compat import upgrade_legacy_teacher, upgrade_model_kwargs
from distill.config.checks import check_machine, check_semantics
from distill.config.files import key_paths, load_with_bases, merge_experiment, parse_overrides, read_yaml_mapping
from distill.config.keys import Affects, affects, flat_dict, is_harmless, resume_entries, teacher_keys
from distill.data.gpu_decode import DECODES
from distill.data.ijb import TARGETS as IJB_TARGETS
from distill.losses.heads import HEADS
from distill.losses.terms import parse_terms
from distill.models.registry import (
    canonical_name,
    check_model_kwargs,
    check_model_name,
    did_you_mean,
    model_defaults,
)
from distill.utils.atomic import atomic_open
from distill.utils.device import AMP_MODES
from distill.utils.dist import DEFAULT_TIMEOUT_MINUTES
from distill.utils.errors import ConfigDeprecationWarning, ConfigError, DistillError

NOTHING, TEACHER, RESUME = Affects.NOTHING, Affects.TEACHER, Affects.RESUME

# The values of keys whose implementation sits above the config (distill/train, distill/run import the config, so
# the lists live here and the implementation reads them from here); the others come from the module implementing
# them (margin heads, IJB targets, decoders, precisions).
SCHEDULERS = ("poly", "cosine", "step")                 # train.scheduler: distill/train/setup.py create_scheduler
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "off")  # train.optimizer_impl: distill/train/setup.py create_optimizer
PROJECTIONS = ("none", "linear")                       # distill.project: distill/train/objective.py
WANDB_MODES = ("auto", "online", "offline", "disabled")  # tracking.wandb: distill/train/tracking.py
RECURSIVE_TEACHERS = ("fixed", "previous")             # recursive.teacher: distill/run/experiment.py


def _key(default, effect: Affects | None = None, *, allowed=None, **resume):
    """A field declaring what a change to it touches (distill/config/keys.py; undeclared: its section's) and the
    values it may take (`allowed`, checked by distill/config/checks.py; a registry stays live)."""
    metadata = affects(effect, **resume) if effect is not None else {}
    return field(default=default, metadata={**metadata, **({"allowed": allowed} if allowed is not None else {})})


@dataclass
class SyntheticConfig:
    """Procedural identities generated into `data.train` on first use (distill/data/synthetic.py)."""
    ids: int = 200                 # training identities
    images_per_id: int = 20
    holdout_ids: int | None = None  # identities kept out of training for the pairs (default: generator picks)
    pairs: int = 2000              # verification pairs (half same, half different)
    size: int = 112                # image side
    seed: int = 0


@dataclass
class IJBConfig:
    """IJB-B/IJB-C template verification of every finished stage (distill/eval/ijb_stage.py), after training."""
    root: str = ""                 # insightface's IJB folder: loose_crop/, meta/<t>_*.txt
    target: str = _key("IJBC", allowed=IJB_TARGETS)
    batch_size: int = 128


@dataclass
class DataConfig:
    """A teacher trained in the run is a function of the training data's keys (not of the verification sets, which
    are evaluated, not trained on, nor of the loader's settings)."""
    train: str = _key("", TEACHER)  # RecordIO folder / .rec file, or an identity-per-folder image tree
    val: list = field(default_factory=list)  # verification .bin files (LFW, CFP-FP, AgeDB-30 ...)
    input_size: int = _key(112, TEACHER | RESUME, resume_as="model_kwargs")  # images are resized to it
    # loader workers; null: 0 on a CPU (a worker takes a core from training: the quickstart's student step was
    # 1.42x slower with 1 worker than with 0 on 2 cores), 2 on a GPU (distill.utils.threads.loader_workers)
    num_workers: int | None = _key(None, NOTHING)
    prefetch_factor: int = _key(4, NOTHING)  # batches each loader worker keeps ready (workers persist all stage)
    # cpu: JPEGs decoded by loader workers | cuda: by nvJPEG, batched (distill/data/gpu_decode.py)
    decode: str = _key("cpu", NOTHING, allowed=DECODES)
    synthetic: SyntheticConfig | None = _key(None, TEACHER)
    ijb: IJBConfig | None = _key(None, NOTHING)  # evaluate every finished stage on IJB-B/C too (TAR@FAR 1e-6 .. 1e-1)
    # K: P×K batches of batch_size/K identities with K images each, for batch-level distillation losses
    # (distill/train/epoch_plan.py plan_identity_epoch); null: plain shuffled batches (a last.pt without the entry
    # reads as null, so it is recorded always)
    images_per_id: int | None = _key(None, TEACHER | RESUME, resume_as="images_per_id")
    # with images_per_id: the share of each batch in groups, the rest shuffled single images
    grouped_fraction: float = _key(1.0, TEACHER | RESUME, resume_as="grouped_fraction", resume_if_set=True)


def _spread(effect: Affects, **resume):
    """A section's dict field that holds every key the section does not define itself: the keyword arguments
    of its model (`arch`), checked against the registered constructor's signature and written back flat."""
    return field(default_factory=dict, metadata=affects(effect, spread=True, **resume))


def _model_kwargs(arch: str, given: dict, section: str, own: tuple) -> dict:
    """`given` checked against `arch`'s constructor, completed with its defaults (tuples as lists, for YAML);
    arcface_torch's argument names first become the registry's (distill/compat.py: num_features, which wins over
    an embedding_size beside it: a base file's embedding_size is overridden by the file that names num_features)."""
    given = upgrade_model_kwargs(canonical_name(arch), given)
    check_model_kwargs(arch, given, section=section, other_keys=own)
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in model_defaults(arch).items()}
    return {**defaults, **given}


class _ModelArguments:
    """Model arguments read like the section's own keys: cfg.student.multiplier is cfg.student.model['multiplier']."""

    def __getattr__(self, name):
        model = self.__dict__.get("model")
        if model is None or name not in model:
            raise AttributeError(f"{type(self).__name__} has no key {name!r}")
        return model[name]


@dataclass
class StudentConfig(_ModelArguments):
    """`arch` (a model registry name), `init`, and the keyword arguments of `arch` beside them (embedding_size,
    group_size, se, ... for VarGFaceNet). Its input size is data.input_size."""
    arch: str = _key("vargfacenet", RESUME, resume_as="arch")
    init: str | None = None     # generation 1 starts from this student.pt instead of from scratch
    model: dict = _spread(RESUME, resume_as="model_kwargs")

    def __post_init__(self):
        check_model_name(self.arch, "student.arch")
        if "input_size" in self.model:
            raise ConfigError("key 'student.input_size': the student's input size is data.input_size; set that")
        self.model = _model_kwargs(self.arch, self.model, "student.", ("arch", "init"))
        self.model.pop("input_size")

    def model_kwargs(self, input_size: int) -> dict:
        """Constructor arguments of the student."""
        return {**self.model, "input_size": input_size}


@dataclass
class MarginConfig:
    """Margin head: ArcFace cos(m1*theta + m2) - m3 with s; arcface (m2=m), cosface (m3=m), combined, softmax,
    or any head registered with distill.losses.heads.register_head (its entry reads the values it takes)."""
    margin: str = _key("arcface", allowed=HEADS)
    s: float = 64.0
    m: float = 0.5
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    straight_through: bool = False  # arcface_torch's margin without gradient
    sample_rate: float = 1.0        # PartialFC class sampling
    # the head's own options, by name (AdaFace's h, t_alpha; MagFace's l_a, u_a ...), checked against its factory;
    # null (none) reads as an absent key, so the teacher identities and last.pt files recorded before it still match
    options: dict | None = None

    def __post_init__(self):
        if self.options is not None and not isinstance(self.options, dict):
            raise ConfigError(f"key 'margin.options' must be a mapping of the head's options (e.g. {{h: 0.333}}), "
                              f"got {self.options!r}")
        self.options = self.options or None  # {} is no option: the same run as null


@dataclass
class DistillConfig:
    """What students distil with: the short form `loss` + `alpha`, or `terms` (distill/losses/terms.py); not both."""
    loss: str | None = _key(None, RESUME)  # the short form's loss (default equivalent_angular)
    # total = classification + alpha * distillation (default 7, the paper's)
    alpha: float | None = _key(None, RESUME, resume_as="alpha")
    # none (the paper: student and teacher embeddings of one size) | linear: a learned student->teacher
    # projection used only inside the distillation loss (trained with the student, kept in last.pt only)
    project: str = _key("none", RESUME, allowed=PROJECTIONS, resume_if_set=True)
    # [{loss: equivalent_angular, alpha: 7}, {loss: fitnet, alpha: 1, stages: [-2]}]
    terms: list | None = _key(None, RESUME, resume_if_set=True)

    def __post_init__(self):
        if self.terms is None:
            self.loss = "equivalent_angular" if self.loss is None else self.loss
            self.alpha = 7.0 if self.alpha is None else self.alpha
            return
        given = [k for k in ("loss", "alpha") if getattr(self, k) is not None]
        if given:
            raise ConfigError(f"key 'distill.terms' and {' and '.join('distill.' + k for k in given)} are both set: "
                              f"the terms replace the one-term form. Remove {', '.join('distill.' + k for k in given)} "
                              f"(or set them to null), or set distill.terms: null")
        parse_terms(self.terms)  # the structure; the losses' options are checked with the other names

    @property
    def weight(self) -> float:
        """How much the students distil: the short form's alpha, or the terms' summed alphas (0: not at all)."""
        return float(self.alpha) if self.terms is None else sum(t.alpha for t in parse_terms(self.terms))


@dataclass
class TrainConfig:
    epochs: float = 1.0
    batch_size: int = _key(128, RESUME)  # per process
    lr: float = 0.1                # for a total batch of lr_batch_size, scaled linearly with the batch
    lr_batch_size: int = 512
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # weight decay on 1-D parameters too (BatchNorm, biases, PReLU slopes), as MXNet insightface and
    # arcface_torch do (the paper recipe sets it); false: timm's habit of exempting them
    decay_norm_and_bias: bool = False
    scheduler: str = _key("poly", allowed=SCHEDULERS)
    warmup_epochs: float = 0.0
    poly_power: float = 2.0
    decay_epochs: list = field(default_factory=list)  # for scheduler 'step'
    decay_rate: float = 0.1
    min_lr: float = 0.0
    # auto (bf16 on CUDA; on a bf16 CPU for models faster in it: IResNet) | bf16 | fp16 | off
    amp: str = _key("auto", allowed=AMP_MODES)
    # NHWC memory format for the student and an online teacher; null: on CUDA
    channels_last: bool | None = _key(None, NOTHING)
    # torch.compile the student and an online teacher (eager, with a warning, where it fails)
    compile: bool = _key(False, NOTHING)
    # auto (fused on CUDA where it exists, else torch's default) | fused | foreach | off
    optimizer_impl: str = _key("auto", NOTHING, allowed=OPTIMIZER_IMPLS)
    threads: int | None = _key(None, NOTHING)  # torch threads; null: the thread policy (distill/utils/threads.py)
    clip_grad: float | None = None
    accumulate: int = _key(1, RESUME)  # gradient accumulation steps
    eval_every: int = 0            # steps between verification runs (0: only at the end)
    log_every: int = _key(20, NOTHING)
    checkpoint_every: int = 200    # steps between last.pt writes
    max_steps: int | None = None


@dataclass
class TeacherConfig(_ModelArguments):
    """A registered model (`arch` and its keyword arguments beside it, e.g. embedding_size, input_size) or an
    ONNX file (`onnx`; its sizes are read from the file). Its identity is its arch, arguments and recipe: not
    where its weights are (a loaded file's contents are hashed into the identity), whether its embeddings are
    cached, ONNX Runtime's providers, its class centres (the students' business) or where a shared cache lives
    (whose rows are keyed by the weights)."""
    # iresnet100 (or r100), timm/<name>, vargfacenet, ... (model registry)
    arch: str | None = _key(None, TEACHER | RESUME, resume_as="arch")
    onnx: str | None = None     # an insightface model-zoo ONNX file instead of arch
    checkpoint: str | None = None  # weights of arch (arcface_torch backbone.pth, a state dict)
    providers: list | None = None  # onnx: ONNX Runtime execution providers (default: CUDA if present, CPU)
    cache: bool = True             # embeddings computed once (original + flip); false: online teacher
    head: str | None = None     # its class centres (a file or a glob of rank files) for kd, margin_distillation, ...
    shared_cache: str | None = None  # a folder many runs share: this teacher's cache and metrics, made once
    train: TrainConfig | None = _key(None, TEACHER)  # recipe to train the teacher as stage 0 when checkpoint is missing
    model: dict = _spread(TEACHER | RESUME, resume_as="model_kwargs")

    def __post_init__(self):
        if (self.arch is None) == (self.onnx is None):
            raise ConfigError("key 'teacher': give exactly one of arch: <model name> (e.g. iresnet100, timm/resnet50, "
                              "vargfacenet) or onnx: <file>")
        if self.onnx is not None:
            given = sorted(self.model) + [k for k in ("train", "checkpoint") if getattr(self, k) is not None]
            if given:
                raise ConfigError(f"key 'teacher.{given[0]}': an ONNX teacher is its file: it takes onnx, providers, "
                                  f"cache and shared_cache (its sizes are read from the file)")
            return
        check_model_name(self.arch, "teacher.arch")
        self.model = _model_kwargs(self.arch, self.model, "teacher.", tuple(f.name for f in dataclasses.fields(self)))

    @property
    def embedding_size(self) -> int | None:
        return self.model.get("embedding_size")

    def spec(self) -> dict:
        """The dict `teachers.build_teacher` takes."""
        if self.onnx is not None:
            return {"onnx": self.onnx, "providers": self.providers}
        return {"arch": self.arch, "checkpoint": self.checkpoint, **self.model}


@dataclass
class TrackingConfig:
    wandb: str = _key("auto", allowed=WANDB_MODES)  # auto: offline unless credentials exist
    project: str = "facedistill"
    entity: str | None = None


@dataclass
class DistConfig:
    """The process group under torchrun (distill/utils/dist.py init_distributed); how the work is done, not what."""
    # how long a rank waits for the others (a collective, or rank 0 alone preparing files) before failing with
    # an error instead of hanging; the default's reasoning: distill/utils/dist.py DEFAULT_TIMEOUT_MINUTES
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES

    def __post_init__(self):
        if not self.timeout_minutes > 0:
            raise ConfigError(f"key 'dist.timeout_minutes' must be positive (minutes a rank waits for the others), "
                              f"got {self.timeout_minutes!r}")


@dataclass
class RecursiveConfig:
    """How generations chain: each starts from the previous student; `teacher` says whom it distils from: fixed
    (the experiment's teacher for every generation, the paper) or previous (born-again networks, Furlanello et
    al., ICML 2018: generation k's teacher is generation k-1's student; generation 1's is the teacher)."""
    teacher: str = _key("fixed", allowed=RECURSIVE_TEACHERS)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = _key(0, TEACHER | RESUME)
    device: str = _key("auto", NOTHING)  # auto | cpu | cuda
    deterministic: bool = _key(False, TEACHER)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig | None = None   # no teacher: plain training
    student: StudentConfig = field(default_factory=StudentConfig)
    margin: MarginConfig = field(default_factory=MarginConfig, metadata=affects(TEACHER | RESUME))
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    baseline: bool = True          # also train the student without distillation, same budget
    generations: int = _key(2, NOTHING)
    init_head_from_previous: bool = False
    recursive: RecursiveConfig = field(default_factory=RecursiveConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata=affects(NOTHING))
    dist: DistConfig = field(default_factory=DistConfig, metadata=affects(NOTHING))  # torchrun's process group

    @classmethod
    def is_harmless(cls, key: str) -> bool:
        """Whether `key` may change between reruns of one run directory (declared to affect nothing)."""
        return is_harmless(cls, key)

    def teacher_identity_keys(self, trained_here: bool) -> dict:
        """{key: value} of the keys a teacher is a function of (declared TEACHER; a loaded teacher: its own)."""
        return teacher_keys(type(self), flat_dict(to_dict(self)), trained_here)

    def resume_entries(self, recipe: TrainConfig) -> dict:
        """The keys declared RESUME, as a stage training with `recipe` records them in last.pt."""
        return resume_entries(self, recipe)


# --------------------------------------------------------------------------------------- validation

def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
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
        if ok and not math.isfinite(value):  # .inf / .nan parse as YAML floats; no key means them
            raise ConfigError(f"{where}: key '{key}' must be a finite number, got {value!r}")
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


@functools.cache
def _section_schema(cls) -> tuple:
    """(name -> field, the field holding model arguments or None, name -> resolved type) of a schema dataclass,
    worked out once per class (resolving the string annotations is most of a small config's build time)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    spread = next((f.name for f in fields.values() if f.metadata.get("spread")), None)
    return fields, spread, typing.get_type_hints(cls)


def _build(cls, data: dict, prefix: str, where):
    fields, spread, hints = _section_schema(cls)  # shared: read only
    values = {spread: {}} if spread else {}
    for k, v in data.items():
        src = where(prefix + k) if callable(where) else where
        if spread and (k not in fields or k == spread):
            values[spread][k] = v  # a model argument: checked against the constructor by the section
            continue
        if k not in fields:
            hint = did_you_mean(k, fields, prefix=prefix) or f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{src}: unknown key '{prefix}{k}'{hint}")
        values[k] = _check_value(v, hints[k], prefix + k, src)
    try:
        return cls(**values)
    except DistillError as err:  # a section's own check (model name, model arguments): name the file
        src = where(prefix.rstrip(".")) if callable(where) else where
        raise type(err)(f"{src}: {err}") from None


def _upgrade_legacy(raw: dict, where, quiet: bool) -> dict:
    """Legacy spellings that still load: `teacher: {kind: iresnet, depth: 100}`, `kind: facedistill` with
    `teacher.student`, `kind: timm, name:`, `kind: onnx, checkpoint:` (distill.compat.upgrade_legacy_teacher)."""
    if not isinstance(raw.get("teacher"), dict):
        return raw
    teacher, note = upgrade_legacy_teacher(raw["teacher"], ConfigError)
    if note and not quiet:
        warnings.warn(f"{where('teacher.kind')}: {note}", ConfigDeprecationWarning, stacklevel=4)
    return {**raw, "teacher": teacher}


def build_config(raw: dict, source: str = "<config>", origin: dict | None = None,
                 quiet: bool = False) -> ExperimentConfig:
    origin = origin or {}

    def where(key):
        top = key
        while top not in origin and "." in top:
            top = top.rsplit(".", 1)[0]
        return origin.get(top, source)

    cfg = _build(ExperimentConfig, _upgrade_legacy(raw, where, quiet), "", where)
    check_semantics(cfg, where)
    if not quiet:  # a config given now, not a run directory's saved copy (which may come from another machine)
        check_machine(cfg, where)
    return cfg


def _own_keys() -> dict:
    """The keys the student and teacher sections define themselves (the rest are their model's arguments)."""
    return {name: {f.name for f in dataclasses.fields(cls)} - {"arch", "onnx", "model"}
            for name, cls in (("student", StudentConfig), ("teacher", TeacherConfig))}


def _model_args(arch: str) -> tuple:
    """The arguments model `arch` takes (none for a name the registry does not know: the section's own check
    names it), so a change of `arch` keeps the old arguments the new model takes (files.merge_experiment)."""
    try:
        return tuple(model_defaults(arch))
    except DistillError:
        return ()


def load_config(path: str, overrides: list | None = None) -> ExperimentConfig:
    """Read, merge (base, overrides) and validate an experiment file; raises ConfigError naming key and file."""
    raw, origin = load_with_bases(path, _own_keys(), model_args=_model_args)
    over = parse_overrides(overrides or [])
    raw = merge_experiment(raw, over, _own_keys(), _model_args)
    origin.update({k: "command-line override" for k in key_paths(over)})
    # Relative data/checkpoint paths stay relative to the working directory, as for every CLI tool.
    return build_config(raw, source=path, origin=origin)


def to_dict(cfg) -> dict:
    """The config as plain YAML-able data; a section's model arguments sit flat beside its own keys."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, (dict, list)):
            value = copy.deepcopy(value)
        if f.metadata.get("spread"):
            out.update(value)
        else:
            out[f.name] = value
    return out


def dump_config(cfg, path: str) -> None:
    with atomic_open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def load_saved_config(path: str) -> ExperimentConfig:
    """The resolved config a run directory keeps (experiment.yaml, written by dump_config)."""
    fix = ("the run directory's copy of its experiment is damaged: restore it, or delete it and rerun `distill run` "
           "with the experiment file that made this run (which writes it again)")
    return config_from_dict(read_yaml_mapping(path, "saved experiment file", fix=fix), source=path)


def config_from_dict(d: dict, source: str = "saved config") -> ExperimentConfig:
    """Rebuild a config saved in a checkpoint or run directory (already validated once; a legacy
    spelling is upgraded without a note: the user did not write it)."""
    return build_config(d, source=source, quiet=True)
