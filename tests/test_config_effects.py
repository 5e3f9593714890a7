"""Config keys say what a change to them touches (distill/config/keys.py): which keys may change between reruns,
which make a teacher's identity, which a resume compares, all derived from the schema's declarations.

The three sets are pinned here against the hand-written lists they replace (OLD_*: copied from the code that kept
them), for every key the schema has; and a field added with a declaration takes its effect everywhere with no
other file touched."""

import dataclasses
import typing
from dataclasses import dataclass, field

import pytest

from distill.config import schema
from distill.config.keys import STAGE_ENTRIES, Affects, affects, flat_dict, harmless_keys, key_effect
from distill.config.schema import ExperimentConfig, build_config, dump_config, to_dict
from distill.run.rundir import check_run_dir
from distill.utils.errors import ConfigError

# ---------------------------------------------------------------------------- the lists the declarations replace

OLD_HARMLESS = ("generations", "tracking", "data.num_workers", "data.prefetch_factor", "data.decode",
                "train.log_every", "train.compile", "train.optimizer_impl", "train.channels_last", "train.threads",
                "device", "data.ijb", "dist")
OLD_NOT_IDENTITY = ("data.val", "teacher.cache", "teacher.checkpoint", "teacher.providers", "teacher.onnx",
                    "teacher.head", "teacher.shared_cache")


def old_is_harmless(key: str) -> bool:
    return any(key == h or key.startswith(h + ".") for h in OLD_HARMLESS)


def old_identity_key(key: str) -> bool:
    if key.startswith("teacher.train."):
        return not old_is_harmless(key[len("teacher."):])
    if key.startswith("teacher."):
        return not any(key == k or key.startswith(k + ".") for k in OLD_NOT_IDENTITY)
    if key.startswith(("data.", "margin.")) or key in ("seed", "deterministic"):
        return not old_is_harmless(key) and not any(key == k or key.startswith(k + ".") for k in OLD_NOT_IDENTITY)
    return False


def old_identity(cfg, trained_here: bool) -> dict:
    flat = flat_dict(to_dict(cfg))
    if trained_here:
        return {k: v for k, v in flat.items() if old_identity_key(k)}
    return {k: v for k, v in flat.items() if k.startswith("teacher.") and old_identity_key(k)
            and not k.startswith("teacher.train.")}


def old_compat_entries(cfg, recipe) -> dict:
    """The config's part of engine._compat_key as it was written by hand (the stage's arch, model_kwargs, alpha
    and the data's size and world size aside)."""
    return {"images_per_id": cfg.data.images_per_id, "margin": dataclasses.asdict(cfg.margin),
            "batch_size": recipe.batch_size, "accumulate": recipe.accumulate, "distill_loss": cfg.distill.loss,
            "seed": cfg.seed,
            **({"distill_terms": cfg.distill.terms} if cfg.distill.terms is not None else {}),
            **({"grouped_fraction": cfg.data.grouped_fraction} if cfg.data.grouped_fraction != 1 else {}),
            **({"distill_project": cfg.distill.project} if cfg.distill.project != "none" else {})}


# ---------------------------------------------------------------------------------------------- configs, keys

TEACHER_TRAIN = {"batch_size": 24, "lr": 0.1, "max_steps": 4, "log_every": 2}
CONFIGS = {
    "trained teacher": {"data": {"train": "d", "input_size": 32, "synthetic": {"ids": 12}},
                        "teacher": {"arch": "iresnet18", "input_size": 32, "embedding_size": 32,
                                    "train": TEACHER_TRAIN}},
    "loaded teacher": {"data": {"train": "d", "ijb": {"root": "ijb"}, "val": ["a.bin"]},
                       "teacher": {"arch": "iresnet18", "checkpoint": "t.pth", "head": "h.pt", "cache": False,
                                   "shared_cache": "teacher_pool", "train": TEACHER_TRAIN}},
    "onnx teacher": {"data": {"train": "d"}, "teacher": {"onnx": "t.onnx", "providers": ["CPUExecutionProvider"]}},
    "no teacher, terms": {"data": {"train": "d", "images_per_id": 4, "grouped_fraction": 0.5},
                          "distill": {"terms": [{"loss": "equivalent_angular", "alpha": 7}], "project": "linear"},
                          "train": {"batch_size": 32, "accumulate": 2}},
    "timm teacher": {"data": {"train": "d"}, "teacher": {"arch": "timm/resnet18", "checkpoint": "t.pth"},
                     "train": {"threads": 2, "compile": True}, "tracking": {"wandb": "disabled"}},
}


def _cfg(name):
    return build_config(CONFIGS[name])


def _schema_fields(cls, prefix=""):
    """(dotted path, field, the dataclass holding it) of every field of the schema; a section is a key of its
    own (its null) and its fields follow."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("spread"):
            continue
        key = prefix + f.name
        yield key, f, cls
        tp = hints[f.name]
        inner = next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), None)
        if inner is not None:
            yield from _schema_fields(inner, key + ".")


def all_keys() -> list:
    sections = {key for key, f, owner in _schema_fields(ExperimentConfig)
                if dataclasses.is_dataclass(typing.get_type_hints(owner)[f.name])}  # never null: not keys of their own
    keys = {key for key, _, _ in _schema_fields(ExperimentConfig)} - sections
    for name in CONFIGS:  # the model arguments beside student.* and teacher.*, and lists as values
        keys |= set(flat_dict(to_dict(_cfg(name))))
    keys |= {"tracking.unknown", "data.ijb.unknown", "train.unknown", "teacher.train.unknown", "unknown"}
    return sorted(keys)


# ------------------------------------------------------------------------------------------- the pinned sets

def test_every_key_may_change_between_reruns_exactly_as_the_old_list_said():
    differ = [k for k in all_keys() if ExperimentConfig.is_harmless(k) != old_is_harmless(k)]
    assert not differ
    assert set(harmless_keys(ExperimentConfig)) == set(OLD_HARMLESS)


def test_every_key_is_part_of_the_teachers_identity_exactly_as_the_old_list_said():
    differ = [k for k in all_keys() if bool(key_effect(ExperimentConfig, k) & Affects.TEACHER) != old_identity_key(k)]
    assert not differ
    assert "teacher.train.log_every" in all_keys() and not ExperimentConfig.is_harmless("teacher.train.log_every")


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("trained_here", [True, False])
def test_the_identity_of_each_teacher_is_the_old_one(name, trained_here):
    cfg = _cfg(name)
    assert cfg.teacher_identity_keys(trained_here) == old_identity(cfg, trained_here)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_resume_entries_are_the_old_ones(name):
    cfg = _cfg(name)
    for recipe in (cfg.train, cfg.teacher and cfg.teacher.train):
        if recipe is not None:
            assert cfg.resume_entries(recipe) == old_compat_entries(cfg, recipe)


def test_the_engine_records_the_declared_entries_and_the_stages_own():
    from distill.train.engine import StageSpec, _compat_key

    cfg = _cfg("no teacher, terms")
    spec = StageSpec(name="gen1", arch="vargfacenet", model_kwargs={"embedding_size": 8}, train=cfg.train, alpha=7.0)
    data = type("Data", (), {"num_classes": 3, "__len__": lambda self: 10})()
    compat = _compat_key(cfg, spec, data, 1)
    assert compat == {"arch": "vargfacenet", "model_kwargs": {"embedding_size": 8}, "num_samples": 10,
                      "num_classes": 3, "world_size": 1, "alpha": 7.0, **old_compat_entries(cfg, cfg.train)}


def test_every_key_declared_resume_reaches_last_pt():
    """A field declared RESUME is one of the config's entries (when set) or one the stage gives (its model, alpha)."""
    cfg = _cfg("no teacher, terms")
    named = set(cfg.resume_entries(cfg.train)) | set(STAGE_ENTRIES)
    declared = [(key, f, owner) for key, f, owner in _schema_fields(ExperimentConfig)
                if f.metadata.get("affects") is not None and f.metadata["affects"] & Affects.RESUME]
    assert {key for key, _, _ in declared} >= {"seed", "margin", "data.images_per_id", "train.batch_size"}
    for key, f, owner in declared:
        entry = f.metadata["resume_as"] or (f.name if owner is schema.TrainConfig else key.replace(".", "_"))
        assert entry in named, key


# ------------------------------------------------------------------------------------- a field added elsewhere

def _with_field(monkeypatch, effect: Affects):
    """ExperimentConfig with one more top-level key, `extra`, declaring `effect`; nothing else changed."""
    @dataclass
    class Extended(ExperimentConfig):
        extra: int = field(default=0, metadata=affects(effect))

    monkeypatch.setattr(schema, "ExperimentConfig", Extended)
    return Extended


def _run_dir(tmp_path, raw) -> str:
    run = tmp_path / "run"
    run.mkdir()
    dump_config(build_config(raw), str(run / "experiment.yaml"))
    return str(run)


def test_a_new_field_declared_teacher_is_refused_on_rerun_and_changes_the_teachers_identity(monkeypatch, tmp_path):
    _with_field(monkeypatch, Affects.TEACHER)
    raw = CONFIGS["trained teacher"]
    run = _run_dir(tmp_path, raw)
    with pytest.raises(ConfigError, match=r"extra: 0 -> 1"):
        check_run_dir(build_config({**raw, "extra": 1}), run)
    before, after = (build_config({**raw, "extra": v}).teacher_identity_keys(True) for v in (0, 1))
    assert before["extra"] == 0 and after["extra"] == 1
    assert "extra" not in build_config(raw).teacher_identity_keys(False)  # a loaded teacher: its own keys only
    assert "extra" not in build_config(raw).resume_entries(build_config(raw).train)


def test_a_new_field_declared_teacher_makes_a_recorded_teacher_another_one(monkeypatch, tmp_path):
    """The teacher stage records its identity; the same run with the new key changed is refused before any work."""
    import json

    from distill.utils.layout import RunLayout
    from teachers.prepare import IDENTITY_KEY, check_recorded_teacher, teacher_identity

    _with_field(monkeypatch, Affects.TEACHER)
    raw = CONFIGS["trained teacher"]
    stage = RunLayout(str(tmp_path)).teacher
    (tmp_path / "teacher").mkdir()
    with open(stage.result, "w") as f:
        json.dump({IDENTITY_KEY: teacher_identity(build_config(raw))}, f)
    check_recorded_teacher(build_config(raw), str(tmp_path))
    with pytest.raises(ConfigError, match=r"extra: 0 -> 2"):
        check_recorded_teacher(build_config({**raw, "extra": 2}), str(tmp_path))


def test_a_new_field_declared_nothing_may_change_on_rerun(monkeypatch, tmp_path):
    _with_field(monkeypatch, Affects.NOTHING)
    raw = CONFIGS["trained teacher"]
    run = _run_dir(tmp_path, raw)
    check_run_dir(build_config({**raw, "extra": 1}), run)
    assert "extra" not in build_config(raw).teacher_identity_keys(True)
    assert "extra" in harmless_keys(schema.ExperimentConfig)


def test_a_new_field_declared_resume_is_compared_by_a_resume(monkeypatch):
    _with_field(monkeypatch, Affects.RESUME)
    cfg = build_config({**CONFIGS["trained teacher"], "extra": 3})
    assert cfg.resume_entries(cfg.train)["extra"] == 3
    assert cfg.resume_entries(cfg.teacher.train)["extra"] == 3
    assert "extra" not in cfg.teacher_identity_keys(True)
    from distill.train.engine import StageSpec, _compat_key

    spec = StageSpec(name="gen1", arch="vargfacenet", model_kwargs={}, train=cfg.train)
    assert _compat_key(cfg, spec, type("Data", (), {"num_classes": 3, "__len__": lambda self: 10})(), 1)["extra"] == 3


# ------------------------------------------------------------------------------ allowed values, from one place

def _allowed() -> dict:
    """dotted key -> the values its field declares (teacher.train's as train's)."""
    return {key: f.metadata["allowed"] for key, f, _ in _schema_fields(ExperimentConfig) if "allowed" in f.metadata}


def test_allowed_values_are_the_implementing_modules_own():
    from distill.data.gpu_decode import DECODES
    from distill.data.ijb import TARGETS
    from distill.losses.heads import HEADS
    from distill.utils.device import AMP_MODES

    allowed = _allowed()
    assert allowed["margin.margin"] is HEADS and allowed["data.ijb.target"] is TARGETS
    assert allowed["data.decode"] is DECODES and allowed["train.amp"] is AMP_MODES
    assert allowed["tracking.wandb"] is schema.WANDB_MODES and allowed["train.scheduler"] is schema.SCHEDULERS
    assert allowed["teacher.train.optimizer_impl"] is schema.OPTIMIZER_IMPLS
    assert allowed["distill.project"] is schema.PROJECTIONS
    assert allowed["recursive.teacher"] is schema.RECURSIVE_TEACHERS


@pytest.mark.parametrize("key, value, suggestion", [
    ("train.scheduler", "cosin", "cosine"), ("teacher.train.scheduler", "stepp", "step"),
    ("train.amp", "bf61", "bf16"), ("teacher.train.amp", "fp61", "fp16"), ("data.decode", "cdua", "cuda"),
    ("tracking.wandb", "ofline", "offline"), ("recursive.teacher", "previus", "previous"),
    ("distill.project", "linaer", "linear"), ("margin.margin", "arcfce", "arcface"),
    ("data.ijb.target", "IJBD", None), ("train.optimizer_impl", "fusd", "fused")])
def test_a_value_outside_the_declared_ones_is_one_line_naming_the_key(key, value, suggestion):
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in CONFIGS["trained teacher"].items()}
    raw["data"] = {**raw["data"], "ijb": {"root": "ijb"}}
    *path, name = key.split(".")
    node = raw
    for part in path:
        node[part] = dict(node.get(part) or {})
        node = node[part]
    node[name] = value
    with pytest.raises(ConfigError, match=rf"key '{key}' must be one of .*got '{value}'") as err:
        build_config(raw)
    assert suggestion is None or f"did you mean '{suggestion}'?" in str(err.value)
    assert "\n" not in str(err.value)


def test_the_implementation_takes_every_declared_value():
    import torch

    from distill.train.setup import create_optimizer, create_scheduler
    from distill.train.tracking import resolve_mode
    from distill.utils.device import amp_settings

    params = [torch.nn.Parameter(torch.zeros(2))]
    for scheduler in schema.SCHEDULERS:
        train = schema.TrainConfig(scheduler=scheduler, decay_epochs=[1])
        create_scheduler(create_optimizer(params, train, 1, torch.device("cpu")), train, 10, 5.0)
    for impl in schema.OPTIMIZER_IMPLS:
        try:
            create_optimizer(params, schema.TrainConfig(optimizer_impl=impl), 1, torch.device("cpu"))
        except ConfigError as err:  # fused where torch has no fused kernel on this device: said so, not unknown
            assert impl == "fused" and "no fused kernel" in str(err)
    for amp in _allowed()["train.amp"]:
        amp_settings(schema.TrainConfig(amp=amp), torch.device("cpu"))
    for mode in schema.WANDB_MODES:
        assert resolve_mode(mode, environ={}) in ("online", "offline", "disabled")
