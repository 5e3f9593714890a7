"""The checks of an experiment's values that a type cannot express: names against their registries (margin heads,
distillation losses, optimizers, and every key whose field declares its allowed values), positive sizes, P×K batch
divisibility; and, on the configs a user gives (not a run's saved copy), the bounds that are this machine's
(`check_machine`: thread counts). Run by distill.config.schema.build_config on every config before any work."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re

from timm.optim import list_optimizers

from distill.losses.heads import HEADS, head_traits
from distill.losses.registry import DISTILL_LOSSES, check_loss_options
from distill.losses.term_checks import Setting, term_problems
from distill.losses.terms import config_terms
from distill.models.registry import did_you_mean, feature_count
from distill.utils.errors import ConfigError
from distill.utils.threads import THREADS_PER_CORE, max_threads


def _optimizers() -> list:
    """timm's optimizer names (what create_optimizer_v2 takes), also with its lookahead_ prefix."""
    names = list_optimizers()
    return names + [f"lookahead_{n}" for n in names]


def check_semantics(cfg, where) -> None:
    """Every name checked against its registry before any work, so a typo fails in the first second."""
    if cfg.data.ijb is not None:
        if not cfg.data.ijb.root:
            raise ConfigError(f"{where('data.ijb.root')}: key 'data.ijb.root' is empty; give insightface's IJB folder "
                              f"(the one holding loose_crop/ and meta/)")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(cfg.device)):
        raise ConfigError(f"{where('device')}: key 'device' must be auto, cpu, cuda or cuda:N, got {cfg.device!r}"
                          f"{did_you_mean(str(cfg.device), ('auto', 'cpu', 'cuda'))}")
    if cfg.data.prefetch_factor < 1:
        raise ConfigError(f"{where('data.prefetch_factor')}: key 'data.prefetch_factor' must be at least 1 (batches "
                          f"each loader worker prepares ahead), got {cfg.data.prefetch_factor}")
    check_choices(cfg, where)
    try:  # the registered head reads its own values from margin.* (an option it cannot take is an error), and
        # a tiny one refuses its values now, not at stage start (classes enough for any torchrun world size)
        HEADS[cfg.margin.margin].build(cfg.margin, 2, 4096)
    except ConfigError as err:
        raise ConfigError(f"{where('margin')}: {err}") from None
    optimizers = _optimizers()
    for key, train in (("train", cfg.train), ("teacher.train", cfg.teacher and cfg.teacher.train)):
        if train is not None and train.optimizer.lower() not in optimizers:
            raise ConfigError(f"{where(key + '.optimizer')}: key '{key}.optimizer': unknown optimizer "
                              f"{train.optimizer!r}{did_you_mean(train.optimizer.lower(), optimizers)} (timm's "
                              f"create_optimizer_v2 names: sgd, adamw, lamb, ...; see timm.optim.list_optimizers())")
    for key, train in (("train", cfg.train), ("teacher.train", cfg.teacher and cfg.teacher.train)):
        if train is not None:
            check_training(key, train, where)
    positive = {"data.input_size": cfg.data.input_size, "student.embedding_size": cfg.student.embedding_size}
    if cfg.teacher is not None and cfg.teacher.embedding_size is not None:
        positive["teacher.embedding_size"] = cfg.teacher.embedding_size
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where(key)}: key '{key}' must be positive, got {value!r}")
    if cfg.generations < 0:
        raise ConfigError(f"{where('generations')}: key 'generations' must be >= 0, got {cfg.generations}")
    if not cfg.name or os.sep in cfg.name or "/" in cfg.name or ".." in cfg.name or cfg.name == ".":
        raise ConfigError(f"{where('name')}: key 'name' names the run directory runs/<name>; it must not be empty or "
                          f"contain '/' or '..', got {cfg.name!r} (use --out to choose another folder)")
    if not cfg.data.train:
        raise ConfigError(f"{where('data.train')}: key 'data.train' is required (RecordIO folder or image tree)")
    _check_path_lengths(cfg, where)
    _check_images_per_id(cfg, where)
    _check_terms(cfg, where)
    if cfg.recursive.teacher == "previous" and cfg.teacher is None and cfg.generations > 1:
        raise ConfigError(f"{where('recursive.teacher')}: key 'recursive.teacher' is previous (generation k learns "
                          f"from generation k-1), but there is no teacher for generation 1: set teacher, or "
                          f"recursive.teacher: fixed")


def check_choices(section, where, prefix: str = "") -> None:
    """Every key whose field declares the values it may take (`allowed` in its metadata: distill/config/schema.py,
    from the code implementing them) holds one of them; sections are walked (teacher.train as train)."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), prefix + f.name
        allowed = f.metadata.get("allowed")
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{where(key)}: key '{key}' must be one of {', '.join(allowed)}, got {value!r}"
                              f"{did_you_mean(value, list(allowed))}")
        if dataclasses.is_dataclass(value):
            check_choices(value, where, key + ".")


def _check_path_lengths(cfg, where) -> None:
    """Paths the OS cannot even look up (a name over 255 bytes, a path over 4,095): one line here, not an OSError
    from deep inside the first open."""
    paths = {"data.train": cfg.data.train, "student.init": cfg.student.init}
    paths.update({f"data.val[{i}]": p for i, p in enumerate(cfg.data.val)})
    if cfg.teacher is not None:
        paths.update({f"teacher.{k}": getattr(cfg.teacher, k) for k in ("checkpoint", "onnx", "head")})
    for key, path in paths.items():
        if not isinstance(path, str):
            continue
        longest = max((len(part.encode()) for part in path.split(os.sep)), default=0)
        if longest > 255 or len(path.encode()) > 4095:
            raise ConfigError(f"{where(key.split('[')[0])}: key '{key}' is a path longer than the OS allows "
                              f"({len(path.encode()):,} bytes, a name of {longest:,}; at most 255 per name and "
                              f"4,095 in all): {path[:60]}...")


def check_training(key: str, train, where) -> None:
    """The numbers of one training recipe (`train`, `teacher.train`: the same rules for both), before any work: what
    the engine, the optimizer or the schedule would otherwise refuse after minutes, or take silently (a stage of
    0 epochs recorded as finished)."""
    def bad(name: str, rule: str) -> None:
        value = getattr(train, name)
        raise ConfigError(f"{where(f'{key}.{name}')}: key '{key}.{name}' must be {rule}, got {value!r}")

    for name in ("batch_size", "lr", "lr_batch_size", "accumulate", "log_every", "checkpoint_every", "poly_power",
                 "decay_rate"):
        if getattr(train, name) <= 0:
            bad(name, "positive")
    for name in ("weight_decay", "min_lr", "warmup_epochs", "eval_every"):
        if getattr(train, name) < 0:
            bad(name, ">= 0")
    if not 0 <= train.momentum < 1:
        bad("momentum", "in [0, 1) (SGD's momentum; 0.9 is usual)")
    if train.max_steps is not None and train.max_steps < 1:
        bad("max_steps", "at least 1 (or null: train.epochs decides)")
    if train.epochs <= 0:
        bad("epochs", "positive (a stage of no epochs would be recorded as finished untrained)")
    if train.max_steps is None and train.warmup_epochs >= train.epochs:
        bad("warmup_epochs", f"less than {key}.epochs ({train.epochs:g}): the warm-up would take the whole stage")
    if train.clip_grad is not None and train.clip_grad <= 0:
        bad("clip_grad", "positive (the largest gradient norm), or null")
    if train.threads is not None and train.threads < 1:
        bad("threads", "at least 1, or null (the thread policy)")
    if any(not isinstance(e, (int, float)) or isinstance(e, bool) or e < 0 for e in train.decay_epochs):
        bad("decay_epochs", "a list of epochs >= 0 (for scheduler: step)")


def check_machine(cfg, where) -> None:
    """The keys whose bound is this machine's (`train.threads`, `teacher.train.threads`: at most max_threads(), its
    cores × THREADS_PER_CORE; past that the threads only wait, and each costs memory). Checked on the configs a
    user gives, not on a run directory's saved copy (a run may be read on a smaller machine than the one that made
    it; a resumed stage keeps the count it started with)."""
    for key, train in (("train", cfg.train), ("teacher.train", cfg.teacher and cfg.teacher.train)):
        if train is not None and train.threads is not None and train.threads > max_threads():
            raise ConfigError(f"{where(key + '.threads')}: key '{key}.threads' must be at most {max_threads():,} "
                              f"(this machine's {os.cpu_count() or 1} cores × {THREADS_PER_CORE}: more threads only "
                              f"wait and cost memory), got {train.threads:,}; lower it, or write null (the thread "
                              f"policy)")


def _check_images_per_id(cfg, where) -> None:
    """data.images_per_id (K of P×K sampling) is >= 2 and divides every batch size that samples the data."""
    k, f = cfg.data.images_per_id, cfg.data.grouped_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
        raise ConfigError(f"{where('data.grouped_fraction')}: key 'data.grouped_fraction' must be a number in (0, 1] "
                          f"(the share of each batch in identity groups), got {f!r}; 1 keeps whole P×K batches")
    if f != 1 and k is None:
        raise ConfigError(f"{where('data.grouped_fraction')}: key 'data.grouped_fraction' ({f}) mixes identity groups "
                          f"with single images, but data.images_per_id is not set: set data.images_per_id (e.g. 4), "
                          f"or leave grouped_fraction out")
    if k is None:
        return
    if f != 1 and round(f * cfg.train.batch_size / k) < 1:
        raise ConfigError(f"{where('data.grouped_fraction')}: key 'data.grouped_fraction' ({f}) leaves no group of "
                          f"{k} images in a batch of {cfg.train.batch_size}: raise it to at least "
                          f"{k / cfg.train.batch_size:.3g}")
    if k < 2:
        raise ConfigError(f"{where('data.images_per_id')}: key 'data.images_per_id' must be 2 or more (images of one "
                          f"identity in each batch group), got {k}; write null (or leave it out) for plain shuffled "
                          f"batches")
    sizes = {key: train.batch_size for key, train in (("train", cfg.train), ("teacher.train", cfg.teacher and
                                                                              cfg.teacher.train)) if train is not None}
    common = math.gcd(*sizes.values())
    for key, size in sizes.items():
        if size % k == 0:
            continue
        near = min((d for d in range(2, common + 1) if common % d == 0), key=lambda d: (abs(d - k), d), default=None)
        hint = f"data.images_per_id: {near}" if near else "data.images_per_id: null"
        raise ConfigError(f"{where('data.images_per_id')}: key 'data.images_per_id' ({k}) must divide "
                          f"{key}.batch_size ({size}): each batch holds batch_size / images_per_id identities of "
                          f"images_per_id images; set {hint}, or a {key}.batch_size that is a multiple of {k}")


def _check_terms(cfg, where) -> None:
    """Every distillation term (distill.terms, or the one of distill.loss + distill.alpha): its loss registered, its
    options those the loss takes, and what its Requirements ask of the experiment (distill/losses/term_checks.py:
    feature maps of a torch teacher run online, at stages both models have; repeated identities; the batch size;
    the teacher's class centres); at most one term owns the classification."""
    terms = config_terms(cfg.distill)
    for term in terms:
        short = term.key == "distill.loss"  # the short form's one term (distill.loss + distill.alpha)
        if short and term.alpha < 0:
            raise ConfigError(f"{where('distill.alpha')}: key 'distill.alpha' must be >= 0, got {cfg.distill.alpha}")
        src = where(term.key.split("[")[0])
        loss_key = term.key if short else term.key + ".loss"
        if term.loss not in DISTILL_LOSSES:
            raise ConfigError(f"{src}: key '{loss_key}' must be one of {', '.join(DISTILL_LOSSES)}, got {term.loss!r}"
                              f"{did_you_mean(term.loss, list(DISTILL_LOSSES))}")
        try:
            check_loss_options(term.loss, term.options, term.key)
        except ConfigError as err:
            raise ConfigError(f"{src}: {err}") from None
    problems = term_problems(terms, config_setting(cfg))
    if problems:  # the first, prefixed with where its key was set
        raise ConfigError(f"{where(problems[0].key.split('[')[0])}: {problems[0]}")


def config_setting(cfg) -> Setting:
    """What the config tells of the run the terms will train in (requirements.Setting): the teacher's kind and
    cache, whether its class centres will be there, the batches, the models' feature stages and the margin head's
    traits; the embedding sizes are preflight's (a teacher's size may be known only once it is loaded)."""
    teacher = cfg.teacher
    stages = None
    if teacher is not None and not teacher.onnx:
        stages = tuple((role, arch, feature_count(arch, kwargs)) for role, arch, kwargs in (
            ("student", cfg.student.arch, cfg.student.model_kwargs(cfg.data.input_size)),
            ("teacher", teacher.arch, dict(teacher.model))))
    centres = None
    if teacher is not None:
        centres = True if teacher.head else False if (teacher.onnx or teacher.train is None) else None
    return Setting(teacher=None if teacher is None else "onnx" if teacher.onnx else "torch",
                   cached=None if teacher is None else bool(teacher.cache), centres=centres,
                   images_per_id=cfg.data.images_per_id or 0, batch_size=cfg.train.batch_size, stages=stages,
                   head=functools.partial(head_traits, cfg.margin))  # built only for a term that asks
