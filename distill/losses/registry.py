"""The registry of distillation losses: `distill.loss` names one of them (distill/losses/distillation.py for
the embedding losses and the objective's contract, distill/losses/features.py for feature-map losses)."""

from __future__ import annotations

import functools
import inspect
import math

from distill.models.registry import did_you_mean, same_kind
from distill.utils.errors import ConfigError, UnknownNameError

DISTILL_LOSSES: dict = {}


def register_loss(fn, name: str | None = None):
    """Register `fn(student_emb, teacher_emb, *, options...) -> scalar tensor` under its function name, or a
    loss class (see the module docstring) under `name`."""
    if fn is None or isinstance(fn, str):  # @register_loss("name") on a class
        return lambda cls: register_loss(cls, fn)
    DISTILL_LOSSES[name or fn.__name__] = fn
    return fn


def loss_needs(name: str, what: str) -> bool:
    """Whether registered loss `name` declares `what` (needs_labels, replaces_classification, images_per_id,
    same_size)."""
    return bool(getattr(DISTILL_LOSSES.get(name), what, False))


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
    return functools.partial(fn, **kwargs) if kwargs else fn


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
