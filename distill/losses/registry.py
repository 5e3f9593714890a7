"""The registry of distillation losses: `distill.loss` names one of them (distill/losses/distillation.py for
the embedding losses and the objective's contract, distill/losses/features.py for feature-map losses)."""

from __future__ import annotations

import functools
import inspect

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


def create_distill_loss(name: str, **kwargs):
    """The registered loss `name`, with keyword options bound; unknown names or options are errors."""
    if name not in DISTILL_LOSSES:
        raise UnknownNameError(f"unknown distillation loss {name!r}; registered losses: "
                               f"{', '.join(sorted(DISTILL_LOSSES))}")
    fn = DISTILL_LOSSES[name]
    if isinstance(fn, type):
        accepted = [p for p in inspect.signature(fn).parameters if p != "self"]
        _check_options(name, kwargs, accepted)
        return fn(**kwargs)
    if not kwargs:
        return fn
    accepted = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    _check_options(name, kwargs, accepted)
    return functools.partial(fn, **kwargs)


def _check_options(name: str, kwargs: dict, accepted: list) -> None:
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        from distill.models.registry import did_you_mean
        raise ConfigError(f"distillation loss {name!r} does not take {', '.join(unknown)}"
                          f"{did_you_mean(unknown[0], accepted)}; it takes {', '.join(accepted) or 'no options'}")
