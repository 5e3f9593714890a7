"""The registry of distillation losses: a term's `loss` (distill.terms, or the short form distill.loss) names one.

Adding a loss is one file in distill/losses/ with one registration: the registry imports every module of the
package the first time it is read (`discover`), so `@register_loss(...)` in a new file is all it takes. A loss
is a function `fn(student_emb, teacher_emb, *, options...) -> scalar tensor` registered under its name, or an
nn.Module class whose constructor takes the options; each declares what it needs with one Requirements value
(distill/losses/requirements.py): `register_loss(..., requires=Requirements(...))`, or a class attribute
`requires`. The contract of each kind is distill/losses/distillation.py's module docstring.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import pkgutil
import typing

from distill.losses.requirements import Requirements
from distill.models.registry import did_you_mean, same_kind
from distill.utils.errors import ConfigError, UnknownNameError


class _Losses(dict):
    """{name: loss} of every registered loss; reading it first imports the package's modules (`discover`)."""

    def __getitem__(self, name):
        discover()
        return super().__getitem__(name)

    def __contains__(self, name) -> bool:
        discover()
        return super().__contains__(name)

    def __iter__(self):
        discover()
        return super().__iter__()

    def __len__(self) -> int:
        discover()
        return super().__len__()

    def get(self, name, default=None):
        discover()
        return super().get(name, default)

    def keys(self):
        discover()
        return super().keys()

    def values(self):
        discover()
        return super().values()

    def items(self):
        discover()
        return super().items()


DISTILL_LOSSES: dict = _Losses()
_REQUIREMENTS: dict = {}
_DISCOVERED: dict = {"path": None}  # the package path last scanned (a changed __path__ is scanned again)


def discover() -> None:
    """Import every module of distill/losses/ (each registers its losses as it is imported), once per package path."""
    import distill.losses as package

    path = tuple(package.__path__)
    if _DISCOVERED["path"] == path:
        return
    _DISCOVERED["path"] = path  # (set first: a module imported here may read the registry)
    try:
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")
    except BaseException:
        _DISCOVERED["path"] = None
        raise


def register_loss(fn=None, name: str | None = None, *, requires: Requirements | None = None):
    """Register a loss function under its name (or `name`), or a loss class under `name`, with what it needs:
    `requires`, else the class's `requires` attribute (its own or a base class's), else Requirements() (teacher
    embeddings only).

        @register_loss                                   # a function, no requirements beyond the embeddings
        @register_loss(requires=Requirements(sizes="any"))
        @register_loss("ekd", requires=Requirements(labels=True, images_per_id=True))
    """
    if fn is None or isinstance(fn, str):  # @register_loss("name", requires=...) or @register_loss(requires=...)
        return lambda target: register_loss(target, fn, requires=requires)
    own = vars(fn).get("requires") if isinstance(fn, type) else None
    if requires is not None and own is not None:
        raise TypeError(f"{fn.__name__}: declare its Requirements once, in register_loss or as its `requires`")
    inherited = getattr(fn, "requires", None) if isinstance(fn, type) else None  # a base class's declaration
    requires = next((r for r in (requires, own, inherited) if r is not None), Requirements())
    if not isinstance(requires, Requirements):
        raise TypeError(f"{fn.__name__}: requires must be a Requirements value, got {type(requires).__name__}")
    key = name or fn.__name__
    dict.__setitem__(DISTILL_LOSSES, key, fn)
    _REQUIREMENTS[key] = requires
    return fn


def unregister_loss(name: str) -> None:
    """Remove registered loss `name` (tests); its module stays imported."""
    dict.pop(DISTILL_LOSSES, name, None)
    _REQUIREMENTS.pop(name, None)


def requirements(name: str) -> Requirements:
    """What registered loss `name` needs (its declared Requirements)."""
    if name not in DISTILL_LOSSES:
        raise UnknownNameError(f"unknown distillation loss {name!r}; registered losses: "
                               f"{', '.join(sorted(DISTILL_LOSSES))}")
    return _REQUIREMENTS[name]


def loss_options(name: str) -> dict:
    """{option: default} of registered loss `name`: a class's constructor arguments, a function's keyword-only ones."""
    fn = DISTILL_LOSSES[name]
    if isinstance(fn, type):
        params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    else:
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return {p.name: p.default for p in params}


def create_distill_loss(name: str, **kwargs):
    """The registered loss `name`, with keyword options bound; unknown names or options are errors."""
    if name not in DISTILL_LOSSES:
        raise UnknownNameError(f"unknown distillation loss {name!r}; registered losses: "
                               f"{', '.join(sorted(DISTILL_LOSSES))}")
    fn = DISTILL_LOSSES[name]
    _check_options(name, kwargs, list(loss_options(name)))
    if isinstance(fn, type):
        return fn(**kwargs)
    for option, value in kwargs.items():  # a function's options are checked here, as a class checks its own
        allowed = _allowed_values(fn, option)
        if allowed and value not in allowed:
            raise ValueError(f"{name}: {option} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    return functools.partial(fn, **kwargs) if kwargs else fn


def _allowed_values(fn, option: str) -> tuple:
    """The values a function loss's keyword option takes when annotated with typing.Literal, else () (any)."""
    hint = typing.get_type_hints(fn).get(option)
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()


def _check_options(name: str, kwargs: dict, accepted: list, key: str | None = None) -> None:
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        where = f"key '{key}.{unknown[0]}': " if key else ""
        raise ConfigError(f"{where}distillation loss {name!r} does not take {', '.join(unknown)}"
                          f"{did_you_mean(unknown[0], accepted)}; it takes {', '.join(accepted) or 'no options'}")


def _kind(default) -> str | None:
    """How an option whose default is `default` is described ('an integer', ...); None: any value."""
    for kind, words in ((bool, "true or false"), (int, "an integer"), (float, "a finite number"), (str, "a string")):
        if isinstance(default, kind):
            return words
    if isinstance(default, (list, tuple)):
        return "a list" + (f" such as {list(default)}" if default else "")
    return None


def _type_problem(value, default) -> str | None:
    """What is wrong with `value` for an option whose default is `default` (its type is the option's, by the model
    registry's rule: distill.models.registry.same_kind), or None."""
    kind = _kind(default)
    if kind is None:
        return None
    if value is None or not same_kind(value, default) or (isinstance(default, float) and not math.isfinite(value)):
        return kind
    numeric = [d for d in default if isinstance(d, (int, float)) and not isinstance(d, bool)] \
        if isinstance(default, (list, tuple)) else []
    if numeric and len(numeric) == len(default):  # a list of numbers: each element of the defaults' kind
        like, words = (0, "integers") if all(isinstance(d, int) for d in default) else (0.0, "numbers")
        bad = [v for v in value if v is None or not same_kind(v, like)]
        return f"a list of {words} (not {bad[0]!r})" if bad else None
    return None


def check_loss_options(name: str, options: dict, key: str) -> None:
    """A term's options checked against loss `name` before any work: unknown ones (with a did-you-mean), values of
    another type than the option's default, and what the loss itself refuses, each naming `key`.<option>."""
    defaults = loss_options(name)
    _check_options(name, options, list(defaults), key)
    for option, value in options.items():
        problem = _type_problem(value, defaults[option])
        if problem:
            default = list(defaults[option]) if isinstance(defaults[option], tuple) else defaults[option]
            raise ConfigError(f"key '{key}.{option}': distillation loss {name!r} takes {problem} for {option} "
                              f"(default {default!r}), got {value!r}")
    try:
        create_distill_loss(name, **options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"key '{key}': distillation loss {name!r} refuses these options: {err}") from None
