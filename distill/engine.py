"""One training run (a stage): a model, a margin head, data, an optional frozen teacher, exact resume.

The loop is deliberately plain: plan the epoch's batches, forward the student, look the teacher's
embedding up in the cache (or run the teacher online), add the losses, step. What makes it a
research tool rather than a script is the guarantees around that loop:

- Exact resume. The order of samples and their flips is a pure function of (seed, epoch) — planned
  here, not drawn inside DataLoader workers — so a run resumed from `last.pt` at step k sees exactly
  the batches an uninterrupted run would. The checkpoint holds model, head, optimizer, scheduler,
  scaler, step, epoch, position inside the epoch and every RNG state.
- Safe checkpoints: temporary file, fsync, rename (distill.checkpoint.atomic_torch_save).
- Preemption: SIGTERM or SIGUSR1 writes last.pt at the next step boundary and stops cleanly.
- Divergence: a NaN/Inf loss stops the run naming the step and the term; nothing is saved after it.
- The teacher never trains: it is a FrozenTeacher, never handed to the optimizer.

A stage directory holds last.pt, best.pt, student.pt, metrics.jsonl and result.json (written last:
its presence means the stage is finished).
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from tqdm import tqdm

from distill.checkpoint import (atomic_torch_save, atomic_write_json, capture_rng_state, load_state_dict_strict,
                                restore_rng_state, safe_torch_load)
from distill.config import ExperimentConfig, TrainConfig, to_dict
from distill.errors import CheckpointError, DistillError
from distill.evaluate import evaluate_sets
from distill.heads import create_head
from distill.losses import DistillationObjective
from distill.models import model_embedding_size, save_student
from distill.registry import create_model
from distill.teacher_cache import match_input_size
from distill.tracking import Tracker, val_scalars

TRAIN_FORMAT = "facedistill.train/1"


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
    alpha: float = 0.0              # 0: no distillation
    generation: int = 0
    init_from: str | None = None    # student.pt whose weights initialise the model (recursion)
    head_from: str | None = None    # last.pt whose margin head initialises this head


# ------------------------------------------------------------------------------------------ data

class _Planned(torch.utils.data.Dataset):
    """Items are (index, flip) pairs chosen by the epoch plan, so flips never depend on workers."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, flip = item
        return self.dataset.item(index, bool(flip))


def plan_epoch(n: int, batch_size: int, seed: int, epoch: int, flip: bool, rank: int = 0, world: int = 1) -> list:
    """This rank's batches of one epoch: lists of (index, flip); full global batches only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    flips = torch.randint(0, 2, (n,), generator=g) if flip else torch.zeros(n, dtype=torch.int64)
    glob = batch_size * world
    batches = []
    for b in range(n // glob):
        part = order[b * glob + rank * batch_size: b * glob + (rank + 1) * batch_size]
        batches.append(list(zip(part.tolist(), flips[part].tolist())))
    return batches


# ------------------------------------------------------------------------------------------ setup

def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise DistillError("device: cuda requested but no CUDA device is available (use device: auto or cpu)")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())  # torchrun: set from LOCAL_RANK
    return torch.device("cpu")


def _amp(train: TrainConfig, device: torch.device):
    """(autocast dtype or None, whether a GradScaler is needed). `auto` is bf16 on CUDA and off on CPU
    (CPU autocast rarely pays); an explicit bf16/fp16 is honoured on any device."""
    if train.amp == "off" or (train.amp == "auto" and device.type != "cuda"):
        return None, False
    if train.amp == "fp16":
        return torch.float16, True
    return torch.bfloat16, False


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def scaled_lr(train: TrainConfig, world: int) -> float:
    """lr is given for a total batch of lr_batch_size and scales linearly with the real total batch."""
    return train.lr * train.batch_size * world * train.accumulate / train.lr_batch_size


def _scheduler(optimizer, train: TrainConfig, total_steps: int, steps_per_epoch: float):
    """timm scheduler stepped per optimizer update: epochs in the config become update counts here."""
    warmup = int(round(train.warmup_epochs * steps_per_epoch))
    common = dict(num_epochs=total_steps, warmup_epochs=warmup, min_lr=train.min_lr, warmup_lr=train.min_lr or 1e-6,
                  step_on_epochs=False, updates_per_epoch=1)
    if train.scheduler == "poly":
        sched, _ = create_scheduler_v2(optimizer, sched="poly", decay_rate=train.poly_power, **common)
    elif train.scheduler == "cosine":
        sched, _ = create_scheduler_v2(optimizer, sched="cosine", **common)
    else:
        milestones = [int(round(e * steps_per_epoch)) for e in train.decay_epochs]
        sched, _ = create_scheduler_v2(optimizer, sched="multistep", decay_milestones=milestones,
                                       decay_rate=train.decay_rate, **common)
    return sched


def _compat_key(cfg: ExperimentConfig, spec: StageSpec, dataset, world: int) -> dict:
    """What a checkpoint must agree on to be resumed (shapes, data, batch geometry)."""
    return {"arch": spec.arch, "model_kwargs": spec.model_kwargs, "num_samples": len(dataset),
            "num_classes": dataset.num_classes, "margin": asdict(cfg.margin), "batch_size": spec.train.batch_size,
            "accumulate": spec.train.accumulate, "world_size": world, "alpha": spec.alpha,
            "distill_loss": cfg.distill.loss, "seed": cfg.seed}


def _head(cfg: ExperimentConfig, embedding_size: int, num_classes: int) -> nn.Module:
    mc = cfg.margin
    options = dict(straight_through=mc.straight_through, sample_rate=mc.sample_rate)
    if mc.margin in ("arcface", "cosface"):
        return create_head(mc.margin, embedding_size, num_classes, s=mc.s, m=mc.m, **options)
    if mc.margin == "combined":
        return create_head("combined", embedding_size, num_classes, s=mc.s, m1=mc.m1, m2=mc.m2, m3=mc.m3, **options)
    return create_head("softmax", embedding_size, num_classes, s=mc.s, **options)


# ------------------------------------------------------------------------------------------ the run

def run_stage(cfg: ExperimentConfig, spec: StageSpec, stage_dir: str, train_set, val_sets: dict,
              teacher=None, cache=None, tracker: Tracker | None = None, progress: bool = True,
              log=print) -> dict:
    """Train one stage to the end (or resume it) and return its result (also written to result.json)."""
    os.makedirs(stage_dir, exist_ok=True)
    device = resolve_device(cfg.device)
    rank, world = _world()
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(cfg.seed + 7919 * spec.generation)
    tr = spec.train

    model = create_model(spec.arch, **spec.model_kwargs)
    if spec.init_from:
        init = safe_torch_load(spec.init_from)
        load_state_dict_strict(model, init["state_dict"], source=spec.init_from)
    embedding_size = model_embedding_size(model)
    head = _head(cfg, embedding_size, train_set.num_classes)
    if spec.head_from:
        head.load_full_weight(safe_torch_load(spec.head_from)["head_weight"])
    model.to(device)
    head.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    objective = DistillationObjective(head, loss=cfg.distill.loss, alpha=spec.alpha)
    use_teacher = spec.alpha > 0 and (teacher is not None or cache is not None)
    if teacher is not None and cache is None:
        teacher.to(device)

    steps_per_epoch = len(train_set) // (tr.batch_size * world) / tr.accumulate  # plan_epoch's full batches
    if steps_per_epoch < 1:
        raise DistillError(f"data.train: {len(train_set)} images are fewer than one step of "
                           f"{tr.batch_size * world * tr.accumulate}; lower train.batch_size")
    batches_per_epoch = int(steps_per_epoch * tr.accumulate)
    total_steps = tr.max_steps or max(1, math.ceil(tr.epochs * steps_per_epoch))
    optimizer = create_optimizer_v2(nn.ModuleList([model, head]), opt=tr.optimizer, lr=scaled_lr(tr, world),
                                    weight_decay=tr.weight_decay, momentum=tr.momentum, filter_bias_and_bn=True)
    scheduler = _scheduler(optimizer, tr, total_steps, steps_per_epoch)
    amp_dtype, need_scaler = _amp(tr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=need_scaler)
    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    compat = _compat_key(cfg, spec, train_set, world)
    paths = {k: os.path.join(stage_dir, f) for k, f in
             (("last", "last.pt"), ("best", "best.pt"), ("student", "student.pt"), ("result", "result.json"))}
    step, micro, train_seconds, best = 0, 0, 0.0, None
    if os.path.exists(paths["last"]):
        ck = safe_torch_load(paths["last"], map_location="cpu")
        differ = sorted(k for k in compat if ck.get("compat", {}).get(k) != compat[k])
        if differ:
            raise CheckpointError(f"{paths['last']}: cannot resume: the config changed in a way that breaks it "
                                  f"({', '.join(differ)} differ from the checkpoint). Use another output "
                                  f"directory, or restore the previous settings.")
        model.load_state_dict(ck["model"])
        head.load_full_weight(ck["head_weight"].to(device))
        optimizer.load_state_dict(ck["optimizer"])
        if rank != 0:  # the file holds rank 0's head momentum; this rank's shard restarts its own
            optimizer.state.pop(head.weight, None)
        scheduler.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        step, micro, train_seconds, best = ck["step"], ck["micro"], ck["train_seconds"], ck.get("best")
        restore_rng_state(ck["rng"])
        log(f"{spec.name}: resuming from {paths['last']} at step {step}/{total_steps}")
    tracker = tracker or Tracker(stage_dir, rank=rank)
    tracker.truncate_after(step)

    def checkpoint():
        head_weight = head.full_weight().cpu()  # a collective: every rank takes part
        if rank != 0:
            return
        atomic_torch_save({
            "format": TRAIN_FORMAT, "stage": spec.name, "arch": spec.arch, "model_kwargs": spec.model_kwargs,
            "model": model.state_dict(), "head_weight": head_weight,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if need_scaler else None, "step": step, "micro": micro,
            "epoch": micro // batches_per_epoch, "batch_in_epoch": micro % batches_per_epoch,
            "train_seconds": train_seconds, "best": best, "rng": capture_rng_state(),
            "config": to_dict(cfg), "compat": compat,
        }, paths["last"])

    def evaluate() -> dict:
        if not val_sets:
            return {}
        metrics = evaluate_sets(model, val_sets, spec.model_kwargs.get("input_size", 112), device=device,
                                progress=False, model_name=f"{spec.name} ({spec.arch})")
        tracker.log(val_scalars(metrics), step)
        return metrics

    stop = {"signal": None}
    previous = {}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread: the caller handles preemption
            pass

    model.train()
    head.train()
    scheduler.step_update(step)
    bar = tqdm(total=total_steps, initial=step, desc=spec.name, unit="step", disable=not progress or rank != 0,
               dynamic_ncols=True, leave=False)
    window_t, window_imgs = time.perf_counter(), 0
    try:
        while step < total_steps:
            epoch, pos = divmod(micro, batches_per_epoch)
            plan = plan_epoch(len(train_set), tr.batch_size, cfg.seed, epoch, train_set.flip, rank, world)
            loader = torch.utils.data.DataLoader(
                _Planned(train_set), batch_sampler=plan[pos:batches_per_epoch], num_workers=cfg.data.num_workers,
                pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed + epoch))
            t_start = time.perf_counter()
            for x, y, idx, flipped in loader:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                t_emb = None
                if use_teacher:
                    if cache is not None:
                        t_emb = cache.lookup(idx, flipped).to(device, non_blocking=True)
                    else:
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                            t_emb = teacher(match_input_size(x, teacher.input_size)).float()
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    emb = ddp_model(x)
                total, logs = objective(emb.float(), y, t_emb)
                if not torch.isfinite(total):
                    bad = [k for k, v in logs.items() if torch.is_tensor(v) and not torch.isfinite(v).all()]
                    kept = f"last good checkpoint: {paths['last']}" if os.path.exists(paths["last"]) else "no checkpoint was written yet"
                    raise TrainingDiverged(f"{spec.name}: loss became non-finite at step {step + 1} "
                                           f"(term(s): {', '.join(bad) or 'loss'}); {kept}. Lower train.lr "
                                           f"or set train.clip_grad.")
                scaler.scale(total / tr.accumulate).backward()
                micro += 1
                window_imgs += len(x) * world
                if micro % tr.accumulate:
                    continue
                if tr.clip_grad:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()), tr.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                scheduler.step_update(step)
                bar.update(1)
                if step % tr.log_every == 0 or step == total_steps:
                    now = time.perf_counter()
                    scalars = {f"train/{k}": float(v) for k, v in logs.items()}
                    scalars["train/lr"] = optimizer.param_groups[0]["lr"]
                    scalars["train/images_per_s"] = window_imgs / max(now - window_t, 1e-9)
                    scalars["train/epoch"] = micro / batches_per_epoch
                    tracker.log(scalars, step)
                    bar.set_postfix({k.split("/")[1]: f"{v:.3g}" for k, v in scalars.items() if k != "train/epoch"})
                    window_t, window_imgs = now, 0
                if tr.eval_every and step % tr.eval_every == 0 and step < total_steps:
                    train_seconds += time.perf_counter() - t_start
                    best = _keep_best(evaluate(), best, step, model, spec, paths, rank)
                    t_start = time.perf_counter()
                if world > 1:  # a signal reaches ranks at different steps: stop together, at the same step
                    flag = torch.tensor([1.0 if stop["signal"] else 0.0], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stop["signal"] = stop["signal"] or ("SIGTERM" if flag.item() else None)
                if stop["signal"] or step % tr.checkpoint_every == 0 or step == total_steps:
                    train_seconds += time.perf_counter() - t_start
                    t_start = time.perf_counter()
                    checkpoint()
                    if stop["signal"]:
                        raise Preempted(f"{spec.name}: {stop['signal']} received; checkpoint written at step "
                                        f"{step} ({paths['last']}). Rerun the same command to resume.")
                if step >= total_steps:
                    break
            else:
                train_seconds += time.perf_counter() - t_start
    finally:
        bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    metrics = evaluate()
    best = _keep_best(metrics, best, step, model, spec, paths, rank)
    result = {"stage": spec.name, "generation": spec.generation, "init_from": spec.init_from, "arch": spec.arch,
              "model_kwargs": spec.model_kwargs, "steps": step, "train_seconds": round(train_seconds, 3),
              "metrics": metrics, "best": best}
    if rank == 0:
        save_student(paths["student"], model, spec.arch, spec.model_kwargs, extra={"stage": spec.name, "step": step})
        atomic_write_json(paths["result"], result)
    if world > 1:  # the next stage starts from these files on every rank
        dist.barrier()
    tracker.finish(result, paths["student"] if rank == 0 else None)
    return result


def _score(metrics: dict) -> float | None:
    accs = [m["acc_mean"] for m in metrics.values()]
    return sum(accs) / len(accs) if accs else None


def _keep_best(metrics: dict, best, step: int, model, spec: StageSpec, paths: dict, rank: int):
    """best.pt is the student (same format as student.pt) at the evaluation with the best mean accuracy."""
    score = _score(metrics)
    if score is None or (best is not None and score <= best["score"]):
        return best
    best = {"score": score, "step": step}
    if rank == 0:
        save_student(paths["best"], model, spec.arch, spec.model_kwargs, extra={"stage": spec.name, "step": step, "metrics": metrics})
    return best
