"""Margin heads by name: the registry behind `margin.margin` and the built-in heads (arcface, cosface, combined,
softmax), each a MarginHead (distill/losses/margin_head.py: the margin formula, its numerics and the class
centres sharded across ranks, PartialFC-style).

The registry. `margin.margin` names an entry of HEADS (arcface, cosface, combined, softmax), and that entry
builds the head (`head_from_config` -> HeadEntry.build): its factory receives the MarginConfig values it has
parameters for, by name (s, m, m1, m2, m3, straight_through, sample_rate), or what the entry's own
`config_kwargs(margin)` returns. No name is special-cased, so a head registered before the config is built
both passes validation and is the one that trains. A custom head:

    from distill.losses.heads import MarginHead, register_head

    @register_head(name="my_cosface")            # margin: {margin: my_cosface, s: 32, m: 0.35}
    class MyCosFace(MarginHead):
        def __init__(self, embedding_size, num_classes, s=64.0, m=0.35, **options):
            super().__init__(embedding_size, num_classes, s=s, m3=m, **options)

    register_head(my_factory, name="other", config_kwargs=lambda margin: {"scale": margin.s})

A head is an nn.Module whose forward(embeddings, labels) returns (loss, logs of detached scalar tensors);
the engine also checkpoints it through full_weight() / load_full_weight() and head_state() / load_head_state(),
and the losses through the teacher's class centres (AdaDistill, margin_distillation, proxyless_kd, kd) use its
centre API (centre_shard, local_centres, update_local_centres, freeze_centres): subclassing MarginHead gives all
of that. An option the
factory cannot take (straight_through, sample_rate) set away from its default is a ConfigError, never silently
dropped; `unregister_head(name)` removes an entry (tests), `register_head(..., replace=True)` replaces one.

Besides the four built here, every module distill/losses/heads_*.py is imported with this one and registers its
heads (heads_adaptive: adaface, curricularface, magface).

A head's own options: `margin.options: {h: 0.333, t_alpha: 0.01}` (AdaFace's) are passed to its factory as keyword
arguments, checked when the config loads: a name the factory does not take, or a value it refuses (a ValueError;
a HeadOptionError names its option), is a ConfigError naming `margin.options.<name>`. `head_traits(margin)` says
what the distillation losses may ask of the head (one centre per class, a margin per sample; term_checks.py).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from distill.losses.margin_head import HeadOptionError, MarginHead
from distill.models.registry import did_you_mean
from distill.utils.errors import ConfigError, UnknownNameError

# --------------------------------------------------------------------------- the registry

# MarginConfig's values a factory receives when it has a parameter of that name (see `register_head`)
CONFIG_FIELDS = ("s", "m", "m1", "m2", "m3", "straight_through", "sample_rate")
_DEFAULT_OPTIONS = {"straight_through": False, "sample_rate": 1.0}  # MarginConfig's defaults of the options


@dataclass(frozen=True)
class HeadEntry:
    """A registered head: `factory(embedding_size, num_classes, **kwargs) -> nn.Module` and how an experiment's
    `margin:` section (MarginConfig) becomes those kwargs (`config_kwargs(margin) -> dict`)."""
    name: str
    factory: Callable
    config_kwargs: Callable

    def build(self, margin, embedding_size: int, num_classes: int) -> nn.Module:
        """The head `margin` (a MarginConfig) describes, for these sizes; a value the head refuses is a
        ConfigError naming its key (margin.options.<name>, or margin.<name> for the section's own keys)."""
        options = dict(margin.options or {})
        check_head_options(self.name, options, self.factory)
        kwargs = {**self.config_kwargs(margin), **options}
        try:
            return create_head(self.name, embedding_size, num_classes, **kwargs)
        except HeadOptionError as err:
            own = err.option in CONFIG_FIELDS
            key = f"margin.{err.option}" if own else f"margin.options.{err.option}"
            value = kwargs.get(err.option)
            raise ConfigError(f"key '{key}': margin head {self.name!r} refuses {err.option}={value!r}: {err}") from None
        except (ValueError, TypeError) as err:
            if not options:
                raise
            raise ConfigError(f"key 'margin.options': margin head {self.name!r} refuses its options "
                              f"{options}: {err}") from None

    def __call__(self, embedding_size, num_classes, **kwargs) -> nn.Module:
        return self.factory(embedding_size, num_classes, **kwargs)


HEADS: dict[str, HeadEntry] = {}


def _accepted(fn) -> list:
    """The keyword arguments a factory (function or class) takes besides the two sizes; a factory with
    **options also takes MarginHead's keyword-only options (straight_through, sample_rate, process_group)."""
    params = inspect.signature(fn).parameters
    accepted = [p for p in params if p not in ("embedding_size", "num_classes")
                and params[p].kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted += [p.name for p in inspect.signature(MarginHead).parameters.values()
                     if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in accepted]
    return accepted


def _by_parameter_name(name: str, fn) -> Callable:
    """The default `config_kwargs`: each MarginConfig value the factory has a parameter for, by name. An option
    it cannot take (straight_through, sample_rate) set away from its default is an error, never dropped."""
    accepted = set(_accepted(fn))

    def config_kwargs(margin) -> dict:
        for option, default in _DEFAULT_OPTIONS.items():
            if option not in accepted and getattr(margin, option) != default:
                raise ConfigError(f"margin head {name!r} does not take margin.{option} (set to "
                                  f"{getattr(margin, option)!r}); leave it at {default!r} or give the head that option")
        return {f: getattr(margin, f) for f in CONFIG_FIELDS if f in accepted}

    return config_kwargs


def head_options(fn) -> list:
    """The options `margin.options` may give factory `fn`: its keyword arguments besides margin's own keys
    (CONFIG_FIELDS) and the process group."""
    return [p for p in _accepted(fn) if p not in CONFIG_FIELDS and p != "process_group"]


def check_head_options(name: str, options: dict, fn) -> None:
    """`margin.options` against head `name`'s factory: an option it does not take, or one of the margin section's
    own keys, is a ConfigError naming margin.options.<option>."""
    takes = head_options(fn)
    for option in options:
        if option in CONFIG_FIELDS:
            raise ConfigError(f"key 'margin.options.{option}': {option} is a key of the margin section; set "
                              f"margin.{option} instead")
        if option not in takes:
            raise ConfigError(f"key 'margin.options.{option}': margin head {name!r} does not take {option}"
                              f"{did_you_mean(option, takes)}; its options are {', '.join(takes) or 'none'}")


@dataclass(frozen=True)
class HeadTraits:
    """What the distillation losses may ask of a head (distill/losses/term_checks.py checks them at config load):
    `centres_per_class` rows of weight per class, `takes_sample_margins` forward(..., margins=) sets the target
    margin m2 per sample. None: not a MarginHead, nothing known."""
    name: str
    centres_per_class: int | None
    takes_sample_margins: bool | None


def head_traits(margin) -> HeadTraits:
    """The traits of the head `margin` (a MarginConfig) builds, read from a tiny one (the values may depend on
    its options, e.g. k sub-centres)."""
    head = head_entry(margin.margin).build(margin, 2, 4096)  # classes enough for any world size
    if not isinstance(head, MarginHead):
        return HeadTraits(margin.margin, None, None)
    return HeadTraits(margin.margin, int(head.centres_per_class), bool(head.takes_sample_margins))


def register_head(fn=None, *, name: str | None = None, config_kwargs: Callable | None = None,
                  replace: bool = False):
    """Register a head factory under `name` (default: the function's or class's name); a decorator, with or
    without arguments, or a plain call. Returns `fn` unchanged.

    fn: `fn(embedding_size, num_classes, **kwargs) -> nn.Module`, a function or a class (e.g. a MarginHead
    subclass). config_kwargs: `config_kwargs(margin) -> dict` of fn's kwargs from a MarginConfig; by default
    every MarginConfig field (s, m, m1, m2, m3, straight_through, sample_rate) fn has a parameter of that name
    for. A name already registered is a ValueError unless `replace=True`."""

    def add(fn):
        key = name or fn.__name__
        if key in HEADS and not replace:
            raise ValueError(f"margin head {key!r} is registered twice (pass replace=True to replace it, or "
                             f"unregister_head({key!r}) first)")
        HEADS[key] = HeadEntry(key, fn, config_kwargs or _by_parameter_name(key, fn))
        return fn

    return add if fn is None else add(fn)


def head_entry(name: str) -> HeadEntry:
    """The registered entry `name`; an unknown name is an UnknownNameError listing the registered ones."""
    if name not in HEADS:
        raise UnknownNameError(f"unknown margin head {name!r}; registered heads: {', '.join(sorted(HEADS))}")
    return HEADS[name]


def unregister_head(name: str) -> HeadEntry:
    """Remove a registered head (e.g. a test's); returns its entry."""
    head_entry(name)
    return HEADS.pop(name)


def create_head(name: str, embedding_size: int, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered head; unknown names and arguments are errors that list what is accepted."""
    fn = head_entry(name).factory
    accepted = _accepted(fn)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"margin head {name!r} does not take {', '.join(unknown)}; it takes {', '.join(accepted)}")
    return fn(embedding_size, num_classes, **kwargs)


@register_head
def arcface(embedding_size, num_classes, s=64.0, m=0.5, **options):
    """ArcFace (additive angular margin): target logit s·cos(θ + m)."""
    return MarginHead(embedding_size, num_classes, s=s, m1=1.0, m2=m, m3=0.0, **options)


@register_head
def cosface(embedding_size, num_classes, s=64.0, m=0.4, **options):
    """CosFace (additive cosine margin): target logit s·(cosθ − m)."""
    return MarginHead(embedding_size, num_classes, s=s, m1=1.0, m2=0.0, m3=m, **options)


@register_head
def combined(embedding_size, num_classes, s=64.0, m1=1.0, m2=0.5, m3=0.0, **options):
    """Combined margin (insightface's MXNet formula): target logit s·(cos(m1·θ + m2) − m3); defaults are ArcFace's.
    arcface_torch's CombinedMarginLoss drops m1 and m2 whenever m3 > 0 (margin_head.py's module docstring)."""
    return MarginHead(embedding_size, num_classes, s=s, m1=m1, m2=m2, m3=m3, **options)


@register_head
def softmax(embedding_size, num_classes, s=64.0, **options):
    """Normalised softmax without margin: every logit s·cosθ."""
    return MarginHead(embedding_size, num_classes, s=s, m1=1.0, m2=0.0, m3=0.0, **options)


def head_from_config(margin, embedding_size: int, num_classes: int) -> nn.Module:
    """The head an experiment's `margin:` section (distill.config.schema.MarginConfig) describes: its
    registered entry, `margin.margin`, builds itself (HeadEntry.build). An unknown name is an error."""
    return head_entry(margin.margin).build(margin, embedding_size, num_classes)


def _import_head_modules() -> None:
    """Import every distill/losses/heads_*.py (AdaFace, CurricularFace, MagFace, ...): each registers its heads,
    so `margin.margin` knows them as soon as this registry is imported."""
    import distill.losses as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name.startswith("heads_"):
            importlib.import_module(f"{package.__name__}.{module.name}")


_import_head_modules()
