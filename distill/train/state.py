"""A stage's training state in last.pt: written at checkpoints (`save_state`) and read back into a freshly built
stage (`resume_state`) so that a resumed run continues bit for bit: model, margin head, the objective's own
state, optimizer, scheduler, scaler, step counters, best score and every rank's RNG states (each rank draws its
own: PartialFC's class sampling, dropout; each resumes its own). `st` is the engine's _Stage.

With several ranks each rank's shard of the head also has its own optimizer state (momentum): `head_optimizer`
holds it gathered like `head_weight` (all classes), and each rank resumes its own rows.

Format facedistill.train/2 holds `rng` as a list, one entry per rank, and `head_optimizer`; /1 (one state, rank 0's,
and rank 0's head momentum only) still resumes as before: every rank restores that state and the other ranks'
shards restart their momentum.

last.pt also records the SHA-256 of the class centres' file a stage reads (`centres_sha256`, StageSpec.centres:
teacher.head, ...) as it was when the stage (re)started; a resume with a changed file says so in one note and goes
on against the new file.

Format /3 adds `loss_options`: {term name: {option: value}}, every option of each term's loss (its default unless
the term sets it), so that a stage resumes under the options it started with (`started_terms`, applied when the
stage's objective is built, before its optimizer: an option may change what the optimizer holds). An option the
config leaves unset keeps its recorded value when the default has changed since, with one note; one the config
sets to another value is refused, naming its key. A last.pt without the record (/2, /1) resumes each term under
the defaults of the code that wrote it (distill.compat.LEGACY_LOSS_DEFAULTS), with the same note.

`head_state` (optional, beside /3) holds the margin head's own state (MarginHead.head_state: AdaFace's feature-norm
EMA, CurricularFace's running t). Those heads compute it from the gathered, global batch, so every rank holds the
same values and rank 0's is the one saved; every rank restores it. A last.pt without it (written before, or by a
head that keeps none) resumes the head's state as built; a compat entry recorded before a key was added to its
section (ADDED_KEYS, e.g. margin.options) compares as that key's value then."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os

import torch

from distill.compat import LEGACY_LOSS_DEFAULTS
from distill.config.schema import to_dict
from distill.losses.registry import loss_options
from distill.utils.checkpoint import atomic_torch_save, capture_rng_state, restore_rng_state, safe_torch_load
from distill.utils.dist import all_gather_objects
from distill.utils.errors import CheckpointError
from distill.utils.threads import apply_threads

TRAIN_FORMAT = "facedistill.train/3"
LOSS_OPTIONS = "loss_options"  # last.pt's record of every term's options (format /3)
HEAD_STATE = "head_state"      # the margin head's own state (MarginHead.head_state), rank 0's
# {compat entry: {key: value}} of keys added to a section declared RESUME after last.pt files were written without
# them: such a file's entry reads as if it held the key at this value (what the code that wrote it did)
ADDED_KEYS = {"margin": {"options": None}}


@dataclasses.dataclass(frozen=True)
class LastPt:
    """A stage's last.pt as the stage's build read it, once: its terms' options are decided from it before the
    optimizer is made (`started_terms`), and `resume_state` loads the rest into the built stage."""
    path: str
    state: dict


def read_last(path: str, name: str) -> LastPt | None:
    """Stage `name`'s last.pt (None: there is none, the stage starts from its beginning); an unreadable one is
    refused saying what to do. Every rank calls it (a collective): rank 0, which writes last.pt, decides whether
    the stage resumes, once it has finished writing (a stage run again in the same job), and every rank reads it."""
    if not all_gather_objects(os.path.exists(path))[0]:
        return None
    try:
        return LastPt(path, safe_torch_load(path, map_location="cpu"))
    except CheckpointError as err:
        raise CheckpointError(f"{err}. Stage {name} cannot resume from it: delete {path} to start the stage from "
                              f"its beginning, or rerun with --restart-stage {name} (which keeps the old stage "
                              f"folder aside)") from None


def resume_state(st, log: logging.Logger) -> None:
    """Load last.pt (st.last, read when the stage was built) into the freshly built stage: weights, optimizer,
    scheduler, scaler, counters, RNG; what it notes goes to `log`."""
    path, name = st.paths.last, st.spec.name
    ck, st.last = st.last.state, None  # (the stage keeps no second copy of the checkpoint once it is loaded)
    recorded = ck.get("compat", {})
    differ = sorted(k for k in st.compat if _with_added_keys(k, recorded.get(k)) != st.compat[k])
    if differ:
        raise CheckpointError(f"{path}: cannot resume: the config changed in a way that breaks it "
                              f"({', '.join(differ)} differ from the checkpoint). Use another output "
                              f"directory, restore the previous settings, or rerun with --restart-stage {name}.")
    st.model.load_state_dict(ck["model"])
    st.head.load_full_weight(ck["head_weight"].to(st.device))
    if ck.get(HEAD_STATE) is not None:
        st.head.load_head_state(ck[HEAD_STATE])
    st.objective.load_training_state(ck.get("objective", {}), source=path)
    st.optimizer.load_state_dict(ck["optimizer"])
    _resume_head_moments(st, ck.get("head_optimizer"))
    st.scheduler.load_state_dict(ck["scheduler"])
    if ck.get("scaler"):
        st.scaler.load_state_dict(ck["scaler"])
    st.step, st.micro, st.train_seconds, st.best = ck["step"], ck["micro"], ck["train_seconds"], ck.get("best")
    rng = ck["rng"]
    restore_rng_state(rng[st.rank] if isinstance(rng, list) else rng, st.device)
    started = ck.get("threads")
    if started and st.threads is not None and started != st.threads.threads:
        if st.threads.source == "policy":  # the digits depend on the thread count: keep the one it started with
            st.threads = apply_threads(dataclasses.replace(st.threads, threads=started, source="its last.pt"))
        else:
            log.info(f"{name}: note: started with {started} torch threads, resumes with {st.threads.threads} "
                     f"({st.threads.source}): the rest of the stage will not be bit-identical to an uninterrupted run")
    _note_changed_centres(st, ck.get("centres_sha256"), log)
    log.info(f"{st.spec.name}: resuming from {path} at step {st.step}/{st.total_steps}")


def _with_added_keys(name: str, entry):
    """A recorded compat entry completed with the keys added to its section since (ADDED_KEYS)."""
    if isinstance(entry, dict) and name in ADDED_KEYS:
        return {**ADDED_KEYS[name], **entry}
    return entry


def _note_changed_centres(st, recorded: str | None, log: logging.Logger) -> None:
    """One note when the class centres' file (spec.centres: teacher.head, ...) is not the one the stage started
    with (last.pt records its SHA-256): the rest of the stage trains against the file as it is now, and last.pt
    records that one from now on. A last.pt without the record (an earlier facedistill) is not compared."""
    current = st.centres_sha256
    if recorded is None or current is None or recorded == current:
        return
    log.info(f"{st.spec.name}: note: the teacher's class centres {st.spec.centres} changed since the stage started "
             f"(sha256 {recorded[:16]}... -> {current[:16]}...): steps {st.step + 1}..{st.total_steps} train against "
             f"the new file, steps 1..{st.step} trained against the old one; to train against one file throughout, "
             f"put the old file back or rerun with --restart-stage {st.spec.name}")


def save_state(st) -> None:
    """Write last.pt (rank 0); every rank must call it: gathering the sharded head and the RNG states are
    collectives."""
    head_weight = st.head.full_weight().cpu()
    head_moments = _head_moments(st)
    rng = all_gather_objects(capture_rng_state(st.device))  # every rank's, in rank order
    if st.rank != 0:
        return
    spec, bpe = st.spec, st.batches_per_epoch
    atomic_torch_save({
        "format": TRAIN_FORMAT, "stage": spec.name, "arch": spec.arch, "model_kwargs": spec.model_kwargs,
        "model": st.model.state_dict(), "head_weight": head_weight, "head_optimizer": head_moments,
        HEAD_STATE: st.head.head_state(),
        "objective": st.objective.training_state(),  # the projection and a loss's own state (distillation.py)
        "optimizer": st.optimizer.state_dict(), "scheduler": st.scheduler.state_dict(),
        "scaler": st.scaler.state_dict() if st.scaler.is_enabled() else None, "step": st.step, "micro": st.micro,
        "epoch": st.micro // bpe, "batch_in_epoch": st.micro % bpe,
        "train_seconds": st.train_seconds, "best": st.best, "rng": rng,
        "config": to_dict(st.cfg), "compat": st.compat, "threads": st.threads.threads if st.threads else None,
        "centres_sha256": st.centres_sha256, LOSS_OPTIONS: recorded_options(st.objective.terms),
    }, st.paths.last)


def _head_moments(st) -> dict:
    """The optimizer's state of the head's centres shaped like them (SGD's momentum, Adam's moments), every rank's
    rows gathered into one (classes × embedding) tensor per entry, as head_weight is: a collective. {} with one
    rank, whose optimizer state dict holds it all."""
    if st.world == 1:
        return {}
    weight, shard = st.head.weight, st.head.centre_shard()
    state = st.optimizer.state.get(weight, {})
    rows = {k: v for k, v in sorted(state.items()) if torch.is_tensor(v) and v.shape == weight.shape}
    sizes = shard.comm.batch_sizes(shard.count, weight.device) if rows else []
    return {k: shard.comm.gather_rows(v, sizes).cpu() for k, v in rows.items()}


def _resume_head_moments(st, gathered: dict | None) -> None:
    """Each rank's own rows of the head's optimizer state; the file's optimizer state dict holds rank 0's."""
    if st.rank == 0:
        return
    from_rank0 = st.optimizer.state.pop(st.head.weight, None)
    if from_rank0 is None or not gathered:  # an older last.pt: this rank's shard restarts its momentum
        return
    shard = st.head.centre_shard()
    st.optimizer.state[st.head.weight] = {**from_rank0, **{
        k: shard.rows_of(full).to(device=st.head.weight.device, dtype=from_rank0[k].dtype)
        for k, full in gathered.items()}}


# ------------------------------------------------------------------------------------------ loss options

def _options(loss: str) -> dict:
    """{option: default} of registered loss `loss` (distill.losses.registry.loss_options), as plain values."""
    return {k: _plain(v) for k, v in loss_options(loss).items() if v is not inspect.Parameter.empty}


def _plain(value):
    """An option's value as a config gives it and last.pt keeps it: tuples as lists."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _shown(value) -> str:
    """An option's value as a config writes it: ceil, true, [-2]."""
    return value if isinstance(value, str) else json.dumps(value)


def recorded_options(terms) -> dict:
    """last.pt's `loss_options`: {term name: {option: value}}, every option of each term's loss, its default unless
    the term sets it."""
    return {t.name: {**_options(t.loss), **{k: _plain(v) for k, v in t.options.items()}} for t in terms}


def started_terms(terms: list, last: LastPt | None, stage: str, log: logging.Logger | None = None) -> list:
    """The stage's terms under the options it started with. A fresh stage (`last` None): as configured. A resumed
    one: an option the config leaves unset takes the value its last.pt records, or, in a last.pt written before
    that record, the value of the code that wrote it (LEGACY_LOSS_DEFAULTS), with one note per term that so keeps
    a value other than today's default; an option the config sets to another value than the recorded one is a
    CheckpointError naming its key (the options of a last.pt without the record were the config's: not compared)."""
    if last is None:
        return terms
    log = log or logging.getLogger(__name__)
    recorded = last.state.get(LOSS_OPTIONS)
    out = []
    for term in terms:
        defaults = _options(term.loss)
        if recorded is None:
            started = LEGACY_LOSS_DEFAULTS.get(term.loss, {})
            why = "its last.pt predates the record of loss options: the defaults of the code that wrote it"
        else:
            started, why = recorded.get(term.name, {}), "recorded in its last.pt"
            _refuse_changed(term, started, last.path, stage)
        kept = {k: v for k, v in started.items() if k in defaults and k not in term.options and v != defaults[k]}
        if kept:
            label = term.name if term.name == term.loss else f"{term.name} ({term.loss})"
            log.info(f"{stage}: note: term {label} resumes with the options it started with, "
                     f"{', '.join(f'{k} {_shown(v)}' for k, v in kept.items())} ({why}; the defaults are now: "
                     f"{', '.join(f'{k} {_shown(defaults[k])}' for k in kept)}); to train it under the current "
                     f"defaults, rerun with --restart-stage {stage}")
            term = dataclasses.replace(term, options={**term.options, **kept})
        out.append(term)
    return out


def _refuse_changed(term, started: dict, path: str, stage: str) -> None:
    """A CheckpointError when the config sets one of the term's options to another value than the stage started
    with (an option the record lacks is left to the resume's other checks)."""
    for option, value in term.options.items():
        if option in started and _plain(value) != started[option]:
            key = f"{term.key}.{option}" if term.key else f"{option} of term {term.name}"
            now, was = _shown(_plain(value)), _shown(started[option])
            raise CheckpointError(f"{path}: cannot resume: key '{key}' is {now}, the stage started with {was}; set "
                                  f"it back to {was}, or rerun with --restart-stage {stage} (which keeps the old "
                                  f"stage folder aside)")
