"""AdaDistill (Boutros et al., ECCV 2024): the teacher's knowledge goes into the student's class centres; see the
class docstring and docs/methods.md (the authors' code, and where ours differs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses.distillation import prepare_pair
from distill.losses.registry import register_loss
from distill.losses.requirements import Requirements


@register_loss("adadistill", requires=Requirements(sizes="same", replaces_classification=True))
class AdaDistill(nn.Module):
    """AdaDistill (Boutros et al., ECCV 2024): the teacher's knowledge goes into the student's class centres.

    For each sample i of identity y_i, with ŝ_i, t̂_i the normalised student and teacher embeddings and Ŵ_y the
    normalised class centre, computed without gradient:
        α_i = clip(cos(ŝ_i, t̂_i) · clip(cos(Ŵ_{y_i}, t̂_i), 1e-6, 1), 1e-6, 1)
        W_{y_i} ← α_i Ŵ_{y_i} + (1 − α_i) t̂_i
    then the head's usual margin loss (the paper: ArcFace s = 64, m = 0.45; here margin.*) on the updated
    centres, which replaces the classification term (no alpha × term is added; alpha > 0 turns it on).
    Early in training (student far from teacher) α is small and the centres follow the teacher; as the
    student aligns, α grows and the centres move less. Samples of one identity in a batch: their updated
    centres are averaged (a choice: the paper does not say; the authors' indexed write keeps one). Sharded
    heads: embeddings, labels and teacher embeddings are gathered, and each rank updates the centres it holds.
    The centres are the head's weight, so they are in last.pt already, and they also train by SGD. The
    authors' code (fdbtrs/AdaDistill) blends the raw centre, α W + (1 − α) t̂, and its optimizer holds only
    the backbone (docs/methods.md). Needs teacher and student embeddings of one size (the centres live in the
    student's space).
    """

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
        w_hat = F.normalize(head.local_centres()[rows].to(t_hat.dtype), dim=1)
        alpha = ((s_hat * t_hat).sum(1) * (w_hat * t_hat).sum(1).clamp(1e-6, 1.0)).clamp(1e-6, 1.0)
        updated = alpha[:, None] * w_hat + (1.0 - alpha[:, None]) * t_hat
        classes, inverse = rows.unique(return_inverse=True)
        summed = updated.new_zeros(len(classes), updated.shape[1]).index_add_(0, inverse, updated)
        counts = torch.bincount(inverse, minlength=len(classes)).to(summed.dtype)
        head.update_local_centres(classes, summed / counts[:, None])
        return alpha

    def classify(self, head, student_emb, labels, teacher_emb):
        alpha = self.update_centres(head, student_emb, labels, teacher_emb)
        loss, logs = head(student_emb, labels)
        return loss, {**logs, "ada_alpha": alpha.mean() if alpha.numel() else alpha.new_zeros(())}
