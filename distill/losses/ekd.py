"""EKD, evaluation-oriented knowledge distillation (Huang et al., CVPR 2022); see the class docstring and
docs/methods.md (TFace's code, and where ours differs)."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses.distillation import prepare_pair
from distill.losses.margin_head import Collectives, GatherEmbeddings
from distill.losses.registry import register_loss
from distill.losses.requirements import Requirements
from distill.utils.errors import ConfigError

ThresholdIndex = Literal["floor", "ceil"]
WarmStart = Literal["zero", "first_batch"]
Batch = Literal["global", "device"]


def _one_of(option: str, value, values) -> str:
    allowed = get_args(values)
    if value not in allowed:
        raise ValueError(f"ekd: {option} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def threshold_position(far: float, n: int, rule: ThresholdIndex) -> int:
    """Where a_r sits among N negative similarities sorted from the highest: "floor" → int(r·N), the one that r·N
    of them exceed (TFace's `N // anchor`); "ceil" → ceil(r·N) − 1, exceeded by r·N − 1 when r·N is whole. The two
    agree unless r·N is whole. r·N within 1e-9 of a whole number counts as whole (1/3 of 54 is 18)."""
    x = far * n
    if abs(x - round(x)) <= 1e-9 * max(1.0, x):
        x = round(x)
    k = math.floor(x) if rule == "floor" else math.ceil(x) - 1
    return min(max(k, 0), n - 1)


@register_loss("ekd", requires=Requirements(labels=True, images_per_id=True))
class EKD(nn.Module):
    """EKD, evaluation-oriented knowledge distillation (Huang et al., CVPR 2022): match where pairs fall relative
    to the verification thresholds, for student and teacher, instead of matching embeddings. The defaults are
    TFace's released code (docs/methods.md; pinned: tests/test_reference_ekd.py).

    In a batch (which needs repeated identities: data.images_per_id), S = the pairwise cosine similarities
    (pairs i < j), once for the student and once for the teacher. Positives: pairs of one identity;
    negatives: the `hard_negatives` pairs of different identities with the highest student similarity (all
    of them when fewer). For each FAR r in `fars`, the batch's threshold a_r is one of its N negative
    similarities (`threshold_index`: "floor", TFace's sorted_neg[int(r·N)], which exactly r·N negatives exceed
    when r·N is whole; "ceil", the ceil(r·N)-th highest; the highest when r·N < 1 under both). The running
    thresholds follow it by an EMA with `momentum`, separately for student and teacher, without gradient, updated
    only in training mode (`warm_start`: "zero", TFace's, they start at 0 and move by `momentum` from the first
    batch on; "first_batch": the first batch sets them). The soft count of thresholds a similarity passes is
    c(x) = Σ_r σ((x − a_r) / `temperature`), and

        loss = `positive_weight` · MSE(c_s(S⁺_s), c_t(S⁺_t)) + `negative_weight` · MSE(c_s(S⁻_s), c_t(S⁻_t)),

    added to the classification loss as alpha × loss: distill.alpha: 1 gives the paper's
    ArcFace + 0.02·MSE⁺ + 0.01·MSE⁻. `batch`: "global" (TFace's train.py), the pairs and thresholds of the
    batch of every rank, all-gathered (every rank computes the same loss and thresholds; each rank's student
    embeddings get the gradient that, averaged by DDP, is the global loss's); "device": this rank's batch alone
    (the same with one process). The thresholds are buffers: saved in last.pt, resumed.
    """

    def __init__(self, fars=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6), hard_negatives: int = 2000, momentum: float = 0.01,
                 temperature: float = 0.01, positive_weight: float = 0.02, negative_weight: float = 0.01,
                 threshold_index: ThresholdIndex = "floor", warm_start: WarmStart = "zero", batch: Batch = "global"):
        super().__init__()
        self.fars = tuple(float(r) for r in fars)
        if not all(0 < r < 1 for r in self.fars):
            raise ValueError(f"ekd: every FAR in fars must lie between 0 and 1, got {list(fars)!r}")
        self.hard_negatives, self.momentum, self.temperature = int(hard_negatives), float(momentum), float(temperature)
        self.positive_weight, self.negative_weight = float(positive_weight), float(negative_weight)
        self.threshold_index = _one_of("threshold_index", threshold_index, ThresholdIndex)
        self.warm_start = _one_of("warm_start", warm_start, WarmStart)
        self.batch = _one_of("batch", batch, Batch)
        self.register_buffer("thresholds", torch.zeros(2, len(self.fars)))  # [student, teacher] x FAR
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))     # batches folded into the EMA

    def extra_repr(self) -> str:
        return f"threshold_index={self.threshold_index!r}, warm_start={self.warm_start!r}, batch={self.batch!r}"

    def batch_thresholds(self, negatives: torch.Tensor) -> torch.Tensor:
        """a_r of one batch, at `threshold_position` of the negatives sorted from the highest."""
        ordered = negatives.detach().sort(descending=True).values
        n = ordered.numel()
        index = [threshold_position(r, n, self.threshold_index) for r in self.fars]
        return ordered[torch.tensor(index, device=ordered.device)]

    def soft_count(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((x[:, None] - thresholds[None, :]) / self.temperature).sum(1)

    @staticmethod
    def global_batch(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> tuple:
        """Every rank's rows in rank order (one process: unchanged). Every rank computes the same loss on them, so
        each rank's gradient of the gathered student rows is divided by W before GatherEmbeddings sums it over the
        ranks and returns W × this rank's rows of it: DDP's average of the backbones' gradients is then the
        gradient of the global loss."""
        comm = Collectives()
        if comm.world_size == 1:
            return s, t, labels
        sizes = comm.batch_sizes(s.shape[0], s.device)
        gathered = GatherEmbeddings.apply(s, comm, sizes)
        if gathered.requires_grad:
            gathered.register_hook(lambda grad: grad / comm.world_size)
        return gathered, comm.gather_rows(t, sizes), comm.gather_rows(labels, sizes)

    def forward(self, student_emb, teacher_emb, labels):
        s, t = prepare_pair(student_emb, teacher_emb)
        s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
        labels = labels.reshape(-1)
        if self.batch == "global":
            s, t, labels = self.global_batch(s, t, labels)
        i, j = torch.triu_indices(len(s), len(s), offset=1, device=s.device)
        same = labels[i] == labels[j]
        if not bool(same.any()):
            raise ConfigError("distill.loss ekd: this batch holds no two images of one identity; set "
                              "data.images_per_id (e.g. 4) so every batch repeats identities")
        sim_s, sim_t = (s[i] * s[j]).sum(1), (t[i] * t[j]).sum(1)
        neg_s, neg_t = sim_s[~same], sim_t[~same]
        if neg_s.numel() == 0:
            raise ConfigError("distill.loss ekd: this batch holds only one identity; lower data.images_per_id so a "
                              "batch holds several identities")
        with torch.no_grad():
            batch = torch.stack([self.batch_thresholds(neg_s), self.batch_thresholds(neg_t)])
            seeded = self.warm_start == "first_batch" and int(self.seen) == 0
            if self.training:
                if seeded:
                    self.thresholds.copy_(batch)
                else:
                    self.thresholds.mul_(1 - self.momentum).add_(self.momentum * batch)
                self.seen += 1
            # before any training batch, "first_batch" has no running thresholds yet: this batch's stand in
            thresholds = batch if seeded and not self.training else self.thresholds.to(sim_s.dtype)
        hard = neg_s.detach().topk(min(self.hard_negatives, neg_s.numel())).indices
        pos_term = F.mse_loss(self.soft_count(sim_s[same], thresholds[0]), self.soft_count(sim_t[same], thresholds[1]))
        neg_term = F.mse_loss(self.soft_count(neg_s[hard], thresholds[0]), self.soft_count(neg_t[hard], thresholds[1]))
        return self.positive_weight * pos_term + self.negative_weight * neg_term
