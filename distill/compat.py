"""Legacy spellings and formats that still load, each with what it maps to.

One place for every old spelling the toolkit still accepts, so the code that reads configs, checkpoints and
teacher specs only ever sees the current form. Each entry names the old form, the current form it maps to and
the function that maps it. Light: importing this module imports no torch (it works on the objects it is given).

Entries (one section each below):

- Model state-dict keys (`STATE_DICT_RENAMES`; `upgrade_state_dict`, `register_legacy_keys`):
  VarGFaceNet `head.*` -> `stem.*` and `features.*` -> `embedding_norm.*`; TimmBackbone `features.*` ->
  `embedding_norm.*`. Applied to every strict load (distill.utils.checkpoint.load_state_dict_strict) and to a
  plain `model.load_state_dict` (last.pt's model state), so student.pt, last.pt and teacher checkpoints written
  with the old keys load unchanged. Teacher fingerprints keep hashing the old key names
  (`fingerprint_state_dict`), so the teacher caches keyed by them stay valid.
- Constructor arguments in student.pt and in a config's student/teacher section (`MODEL_KWARG_RENAMES`;
  `upgrade_model_kwargs`): IResNet's and MobileFaceNet's `num_features` (arcface_torch's name) -> `embedding_size`.
- FAR keys of result.json / summary.json in eval_ijbc.py's spelling ('1e-06', '0.0001') -> far_key's ('1e-6',
  '1e-4'): distill.eval.far.normalise_results (kept beside far_key, whose rule it applies; this module imports
  nothing of distill).
- Teacher specs (`upgrade_legacy_teacher`), in a config's `teacher:` and `teachers.build_teacher`'s argument:
  `kind: iresnet, depth: N` -> `arch: iresnetN`; `kind: timm, name: X` -> `arch: timm/X`; `kind: facedistill`
  (`student:` / `model_kwargs:`) -> `arch:` with its arguments directly under `teacher`; `kind: onnx,
  checkpoint: F` -> `onnx: F`; with a ConfigDeprecationWarning saying what to write instead.
- Loss options of a stage that started before last.pt recorded them (`LEGACY_LOSS_DEFAULTS`): each option's
  default in that version, which the stage resumes under where the config leaves the option unset
  (distill.train.state.started_terms), so it does not finish under other defaults than it started with.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------- model state-dict keys

# old key prefix -> current one, per architecture (the class name, or a base class's). VarGFaceNet's stem was
# held as `head` (the engine's `head` is the margin classifier) and the BatchNorm that ends its embedding as
# `features` (timm's "features" are feature maps). Registration order is unchanged, so the positional optimizer
# state in last.pt still matches.
STATE_DICT_RENAMES: dict[str, dict[str, str]] = {
    "VarGFaceNet": {"head.": "stem.", "features.": "embedding_norm."},
    "TimmBackbone": {"features.": "embedding_norm."},
}


def _renames_of(module) -> dict[str, str]:
    for cls in type(module).__mro__:
        if cls.__name__ in STATE_DICT_RENAMES:
            return STATE_DICT_RENAMES[cls.__name__]
    return {}


def _renamed(key: str, prefix: str, renames: dict[str, str]) -> str:
    if key.startswith(prefix):
        rest = key[len(prefix):]
        for old, new in renames.items():
            if rest.startswith(old):
                return prefix + new + rest[len(old):]
    return key


def _rename_in_place(state_dict, prefix: str, renames: dict[str, str]) -> None:
    """Rename the keys (and the `_metadata` entries torch keeps per module) under `prefix`, keeping their order."""
    if not renames or not any(_renamed(k, prefix, renames) != k for k in state_dict):
        return
    items = [(_renamed(k, prefix, renames), v) for k, v in state_dict.items()]
    state_dict.clear()
    state_dict.update(items)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata:
        entries = [(_renamed(k + ".", prefix, renames)[:-1] if k else k, v) for k, v in metadata.items()]
        metadata.clear()
        metadata.update(entries)


def upgrade_state_dict(model, state_dict: dict) -> dict:
    """`state_dict` for `model` with every legacy key of its modules (STATE_DICT_RENAMES) renamed to the current
    one; a current state dict comes back equal. A new dict: the caller's is not changed."""
    from collections import OrderedDict

    out = OrderedDict(state_dict)
    if hasattr(state_dict, "_metadata"):
        out._metadata = OrderedDict(state_dict._metadata)
    for name, module in model.named_modules():
        _rename_in_place(out, f"{name}." if name else "", _renames_of(module))
    return out


def register_legacy_keys(module) -> None:
    """Make a plain `module.load_state_dict(old)` rename the module's legacy keys first (`state_dict_pre_hook`);
    called by the constructors of the architectures in STATE_DICT_RENAMES."""
    register = getattr(module, "register_load_state_dict_pre_hook", None)  # public in recent torch only
    if register is not None:
        register(state_dict_pre_hook)
    else:
        module._register_load_state_dict_pre_hook(state_dict_pre_hook, with_module=True)


def state_dict_pre_hook(module, state_dict, prefix, *_) -> None:
    """A load_state_dict pre-hook (`register_legacy_keys`): renames the module's legacy keys before torch matches
    them, so a plain `model.load_state_dict(old)` loads too (torch
    hands a nested module a filtered copy without `_metadata`; its BatchNorms then read no version, which only
    matters for files older than `num_batches_tracked`)."""
    _rename_in_place(state_dict, prefix, _renames_of(module))


def fingerprint_state_dict(model) -> dict:
    """`model.state_dict()` under the key names teacher fingerprints are defined over (the legacy names of
    STATE_DICT_RENAMES), so renaming a module does not change a teacher's fingerprint or orphan its cache."""
    state = model.state_dict()
    for name, module in reversed(list(model.named_modules())):  # innermost first: outer prefixes still match
        prefix = f"{name}." if name else ""
        _rename_in_place(state, prefix, {new: old for old, new in _renames_of(module).items()})
    return state



# ------------------------------------------------------------------------------ constructor arguments in files

# student.pt's `kwargs` rebuild the model; argument names that files still hold, per architecture family (a
# canonical registry name's prefix) -> the current argument.
MODEL_KWARG_RENAMES: dict[str, dict[str, str]] = {
    "iresnet": {"num_features": "embedding_size"},  # arcface_torch's name for the embedding size
    "mbf": {"num_features": "embedding_size"},      # the same in its MobileFaceNets (mbf, mbf_large)
}


def upgrade_model_kwargs(arch: str, kwargs: dict) -> dict:
    """`kwargs` recorded for the model `arch` (its canonical registry name) with legacy argument names
    (MODEL_KWARG_RENAMES) replaced by the current ones; a new dict."""
    kwargs = dict(kwargs)
    for family, renames in MODEL_KWARG_RENAMES.items():
        if arch.startswith(family):
            for old, new in renames.items():
                if old in kwargs:
                    value = kwargs.pop(old)
                    if value is not None:  # None: not given (a config's recorded default), the current name stays
                        kwargs[new] = value
    return kwargs

# ------------------------------------------------------------------------------------------ teacher specs
# Legacy teacher spellings (config section `teacher:` and the spec of `teachers.build_teacher`), each -> what it
# maps to, with a ConfigDeprecationWarning saying what to write instead:
#   kind: iresnet, depth: D                    -> arch: iresnet<D>   (kind defaults to iresnet, depth to 100)
#   kind: timm, name: N                        -> arch: timm/<N>
#   kind: facedistill, student: {...} or arch + model_kwargs
#                                              -> arch: <name> with its arguments directly under teacher
#                                                 (embedding_size dropped: the architecture's own size applies)
#   kind: onnx, checkpoint: F                  -> onnx: F   (embedding_size, input_size dropped: read from the file)

def upgrade_legacy_teacher(spec: dict, error: type = ValueError) -> tuple[dict, str | None]:
    """A teacher spec (config section `teacher:` or `teachers.build_teacher`'s argument) in the legacy `kind:` form,
    in the current form, and a note saying what to write (None: the spec is already current). A legacy spec that
    cannot be mapped raises `error` (the callers pass ConfigError; this module imports nothing of distill, so every
    package may import it).

    iresnet (depth) -> arch iresnet<depth>; timm (name) -> arch timm/<name>; facedistill (`student:` in a
    config, or `arch` + `model_kwargs`) -> arch and its arguments; onnx (checkpoint) -> onnx. Other keys
    (checkpoint, cache, train, embedding_size, input_size ...) stay.

    The legacy form is a spec with `kind` (and no `onnx`), or one without `arch` holding a legacy key (`depth`,
    `name`, `student`, `model_kwargs`: the old default kind was iresnet). A current spec (`arch` or `onnx`, no
    `kind`) is never upgraded: `model_kwargs` is also an argument of the current `timm/<name>` models, and a
    trained timm teacher's spec holds it."""
    legacy_keys = ("depth", "name", "student", "model_kwargs")
    if "onnx" in spec or ("kind" not in spec and ("arch" in spec or not any(k in spec for k in legacy_keys))):
        return dict(spec), None
    spec = dict(spec)
    kind = spec.pop("kind", "iresnet")  # the old default kind
    if kind == "iresnet":
        spec["arch"] = f"iresnet{spec.pop('depth', 100)}"
        new = f"arch: {spec['arch']}"
    elif kind == "timm":
        if "name" not in spec:
            raise error("teacher: kind 'timm' needs 'name' (write arch: timm/<name> instead)")
        spec["arch"] = f"timm/{spec.pop('name')}"
        new = f"arch: {spec['arch']}"
    elif kind == "facedistill":
        arch = dict(spec.pop("student", None) or {})
        arch.update(spec.pop("model_kwargs", None) or {})
        arch.pop("init", None)
        name = arch.pop("arch", None) or spec.get("arch")
        if name is None:
            raise error("teacher: kind 'facedistill' needs 'arch' (a registered model name); write arch: <name>")
        spec.pop("embedding_size", None)  # the architecture's own embedding size always won
        spec = {**spec, **arch, "arch": name}
        new = f"arch: {name} with its arguments ({', '.join(sorted(arch)) or 'none'}) directly under teacher"
    elif kind == "onnx":
        spec["onnx"] = spec.pop("checkpoint", None)
        spec.pop("embedding_size", None), spec.pop("input_size", None)  # read from the file; were ignored
        new = f"onnx: {spec['onnx']}"
    else:
        raise error(f"teacher: unknown teacher kind {kind!r}; write arch: <model name> (see `distill "
                    f"profile --list`) or onnx: <file>")
    for key in ("depth", "name", "student", "model_kwargs"):
        spec.pop(key, None)
    return spec, f"teacher: 'kind: {kind}' is deprecated; write {new}"


# ------------------------------------------------------------------------------------------ loss options
# A stage's last.pt records every term's options (distill/train/state.py: `loss_options`, format
# facedistill.train/3). A last.pt without that record was written before these options' defaults became the
# authors' code (docs/methods.md), by code that computed what the values below say; such a stage resumes each term
# with them for the options its config leaves unset, with one note. An option the loss does not take is skipped;
# a value equal to the current default changes nothing.
#   loss -> {option: what the code computed when last.pt recorded no options}
LEGACY_LOSS_DEFAULTS: dict[str, dict[str, object]] = {
    "adadistill": {"centre_update": "normalised", "train_centres": True, "same_class": "mean"},
    "ekd": {"threshold_index": "ceil", "warm_start": "first_batch", "batch": "device"},
    "margin_distillation": {"train_centres": True, "margin_max": "global"},
    "rkd": {"pairs": "distinct"},
    "attention_transfer": {"reduction": "sum"},
    "shrinkteanet_angular": {"form": "squared"},
}
