"""Distillation losses on intermediate feature maps (issue 23, item 2): the student's and the teacher's maps at
the stages a loss names, taken through timm's contract (`feature_info`: distill/models/contract.py) by forward
hooks during the usual forward passes (distill/train/engine.py), so DDP and the embedding path are unchanged.

A feature loss declares `needs_features = True` and `stages` (feature indices in feature_info's order, the stem
first; negative ones count from the last, and are the portable choice: VarGFaceNet has 4 features, an IResNet
5). It is called as `loss(student_maps, teacher_maps)` with one map per stage, in that order. The teacher runs
online (its maps are not cached: `teacher.cache: true` with a feature loss is a config error), and it must be a
torch model (an ONNX file gives no intermediate maps).

    attention_transfer   Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017: per stage the
                         spatial attention a(f) = mean over channels of |f|^p (p = 2), flattened and
                         L2-normalised per image; the loss is sum over stages of mean_i |a(s_i) − a(t_i)|².
                         Channels may differ (attention has none); spatial sizes that differ are brought to
                         the smaller by average pooling of the attention before normalising.
                         The paper's reference code averages (a_s − a_t)² over batch × positions and weights it
                         β/2 = 500; this sum over positions is H·W times that mean, so the paper's weight is
                         distill.alpha ≈ 500 / (H·W) per stage (e.g. ~10 for 7×7 maps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses.registry import register_loss


def attention_map(feature: torch.Tensor, p: float = 2.0, size: tuple | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W): mean over channels of |f|^p, pooled to `size` if given, L2-normalised per image."""
    a = feature.float().abs().pow(p).mean(1, keepdim=True)
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        a = F.adaptive_avg_pool2d(a, size)
    return F.normalize(a.flatten(1), dim=1)


@register_loss("attention_transfer")
class AttentionTransfer(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017); see the module docstring for the formula.

    Options: p (2, the paper's), stages (feature indices, default the last three). Needs: the student's and the
    teacher's feature maps at those stages (an online torch teacher). Tested: tests/test_feature_losses.py
    (hand-computed)."""

    needs_features = True

    def __init__(self, p: float = 2.0, stages: tuple = (-3, -2, -1)):
        super().__init__()
        if not isinstance(p, (int, float)) or p <= 0:
            raise ValueError(f"attention_transfer: p must be a positive number, got {p!r}")
        self.p, self.stages = float(p), tuple(int(s) for s in stages)

    def extra_repr(self) -> str:
        return f"p={self.p}, stages={self.stages}"

    def forward(self, student_maps: list, teacher_maps: list) -> torch.Tensor:
        total = None
        for s, t in zip(student_maps, teacher_maps):
            size = tuple(min(a, b) for a, b in zip(s.shape[-2:], t.shape[-2:]))
            diff = attention_map(s, self.p, size) - attention_map(t.detach(), self.p, size)
            term = diff.pow(2).sum(1).mean()
            total = term if total is None else total + term
        return total
