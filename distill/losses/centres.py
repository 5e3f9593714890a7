"""Distillation through the teacher's class centres: its margin-softmax weights, one row per identity.

Where the centres come from: the stage's teacher signal (`TeacherSignal.centres`, teachers/signal.py) reads
them from the teacher's head file (teachers/head_file.py: the accepted files, a glob of a partial-FC run's ranks),
and distill/train/objective.py gives them to the losses at stage start: a teacher trained by the run (stage 0)
keeps its head in `teacher/last.pt`; a loaded teacher takes `teacher.head: FILE`.

A loss that needs them declares `Requirements(centres=True)` and `set_centres(full, head)`; under torchrun each
rank keeps the rows of the classes its margin head holds, through the head's centre API (MarginHead.centre_shard,
load_full_weight, freeze_centres: distill/losses/margin_head.py).
margin_distillation and proxyless_kd set the head's centres at every stage start, so they win over
`init_head_from_previous` (a resumed stage then loads its own head from last.pt, as always).

    kd                   Hinton et al., "Distilling the Knowledge in a Neural Network", 2015, on margin-softmax
                         logits: z = scale · cos(e, W_t) over the teacher's centres for the student's embedding
                         (projected with distill.project when the sizes differ) and for the teacher's, no margin
                         on either; loss = τ² · KL(softmax(z_t / τ) ‖ softmax(z_s / τ)), mean over the global batch.
                         Options: temperature τ (4: the T of MarginDistillation's KD baseline configuration,
                         `margin_base_with_T`, whose code computes the teacher's logits but never uses them: its
                         term is the student's softmax at T against the hard label; mdistiller's kd_loss is the
                         reference, tests/test_reference_numbers.py), scale (64, ArcFace's s). Sharded: the
                         softmax's max and normaliser are reduced over the ranks' centre shards, as the margin
                         head's are.
    margin_distillation  Svitov & Alyamkin, "MarginDistillation: distillation for margin-based softmax", 2020:
                         the student's class centres start as the teacher's, and the ArcFace margin of each sample
                         is m_i = m_min + (m_max − m_min) · c_i / max_batch c, with c_i = cos(t_i, W_{y_i}) the
                         teacher embedding's cosine to the sample's (current) centre (per sample, as the authors'
                         released code computes it; m_max 0.5, m_min 0.2, s from margin.s). Options:
                         train_centres (false: the centres stay the teacher's, frozen, as the authors' train.py
                         keeps them with `fixed_param_names`; true: they train with the student) and margin_max
                         ("device": the maximum over this rank's own batch, as their symbol computes it on each
                         GPU; "global": over the gathered batch of every rank; one process: the same).
                         Replaces the head's margin term (its m2); margin.m1 and m3 stay as configured (the paper:
                         ArcFace, m1 = 1, m3 = 0).
    proxyless_kd         Shi et al., "ProxylessKD: Direct Knowledge Distillation with Inherited Classifier for
                         Face Recognition", 2020: the student's head is the teacher's classifier, frozen; the
                         student trains with the usual margin loss against those centres, so its embeddings land
                         in the teacher's space. Replaces the classification term (no alpha × term is added).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distill.losses.margin_head import Collectives, GatherEmbeddings, SumOverShards
from distill.losses.registry import register_loss
from distill.losses.requirements import Requirements
from distill.utils.errors import ConfigError


def _shifted_and_log_normaliser(z: torch.Tensor, comm: Collectives) -> tuple:
    """(z − peak, log Σ_j exp(z_j − peak)) over the classes of every rank's shard: the peak (no gradient) and the
    normaliser are reduced over the ranks, so each rank holds the normaliser whole; z − peak − the second is the
    log softmax (this rank's columns)."""
    peak = z.detach().amax(1, keepdim=True)
    comm.all_reduce_(peak, dist.ReduceOp.MAX)
    shifted = z - peak
    return shifted, SumOverShards.apply(shifted.exp().sum(1, keepdim=True), comm).log()


class _CentresLoss(nn.Module):
    """Keeps this rank's rows of the teacher's centres (a buffer outside the state dict: reloaded every stage)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("centres", torch.zeros(0, 0), persistent=False)
        self.comm = Collectives()

    def set_centres(self, full: torch.Tensor, head) -> None:
        shard, mine = head.centre_shard(), head.local_centres()
        self.centres = shard.rows_of(full).to(mine.device, mine.dtype).clone()
        self.comm = shard.comm


@register_loss("kd", requires=Requirements(centres=True))
class MarginKD(_CentresLoss):
    """KD on margin-softmax logits over the teacher's centres (Hinton et al. 2015); see the module docstring.
    Options: temperature (4), scale (64). Needs: teacher centres (teacher.head or a teacher trained here) and
    teacher embeddings (the cache serves). Tested: tests/test_centre_losses.py (hand-computed, two gloo ranks)."""

    def __init__(self, temperature: float = 4.0, scale: float = 64.0):
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0 and math.isfinite(scale) and scale > 0):
            raise ValueError(f"kd: temperature and scale must be positive numbers, got {temperature!r}, {scale!r}")
        self.temperature, self.scale = float(temperature), float(scale)

    def forward(self, student_emb, teacher_emb):
        if self.centres.numel() == 0:
            raise ConfigError("distillation loss kd needs the teacher's class centres (teacher.head)")
        comm = self.comm
        dtype = torch.promote_types(student_emb.dtype, torch.float32)  # half precision in float32
        sizes = comm.batch_sizes(student_emb.shape[0], student_emb.device)
        s = GatherEmbeddings.apply(F.normalize(student_emb.to(dtype), dim=1), comm, sizes)
        t = comm.gather_rows(F.normalize(teacher_emb.detach().to(dtype), dim=1), sizes)
        w = F.normalize(self.centres.to(dtype), dim=1)
        k = self.scale / self.temperature
        with torch.no_grad():
            shifted_t, log_norm_t = _shifted_and_log_normaliser(k * t @ w.t(), comm)
            log_pt = shifted_t - log_norm_t
        # KL = Σ_j p_t,j (log p_t,j − (z_s,j − peak)) + log Σ_j exp(z_s,j − peak), since Σ_j p_t,j = 1: the shards'
        # partial sums plus the normaliser every rank holds whole (so its gradient is the global one on each rank)
        shifted_s, log_norm_s = _shifted_and_log_normaliser(k * s @ w.t(), comm)
        partial = (log_pt.exp() * (log_pt - shifted_s)).sum(1)
        return (SumOverShards.apply(partial, comm) + log_norm_s.squeeze(1)).mean() * self.temperature ** 2


MarginMax = Literal["device", "global"]


@register_loss("margin_distillation", requires=Requirements(centres=True, sizes="same", replaces_classification=True,
                                                            sample_margins=True))
class MarginDistillation(_CentresLoss):
    """MarginDistillation (Svitov & Alyamkin 2020); see the module docstring. Options: m_max (0.5), m_min (0.2),
    train_centres (false: the teacher's centres stay frozen, as the authors' train.py keeps them; true: they train
    with the student), margin_max ("device": the maximum of c over this rank's own batch, as the authors' per-GPU
    symbol computes it; "global": over every rank's batch). Needs: teacher centres and embeddings of the student's
    size. Tested: tests/test_centre_losses.py (hand-computed, two gloo ranks), tests/test_reference_numbers.py."""

    def __init__(self, m_max: float = 0.5, m_min: float = 0.2, train_centres: bool = False,
                 margin_max: MarginMax = "device"):
        super().__init__()
        if not (0 <= m_min <= m_max < math.pi):
            raise ValueError(f"margin_distillation: need 0 <= m_min <= m_max < pi, got m_min={m_min!r}, "
                             f"m_max={m_max!r}")
        if margin_max not in get_args(MarginMax):
            raise ValueError(f"margin_distillation: margin_max must be one of {', '.join(get_args(MarginMax))}, got "
                             f"{margin_max!r}")
        self.m_max, self.m_min = float(m_max), float(m_min)
        self.train_centres, self.margin_max = bool(train_centres), margin_max

    def extra_repr(self) -> str:
        return (f"m_max={self.m_max:g}, m_min={self.m_min:g}, train_centres={self.train_centres}, "
                f"margin_max={self.margin_max}")

    def set_centres(self, full, head) -> None:
        head.load_full_weight(full.to(head.local_centres().dtype))  # the student's centres start as the teacher's
        if not self.train_centres:
            head.freeze_centres()  # before the optimizer is made (distill/train/objective.py), so it never holds them

    @torch.no_grad()
    def margins(self, head, labels, teacher_emb) -> torch.Tensor:
        """m_i of every sample of the global batch (every rank computes the same); c_i / max c with the maximum
        over the sample's own rank's batch ("device") or over the global batch ("global")."""
        shard = head.centre_shard()
        comm = shard.comm
        sizes = comm.batch_sizes(labels.shape[0], labels.device)
        dtype = torch.promote_types(teacher_emb.dtype, torch.float32)
        t = comm.gather_rows(F.normalize(teacher_emb.detach().to(dtype), dim=1), sizes)
        local, mine = shard.local(comm.gather_rows(labels.reshape(-1).long(), sizes))
        w = F.normalize(head.local_centres()[local.clamp(0, shard.count - 1)].to(dtype), dim=1)
        cos = torch.where(mine, (t * w).sum(1), torch.zeros_like(t[:, 0]))
        comm.all_reduce_(cos, dist.ReduceOp.SUM)  # each sample's centre lives on one rank
        if self.margin_max == "global" or len(sizes) == 1:
            peak = cos.max()
        else:  # each rank's rows of the gathered batch (rank order) take that rank's maximum
            peak = torch.cat([part.max().expand(len(part)) for part in cos.split(sizes) if len(part)])
        return self.m_min + (self.m_max - self.m_min) * cos / peak.clamp_min(1e-6)

    def classify(self, head, student_emb, labels, teacher_emb):
        m = self.margins(head, labels, teacher_emb)
        loss, logs = head(student_emb, labels, margins=m)
        return loss, {**logs, "md_margin": m.mean()}


@register_loss("proxyless_kd", requires=Requirements(centres=True, sizes="same", replaces_classification=True))
class ProxylessKD(_CentresLoss):
    """ProxylessKD (Shi et al. 2020); see the module docstring. No options. Needs: teacher centres, embeddings of
    the student's size. Tested: tests/test_centre_losses.py."""

    def set_centres(self, full, head) -> None:
        head.load_full_weight(full.to(head.local_centres().dtype))
        head.freeze_centres()  # the inherited classifier stays the teacher's

    def classify(self, head, student_emb, labels, teacher_emb):
        return head(student_emb, labels)
