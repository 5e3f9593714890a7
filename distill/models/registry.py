"""The model registry: every architecture registered once by name, in timm's manner.

    @register_model(aliases=("r18",))
    def iresnet18(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0):
        return IResNet(18, embedding_size=embedding_size, input_size=input_size, dropout=dropout)

`create_model(name, **kwargs)` and `list_models()` are the only factory: students, IResNet teachers
(`iresnet18..200`, arcface_torch's `r18..r200` as aliases) and any timm backbone as `timm/<name>` (a
family registered by its prefix). Every model takes `embedding_size` and `input_size`.

A model's keyword arguments are its constructor's signature: `model_defaults(name)` lists them with
their defaults and `check_model_kwargs(name, kwargs)` refuses an unknown one with a "did you mean", so a
config is checked when it loads, before any file is touched. A registered function with `**kwargs` that
passes them on to a class says so with `builds=Class`: the class's keyword arguments are then accepted too.

The families register when their modules are imported. The built-in ones (BUILTIN_FAMILIES: the students,
the IResNets, `timm/<name>`) are imported by `_load_builtin_families()`, which every lookup here (and
register_model, so a new name is checked against them) calls first: the registry always knows them, and
`import distill` stays light. The documented import path of this module is `distill.registry`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass

from distill.utils.errors import ConfigError, UnknownNameError


def did_you_mean(word: str, choices, prefix: str = "") -> str:
    """'; did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def check_name(name, known, what: str, key: str = "") -> None:
    """Refuse a name that is not registered: the message names the key, suggests and lists the known names."""
    known = sorted(known)
    if name in known:
        return
    where = f"key '{key}': " if key else ""
    listing = f" (registered: {', '.join(known)})" if len(known) <= 40 else ""
    raise UnknownNameError(f"{where}unknown {what} {name!r}{did_you_mean(name, known)}{listing}")


@dataclass
class ModelEntry:
    name: str
    fn: object                  # the registered constructor
    params: dict                # keyword argument -> default (inspect.Parameter.empty when required)
    family: bool = False        # registered by prefix: fn(<rest of the name>, **kwargs)
    check: object = None        # family: check(member name) raises when the member does not exist


_MODELS: dict = {}     # canonical name (or family prefix) -> ModelEntry
_ALIASES: dict = {}    # alias -> canonical name
_FAMILIES: dict = {}   # prefix -> ModelEntry

BUILTIN_FAMILIES = ("distill.models.vargfacenet", "distill.models.iresnet", "distill.models.mobilefacenet",
                    "distill.models.timm_backbone")
_builtins = "not loaded"  # -> "loading" (their modules call register_model while imported) -> "loaded"


def _load_builtin_families() -> None:
    """Import the modules of BUILTIN_FAMILIES once (they register their models when imported)."""
    global _builtins
    if _builtins != "not loaded":
        return
    _builtins = "loading"
    try:
        for module in BUILTIN_FAMILIES:
            importlib.import_module(module)
    except BaseException:
        _builtins = "not loaded"
        raise
    _builtins = "loaded"


def _keyword_params(fn, skip: int = 0) -> tuple[dict, bool]:
    """{name: default} of fn's keyword-capable parameters (the first `skip` dropped) and whether it has **kwargs."""
    params, var_kw = {}, False
    for i, p in enumerate(inspect.signature(fn).parameters.values()):
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
        elif i >= skip and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            params[p.name] = p.default
    return params, var_kw


def _entry(name: str, fn, builds, family: bool = False, check=None) -> ModelEntry:
    params, var_kw = _keyword_params(fn, skip=1 if family else 0)
    if var_kw:
        if builds is None:
            raise TypeError(f"register_model({name}): a constructor taking **kwargs must say what it builds "
                            f"(builds=Class)")
        inherited, _ = _keyword_params(builds.__init__, skip=1)
        params = {**inherited, **params}  # the function's own defaults win (vargfacenet_depthwise: group_size=1)
    missing = {"embedding_size", "input_size"} - set(params)
    if missing:
        raise TypeError(f"register_model({name}): every model takes embedding_size and input_size; "
                        f"{', '.join(sorted(missing))} missing")
    return ModelEntry(name, fn, params, family=family, check=check)


def register_model(fn=None, *, aliases: tuple = (), builds=None, timm: bool = False):
    """Register `fn(**kwargs) -> nn.Module` under its function name (decorator, with or without arguments).

    aliases: other names for it (r100 for iresnet100); builds: the class `fn` passes **kwargs to;
    timm: also register it with timm, so `timm.create_model(name)` builds it after `import distill` (a dict:
    entries of its default pretrained_cfg at 112 px, e.g. first_conv; distill/models/contract.py)."""

    def add(fn):
        _load_builtin_families()
        name = fn.__name__
        for key in (name, *aliases):
            if key in _MODELS or key in _ALIASES:
                raise ValueError(f"model name {key!r} is registered twice")
        _MODELS[name] = _entry(name, fn, builds)
        _ALIASES.update({a: name for a in aliases})
        if timm:
            for key in (name, *aliases):
                _register_with_timm(fn, key, timm if isinstance(timm, dict) else {})
        return fn

    return add(fn) if fn is not None else add


def register_model_family(prefix: str, check=None):
    """Register `fn(name, **kwargs)` for every model name `<prefix><name>` (e.g. timm/resnet50).
    `check(name)` raises when `name` does not exist in the family."""

    def add(fn):
        _load_builtin_families()
        _FAMILIES[prefix] = _entry(prefix + "<name>", fn, None, family=True, check=check)
        return fn

    return add


def _register_with_timm(fn, name: str, cfg: dict) -> None:
    """`timm.create_model(name, ...)` builds `fn`'s model through timm's builder (build_model_with_cfg), so it
    carries its pretrained_cfg and `features_only=True` (out_indices, feature_cls) works; a name timm already
    has is left to timm."""
    import sys

    import timm.models
    from timm.models import build_model_with_cfg

    from distill.models.contract import face_pretrained_cfg

    if name in timm.models.list_models(name):
        return
    ignored = ("cache_dir", "global_pool", "drop_rate", "scriptable", "exportable", "no_jit")  # not the model's
    # timm reads a registered model's default cfg from its module's `default_cfgs` (list_models(pretrained=...),
    # name_matches_cfg): the face conventions at 112 px; a model built at another size carries its own
    module = sys.modules[fn.__module__]
    if not hasattr(module, "default_cfgs"):
        module.default_cfgs = {}
    module.default_cfgs[name] = face_pretrained_cfg(112, 7, cfg.get("first_conv", ""))

    def factory(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"{name}: no pretrained weights are published; load a student.pt instead")
        place = {k: v for k, v in ((k, kwargs.pop(k, None)) for k in ("device", "dtype")) if v is not None}
        pool = kwargs.get("global_pool")
        kwargs = {k: v for k, v in kwargs.items() if k not in ignored}
        model = _build_for_timm(kwargs)
        if pool is not None and not kwargs.get("features_only"):
            model.reset_classifier(model.num_classes, pool)
        return model.to(**place) if place else model

    def _build_for_timm(kwargs):
        model_kwargs = {k: v for k, v in kwargs.items() if k not in ("features_only", "out_indices", "feature_cls",
                                                                     "pretrained_cfg", "pretrained_cfg_overlay")}
        if not kwargs.get("features_only"):
            model = fn(**model_kwargs)
            model.pretrained_cfg = model.default_cfg = _resolved_cfg(model, kwargs)
            return model
        import torch

        with torch.random.fork_rng(devices=[]):  # a probe for the feature layout: the model draws what fn's would
            probe = fn(**model_kwargs)
        kwargs.pop("pretrained_cfg", None)
        return build_model_with_cfg(
            fn, name, pretrained=False, pretrained_cfg=_resolved_cfg(probe, kwargs), kwargs_filter=("img_size",),
            feature_cfg=dict(out_indices=tuple(range(len(probe.feature_info))),
                             flatten_sequential=any("." in f["module"] for f in probe.feature_info)), **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__module__ = fn.__module__
    factory.__doc__ = fn.__doc__
    timm.models.register_model(factory)


def _resolved_cfg(model, kwargs) -> dict:
    """The model's own pretrained_cfg with timm's overlay (`pretrained_cfg_overlay=`) applied."""
    return {**model.pretrained_cfg, **(kwargs.get("pretrained_cfg_overlay") or {})}


def list_models(aliases: bool = False) -> list:
    """Registered model names (and their aliases), then each family as `<prefix><name>`."""
    _load_builtin_families()
    names = sorted(_MODELS, key=_natural) + (sorted(_ALIASES, key=_natural) if aliases else [])
    return names + [f"{p}<name>" for p in sorted(_FAMILIES)]


def _natural(name: str) -> tuple:
    """iresnet18 < iresnet100 (digits compared as numbers)."""
    head = name.rstrip("0123456789")
    return (head, int(name[len(head):]) if name[len(head):] else -1)


def resolve(name: str) -> tuple[ModelEntry, str | None]:
    """(entry, family member name or None) of a model name; unknown names get a suggestion."""
    _load_builtin_families()
    if not isinstance(name, str):
        raise ConfigError(f"a model name must be a string, got {name!r}")
    name = _ALIASES.get(name, name)
    if name in _MODELS:
        return _MODELS[name], None
    for prefix, entry in _FAMILIES.items():
        if name.startswith(prefix):
            member = name[len(prefix):]
            if entry.check is not None:
                entry.check(member)
            return entry, member
    raise UnknownNameError(f"unknown model {name!r}{did_you_mean(name, list(_MODELS) + list(_ALIASES))} "
                           f"(registered: {', '.join(list_models(aliases=True))})")


def check_model_name(name: str, key: str) -> None:
    """`resolve` for a config key: an unknown name's message starts with the key."""
    _load_builtin_families()
    try:
        resolve(name)
    except UnknownNameError as err:
        raise UnknownNameError(f"key '{key}': {err}") from None


def canonical_name(name: str) -> str:
    """iresnet100 for r100; a family member and a registered name stay as they are."""
    _load_builtin_families()
    return _ALIASES.get(name, name)


# timm's contract arguments (distill/models/contract.py): accepted, never part of an experiment's defaults, so
# experiment.yaml, a teacher's identity and student.pt's kwargs read as they did before the contract
CONTRACT_ONLY = ("num_classes", "in_chans")


def model_defaults(name: str) -> dict:
    """The model's keyword arguments and their defaults (required ones absent; timm's contract-only ones too)."""
    _load_builtin_families()
    entry, _ = resolve(name)
    return {k: v for k, v in entry.params.items() if v is not inspect.Parameter.empty and k not in CONTRACT_ONLY}


def check_model_kwargs(name: str, kwargs: dict, section: str = "", other_keys: tuple = ()) -> None:
    """Refuse keyword arguments the constructor of `name` does not take, or values of the wrong type
    (judged by the default's type). `section` prefixes key names in messages (e.g. 'student.');
    `other_keys` are the section's own keys, suggested too (a typo of 'init' is not a model argument)."""
    _load_builtin_families()
    entry, _ = resolve(name)
    if section and kwargs.get("num_classes"):  # a timm user's classifier; an experiment's is the margin head
        raise ConfigError(f"key '{section}num_classes': the margin head (margin:) classifies in an experiment; "
                          f"remove {section}num_classes (it is for timm.create_model users)")
    for key, value in kwargs.items():
        if key not in entry.params:
            hint = (did_you_mean(key, [*entry.params, *other_keys], prefix=section)
                    or f"; {name} takes {', '.join(entry.params)}")
            raise ConfigError(f"unknown key '{section}{key}': {name} has no argument {key!r}{hint}")
        default = entry.params[key]
        if not same_kind(value, default):
            kind = "list" if isinstance(default, (list, tuple)) else type(default).__name__
            raise ConfigError(f"key '{section}{key}' must be {kind}, got {value!r} ({type(value).__name__})")


def same_kind(value, default) -> bool:
    """Whether `value` is of the kind of `default` (a model argument's or a loss option's; None: any)."""
    if default is inspect.Parameter.empty or default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def create_model(name: str, **kwargs):
    """A fresh (randomly initialised) model of architecture `name`, built from keyword arguments."""
    _load_builtin_families()
    entry, member = resolve(name)
    check_model_kwargs(name, kwargs)
    return entry.fn(member, **kwargs) if entry.family else entry.fn(**kwargs)


def create_model_to_load(name: str, **kwargs):
    """Model `name` with uninitialised weights, for a state dict to fill (every load of a file: a teacher's
    checkpoint, a student.pt): built on the meta device, then given CPU memory, so no time goes into a random
    initialisation the load overwrites (an IResNet-100 spends seconds in it on a CPU) and no random number is drawn.
    A model whose state dict would not fill it (buffers kept out of the state dict, left uninitialised otherwise)
    or that the meta device cannot build is built as create_model builds it."""
    import torch

    try:
        with torch.device("meta"):
            model = create_model(name, **kwargs)
    except (RuntimeError, NotImplementedError, ValueError, TypeError):  # e.g. a value read from a tensor when built
        return create_model(name, **kwargs)
    saved = set(model.state_dict())
    if any(buffer not in saved for buffer, _ in model.named_buffers()):
        return create_model(name, **kwargs)
    return model.to_empty(device="cpu")


_FEATURE_COUNTS: dict = {}


def feature_count(name: str, kwargs: dict) -> int | None:
    """How many feature stages (timm's feature_info) model `name` with `kwargs` has, built on the meta device (no
    memory, no random state; counted once per process); None when the model has no feature_info or cannot be built
    so (the stage start checks it again on the real model)."""
    if kwargs.get("pretrained"):  # the count does not depend on the weights: never download them for it
        kwargs = {**kwargs, "pretrained": False}
    key = (name, repr(sorted(kwargs.items())))
    if key not in _FEATURE_COUNTS:
        import torch
        try:
            with torch.device("meta"):
                info = getattr(create_model(name, **kwargs), "feature_info", None)
        except Exception:  # noqa: BLE001 - a model meta tensors cannot build is checked at stage start instead
            info = None
        _FEATURE_COUNTS[key] = None if info is None else len(info.info if hasattr(info, "info") else info)
    return _FEATURE_COUNTS[key]
