"""What a change to a config key touches, declared on the schema's fields, and what follows from it.

Each field of the experiment schema (distill/config/schema.py) may declare its effect with `affects(...)` in its
metadata; a field that declares nothing has its section's effect (a section is a field holding a dataclass: its
declaration is the default of every key in it; the top level's default is RESULTS). The effect is a set of flags:

    NOTHING  how the work is done (loader, logging, speed): may change between reruns of one run directory
    RESULTS  what a run produces: a rerun with another value is another experiment (every other key)
    TEACHER  a teacher trained in the run is a function of it: part of the teacher's identity
    RESUME   a stage's last.pt must agree on it to be resumed

TEACHER and RESUME imply RESULTS. In a section that affects the teacher (teacher.train, data.synthetic, margin),
a key that changes anything affects the teacher too, and a key declared NOTHING (teacher.train.log_every) is
no part of the teacher's identity but is still compared between reruns (RESULTS): the teacher stage's
settings change only with `--restart-stage teacher`.

From the declarations: `is_harmless` (the rerun check, distill/run/rundir.py), `teacher_keys` (the config's part
of a teacher's identity, teachers/prepare.py), `resume_entries` (what last.pt records and a resume compares,
distill/train/engine.py). The experiment schema binds them to itself (ExperimentConfig.is_harmless,
.teacher_identity_keys, .resume_entries). This module imports nothing of distill: teachers/ may use it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing


class Affects(enum.Flag):
    NOTHING = 0
    RESULTS = enum.auto()
    TEACHER = enum.auto()
    RESUME = enum.auto()


# last.pt entries the stage itself gives (engine.StageSpec: its model, input size included, and its distillation
# weight): a key declared RESUME with one of these names reaches the checkpoint through the stage, not read here
STAGE_ENTRIES = ("arch", "model_kwargs", "alpha")


def affects(effect: Affects, *, resume_as: str | None = None, resume_if_set: bool = False, **metadata) -> dict:
    """A field's metadata declaring its effect. With RESUME: `resume_as` names its last.pt entry (default: the key
    with '_' for '.'; a key of a training recipe, its own name); `resume_if_set`: the entry is recorded only when the
    value differs from the field's default (a key added after checkpoints without it were written: they resume)."""
    if effect:
        effect |= Affects.RESULTS
    return {"affects": effect, "resume_as": resume_as, "resume_if_set": resume_if_set, **metadata}


def flat_dict(d: dict, prefix: str = "") -> dict:
    """{'train.lr': 0.1, ...}: a nested config dict keyed by dotted paths (empty sections kept as values)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------------------ the schema's tree

@functools.cache
def _fields(cls) -> dict:
    """name -> (field, the dataclass it holds or None) of a schema dataclass."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        out[f.name] = (f, tp if dataclasses.is_dataclass(tp) else None)
    return out


def _spread(cls):
    """The field that holds the keys a section does not define itself (a model's arguments), or None."""
    return next((f for f, _ in _fields(cls).values() if f.metadata.get("spread")), None)


def _within(section: Affects, declared: Affects | None) -> Affects:
    """The effect of a key in a section: its own declaration, else the section's; in a section that affects the
    teacher, a key that changes anything affects the teacher too, and one that changes nothing is still compared."""
    own = section if declared is None else declared
    if section & Affects.TEACHER:
        return own | Affects.TEACHER if own else Affects.RESULTS
    return own


def key_effect(root, key: str) -> Affects:
    """What a change to `key` (a dotted path, as flat_dict writes it) touches, for the schema whose top is `root`.
    A key the schema does not know has its section's effect."""
    effect, cls = Affects.RESULTS, root
    for part in key.split("."):
        if cls is None:
            break
        entry = _fields(cls).get(part)
        f, inner = entry if entry else (_spread(cls), None)
        if f is None:
            break
        effect, cls = _within(effect, f.metadata.get("affects")), inner
    return effect


def is_harmless(root, key: str) -> bool:
    """Whether `key` may change between reruns of one run directory (its effect is NOTHING)."""
    return key_effect(root, key) == Affects.NOTHING


def harmless_keys(root, cls=None, prefix: str = "") -> tuple:
    """The keys (and key prefixes: a section) declared to affect nothing, in schema order."""
    out = []
    for name, (f, inner) in _fields(cls or root).items():
        if f.metadata.get("spread"):
            continue
        key = prefix + name
        if is_harmless(root, key):
            out.append(key)
        elif inner is not None:
            out.extend(harmless_keys(root, inner, key + "."))
    return tuple(out)


def teacher_keys(root, flat: dict, trained_here: bool, section: str = "teacher") -> dict:
    """The config's part of a teacher's identity: {key: value} of the keys of `flat` that affect the teacher. A
    loaded teacher (not trained here) is its own section's keys only, its training recipe's (teacher.train.*)
    excepted: what it was trained with is in its file, whose contents the identity holds beside these."""
    out = {k: v for k, v in flat.items() if key_effect(root, k) & Affects.TEACHER}
    if not trained_here:
        out = {k: v for k, v in out.items() if k.startswith(section + ".") and not k.startswith(section + ".train.")}
    return out


def resume_entries(cfg, recipe) -> dict:
    """The config's entries of what a stage's last.pt must agree on: one per field declared RESUME (a section
    declared RESUME is one entry, its fields as a dict), named by its `resume_as`. The keys of a training recipe
    are read from `recipe` (the stage's: train or teacher.train) under their own names; the entries the stage
    itself gives (STAGE_ENTRIES) are left to it."""
    out = _entries(cfg, type(recipe), "")
    for name, (f, _) in _fields(type(recipe)).items():
        if _declares_resume(f):
            _add(out, f, name, getattr(recipe, name))
    return out


def _declares_resume(f) -> bool:
    effect = f.metadata.get("affects")
    return effect is not None and bool(effect & Affects.RESUME)


def _entries(section, recipe_type, prefix: str) -> dict:
    out = {}
    for name, (f, inner) in _fields(type(section)).items():
        value = getattr(section, name)
        if _declares_resume(f):
            name_as = f.metadata.get("resume_as") or (prefix + name).replace(".", "_")
            if name_as not in STAGE_ENTRIES:
                _add(out, f, name_as, value)
        elif inner is not None and inner is not recipe_type and value is not None:
            out.update(_entries(value, recipe_type, prefix + name + "."))
    return out


def _add(out: dict, f, name: str, value) -> None:
    if f.metadata.get("resume_if_set"):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if value == default:
            return
    out[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
