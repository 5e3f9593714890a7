"""Sub-center ArcFace (`subcenter_arcface`): k centres per class, the closest one takes ArcFace's margin.

Deng et al., "Sub-center ArcFace: Boosting Face Recognition by Large-scale Noisy Web Faces", ECCV 2020; the
authors' code deepinsight/insightface recognition/SubCenter-ArcFace (MXNet): train_parall.py, get_symbol_arcface
with config.loss_K = 3. Each class c keeps k centres W_c1..W_ck; a sample's cosine to class c is the largest of
its cosines to them, and that cosine goes through ArcFace:

    cos θ_c = max_j cos(x, W_cj);   target logit s·cos(θ_y + m), every other class s·cos θ_c   (k 3, s 64, m 0.5)

so a noisy image can settle near a non-dominant sub-centre instead of pulling the dominant one. The gradient
reaches, per sample and class, only the sub-centre that gave the max. (The paper's second step, dropping the
non-dominant sub-centres and the images far from the dominant one, then retraining with ArcFace, is their
drop.py, a dataset tool, not part of the head.)

Layout: `weight` is (classes held here, k, embedding_size), the class first, so sharding over ranks, PartialFC's
class sampling (a kept class keeps all its k sub-centres), full_weight() and the optimizer's state index classes
as for every head; the authors' fc7 weight (classes·k rows, class c's sub-centres in rows c·k .. c·k + k − 1) is
its reshape to (classes·k, embedding_size). The margin, the softmax and the sharded cross-entropy are
MarginHead's (margin_head.py), with its differences to the authors' code (continuous fallback past θ* = π − m;
arcface's straight_through option). The losses that read one centre per identity (kd, proxyless_kd, adadistill,
margin_distillation) cannot use k of them: distill/losses/term_checks.py refuses them against `centres_per_class`
= k, and the centre API (local_centres, update_local_centres) refuses them too; k = 1 is ArcFace, its weight
(classes, embedding_size) as ArcFace's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.heads import register_head
from distill.losses.margin_head import HeadOptionError, MarginHead
from distill.utils.errors import ConfigError


class SubCenterArcFace(MarginHead):
    """ArcFace over the max cosine of k sub-centres per class; `weight` is (classes, k, embedding_size)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5, *, k: int = 3,
                 **options):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise HeadOptionError("k", f"subcenter_arcface: k (sub-centres per class) must be an integer >= 1, "
                                       f"got {k!r}")
        self._k = k  # read by centre_shape while MarginHead builds the weight
        super().__init__(embedding_size, num_classes, s=s, m1=1.0, m2=m, m3=0.0, **options)
        self.centres_per_class = k

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self._k}"

    def centre_shape(self, classes: int) -> tuple:
        """(classes, k, embedding_size): a class's k sub-centres stay together through sharding and sampling;
        k = 1: (classes, embedding_size), ArcFace's own, so its centres and the centre losses' files fit."""
        return (classes, self.embedding_size) if self._k == 1 else (classes, self._k, self.embedding_size)

    def class_cosines(self, embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(batch × classes) cosine to each class: the largest of the cosines to its k sub-centres."""
        if weight.dim() == 2:
            return super().class_cosines(embeddings, weight)
        classes, k, d = weight.shape
        cos = F.linear(F.normalize(embeddings), F.normalize(weight, dim=-1).reshape(classes * k, d))
        return cos.view(-1, classes, k).max(dim=2).values

    # the centre API reads and moves one centre per class: with k > 1 there is none (term_checks refuses the losses
    # that use it when the config loads; this says the same if one is reached without that check)
    def _one_centre_per_class(self) -> None:
        if self._k > 1:
            raise ConfigError(f"margin head subcenter_arcface keeps {self._k} centres per class, and a loss that reads "
                              f"or moves one centre per identity (kd, proxyless_kd, margin_distillation, adadistill) "
                              f"cannot use them: set margin.margin arcface (or margin.options.k 1), or choose another "
                              f"distillation loss")

    def local_centres(self) -> torch.Tensor:
        self._one_centre_per_class()
        return super().local_centres()

    def update_local_centres(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        self._one_centre_per_class()
        super().update_local_centres(rows, values)


@register_head
def subcenter_arcface(embedding_size, num_classes, s=64.0, m=0.5, k=3, **options):
    """Sub-center ArcFace: cos θ_c the max over class c's k sub-centres; target logit s·cos(θ_y + m)."""
    return SubCenterArcFace(embedding_size, num_classes, s=s, m=m, k=k, **options)
