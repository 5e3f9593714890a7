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
on against the new file."""

from __future__ import annotations

import dataclasses
import logging

import torch

from distill.config.schema import to_dict
from distill.utils.checkpoint import atomic_torch_save, capture_rng_state, restore_rng_state, safe_torch_load
from distill.utils.dist import all_gather_objects
from distill.utils.errors import CheckpointError
from distill.utils.threads import apply_threads

TRAIN_FORMAT = "facedistill.train/2"


def resume_state(st, log: logging.Logger) -> None:
    """Load last.pt into the freshly built stage: weights, optimizer, scheduler, scaler, counters, RNG; what it
    notes goes to `log`."""
    path, name = st.paths.last, st.spec.name
    try:
        ck = safe_torch_load(path, map_location="cpu")
    except CheckpointError as err:
        raise CheckpointError(f"{err}. Stage {name} cannot resume from it: delete {path} to start the stage from "
                              f"its beginning, or rerun with --restart-stage {name} (which keeps the old stage "
                              f"folder aside)") from None
    differ = sorted(k for k in st.compat if ck.get("compat", {}).get(k) != st.compat[k])
    if differ:
        raise CheckpointError(f"{path}: cannot resume: the config changed in a way that breaks it "
                              f"({', '.join(differ)} differ from the checkpoint). Use another output "
                              f"directory, restore the previous settings, or rerun with --restart-stage {name}.")
    st.model.load_state_dict(ck["model"])
    st.head.load_full_weight(ck["head_weight"].to(st.device))
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
        "objective": st.objective.training_state(),  # the projection and a loss's own state (distillation.py)
        "optimizer": st.optimizer.state_dict(), "scheduler": st.scheduler.state_dict(),
        "scaler": st.scaler.state_dict() if st.scaler.is_enabled() else None, "step": st.step, "micro": st.micro,
        "epoch": st.micro // bpe, "batch_in_epoch": st.micro % bpe,
        "train_seconds": st.train_seconds, "best": st.best, "rng": rng,
        "config": to_dict(st.cfg), "compat": st.compat, "threads": st.threads.threads if st.threads else None,
        "centres_sha256": st.centres_sha256,
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
