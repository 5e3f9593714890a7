"""One optimizer update of a stage: the accumulated gradients made global, clipped by the norm of the whole model
(`train.clip_grad`), stepped, and the schedule advanced. `st` is the engine's _Stage.

Which gradients are global already. DDP leaves every rank with the same averaged gradient of the model. The
objective's own trained modules (a projection, FitNet's regressors) live outside DDP's wrapper: they start from
rank 0's values (`replicate_outside_ddp`, as DDP does for the model: each rank drew them after its own shard of
the head, of another size when the classes do not divide evenly) and their gradients are averaged here, in one
all-reduce of all of them. The margin head is sharded (distill/losses/margin_head.py): each rank holds exactly
the gradient of its own class centres, nothing to average.

The clip norm. One process holding every class would clip by sqrt(|replicated|² + |head|²). With the head
sharded, |head|² is the sum over ranks of each shard's squared norm, while the replicated gradients (identical on
every rank) count once: norm = sqrt(|replicated|² + Σ_r |shard_r|²), one all-reduce of a scalar over the head's
ranks. Every rank then scales by the same factor, the one of one process. (A per-rank clip_grad_norm_ over the model
and the rank's own shard gives each rank its own factor for the same DDP gradients: the replicas drift apart
silently, since DDP never re-broadcasts the parameters.) The factor is torch's own (clip_grads_with_norm_, as
clip_grad_norm_ uses): a NaN/Inf norm makes the gradients NaN as clip_grad_norm_ does, and no host sync is needed.
With fp16 the gradients are unscaled first (GradScaler.unscale_), so the norm is the true gradients'.

fp16's skipped steps. GradScaler skips the step of a rank whose gradients hold an Inf/NaN (an overflow, which its
growing scale provokes now and then by design). The replicated gradients are the same on every rank, but a shard's
are its own: an overflow in one shard alone would make that rank alone skip, and the replicas part. So the ranks
agree first (`skip_together`): a non-finite shard anywhere makes a gradient non-finite on every rank, and every
rank's GradScaler skips the same step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.utils import clip_grads_with_norm_, get_total_norm


def _with_grads(params) -> list:
    return [p for p in params if p.grad is not None]


def _squared_norm(params: list, device: torch.device) -> torch.Tensor:
    """|gradients|², a float32 scalar on `device` (0 without gradients: a rank may hold no trained centres)."""
    if not params:
        return torch.zeros((), dtype=torch.float32, device=device)
    return get_total_norm([p.grad for p in params], norm_type=2.0).float().square()


def replicate_outside_ddp(modules, world: int) -> None:
    """Give every rank rank 0's parameters and buffers of `modules` (one broadcast per dtype, flattened)."""
    if world <= 1:
        return
    by_dtype: dict = {}
    for t in (t for m in modules for t in (*m.parameters(), *m.buffers())):
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for tensors in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.broadcast(flat, src=0)
            for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
                t.copy_(part.view_as(t))


def average_outside_ddp(params, world: int) -> None:
    """Average over ranks the gradients of parameters DDP does not wrap, in one all-reduce (flattened)."""
    grads = [p.grad for p in _with_grads(params)]
    if world <= 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world)
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))


def skip_together(replicated, sharded, comm, device: torch.device) -> None:
    """Make one of `replicated`'s gradients NaN on every rank when any rank's `sharded` gradients are not finite, so
    that every rank's GradScaler skips the step (module docstring). One all-reduce of the shards' summed squares
    (Inf/NaN when any is), added × 0 to a gradient: +0 when finite, NaN otherwise; no host sync."""
    target = next(iter(_with_grads(replicated)), None)
    shard_sq = comm.all_reduce_(_squared_norm(_with_grads(sharded), device), dist.ReduceOp.SUM)
    if target is not None:
        target.grad.add_((shard_sq * 0).to(target.grad.dtype))


def clip_global_norm(params: list, sharded, max_norm: float, comm, device: torch.device) -> torch.Tensor:
    """Scale the gradients of `params` by one factor, the one clip_grad_norm_ would use on one process holding all
    of them. Those in `sharded` are this rank's part of a whole spread over `comm`'s ranks (their squares are summed
    over the ranks); the others are the same on every rank (counted once). Returns the global norm."""
    params = _with_grads(params)
    if comm.world_size == 1:  # one process: clip_grad_norm_'s own norm, to the bit
        total = get_total_norm([p.grad for p in params], norm_type=2.0)
    else:
        shards = {id(p) for p in sharded}
        shard_sq = _squared_norm([p for p in params if id(p) in shards], device)
        comm.all_reduce_(shard_sq, dist.ReduceOp.SUM)  # every rank calls it, with or without trained centres
        total = (_squared_norm([p for p in params if id(p) not in shards], device) + shard_sq).sqrt()
    clip_grads_with_norm_(params, max_norm, total)
    return total


def update(st) -> None:
    """The optimizer update over the accumulated gradients (clipped if asked), then the schedule."""
    extra = [p for m in st.objective.trained_modules() for p in m.parameters()]  # projection, FitNet's regressors
    average_outside_ddp(extra, st.world)
    if st.scaler.is_enabled() and st.world > 1:
        skip_together([*st.model.parameters(), *extra], st.head.parameters(), st.head.collectives(), st.device)
    if st.spec.train.clip_grad:
        st.scaler.unscale_(st.optimizer)
        clip_global_norm([*st.model.parameters(), *st.head.parameters(), *extra], st.head.parameters(),
                         st.spec.train.clip_grad, st.head.collectives(), st.device)
    st.scaler.step(st.optimizer)
    st.scaler.update()
    st.optimizer.zero_grad(set_to_none=True)
    st.step += 1
    st.scheduler.step_update(st.step)
