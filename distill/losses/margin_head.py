"""Margin heads (ArcFace, CosFace, combined margin) with class centres sharded across ranks, PartialFC-style.

A head turns embeddings and labels into the classification loss. With θ the angle between an embedding
and a class centre, the logit of the target class y is

    s · (cos(m1·θ_y + m2) − m3)        (ArcFace: m1=1, m2=0.5; CosFace: m3=0.4; m=0: normalised softmax)

and every other class gets s · cos θ_j; the loss is the cross-entropy of these logits, averaged over
the global batch (all ranks).

Numerics. With m1 = 1 the margin uses cos(θ+m) = cosθ·cos m − sinθ·sin m, sinθ = sqrt(max(1−cos²θ, eps)),
so acos is never differentiated at ±1 (its derivative is infinite there); other m1 go through
acos(clamp(cosθ, −1+eps, 1−eps)). Past θ* = (π − m2)/m1 the angle m1·θ + m2 wraps beyond π and
cos(m1·θ + m2) would rise again, rewarding a worse embedding. There the target logit is
cosθ − m3 − (1 + cos θ*): it meets the margin curve at θ* (both equal −1 − m3) and keeps falling, so the
target logit is continuous and monotone in θ. (arcface_torch's ArcFace and CombinedMarginLoss used
cosθ − m·sin m there in 2022 until December, which jumps at θ*, and have no fallback since. Whenever
m3 > 0 its CombinedMarginLoss applies cosθ − m3 alone, dropping m1 and m2, so its combined target differs
from insightface's MXNet formula above, which this head follows. The region is θ > 151° for m = 0.5, which a
target class leaves within the first steps of training. docs/methods.md has the comparison.)

Gradients. By default the gradient is the true gradient of the margin logit. `straight_through=True`
reproduces arcface_torch, which applies the margin without gradient: the forward value is the margin
logit, the backward pass sees s·cosθ (logit = cosθ + (margin − cosθ).detach()).

Sharding. Rank r of W holds the contiguous classes [start_r, start_r + n_r) (the first C % W ranks hold
one more); embeddings and labels are all-gathered, and the softmax uses the all-reduced max and sum, so
every rank returns the loss of one process holding all classes. Each rank's `weight` receives exactly
the gradient of that loss. The gradient sent back to each rank's embeddings is world_size × ∂loss/∂e,
as arcface_torch does, because DistributedDataParallel averages the backbone's gradients over ranks:
the average then equals the gradient of the global loss. So wrap the backbone in DDP, never the head.
With one process (torch.distributed not initialised) the collectives are identities; it is the same code.

Class sampling (`sample_rate` < 1, training mode only): each rank keeps every class that is a label in
the global batch and fills up to int(sample_rate · n_r) with random other classes, as PartialFC does.
The sampled rows are indexed out of `weight`, so only they receive gradient.

Class centres, the public API the distillation losses use (distill/losses/centres.py, AdaDistill):
`centre_shard()` (this rank's class range and the collectives over the head's ranks), `local_centres()` (this
rank's rows, the live parameter), `update_local_centres(rows, values)` (an in-place move without gradient),
`full_weight()` (every class, gathered), `load_full_weight(full)` (this rank's rows of a full matrix) and
`freeze_centres()` (the centres train no more).

Hooks for heads built on this one (distill/losses/heads_adaptive.py): `class_cosines(embeddings, weight)` (the
cosine of each sample to each class held here: k sub-centres override only it), `logits(cosine, local, margins,
batch)` (the scaled logits; `batch` holds the gathered embeddings before normalisation, for heads whose margin
reads the feature norm), `regulariser(batch)` (an extra term added to the loss, e.g. MagFace's g(a)), and
`head_state()` / `load_head_state(state)` (the head's buffers in last.pt). Capabilities the distillation losses
check when the config loads (distill/losses/term_checks.py): `centres_per_class` (rows of `weight` per class)
and `takes_sample_margins` (whether `forward(..., margins=)` sets the target margin m2, as margin_distillation
needs). `weight`'s first dimension is always the class: sampling, sharding and the centre API index it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distill.utils.errors import ConfigError


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first class, number of classes) held by `rank`: contiguous blocks, the first C % W one larger."""
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + int(rank < extra)


class Collectives:
    """The collectives a head uses, over one process group; with one process each is the identity."""

    def __init__(self, group=None):
        self.group = group
        initialised = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if initialised else 0
        self.world_size = dist.get_world_size(group) if initialised else 1

    def all_reduce_(self, x: torch.Tensor, op) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x, op=op, group=self.group)
        return x

    def batch_sizes(self, n: int, device) -> list[int]:
        """Every rank's batch size: the last batch of an epoch may differ between ranks. Exchanged on the CPU when
        the group has gloo (`cuda:nccl,cpu:gloo`, distill/utils/dist.py: no wait on the GPU's queue), else on
        `device` (NCCL alone takes no CPU tensors)."""
        if self.world_size == 1:
            return [n]
        on_cpu = "gloo" in str(dist.get_backend(self.group))
        mine = torch.tensor([n], device="cpu" if on_cpu else device)
        sizes = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(sizes, mine, group=self.group)
        return [int(s) for s in sizes]

    def gather_rows(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate every rank's rows (rank order); all_gather needs equal shapes, so pad to the largest."""
        if self.world_size == 1:
            return x
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


class GatherEmbeddings(torch.autograd.Function):
    """All-gather whose backward sums each rank's partial gradient and keeps this rank's rows (× W, see top)."""

    @staticmethod
    def forward(ctx, x, comm, sizes):
        ctx.comm, ctx.sizes = comm, sizes
        return comm.gather_rows(x, sizes)

    @staticmethod
    def backward(ctx, grad):
        comm, sizes = ctx.comm, ctx.sizes
        # each rank's grad covers only its own classes' logits; their sum is the gradient of the loss
        grad = comm.all_reduce_(grad.contiguous().clone(), dist.ReduceOp.SUM)
        start = sum(sizes[: comm.rank])
        return grad[start : start + sizes[comm.rank]] * comm.world_size, None, None


class SumOverShards(torch.autograd.Function):
    """Sum of per-shard partial values; backward is the identity, since every rank holds the same result."""

    @staticmethod
    def forward(ctx, x, comm):
        return comm.all_reduce_(x.clone(), dist.ReduceOp.SUM)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


@dataclass(frozen=True)
class CentreShard:
    """The classes [start, start + count) whose centres this rank holds, and the collectives over the ranks."""
    start: int
    count: int
    comm: Collectives

    def rows_of(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full (num_classes × d) matrix."""
        return full[self.start:self.start + self.count]

    def local(self, labels: torch.Tensor) -> tuple:
        """(local row of each label, whether this rank holds it) for global class labels."""
        local = labels - self.start
        return local, (local >= 0) & (local < self.count)


class HeadOptionError(ValueError):
    """A head option's value the head refuses; `option` names it, so the config load can name its key."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


@dataclass
class GatheredBatch:
    """What a head's hooks may read besides the cosines: the global batch's embeddings before normalisation (all
    ranks' rows, rank order; gradient flows back through GatherEmbeddings), their labels and the collectives."""
    embeddings: torch.Tensor
    labels: torch.Tensor
    comm: Collectives

    def norms(self) -> torch.Tensor:
        """‖e_i‖ of every sample of the global batch, in at least float32 (the feature norm of AdaFace, MagFace)."""
        return self.embeddings.to(torch.promote_types(self.embeddings.dtype, torch.float32)).norm(dim=1)


def once_over_ranks(x: torch.Tensor, comm: Collectives) -> torch.Tensor:
    """`x`, a term every rank computes alike from the gathered batch, whose gradient counts once: GatherEmbeddings
    sums the ranks' gradients (each rank's covers its own classes), so each rank sends back 1/W of this one."""
    if comm.world_size == 1:
        return x
    return x.detach() + (x - x.detach()) / comm.world_size


class MarginHead(nn.Module):
    """Combined-margin softmax head s·(cos(m1·θ + m2) − m3), class centres sharded over ranks."""

    centres_per_class = 1         # rows of `weight` per class (sub-centre heads hold k)
    takes_sample_margins = True   # forward(..., margins=) sets each sample's m2 (margin_distillation)

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m1: float = 1.0, m2: float = 0.0,
                 m3: float = 0.0, *, straight_through: bool = False, sample_rate: float = 1.0, process_group=None):
        super().__init__()
        self.process_group = process_group
        comm = Collectives(process_group)
        if int(embedding_size) < 1 or int(num_classes) < comm.world_size:
            raise ConfigError(f"margin head: need embedding_size >= 1 and num_classes >= world size "
                              f"({comm.world_size}), got embedding_size={embedding_size}, num_classes={num_classes}")
        if not (math.isfinite(s) and s > 0):
            raise ConfigError(f"margin head: scale s must be a positive number, got s={s}")
        if not (math.isfinite(m1) and m1 > 0 and 0 <= m2 < math.pi and math.isfinite(m3)):
            raise ConfigError(f"margin head: need m1 > 0, 0 <= m2 < pi and a finite m3 (the target logit must "
                              f"fall as θ grows), got m1={m1}, m2={m2}, m3={m3}")
        if not 0 < sample_rate <= 1:
            raise ConfigError(f"margin head: sample_rate must be in (0, 1], got {sample_rate}")
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.straight_through, self.sample_rate = bool(straight_through), float(sample_rate)
        self.rank, self.world_size = comm.rank, comm.world_size
        self.class_start, self.num_local_classes = shard_range(self.num_classes, self.rank, self.world_size)
        # θ* where m1·θ + m2 reaches π; past it the monotone fallback applies (module docstring)
        theta_limit = (math.pi - self.m2) / self.m1
        self._wraps = theta_limit < math.pi
        self._cos_limit = math.cos(theta_limit)
        self.weight = nn.Parameter(torch.normal(0, 0.01, self.centre_shape(self.num_local_classes)))
        self.sampled_classes = None  # global ids of the classes the last sampled forward used

    def extra_repr(self) -> str:
        end = self.class_start + self.num_local_classes
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, s={self.s}, m1={self.m1}, "
                f"m2={self.m2}, m3={self.m3}, straight_through={self.straight_through}, "
                f"sample_rate={self.sample_rate}, classes=[{self.class_start}, {end}) on rank "
                f"{self.rank} of {self.world_size}")

    def centre_shape(self, classes: int) -> tuple:
        """The shape of `weight` for `classes` classes (the class first; a sub-centre head: (classes, k, d))."""
        return (classes, self.embedding_size)

    def collectives(self) -> Collectives:
        comm = Collectives(self.process_group)
        if (comm.rank, comm.world_size) != (self.rank, self.world_size):
            raise ConfigError(f"margin head was built as rank {self.rank} of {self.world_size} but runs as rank "
                              f"{comm.rank} of {comm.world_size}; build heads after init_process_group")
        return comm

    def margin_cosine(self, cos: torch.Tensor, m2: torch.Tensor | None = None) -> torch.Tensor:
        """cos(m1·θ + m2) − m3 for target cosines (no scale), with the monotone fallback past θ*. `m2`: a margin
        per target (same shape as `cos`) instead of the head's (MarginDistillation)."""
        if m2 is not None:
            limit = torch.cos((math.pi - m2) / self.m1)
            if self.m1 == 1.0:
                sin = torch.sqrt(torch.clamp(1.0 - cos * cos, min=torch.finfo(cos.dtype).eps))
                out = cos * torch.cos(m2) - sin * torch.sin(m2)
            else:
                eps = torch.finfo(cos.dtype).eps
                out = torch.cos(self.m1 * torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps)) + m2)
            wraps = (math.pi - m2) / self.m1 < math.pi
            out = torch.where(wraps & (cos <= limit), cos - 1.0 - limit, out)
            return out - self.m3
        if self.m1 == 1.0 and self.m2 == 0.0:
            out = cos
        elif self.m1 == 1.0:
            sin = torch.sqrt(torch.clamp(1.0 - cos * cos, min=torch.finfo(cos.dtype).eps))
            out = cos * math.cos(self.m2) - sin * math.sin(self.m2)
        else:
            eps = torch.finfo(cos.dtype).eps
            theta = torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))
            out = torch.cos(self.m1 * theta + self.m2)
        if self._wraps:
            out = torch.where(cos > self._cos_limit, out, cos - 1.0 - self._cos_limit)
        return out - self.m3

    def apply_margin(self, cosine: torch.Tensor, local_labels: torch.Tensor, margins=None) -> torch.Tensor:
        """Scaled logits from a (batch × local classes) cosine matrix; label -1 = target not on this rank;
        `margins`: one m2 per row instead of the head's."""
        on_shard = (local_labels >= 0).unsqueeze(1)
        index = local_labels.clamp(min=0).unsqueeze(1)
        target = cosine.gather(1, index)
        margin = self.margin_cosine(target, None if margins is None else margins.reshape(-1, 1).to(target.dtype))
        if self.straight_through:
            margin = target + (margin - target).detach()
        # gather/where/scatter instead of boolean indexing: no host sync on GPU
        target = torch.where(on_shard, margin, target)
        return (cosine * self.s).scatter_(1, index, target * self.s)

    def _sample(self, local_labels: torch.Tensor) -> torch.Tensor:
        """Sorted local ids of this step's classes: every positive, then random others up to the sample size, as
        arcface_torch's PartialFC_V2.sample (tests/test_reference_partial_fc.py): the scores are drawn by the CPU
        generator on every device (so a seed keeps the same classes on a GPU as on a CPU), and when the positives
        alone fill the sample nothing is drawn (the generator's state stays as theirs)."""
        n = self.num_local_classes
        positive = torch.bincount(local_labels + 1, minlength=n + 1)[1:] > 0  # label -1 lands in bin 0
        num_positive, num_sample = int(positive.sum()), int(self.sample_rate * n)
        if num_positive > num_sample:
            return positive.nonzero().view(-1)
        score = torch.rand(n).to(local_labels.device).masked_fill_(positive, 2.0)
        return score.topk(max(num_sample, 1)).indices.sort().values

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor | None = None):
        """(loss, logs): cross-entropy over all ranks' classes of the global batch; logs hold detached tensors.
        `margins`: an m2 per sample of the global batch (all ranks' rows, rank order) instead of the head's."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ConfigError(f"margin head expects embeddings of shape (batch, {self.embedding_size}) "
                              f"(its embedding_size), got {tuple(embeddings.shape)}")
        labels = labels.reshape(-1).long()
        if labels.shape[0] != embeddings.shape[0]:
            raise ConfigError(f"margin head got {embeddings.shape[0]} embeddings but {labels.shape[0]} labels")
        # a label no shard holds would silently drop out of the softmax, so check (one host sync per step)
        if labels.numel() and bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ConfigError(f"margin head: labels must lie in [0, {self.num_classes}) (its num_classes), got "
                              f"min {int(labels.min())}, max {int(labels.max())}")
        if margins is not None and not self.takes_sample_margins:
            raise ConfigError(f"margin head {type(self).__name__} sets its own target margins and takes no margin per "
                              f"sample (margins=); use a head with a fixed margin (arcface, combined)")
        comm = self.collectives()
        sizes = comm.batch_sizes(embeddings.shape[0], embeddings.device)
        embeddings = GatherEmbeddings.apply(embeddings, comm, sizes)
        labels = comm.gather_rows(labels, sizes)

        local = labels - self.class_start
        local = torch.where((local >= 0) & (local < self.num_local_classes), local, -1)
        weight = self.weight
        if self.training and self.sample_rate < 1:
            index = self._sample(local)
            self.sampled_classes = index + self.class_start
            weight = weight[index]
            local = torch.where(local >= 0, torch.searchsorted(index, local.clamp(min=0)), -1)

        cosine = self.class_cosines(embeddings, weight)
        batch = GatheredBatch(embeddings, labels, comm)
        # margin and softmax in at least float32 even under autocast: exp(64·cos) overflows float16
        with torch.autocast(device_type=cosine.device.type, enabled=False):
            if cosine.dtype in (torch.float16, torch.bfloat16):
                cosine = cosine.float()
            cosine = cosine.clamp(-1.0, 1.0)  # rounding can leave |cos| a hair above 1
            logits = self.logits(cosine, local, margins, batch)
            loss, logs = self._cross_entropy(logits, cosine, local, comm)
            extra = self.regulariser(batch)
            if extra is not None:
                term, extra_logs = extra
                loss, logs = loss + term, {**logs, **extra_logs}
            return loss, logs

    def class_cosines(self, embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(batch × classes held here) cosines of the gathered embeddings to this step's centres `weight`."""
        return F.linear(F.normalize(embeddings), F.normalize(weight))

    def logits(self, cosine: torch.Tensor, local: torch.Tensor, margins, batch: GatheredBatch) -> torch.Tensor:
        """The scaled logits of this shard's classes (float32 or wider, |cos| <= 1); `local`: each sample's target
        column here, or -1; `margins`: an m2 per sample or None. This head: apply_margin."""
        return self.apply_margin(cosine, local, margins)

    def regulariser(self, batch: GatheredBatch):
        """(term added to the loss, its logs) or None. A term every rank computes alike from the gathered batch goes
        through once_over_ranks, so its gradient counts once."""
        return None

    def head_state(self) -> dict:
        """The head's own state for last.pt (its buffers: statistics it keeps across steps), on the CPU. Heads that
        keep one compute it from the gathered, global batch, so every rank holds the same and rank 0's is saved."""
        return {name: b.detach().cpu().clone() for name, b in self.named_buffers()}

    def load_head_state(self, state: dict) -> None:
        """Restore `head_state()`'s values; a name this head does not keep, or one it keeps but `state` lacks, is a
        ConfigError naming it."""
        own = dict(self.named_buffers())
        if set(state) != set(own):
            raise ConfigError(f"margin head keeps state {sorted(own)}, the checkpoint holds {sorted(state)}: it was "
                              f"written by another head")
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value.to(own[name].device, own[name].dtype))

    def _cross_entropy(self, logits, cosine, local, comm):
        """Softmax cross-entropy whose max and normaliser are reduced over the ranks' class shards."""
        on_shard = local >= 0
        index = local.clamp(min=0).unsqueeze(1)
        # the max only stabilises exp() and cancels out of the loss, so it carries no gradient
        maxes = torch.stack([logits.detach().amax(1), cosine.detach().amax(1)], 1)
        comm.all_reduce_(maxes, dist.ReduceOp.MAX)
        shifted = logits - maxes[:, :1]
        zero = shifted.new_zeros(())
        parts = torch.stack([
            shifted.exp().sum(1),                                              # this shard's share of Σ exp
            torch.where(on_shard, shifted.gather(1, index).squeeze(1), zero),  # target logit, on one shard
            torch.where(on_shard, cosine.detach().gather(1, index).squeeze(1), zero),
        ], 1)
        total = SumOverShards.apply(parts, comm)
        loss = (total[:, 0].log() - total[:, 1]).mean()
        target_cos = total[:, 2].detach()
        logs = {
            # accuracy over the classes in this step's softmax (all of them unless sampling)
            "acc": (target_cos >= maxes[:, 1]).float().mean(),
            "cos_target": target_cos.mean(),
        }
        return loss, logs

    def centre_shard(self) -> CentreShard:
        """This rank's classes [start, start + count) of the centres and the collectives over the head's ranks."""
        return CentreShard(self.class_start, self.num_local_classes, self.collectives())

    def local_centres(self) -> torch.Tensor:
        """This rank's class centres (count × embedding_size): the head's trained parameter itself."""
        return self.weight

    @torch.no_grad()
    def update_local_centres(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite this rank's centres at local `rows` with `values`, without gradient (AdaDistill's update)."""
        self.weight[rows] = values.to(self.weight.dtype)

    def freeze_centres(self) -> None:
        """The centres stay as they are: no gradient, so the optimizer never moves them (ProxylessKD; adadistill and
        margin_distillation with train_centres false)."""
        self.weight.requires_grad_(False)

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """All class centres (num_classes × embedding_size) on every rank, e.g. for one checkpoint file."""
        comm = self.collectives()
        sizes = [shard_range(self.num_classes, r, self.world_size)[1] for r in range(self.world_size)]
        return comm.gather_rows(self.weight.detach(), sizes).clone()  # never a view of the live weight

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor) -> None:
        """Copy this rank's rows out of a full (num_classes × embedding_size) matrix of class centres."""
        shape = self.centre_shape(self.num_classes)
        if tuple(weight.shape) != shape:
            raise ConfigError(f"margin head holds {self.num_classes} classes × {' × '.join(map(str, shape[1:]))}, "
                              f"got class centres of shape {tuple(weight.shape)}")
        self.weight.copy_(weight[self.class_start : self.class_start + self.num_local_classes])
