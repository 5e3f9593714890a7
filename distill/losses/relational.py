"""Relational distillation losses on the batch's embeddings: the student matches how the teacher places
the images of a batch relative to each other, not each embedding itself. Each works with the cached teacher
(embeddings only), needs a batch of at least two images (RKD's angle term: three) and no repeated identities;
student and teacher embeddings may differ in size (relations have none), so no distill.project is needed.

    rkd   Park et al., "Relational Knowledge Distillation", CVPR 2019.
          Distance-wise: ψ_D(i, j) = |e_i − e_j| / μ with μ the mean distance over the batch's pairs i ≠ j, for
          student and teacher; Huber (smooth L1, δ = 1) between them. Angle-wise: ψ_A(i, j, k) =
          cos ∠(e_i − e_j, e_k − e_j), Huber between them. loss = distance_weight (25, the paper's) × distance +
          angle_weight (50) × angle, on the raw embeddings as the paper does (the mean normalisation makes the
          distances scale-free). `pairs` (default "all", the authors' code, lenscloth/RKD's RkdDistance and
          RKdAngle): the Huber terms are averaged over the whole b × b matrix and b × b × b tensor, whose
          degenerate entries (a pair i = j; a triplet with i = j or k = j) are 0 on both sides and only dilute
          the mean; "distinct": over the b(b−1) pairs i ≠ j and the b(b−1)² triplets i ≠ j, k ≠ j, which is the
          "all" value times b/(b−1) (distance) and b²/(b−1)² (angle).
    cc    Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019. On L2-normalised
          embeddings, the Gaussian RBF kernel k(x, y) = exp(−γ|x − y|²) = exp(−2γ) exp(2γ x·y) is replaced by its
          Taylor expansion of order P: k(x, y) ≈ Σ_{p=0..P} exp(−2γ) (2γ)^p / p! (x·y)^p. C is the batch's
          b × b matrix of k over every pair; loss = |C_s − C_t|²_F / b². Options gamma (0.4) and order (2: a
          second-order expansion). The authors released no code; TFace's face-KD baseline (cc.py, since
          commit b3dad95) sums p = 0, 1 only, a first-order expansion: `order: 1` gives its numbers.
    sp    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019. G = E·Eᵀ (b × b), each row
          L2-normalised; loss = |G̃_s − G̃_t|²_F / b². The paper applies it to flattened feature maps; here to
          the embeddings, as TFace's face-KD baseline does, but with the paper's row normalisation: TFace's SP
          takes the cosine matrix of the normalised embeddings, not row-normalised (0.00905 against this
          0.00840 on issue 38's batch): option gram: cosine gives TFace's.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses.registry import register_loss
from distill.losses.requirements import Requirements
from distill.utils.errors import ConfigError


def _pair(student, teacher, name: str, least: int = 2):
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ConfigError(f"distillation loss {name} needs student and teacher embeddings of one batch (batch, dim), "
                          f"got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    if student.shape[0] < least:
        raise ConfigError(f"distillation loss {name} relates the images of a batch and needs at least {least}, got "
                          f"{student.shape[0]}: raise train.batch_size (a last short batch is never drawn)")
    dtype = torch.promote_types(student.dtype, torch.float32)  # float16/bfloat16 in float32; float64 stays
    return student.to(dtype), teacher.detach().to(dtype)


Pairs = Literal["all", "distinct"]


def pair_distances(e: torch.Tensor, pairs: Pairs = "all") -> torch.Tensor:
    """ψ_D of RKD: |e_i − e_j| / μ, μ the mean distance over the pairs i ≠ j. `pairs` "all": the b × b matrix,
    its diagonal 0 (the authors' code); "distinct": the b(b−1) ordered pairs i ≠ j only."""
    d = torch.cdist(e, e)
    off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    scaled = d / d[off].mean().clamp_min(1e-12)
    return scaled[off] if pairs == "distinct" else torch.where(off, scaled, torch.zeros_like(scaled))


def triplet_angles(e: torch.Tensor, pairs: Pairs = "all") -> torch.Tensor:
    """ψ_A of RKD: cos ∠(e_i − e_j, e_k − e_j). `pairs` "all": the b × b × b tensor, 0 where i = j or k = j (a
    zero vector's direction; the authors' code); "distinct": the triplets with i ≠ j and k ≠ j only."""
    n = len(e)
    v = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # v[j, i] = unit(e_i − e_j), 0 for i = j
    cos = torch.bmm(v, v.transpose(1, 2))                   # cos[j, i, k]
    if pairs == "all":
        return cos
    eye = torch.eye(n, dtype=torch.bool, device=e.device)
    return cos[~(eye[:, :, None] | eye[:, None, :])]       # i ≠ j and k ≠ j


@register_loss("rkd", requires=Requirements(sizes="any", min_batch=3))  # the angle term's triplets
class RKD(nn.Module):
    """RKD (Park et al., CVPR 2019), distance- and angle-wise; see the module docstring. Options: distance_weight
    (25), angle_weight (50), pairs ("all": the authors' means over the b² pairs and b³ triplets, the degenerate
    ones included; "distinct": over the pairs i ≠ j and triplets i ≠ j, k ≠ j only). Needs: teacher embeddings (the
    cache serves), batches of >= 3 images for the angle term (2 with angle_weight 0). Tested:
    tests/test_relational.py (hand-computed), tests/test_reference_numbers.py (lenscloth/RKD's numbers)."""

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, pairs: Pairs = "all"):
        super().__init__()
        if distance_weight < 0 or angle_weight < 0 or not math.isfinite(distance_weight + angle_weight):
            raise ValueError(f"rkd: distance_weight and angle_weight must be finite and >= 0, got "
                             f"{distance_weight!r}, {angle_weight!r}")
        if pairs not in get_args(Pairs):
            raise ValueError(f"rkd: pairs must be one of {', '.join(get_args(Pairs))}, got {pairs!r}")
        self.distance_weight, self.angle_weight, self.pairs = float(distance_weight), float(angle_weight), pairs

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight:g}, angle_weight={self.angle_weight:g}, pairs={self.pairs}"

    def forward(self, student_emb, teacher_emb):
        s, t = _pair(student_emb, teacher_emb, "rkd", 3 if self.angle_weight else 2)
        loss = s.new_zeros(())
        if self.distance_weight:
            distance = F.smooth_l1_loss(pair_distances(s, self.pairs), pair_distances(t, self.pairs))
            loss = loss + self.distance_weight * distance
        if self.angle_weight:
            angle = F.smooth_l1_loss(triplet_angles(s, self.pairs), triplet_angles(t, self.pairs))
            loss = loss + self.angle_weight * angle
        return loss


def rbf_correlation(e: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """The b × b Taylor-expanded Gaussian-RBF correlation of L2-normalised embeddings (CC's C)."""
    x = F.normalize(e, dim=1)
    dot = x @ x.t()
    terms = [(2 * gamma) ** p / math.factorial(p) * dot.pow(p) for p in range(order + 1)]
    return math.exp(-2 * gamma) * torch.stack(terms).sum(0)


@register_loss("cc", requires=Requirements(sizes="any", min_batch=2))
class CorrelationCongruence(nn.Module):
    """Correlation congruence (Peng et al., ICCV 2019); see the module docstring. Options: gamma (0.4), order (2).
    Needs: teacher embeddings (the cache serves), batches of >= 2 images. Tested: tests/test_relational.py."""

    def __init__(self, gamma: float = 0.4, order: int = 2):
        super().__init__()
        if not (math.isfinite(gamma) and gamma > 0) or order < 0:
            raise ValueError(f"cc: gamma must be a positive number and order >= 0, got {gamma!r}, {order!r}")
        self.gamma, self.order = float(gamma), int(order)

    def forward(self, student_emb, teacher_emb):
        s, t = _pair(student_emb, teacher_emb, "cc")
        diff = rbf_correlation(s, self.gamma, self.order) - rbf_correlation(t, self.gamma, self.order)
        return diff.pow(2).sum() / len(s) ** 2


Gram = Literal["row_normalised", "cosine"]


@register_loss("sp", requires=Requirements(sizes="any", min_batch=2))
class SimilarityPreserving(nn.Module):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019): |G̃_s − G̃_t|²_F / b² with G̃ the batch's similarity matrix.
    Option gram: "row_normalised" (default: the paper's G = E·Eᵀ with each row L2-normalised, as RepDistiller's
    code) or "cosine" (TFace's face-KD baseline: the cosine matrix of the L2-normalised embeddings, rows not
    normalised). Needs: teacher embeddings (the cache serves), batches of >= 2 images. Tested:
    tests/test_relational.py (hand-computed), tests/test_reference_numbers.py (RepDistiller's and TFace's numbers)."""

    def __init__(self, gram: Gram = "row_normalised"):
        super().__init__()
        if gram not in get_args(Gram):
            raise ValueError(f"sp: gram must be one of {', '.join(get_args(Gram))}, got {gram!r}")
        self.gram = gram

    def extra_repr(self) -> str:
        return f"gram={self.gram}"

    def matrix(self, e: torch.Tensor) -> torch.Tensor:
        if self.gram == "cosine":
            x = F.normalize(e, dim=1)
            return x @ x.t()
        return F.normalize(e @ e.t(), dim=1)

    def forward(self, student_emb, teacher_emb):
        s, t = _pair(student_emb, teacher_emb, "sp")
        return (self.matrix(s) - self.matrix(t)).pow(2).sum() / len(s) ** 2
