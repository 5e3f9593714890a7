"""AdaDistill (Boutros et al., ECCV 2024): the teacher's knowledge goes into the student's class centres; see the
class docstring and docs/methods.md (the authors' code, and where ours differs)."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses.distillation import prepare_pair
from distill.losses.registry import register_loss
from distill.losses.requirements import Requirements

CentreUpdate = Literal["raw", "normalised"]
SameClass = Literal["last", "mean"]


def _choice(name: str, value, values) -> str:
    allowed = get_args(values)
    if value not in allowed:
        raise ValueError(f"{name} must be {' or '.join(repr(a) for a in allowed)}, got {value!r}")
    return value


@register_loss("adadistill", requires=Requirements(sizes="same", replaces_classification=True,
                                                   one_centre_per_class=True))
class AdaDistill(nn.Module):
    """AdaDistill (Boutros et al., ECCV 2024): the teacher's knowledge goes into the student's class centres.

    For each sample i of identity y_i, with ŝ_i, t̂_i the normalised student and teacher embeddings and W_y the
    class centre (Ŵ_y normalised), computed without gradient:
        α_i = clip(cos(ŝ_i, t̂_i) · clip(cos(W_{y_i}, t̂_i), 1e-6, 1), 1e-6, 1)
        W_{y_i} ← α_i W_{y_i} + (1 − α_i) t̂_i        (centre_update "raw", the authors' code)
        W_{y_i} ← α_i Ŵ_{y_i} + (1 − α_i) t̂_i        (centre_update "normalised")
    then the head's usual margin loss (the paper: ArcFace s = 64, m = 0.45; here margin.*) on the updated
    centres, which replaces the classification term (no alpha × term is added; alpha > 0 turns it on).
    Early in training (student far from teacher) α is small and the centres follow the teacher; as the
    student aligns, α grows and the centres move less.

    Options (defaults: the authors' code, fdbtrs/AdaDistill utils/losses.py and train/train_AdaDistill.py):
    `centre_update` "raw" | "normalised" (above; the two agree only for centres of norm 1); `train_centres`
    false | true: false, the centres move only by the blend (their optimizer holds only the backbone; the head is
    frozen before the optimizer is built, prepare_head), true, also by SGD as the head's weight; `same_class`
    "last" | "mean": a class seen more than once in the global batch (ranks in order) keeps the last sample's
    updated centre (their indexed write, as it falls on CPU) or the mean of its samples' updated centres.
    Sharded heads: embeddings, labels and teacher embeddings are gathered, and each rank updates the centres it
    holds, so every class has one centre (theirs: one copy per GPU, each blended with its own batch). The centres
    are the head's weight, so they are in last.pt. Needs teacher and student embeddings of one size (the centres
    live in the student's space).
    """

    def __init__(self, centre_update: CentreUpdate = "raw", train_centres: bool = False,
                 same_class: SameClass = "last"):
        super().__init__()
        self.centre_update = _choice("centre_update", centre_update, CentreUpdate)
        self.same_class = _choice("same_class", same_class, SameClass)
        if not isinstance(train_centres, bool):
            raise ValueError(f"train_centres must be true or false, got {train_centres!r}")
        self.train_centres = train_centres

    def extra_repr(self) -> str:
        return (f"centre_update={self.centre_update}, train_centres={self.train_centres}, "
                f"same_class={self.same_class}")

    def prepare_head(self, head) -> None:
        """Before the optimizer is built (distill/train/objective.py): train_centres false freezes the centres,
        so only the blend moves them."""
        if not self.train_centres:
            head.freeze_centres()

    @torch.no_grad()
    def update_centres(self, head, student_emb, labels, teacher_emb) -> torch.Tensor:
        """Move the centres of this batch's identities (those this rank holds) toward the teacher; returns the α
        of every sample of the global batch whose centre is on this rank."""
        s, t = prepare_pair(student_emb, teacher_emb)
        shard = head.centre_shard()
        comm = shard.comm
        labels = labels.reshape(-1).long()
        sizes = comm.batch_sizes(labels.shape[0], labels.device)
        s_hat = comm.gather_rows(F.normalize(s, dim=1), sizes)
        t_hat = comm.gather_rows(F.normalize(t, dim=1), sizes)
        local, mine = shard.local(comm.gather_rows(labels, sizes))
        rows, s_hat, t_hat = local[mine], s_hat[mine], t_hat[mine]
        w = head.local_centres()[rows].to(t_hat.dtype)  # every sample reads the centre as it was before the batch
        w_hat = F.normalize(w, dim=1)
        alpha = ((s_hat * t_hat).sum(1) * (w_hat * t_hat).sum(1).clamp(1e-6, 1.0)).clamp(1e-6, 1.0)
        base = w if self.centre_update == "raw" else w_hat
        updated = alpha[:, None] * base + (1.0 - alpha[:, None]) * t_hat
        if self.same_class == "mean":
            classes, inverse = rows.unique(return_inverse=True)
            summed = updated.new_zeros(len(classes), updated.shape[1]).index_add_(0, inverse, updated)
            counts = torch.bincount(inverse, minlength=len(classes)).to(summed.dtype)
            head.update_local_centres(classes, summed / counts[:, None])
        else:  # the last sample of each class: a stable sort, then the end of each run (no duplicate-index write)
            ordered, order = torch.sort(rows, stable=True)
            last = torch.ones_like(ordered, dtype=torch.bool)
            last[:-1] = ordered[1:] != ordered[:-1]
            head.update_local_centres(ordered[last], updated[order[last]])
        return alpha

    def classify(self, head, student_emb, labels, teacher_emb):
        alpha = self.update_centres(head, student_emb, labels, teacher_emb)
        loss, logs = head(student_emb, labels)
        return loss, {**logs, "ada_alpha": alpha.mean() if alpha.numel() else alpha.new_zeros(())}
