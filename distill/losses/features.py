"""Distillation losses on intermediate feature maps: the student's and the teacher's maps at
the stages a loss names, taken through timm's contract (`feature_info`: distill/models/contract.py) by forward
hooks during the usual forward passes (distill/train/engine.py), so DDP and the embedding path are unchanged.

A feature loss declares `Requirements(feature_maps=True, teacher_embedding=False)` and takes `stages` (feature
indices in feature_info's order, the stem first; negative ones count from the last, and are the portable choice:
VarGFaceNet has 4 features, an IResNet 5). It is called as `loss(student_maps, teacher_maps)` with one map per
stage, in that order. The teacher runs online (its maps are not cached: `teacher.cache: true` with a feature loss
is a config error), and it must be a torch model (an ONNX file gives no intermediate maps).

    attention_transfer   Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017: per stage the
                         spatial attention a(f) = mean over channels of |f|^p (p = 2), flattened and
                         L2-normalised per image; the loss is the sum over stages of (a(s) − a(t))² reduced by
                         `reduction`: "mean" (default, the authors' at_loss in szagoruyko/attention-transfer:
                         the mean over batch × H·W positions, so a stage's weight does not grow with its map) or
                         "sum" (summed over positions, mean over the batch: H·W times "mean"). The authors weight
                         the "mean" loss by β = 1000 (`--beta 1e+3` in their README's commands; the paper writes
                         β/2 with β = 10³ / (H·W · batch)): distill.alpha 1000 is their recipe.
                         Channels may differ (attention has none); spatial sizes that differ are brought to
                         the smaller by adaptive average pooling of the attention before normalising.
    fitnet               Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015: mean squared error
                         between a regressed student map (1×1 conv + BN to the teacher's channels, trained
                         with the student; resized bilinearly to the teacher's size when they differ) and the
                         teacher's map at each chosen stage (default the second to last), summed over stages.
                         The paper trains the hint alone first, then the whole student with KD (its two
                         stages); here the hint is one term of the one objective, trained from the start.

Both resizes are F.adaptive_avg_pool2d's and F.interpolate's (bilinear, align_corners=False) numbers, computed as
two matrix products (`resize`): those ops have no deterministic CUDA backward, so `deterministic: true` would
raise in the first backward on a GPU; a product's backward is a product.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses.registry import register_loss
from distill.losses.requirements import Requirements

MAPS = Requirements(feature_maps=True, teacher_embedding=False)  # maps of an online torch teacher, no embeddings


@functools.lru_cache(maxsize=64)
def _axis_weights(mode: str, n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n_out, n_in): one axis of F.adaptive_avg_pool2d (`pool`: output i averages inputs floor(i·n_in/n_out) up
    to ceil((i+1)·n_in/n_out)) or of F.interpolate(mode="bilinear", align_corners=False) without antialias
    (`bilinear`: output i reads source position (i + ½)·n_in/n_out − ½, clamped at 0, between its two inputs)."""
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        if mode == "pool":
            lo, hi = (i * n_in) // n_out, math.ceil((i + 1) * n_in / n_out)
            w[i, lo:hi] = 1.0 / (hi - lo)
        else:
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            lo = int(src)
            frac = src - lo
            w[i, lo] += 1.0 - frac
            w[i, min(lo + 1, n_in - 1)] += frac
    return w.to(device=device, dtype=dtype)


def resize(x: torch.Tensor, size: tuple, mode: str) -> torch.Tensor:
    """(…, H, W) -> (…, h, w) as F.adaptive_avg_pool2d (`pool`) or bilinear F.interpolate with align_corners=False
    (`bilinear`) give it, up to float rounding: both are linear along H and W separately, so the result is
    rows @ x @ cols.T, whose backward is deterministic on CUDA (the module docstring)."""
    (h_in, w_in), (h, w) = x.shape[-2:], size
    rows = _axis_weights(mode, h_in, h, x.device, x.dtype)
    cols = _axis_weights(mode, w_in, w, x.device, x.dtype)
    return torch.matmul(torch.matmul(rows, x), cols.t())


def attention_map(feature: torch.Tensor, p: float = 2.0, size: tuple | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W): mean over channels of |f|^p, pooled to `size` if given, L2-normalised per image;
    in float32 at least (half-precision maps are cast, float64 stays)."""
    a = feature.to(torch.promote_types(feature.dtype, torch.float32)).abs().pow(p).mean(1, keepdim=True)
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        a = resize(a, size, "pool")
    return F.normalize(a.flatten(1), dim=1)


Reduction = Literal["mean", "sum"]


@register_loss("attention_transfer", requires=MAPS)
class AttentionTransfer(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017); see the module docstring for the formula.

    Options: p (2, the paper's), stages (feature indices, default the last three), reduction ("mean": the authors'
    at_loss, over batch × positions; "sum": over positions, mean over the batch). Needs: the student's and the
    teacher's feature maps at those stages (an online torch teacher). Tested: tests/test_feature_losses.py
    (hand-computed), tests/test_reference_numbers.py (the authors' at_loss numbers)."""

    def __init__(self, p: float = 2.0, stages: tuple = (-3, -2, -1), reduction: Reduction = "mean"):
        super().__init__()
        if not isinstance(p, (int, float)) or p <= 0:
            raise ValueError(f"attention_transfer: p must be a positive number, got {p!r}")
        if reduction not in get_args(Reduction):
            raise ValueError(f"attention_transfer: reduction must be one of {', '.join(get_args(Reduction))}, got "
                             f"{reduction!r}")
        self.p, self.stages, self.reduction = float(p), tuple(int(s) for s in stages), reduction

    def extra_repr(self) -> str:
        return f"p={self.p}, stages={self.stages}, reduction={self.reduction}"

    def forward(self, student_maps: list, teacher_maps: list) -> torch.Tensor:
        total = None
        for s, t in zip(student_maps, teacher_maps, strict=True):
            size = tuple(min(a, b) for a, b in zip(s.shape[-2:], t.shape[-2:], strict=True))
            squared = (attention_map(s, self.p, size) - attention_map(t.detach(), self.p, size)).pow(2)
            term = squared.mean() if self.reduction == "mean" else squared.sum(1).mean()
            total = term if total is None else total + term
        return total


@register_loss("fitnet", requires=MAPS)
class FitNet(nn.Module):
    """FitNets (Romero et al., ICLR 2015): a regressor (1×1 conv + BatchNorm) maps the student's map at each
    chosen stage to the teacher's channels, and the loss is the mean squared error to the teacher's map there
    (the paper's hint loss; a regressed map of another size is resized bilinearly to the teacher's).

    Options: stages (default the second to last: a middle-level hint, as the paper chooses). Needs: the maps of
    an online torch teacher. The regressors are built for the two models when the stage starts
    (`build(student_channels, teacher_channels)`), train with the student, are kept in last.pt with the
    objective and never in student.pt or exports."""

    def __init__(self, stages: tuple = (-2,)):
        super().__init__()
        self.stages = tuple(int(s) for s in stages)
        self.regressors = nn.ModuleList()

    def build(self, student_channels: list, teacher_channels: list) -> None:
        self.regressors = nn.ModuleList(nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct))
                                        for cs, ct in zip(student_channels, teacher_channels, strict=True))

    def forward(self, student_maps: list, teacher_maps: list) -> torch.Tensor:
        if len(self.regressors) != len(student_maps):
            raise RuntimeError("fitnet: its regressors were not built for these models (FitNet.build)")
        total = None
        for regress, s, t in zip(self.regressors, student_maps, teacher_maps, strict=True):
            y = regress(s.float())
            if y.shape[-2:] != t.shape[-2:]:
                y = resize(y, tuple(t.shape[-2:]), "bilinear")
            term = F.mse_loss(y, t.detach().float())
            total = term if total is None else total + term
        return total
