"""The rules of a run directory: it holds one experiment (a rerun with a differing config is refused, nothing
trained is overwritten) and a stage trains again from its beginning only when asked (`--restart-stage`)."""

from __future__ import annotations

import logging
import os
import time

from distill.config.keys import flat_dict
from distill.config.schema import ExperimentConfig, load_saved_config, to_dict
from distill.models.registry import did_you_mean
from distill.utils.errors import ConfigError
from distill.utils.layout import BASELINE, TEACHER, RunLayout, generation_name


def default_run_dir(cfg: ExperimentConfig) -> str:
    return os.path.join("runs", cfg.name)


def check_run_dir(cfg: ExperimentConfig, run_dir: str, restart=()) -> None:
    """Refuse a run directory that holds a different experiment (nothing trained is overwritten). The saved
    config is read through the current schema, so a directory written with legacy key names still resumes.
    Keys of the teacher alone may differ when the teacher is restarted (`restart` holds 'teacher')."""
    path = RunLayout(run_dir).experiment
    if not os.path.exists(path):
        return
    old = flat_dict(to_dict(load_saved_config(path)))
    new = flat_dict(to_dict(cfg))
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and not cfg.is_harmless(k))
    if TEACHER in restart:
        differ = [k for k in differ if not (k == "teacher" or k.startswith("teacher."))]
    if differ:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:6])
        teacher_only = all(k == "teacher" or k.startswith("teacher.") for k in differ)
        ways = ("train the teacher again here with --restart-stage teacher (with the stages distilled from it), "
                "choose another --out directory, or restore those settings to resume it" if teacher_only else
                "choose another --out directory, or restore those settings to resume it")
        raise ConfigError(f"{run_dir} holds a different experiment ({shown}). Nothing trained is overwritten: {ways}.")


def planned_stages(cfg: ExperimentConfig) -> list:
    return ([TEACHER] if cfg.teacher is not None else []) + ([BASELINE] if cfg.baseline else []) \
        + [generation_name(k) for k in range(1, cfg.generations + 1)]


def _dependents(cfg: ExperimentConfig, name: str) -> list:
    """The stages that start from `name`'s outcome: a generation from the one before it, every generation
    from the teacher (its weights and cache); the baseline from nothing."""
    gens = [generation_name(k) for k in range(1, cfg.generations + 1)]
    if name == TEACHER:
        return gens
    return gens[gens.index(name) + 1:] if name in gens else []


def check_restart(cfg: ExperimentConfig, run_dir: str, names) -> list:
    """The stage names of `--restart-stage`, checked (known stages; a finished stage that started from one must
    be restarted too) before anything is moved."""
    names = list(dict.fromkeys(names or ()))
    planned = planned_stages(cfg)
    run = RunLayout(run_dir)
    for name in names:
        if name not in planned:
            raise ConfigError(f"--restart-stage {name}: this experiment's stages are {', '.join(planned)}"
                              f"{did_you_mean(name, planned)}")
        stale = [d for d in _dependents(cfg, name) if d not in names and os.path.isdir(run.stage(d).dir)]
        if stale:
            raise ConfigError(f"--restart-stage {name}: {', '.join(stale)} started from {name}'s result; restart "
                              f"{'it' if len(stale) == 1 else 'them'} too (--restart-stage "
                              f"{' --restart-stage '.join(stale)}) or use another --out")
    return names


def restart_stages(cfg: ExperimentConfig, run_dir: str, names, log: logging.Logger) -> None:
    """`--restart-stage NAME`: move the stage's folder aside (to NAME.restarted-<time>, nothing deleted) so the
    stage trains again from its beginning; restarting the teacher moves its cache aside too (a loaded teacher's
    stage holds its recorded identity and metrics, which are then made again). What it moves is said on `log`."""
    names = check_restart(cfg, run_dir, names)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = RunLayout(run_dir)
    for name in names:
        folders = [run.stage(name).dir] + ([run.teacher_cache] if name == TEACHER else [])
        moved = False
        for folder in folders:
            if os.path.isdir(folder):
                aside = f"{folder}.restarted-{stamp}"
                os.replace(folder, aside)
                log.info(f"{name}: restarting from its beginning; the previous folder is kept as {aside}")
                moved = True
        if not moved:
            log.info(f"{name}: --restart-stage: nothing to move aside, the stage has not started")
