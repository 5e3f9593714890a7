"""EKD, evaluation-oriented knowledge distillation (Huang et al., CVPR 2022); see the class docstring and
docs/methods.md (TFace's code, and where ours differs)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses.distillation import prepare_pair
from distill.losses.registry import register_loss
from distill.losses.requirements import Requirements
from distill.utils.errors import ConfigError


@register_loss("ekd", requires=Requirements(labels=True, images_per_id=True))
class EKD(nn.Module):
    """EKD, evaluation-oriented knowledge distillation (Huang et al., CVPR 2022): match where pairs fall relative
    to the verification thresholds, for student and teacher, instead of matching embeddings.

    In a batch (which needs repeated identities: data.images_per_id), S = the pairwise cosine similarities
    (pairs i < j), once for the student and once for the teacher. Positives: pairs of one identity;
    negatives: the `hard_negatives` pairs of different identities with the highest student similarity (all
    of them when fewer). For each FAR r in `fars` the threshold a_r is the ceil(r·N)-th highest of the batch's
    N negative similarities (the highest when r·N < 1), so when r·N is whole r·N − 1 negatives exceed it;
    TFace's code takes sorted_neg[int(r·N)], which r·N exceed (docs/methods.md). It is tracked by an EMA with
    `momentum` (the first batch sets it; TFace's starts at zero), separately for student and teacher, without
    gradient. The soft
    count of thresholds a similarity passes is c(x) = Σ_r σ((x − a_r) / `temperature`), and

        loss = `positive_weight` · MSE(c_s(S⁺_s), c_t(S⁺_t)) + `negative_weight` · MSE(c_s(S⁻_s), c_t(S⁻_t)),

    added to the classification loss as alpha × loss: distill.alpha: 1 gives the paper's
    ArcFace + 0.02·MSE⁺ + 0.01·MSE⁻. The thresholds are buffers: saved in last.pt, resumed.
    """

    def __init__(self, fars=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6), hard_negatives: int = 2000, momentum: float = 0.01,
                 temperature: float = 0.01, positive_weight: float = 0.02, negative_weight: float = 0.01):
        super().__init__()
        self.fars = tuple(float(r) for r in fars)
        self.hard_negatives, self.momentum, self.temperature = int(hard_negatives), float(momentum), float(temperature)
        self.positive_weight, self.negative_weight = float(positive_weight), float(negative_weight)
        self.register_buffer("thresholds", torch.zeros(2, len(self.fars)))  # [student, teacher] x FAR
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))     # batches folded into the EMA

    def batch_thresholds(self, negatives: torch.Tensor) -> torch.Tensor:
        """a_r of one batch: the ceil(r·N)-th highest negative similarity (the highest when r·N < 1)."""
        ordered = negatives.detach().sort(descending=True).values
        n = ordered.numel()
        index = torch.tensor([max(math.ceil(r * n) - 1, 0) for r in self.fars], device=ordered.device)
        return ordered[index]

    def soft_count(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((x[:, None] - thresholds[None, :]) / self.temperature).sum(1)

    def forward(self, student_emb, teacher_emb, labels):
        s, t = prepare_pair(student_emb, teacher_emb)
        s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
        i, j = torch.triu_indices(len(s), len(s), offset=1, device=s.device)
        labels = labels.reshape(-1)
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
            if self.training:
                if int(self.seen) == 0:
                    self.thresholds.copy_(batch)
                else:
                    self.thresholds.mul_(1 - self.momentum).add_(self.momentum * batch)
                self.seen += 1
            thresholds = self.thresholds.to(sim_s.dtype) if int(self.seen) else batch
        hard = neg_s.detach().topk(min(self.hard_negatives, neg_s.numel())).indices
        pos_term = F.mse_loss(self.soft_count(sim_s[same], thresholds[0]), self.soft_count(sim_t[same], thresholds[1]))
        neg_term = F.mse_loss(self.soft_count(neg_s[hard], thresholds[0]), self.soft_count(neg_t[hard], thresholds[1]))
        return self.positive_weight * pos_term + self.negative_weight * neg_term
