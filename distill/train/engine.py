"""One training run (a stage): a model, a margin head, data, an optional frozen teacher, exact resume.

The loop is deliberately plain: plan the epoch's batches, forward the student, ask the teacher signal for the
teacher's embeddings (teachers/signal.py: read from the cache, or the teacher run online), add the losses, step.
What makes it a research tool rather than a script is the guarantees around that loop:

- Exact resume. The order of samples and their flips is a pure function of (seed, epoch) (distill/train/
  epoch_plan.py, not drawn in DataLoader workers): a run resumed from `last.pt` at step k sees exactly the batches
  an uninterrupted run would. last.pt holds model, head, optimizer, scheduler, scaler, step, epoch, position
  inside the epoch and every rank's RNG states.
- Safe checkpoints: temporary file, fsync, rename (atomic_torch_save). Preemption: SIGTERM or SIGUSR1 writes
  last.pt at the next step boundary and stops cleanly.
- Divergence: a NaN/Inf loss stops the run naming the step and the term; nothing is saved after it. The test is
  kept on the device (_LossWatch) and read before every log line, evaluation, checkpoint and the end, not per step.
- The teacher never trains: it is a FrozenTeacher, never handed to the optimizer.

A stage directory holds last.pt, best.pt, student.pt, metrics.jsonl and result.json (written last: its presence
means the stage is finished; it records the SHA-256 of student.pt, best.pt and last.pt, which every reader checks:
distill.utils.digest.check_recorded_file). Every `log_every` updates metrics.jsonl gets one line: each
train/<term> is the mean over all micro-batches since the previous line (weighted by batch size),
train/images_per_s the throughput over them (evaluation and checkpoint time left out), plus train/lr and
train/epoch (tracking.LogWindow); a resumed run starts a fresh window. Device, precision, lr, schedule:
distill/train/setup.py. A feature-map loss gets its maps from hooks (distill/train/feature_taps.py).

run_stage reads top-down: _build (device, seed, model, head, objective, optimizer, scheduler, scaler, DDP: one
_Stage), resume_state (last.pt into it), _train (epochs of _micro_step and the optimizer update, then
_after_update: log, evaluate, checkpoint, stop on a signal), _finish (final evaluation, best.pt, student.pt,
result.json). The update itself (gradients averaged and clipped over the ranks): distill/train/update.py.
save_state writes the state to last.pt (distill/train/state.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from distill.config.schema import ExperimentConfig, TrainConfig
from distill.data.datasets import PlannedDataset
from distill.data.gpu_decode import EncodedPlanned, check_decode, collate_encoded, decode_batch
from distill.eval.verification import evaluate_sets
from distill.losses.distillation import DistillationObjective
from distill.losses.heads import head_from_config
from distill.losses.terms import describe_terms
from distill.models.cost import model_cost
from distill.models.files import model_embedding_size, save_student
from distill.models.registry import create_model
from distill.train.epoch_plan import plan_epoch, plan_identity_epoch, stage_loader
from distill.train.feature_taps import taps_for
from distill.train.objective import stage_objective
from distill.train.setup import (
    create_optimizer,
    create_scheduler,
    describe_precision,
    maybe_compile,
    preemption_signals,
    use_channels_last,
)
from distill.train.state import LastPt, read_last, resume_state, save_state
from distill.train.tracking import LogWindow, Tracker, val_scalars
from distill.train.update import replicate_outside_ddp, update
from distill.utils.atomic import atomic_write_json
from distill.utils.checkpoint import extract_state_dict, load_state_dict_strict, safe_torch_load
from distill.utils.device import amp_settings, deterministic_cublas, resolve_device
from distill.utils.digest import RECORD_KEY, check_recorded_file, files_sha256, named_files_sha256
from distill.utils.dist import all_gather_objects, barrier, world_size
from distill.utils.dist import rank as dist_rank
from distill.utils.errors import DistillError
from distill.utils.layout import StageLayout
from distill.utils.threads import ThreadPlan, apply_threads, loader_workers, plan_threads
from teachers.signal import TeacherSignal, stage_signal


class Preempted(DistillError):
    """SIGTERM/SIGUSR1 arrived: last.pt was written; rerunning the same command resumes."""


class TrainingDiverged(DistillError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


@dataclass
class StageSpec:
    """What one stage trains. The recursive driver builds one per stage (teacher, baseline, gen<k>)."""
    name: str                       # stage directory name and W&B job_type
    arch: str                       # model registry name (vargfacenet, iresnet18, ...)
    model_kwargs: dict              # constructor arguments (input_size included)
    train: TrainConfig
    alpha: float = 0.0              # 0: no distillation; distill.alpha, or the summed alphas of distill.terms
    generation: int = 0
    init_from: str | None = None    # student.pt whose weights initialise the model (recursion)
    head_from: str | None = None    # last.pt whose margin head initialises this head
    centres: str | None = None      # the teacher's class centres for a term that needs them (teacher.head, ...)
    record: dict = field(default_factory=dict)  # extra keys of result.json (the teacher stage: its identity)


def _compat_key(cfg: ExperimentConfig, spec: StageSpec, dataset, world: int) -> dict:
    """What a checkpoint must agree on to be resumed: the stage's model, distillation weight, data size and world
    size, and every config key declared to affect resumes (distill/config/keys.py: margin, seed, batch geometry,
    distillation terms, ...; the training recipe's keys from the stage's recipe)."""
    return {"arch": spec.arch, "model_kwargs": spec.model_kwargs, "num_samples": len(dataset),
            "num_classes": dataset.num_classes, "world_size": world, "alpha": spec.alpha,
            **cfg.resume_entries(spec.train)}


# ------------------------------------------------------------------------------------------ build

@dataclass
class _Stage:
    """One stage's training state: built once by _build, filled by _resume, written by _checkpoint."""
    cfg: ExperimentConfig
    spec: StageSpec
    device: torch.device
    rank: int
    world: int
    paths: StageLayout              # last.pt, best.pt, student.pt, result.json
    compat: dict                    # what last.pt must agree on to be resumed (_compat_key)
    model: nn.Module
    head: nn.Module
    objective: DistillationObjective
    optimizer: torch.optim.Optimizer
    scheduler: object               # timm scheduler, stepped per optimizer update
    scaler: torch.amp.GradScaler    # enabled for fp16 only
    forward: object                 # what training calls: the model or its DDP wrapper, compiled when asked
    amp_dtype: torch.dtype | None
    signal: TeacherSignal | None    # the teacher's embeddings (cached or online, compiled when asked); None: no KD
    channels_last: bool             # inputs in NHWC, as the model (train.channels_last)
    batches_per_epoch: int
    total_steps: int
    step: int = 0                   # optimizer updates done
    micro: int = 0                  # micro-batches done
    train_seconds: float = 0.0
    best: dict | None = None        # {"score", "step"} of best.pt
    clock: float = 0.0              # perf_counter() from which train_seconds counts next
    threads: ThreadPlan | None = None  # torch threads and loader workers (distill/utils/threads.py)
    taps: object = None             # feature maps for a feature-map loss (distill/train/feature_taps.py)
    ddp: nn.Module | None = None    # the DDP wrapper (world > 1): no_sync under accumulation
    watch: _LossWatch | None = None  # the loss's finiteness, kept on the device
    decode: dict | None = None      # data.decode: cuda: images decoded, and on the CPU after nvJPEG failed
    centres_sha256: str | None = None  # the class centres' file (spec.centres) as this (re)start reads it
    last: LastPt | None = None      # last.pt as _build read it (None: a fresh start); resume_state loads it

    def lap(self) -> None:
        """Add the time since the clock last (re)started to train_seconds, and restart it."""
        now = time.perf_counter()
        self.train_seconds += now - self.clock
        self.clock = now


def _model_and_head(cfg: ExperimentConfig, spec: StageSpec, num_classes: int, device: torch.device):
    """The model (+ init_from) and margin head (+ head_from), in this order: it fixes what the seed draws."""
    model = create_model(spec.arch, **spec.model_kwargs)
    if spec.init_from:
        check_recorded_file(spec.init_from)  # a previous generation's student.pt is the one its stage recorded
        init = safe_torch_load(spec.init_from)
        # a student.pt, or any checkpoint holding a state dict of this architecture (e.g. a backbone.pth)
        load_state_dict_strict(model, extract_state_dict(init, spec.init_from), source=spec.init_from)
    embedding_size = model_embedding_size(model)
    head = head_from_config(cfg.margin, embedding_size, num_classes)
    if spec.head_from:
        check_recorded_file(spec.head_from)  # the previous generation's last.pt, as its stage recorded it
        head.load_full_weight(safe_torch_load(spec.head_from)["head_weight"])
    model.to(device)
    head.to(device)
    if use_channels_last(spec.train, device):
        model.to(memory_format=torch.channels_last)
    return model, head


def _build(cfg: ExperimentConfig, spec: StageSpec, stage_dir: str, train_set, teacher, cache=None,
           log: logging.Logger | None = None) -> _Stage:
    """Device, seed, model, head, objective, optimizer, scheduler, scaler and DDP wrapper of a fresh stage, and its
    last.pt when it has one. `teacher`, `cache`: the stage's teacher signal, or what teachers.signal.stage_signal
    makes one of; `log`: where notes go."""
    device = resolve_device(cfg.device)
    check_decode(cfg.data.decode, device, train_set)
    rank, world = dist_rank(), world_size()
    if cfg.deterministic:
        deterministic_cublas()  # in time if this stage is the first cuBLAS user (distill run sets it earlier)
        torch.use_deterministic_algorithms(True)
    # every training batch has the same shape (full batches, one input size): let cuDNN pick its fastest kernels,
    # unless the run must repeat bit for bit (the choice is timed, so it may differ between runs)
    torch.backends.cudnn.benchmark = not cfg.deterministic
    torch.manual_seed(cfg.seed + 7919 * spec.generation)
    tr = spec.train
    model, head = _model_and_head(cfg, spec, train_set.num_classes, device)
    # the centres' file as it is read now: last.pt records it, a resume notes a change (distill/train/state.py); a
    # finished stage's last.pt (the teacher's, a previous generation's) must be the one its stage recorded
    centres_sha256 = None
    if spec.centres:
        check_recorded_file(spec.centres)
        centres_sha256 = named_files_sha256(spec.centres)
    # an online teacher moves to the device here; the signal keeps where its class centres are
    signal = stage_signal(teacher, cache, tr, device, centres=spec.centres)
    paths = StageLayout(stage_dir, spec.name)
    last = read_last(paths.last, spec.name)  # a resumed stage's terms keep the options they started with
    # (FitNet's regressors, and what a loss's options make trainable: before the optimizer)
    objective = stage_objective(cfg, spec, head, model, signal, device, last, log)
    replicate_outside_ddp(objective.trained_modules(), world)  # as DDP does for the model

    # the full global batches of plan_epoch, and of plan_identity_epoch too (it has as many)
    steps_per_epoch = len(train_set) // (tr.batch_size * world) / tr.accumulate
    if steps_per_epoch < 1:
        raise DistillError(f"data.train: {len(train_set)} images are fewer than one step of "
                           f"{tr.batch_size * world * tr.accumulate}; lower train.batch_size")
    total_steps = tr.max_steps or max(1, math.ceil(tr.epochs * steps_per_epoch))
    trained = [model, head] + objective.trained_modules()
    optimizer = create_optimizer(nn.ModuleList(trained), tr, world, device)
    scheduler = create_scheduler(optimizer, tr, total_steps, steps_per_epoch)
    amp_dtype, need_scaler = amp_settings(tr, device, model)
    scaler = torch.amp.GradScaler(device.type, enabled=need_scaler)
    ddp = None
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    signal = signal.compiled(lambda m: maybe_compile(m, tr, "teacher")) if spec.alpha > 0 and signal else None
    return _Stage(cfg=cfg, spec=spec, device=device, rank=rank, world=world, paths=paths,
                  compat=_compat_key(cfg, spec, train_set, world), model=model, head=head, objective=objective,
                  optimizer=optimizer, scheduler=scheduler, scaler=scaler, ddp=ddp, watch=_LossWatch(device),
                  forward=maybe_compile(model if ddp is None else ddp, tr, "student"),
                  amp_dtype=amp_dtype, signal=signal, channels_last=use_channels_last(tr, device),
                  batches_per_epoch=int(steps_per_epoch * tr.accumulate), total_steps=total_steps,
                  decode={"images": 0, "cpu_fallback": 0} if cfg.data.decode == "cuda" else None,
                  centres_sha256=centres_sha256, last=last)


# ------------------------------------------------------------------------------------------ logging

def _log_window(st: _Stage, window: LogWindow, tracker: Tracker, bar) -> None:
    means, rate = window.read()
    scalars = {f"train/{k}": v for k, v in means.items()}
    scalars["train/lr"] = st.optimizer.param_groups[0]["lr"]
    scalars["train/images_per_s"] = rate
    scalars["train/epoch"] = st.micro / st.batches_per_epoch
    tracker.log(scalars, st.step)
    bar.set_postfix({k.split("/", 1)[1]: f"{v:.3g}" for k, v in scalars.items() if k != "train/epoch"})


# ------------------------------------------------------------------------------------------ one step

class _LossWatch:
    """Whether the loss stayed finite, kept on the device so that no micro-batch waits for it: the first step
    whose loss was NaN/Inf and which terms were. `check` reads it (a host sync) where it matters: before a log
    line, an evaluation, a checkpoint or the end, so nothing is logged or saved after a non-finite loss."""
    NONE = 1 << 62  # no bad step yet

    def __init__(self, device: torch.device):
        self.step = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.names, self.finite, self.pending = None, None, False

    def add(self, total: torch.Tensor, logs: dict, step: int) -> None:
        names = [k for k, v in logs.items() if torch.is_tensor(v)]
        if names != self.names:  # the first micro-batch (the terms stay the same through a stage)
            self.names = names
            self.finite = torch.ones(len(names) + 1, dtype=torch.bool, device=self.step.device)
        values = [total] + [logs[k] for k in names]
        finite = torch.isfinite(torch.stack([v.detach().float().sum().to(self.step.device) for v in values]))
        first = (self.step == self.NONE) & ~finite[0]
        self.step = torch.where(first, step, self.step)
        self.finite = torch.where(first, finite, self.finite)
        self.pending = True

    def check(self, st: _Stage) -> None:
        """Raise TrainingDiverged on every rank if any rank's loss was non-finite (ranks stop together)."""
        if not self.pending:
            return
        self.pending = False
        first = self.step.clone()
        if st.world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first = int(first)
        if first == self.NONE:
            return
        mine = int(self.step) == first
        bad = [k for k, ok in zip(self.names, self.finite[1:].tolist(), strict=True) if not ok] if mine else []
        terms = ", ".join(bad) or ("loss" if mine else "on another rank")
        kept = f"last good checkpoint: {st.paths.last}" if os.path.exists(st.paths.last) \
            else "no checkpoint was written yet"
        raise TrainingDiverged(f"{st.spec.name}: loss became non-finite at step {first} (term(s): {terms}); "
                               f"{kept}. Run again with a lower train.lr or a train.clip_grad, into another --out "
                               f"(this directory keeps the settings it was started with)")


def _micro_step(st: _Stage, batch, window: LogWindow, where=None) -> bool:
    """Forward and backward one micro-batch; every `accumulate`-th one also updates. True when it did.
    `where(index)` names a training image in errors (data.decode: cuda decodes here, not in the loader)."""
    x, y, idx, flipped = batch
    if isinstance(x, list):  # data.decode: cuda: encoded images, decoded here as one batch
        name = (lambda i: where(int(idx[i]))) if where else None
        x = decode_batch(x, flipped, st.device, st.cfg.data.input_size, where=name, stats=st.decode)
    x = x.to(st.device, non_blocking=True)
    y = y.to(st.device, non_blocking=True)
    if st.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = dict(device_type=st.device.type, dtype=st.amp_dtype, enabled=st.amp_dtype is not None)
    accumulate = st.spec.train.accumulate
    last = (st.micro + 1) % accumulate == 0
    # DDP all-reduces the model's gradients in every backward pass; only the last micro-batch of an update needs
    # it: under no_sync the others accumulate locally and that pass reduces their sum. (The head's shards and
    # the objective's modules are reduced by hand, per pass or per update: no_sync does not touch them.)
    with st.ddp.no_sync() if st.ddp is not None and not last else contextlib.nullcontext():
        t_emb = st.signal.embed(x, idx, flipped) if st.signal is not None else None
        with torch.autocast(**autocast):
            emb = st.forward(x)
        total, logs = st.objective(emb.float(), y, t_emb, maps=st.taps.read() if st.taps else None)
        st.watch.add(total, logs, st.step + 1)
        st.scaler.scale(total / accumulate).backward()
    st.micro += 1
    window.add(logs, len(x), len(x) * st.world)
    if not last:
        return False
    update(st)
    return True


# ------------------------------------------------------------------------------------------ the loop

def _evaluate(st: _Stage, val_sets: dict, tracker: Tracker) -> dict:
    """The verification sets' metrics; every rank evaluates at the same steps, so each embeds its share of the
    images (the same numbers as one process: distill/eval/spread.py)."""
    if not val_sets:
        return {}
    metrics = evaluate_sets(st.model, val_sets, st.spec.model_kwargs.get("input_size", 112), device=st.device,
                            progress=False, model_name=f"{st.spec.name} ({st.spec.arch})", split_ranks=st.world > 1)
    tracker.log(val_scalars(metrics), st.step)
    return metrics


def _train(st: _Stage, train_set, val_sets: dict, tracker: Tracker, stop: dict, bar) -> None:
    """Planned batches from micro-batch st.micro (epoch, position = divmod(micro, batches_per_epoch)) to
    total_steps, from one loader whose workers live as long as the stage (epoch_plan.stage_loader)."""
    tr, data, window = st.spec.train, st.cfg.data, LogWindow()
    st.model.train()
    st.head.train()
    st.scheduler.step_update(st.step)
    if data.images_per_id:  # P×K batches of identity groups
        labels = train_set.labels()

        def plan(epoch):
            return plan_identity_epoch(labels, tr.batch_size, data.images_per_id, st.cfg.seed, epoch, train_set.flip,
                                       st.rank, st.world, data.grouped_fraction)
    else:
        def plan(epoch):
            return plan_epoch(len(train_set), tr.batch_size, st.cfg.seed, epoch, train_set.flip, st.rank, st.world)
    encoded = data.decode == "cuda"  # workers read the encoded images; _micro_step decodes batches on the GPU
    data = dataclasses.replace(data, num_workers=st.threads.workers)  # capped by the thread policy
    loader = stage_loader(EncodedPlanned(train_set) if encoded else PlannedDataset(train_set), plan,
                          st.batches_per_epoch, st.micro, st.total_steps * tr.accumulate - st.micro, data, st.cfg.seed,
                          pin_memory=st.device.type == "cuda", collate_fn=collate_encoded if encoded else None)
    st.clock = time.perf_counter()  # loader set-up is not training time
    for batch in loader:
        if not _micro_step(st, batch, window, getattr(train_set, "where", None)):
            continue
        bar.update(1)
        if _after_update(st, window, val_sets, tracker, stop, bar):
            return


def _after_update(st: _Stage, window: LogWindow, val_sets: dict, tracker: Tracker, stop: dict, bar) -> bool:
    """Log, evaluate, checkpoint or stop as the step asks. True when the stage has trained all its steps."""
    tr = st.spec.train
    if st.step % tr.log_every == 0 or st.step == st.total_steps:
        st.watch.check(st)
        _log_window(st, window, tracker, bar)
    if tr.eval_every and st.step % tr.eval_every == 0 and st.step < st.total_steps:
        st.watch.check(st)
        st.lap()
        with window.paused():
            metrics = _evaluate(st, val_sets, tracker)
            st.best = _keep_best(metrics, st.best, st.step, st.model, st.spec, st.paths, st.rank)
        st.clock = time.perf_counter()  # evaluation is not training time
    if st.world > 1:
        # A signal reaches the ranks at different steps, and they must checkpoint and stop at the same one. The
        # flag is a Python value: it goes through the CPU (gloo) group and never waits for the device. Exchanged
        # every step, since the grace period after SIGTERM (seconds) may be shorter than the steps to a log line.
        stop["signal"] = stop["signal"] or next((s for s in all_gather_objects(stop["signal"]) if s), None)
    if stop["signal"] or st.step % tr.checkpoint_every == 0 or st.step == st.total_steps:
        st.watch.check(st)
        st.lap()  # the checkpoint's own time counts in the next lap (the last one's, nowhere)
        with window.paused():
            save_state(st)
        if stop["signal"]:
            raise Preempted(f"{st.spec.name}: {stop['signal']} received; checkpoint written at step "
                            f"{st.step} ({st.paths.last}). Rerun the same command to resume.")
    return st.step >= st.total_steps


# ------------------------------------------------------------------------------------------ the run

def run_stage(cfg: ExperimentConfig, spec: StageSpec, stage_dir: str, train_set, val_sets: dict,
              teacher=None, cache=None, tracker: Tracker | None = None, progress: bool = True,
              logger: logging.Logger | None = None) -> dict:
    """Train one stage to the end (or resume it) and return its result (also written to result.json).
    `teacher`: the stage's teacher signal (teachers/signal.py), or a frozen teacher, run online or, with `cache`
    (its TeacherCache), read from the cache (teachers.signal.stage_signal); needed when spec.alpha > 0.
    `logger`: where the stage's lines go (the run's: distill/run/context.py; default this module's logger)."""
    log = logger or logging.getLogger(__name__)
    st = _build(cfg, spec, stage_dir, train_set, teacher, cache, log)  # refusals first: no stage folder is left behind
    os.makedirs(stage_dir, exist_ok=True)
    st.threads = apply_threads(plan_threads(loader_workers(cfg.data.num_workers, st.device.type), spec.train.threads))
    if st.last is not None:
        resume_state(st, log)  # a stage resumes with the thread count it started with (its digits depend on it)
    how = describe_precision(spec.name, spec.train, st.device, st.signal.online if st.signal else None, st.model)
    if st.rank == 0:
        log.info(f"{spec.name}: on {st.device}, {st.threads.describe()}" + (f", {how}" if how else ""))
    tracker = tracker or Tracker(stage_dir, rank=st.rank)
    tracker.truncate_after(st.step)
    with preemption_signals() as stop, taps_for(st) as st.taps, tqdm(  # taps: hooks off after (teacher reused)
            total=st.total_steps, initial=st.step, desc=spec.name, unit="step", disable=not progress or st.rank != 0,
            dynamic_ncols=True, leave=False) as bar:
        _train(st, train_set, val_sets, tracker, stop, bar)
    return _finish(st, val_sets, tracker)


def _finish(st: _Stage, val_sets: dict, tracker: Tracker) -> dict:
    """Final evaluation, best.pt, student.pt and result.json (written last: the stage is done)."""
    st.watch.check(st)
    metrics = _evaluate(st, val_sets, tracker)
    st.best = _keep_best(metrics, st.best, st.step, st.model, st.spec, st.paths, st.rank)
    spec = st.spec
    result = {"stage": spec.name, "generation": spec.generation, "init_from": spec.init_from, "arch": spec.arch,
              "model_kwargs": spec.model_kwargs, "steps": st.step, "train_seconds": round(st.train_seconds, 3),
              "metrics": metrics, "best": st.best, "threads": st.threads.threads,
              "distill": describe_terms(st.objective.terms), **spec.record, **_rank_notes(st)}
    if st.rank == 0:
        result["params"], result["gflops"] = model_cost(spec.arch, spec.model_kwargs)  # uses no random state
        save_student(st.paths.student, st.model, spec.arch, spec.model_kwargs,
                     extra={"stage": spec.name, "step": st.step})
        # what later stages and commands read back is checked against these (distill.utils.digest)
        result[RECORD_KEY] = files_sha256([st.paths.student, st.paths.best, st.paths.last])
        atomic_write_json(st.paths.result, result)
    # rank 0's W&B upload first, then the barrier (through gloo, dist.timeout_minutes): the other ranks wait
    # here, not in the next stage's first NCCL collective, whose watchdog an upload could outlast
    tracker.finish(result, st.paths.student if st.rank == 0 else None)
    if st.world > 1:  # the next stage starts from these files on every rank
        barrier()
    return result


def _rank_notes(st: _Stage) -> dict:
    """result.json's notes gathered from every rank: a compiled model that fell back to eager (train.compile: the
    first rank's reason) and the images decoded on the GPU and on the CPU after nvJPEG failed (summed)."""
    tr, notes = st.spec.train, {}
    if tr.compile:
        notes["compile_fell_back"] = {"student": getattr(st.forward, "fallback", None),
                                      "teacher": getattr(st.signal, "compile_fallback", None)}
    if st.decode is not None:
        notes["decode"] = st.decode
    if st.world == 1 or not notes:
        return notes
    ranks = all_gather_objects(notes)
    if "compile_fell_back" in notes:
        notes["compile_fell_back"] = {k: next((r["compile_fell_back"][k] for r in ranks
                                               if r["compile_fell_back"][k]), None) for k in ("student", "teacher")}
    if "decode" in notes:
        notes["decode"] = {k: sum(r["decode"][k] for r in ranks) for k in st.decode}
    return notes


def _score(metrics: dict) -> float | None:
    accs = [m["acc_mean"] for m in metrics.values()]
    return sum(accs) / len(accs) if accs else None


def _keep_best(metrics: dict, best, step: int, model, spec: StageSpec, paths: StageLayout, rank: int):
    """best.pt is the student (same format as student.pt) at the evaluation with the best mean accuracy."""
    score = _score(metrics)
    if score is None or (best is not None and score <= best["score"]):
        return best
    best = {"score": score, "step": step}
    if rank == 0:
        save_student(paths.best, model, spec.arch, spec.model_kwargs,
                     extra={"stage": spec.name, "step": step, "metrics": metrics})
    return best
