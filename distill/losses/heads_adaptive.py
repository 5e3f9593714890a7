"""Margin heads whose margin adapts to the sample or to training: AdaFace, CurricularFace, MagFace (`adaface`,
`curricularface`, `magface`). Each is a MarginHead (distill/losses/margin_head.py: class centres sharded over ranks,
PartialFC sampling, the softmax over the shards) that overrides its `logits` hook, and MagFace its `regulariser`.
With θ_j the angle to class j, y the label, s the scale:

AdaFace (Kim et al., CVPR 2022; mk-minchul/AdaFace head.py, class AdaFace). From the feature norm ‖z_i‖ (the
embedding before normalisation, clipped to [0.001, 100], no gradient) and an EMA of the batch's mean μ and
standard deviation σ of the norms (rate t_alpha; μ starts at 20, σ at 100; updated before use):
    ẑ_i = clip(h · (‖z_i‖ − μ) / (σ + 0.001), −1, 1),  g_angle = −m·ẑ_i,  g_add = m + m·ẑ_i
    target logit s·(cos(clip(θ_y + g_angle, 0.001, π − 0.001)) − g_add), every other logit s·cos θ_j,
with every cosine first clamped to ±(1 − 0.001), as theirs. m 0.4, h 0.333, t_alpha 0.01 (their train defaults).
CurricularFace (Huang et al., CVPR 2020; HuangYG123/CurricularFace head/metrics.py, class CurricularFace). A
running t (EMA rate 0.01 of the batch's mean target cosine, from 0, updated before use); the target logit is
ArcFace's s·cos(θ_y + m), and a negative harder than it, cos θ_j > cos(θ_y + m), gets s·cos θ_j·(t + cos θ_j).
m 0.5. margin_distillation's per-sample m2 replaces m.
MagFace (Meng et al., CVPR 2021; IrvingMeng/MagFace models/magface.py MagLinear, MagLoss; run/run.sh). With
a = clip(‖z_i‖, l_a, u_a) (gradient through it): m(a) = l_m + (u_m − l_m)·(a − l_a)/(u_a − l_a), the target
logit s·cos(θ_y + m(a)) (their easy_margin: θ_y ≥ 90° keeps s·cos θ_y), and the loss adds
λ_g · mean_i g(a_i), g(a) = 1/a + a/u_a². l_a 10, u_a 110, l_m 0.45, u_m 0.8, λ_g 35 (run.sh).

Under several ranks the statistics (AdaFace's μ, σ; CurricularFace's mean target cosine) are over the global batch,
which every rank holds (gathered), so their state is the same on every rank: last.pt keeps rank 0's (head_state).
They update in training mode only. Conventions where we differ: docs/methods.md, Margin heads.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from distill.losses.heads import register_head
from distill.losses.margin_head import GatheredBatch, HeadOptionError, MarginHead, once_over_ranks


def _number(name: str, value, ok, what: str) -> float:
    """`value` as a float if it is a finite number that `ok` accepts, else a HeadOptionError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise HeadOptionError(name, f"{name} must be {what}, got {value!r}")
    return float(value)


def _target(cosine: torch.Tensor, local: torch.Tensor) -> tuple:
    """(whether the sample's class is on this shard (B × 1), its column (B × 1), its cosine there (B × 1))."""
    index = local.clamp(min=0).unsqueeze(1)
    return (local >= 0).unsqueeze(1), index, cosine.gather(1, index)


@register_head(name="adaface")
class AdaFace(MarginHead):
    """AdaFace: a margin set by the feature norm against the batch's norm statistics (module docstring)."""

    takes_sample_margins = False  # the margin is the norm's; margin_distillation's m2 would replace it
    eps = 1e-3                    # theirs: the cosines' clamp, the angle's clip, σ's guard

    def __init__(self, embedding_size, num_classes, s=64.0, m=0.4, h=0.333, t_alpha=0.01, *, sample_rate=1.0,
                 process_group=None):
        m = _number("m", m, lambda v: 0 <= v < math.pi / 2, "a margin in [0, pi/2)")
        self.h = _number("h", h, lambda v: v > 0, "a positive number (the norm's weight in the margin)")
        self.t_alpha = _number("t_alpha", t_alpha, lambda v: 0 < v <= 1, "an EMA rate in (0, 1]")
        super().__init__(embedding_size, num_classes, s=s, m2=m, sample_rate=sample_rate, process_group=process_group)
        self.m = m
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}"

    def logits(self, cosine, local, margins, batch: GatheredBatch):
        eps = self.eps
        norms = batch.norms().detach().clamp(0.001, 100)
        if self.training and norms.numel() > 1:  # the unbiased std of one norm is undefined: keep the statistics
            with torch.no_grad():
                a = self.t_alpha
                self.batch_mean.copy_(norms.mean() * a + (1 - a) * self.batch_mean)
                self.batch_std.copy_(norms.std() * a + (1 - a) * self.batch_std)
        scaler = ((norms - self.batch_mean) / (self.batch_std + eps) * self.h).clamp(-1, 1).unsqueeze(1)
        cosine = cosine.clamp(-1 + eps, 1 - eps)
        on_shard, index, target = _target(cosine, local)
        theta = (torch.acos(target) - self.m * scaler).clamp(eps, math.pi - eps)
        margin = torch.cos(theta) - (self.m + self.m * scaler)
        return (cosine * self.s).scatter(1, index, torch.where(on_shard, margin, target).to(cosine.dtype) * self.s)


@register_head(name="curricularface")
class CurricularFace(MarginHead):
    """CurricularFace: ArcFace's target, hard negatives re-weighted by the running t (module docstring)."""

    def __init__(self, embedding_size, num_classes, s=64.0, m=0.5, *, sample_rate=1.0, process_group=None):
        super().__init__(embedding_size, num_classes, s=s, m2=m, sample_rate=sample_rate, process_group=process_group)
        self.register_buffer("t", torch.tensor(0.0))

    def logits(self, cosine, local, margins, batch: GatheredBatch):
        on_shard, index, target = _target(cosine, local)
        margin = self.margin_cosine(target, None if margins is None else margins.reshape(-1, 1).to(target.dtype))
        # every shard needs each sample's target cosine (for t) and margin logit (the hardness threshold); the
        # target is on one shard, so their sum over the shards
        shared = torch.where(on_shard, torch.cat([target, margin], 1).detach(), 0.0)
        batch.comm.all_reduce_(shared, dist.ReduceOp.SUM)
        if self.training:
            with torch.no_grad():
                self.t.copy_(shared[:, 0].mean() * 0.01 + (1 - 0.01) * self.t)
        t = self.t.to(cosine.dtype)
        hard = torch.where(cosine > shared[:, 1:], cosine * (t + cosine), cosine)
        return (hard * self.s).scatter(1, index, torch.where(on_shard, margin, hard.gather(1, index)) * self.s)


@register_head(name="magface")
class MagFace(MarginHead):
    """MagFace: a margin growing with the feature magnitude, and the magnitude's regulariser (module docstring)."""

    takes_sample_margins = False  # the margin is the magnitude's

    def __init__(self, embedding_size, num_classes, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8,
                 lambda_g=35.0, easy_margin=True, *, sample_rate=1.0, process_group=None):
        self.l_a = _number("l_a", l_a, lambda v: v > 0, "a positive magnitude")
        self.u_a = _number("u_a", u_a, lambda v: v > self.l_a, f"a magnitude above l_a ({self.l_a})")
        self.l_m = _number("l_m", l_m, lambda v: 0 <= v < math.pi, "a margin in [0, pi)")
        self.u_m = _number("u_m", u_m, lambda v: self.l_m <= v < math.pi, f"a margin in [l_m ({self.l_m}), pi)")
        self.lambda_g = _number("lambda_g", lambda_g, lambda v: v >= 0, "a weight >= 0")
        if not isinstance(easy_margin, bool):
            raise HeadOptionError("easy_margin", f"easy_margin must be true or false, got {easy_margin!r}")
        self.easy_margin = easy_margin
        super().__init__(embedding_size, num_classes, s=s, m2=self.l_m, sample_rate=sample_rate,
                         process_group=process_group)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, u_m={self.u_m}, "
                f"lambda_g={self.lambda_g}, easy_margin={self.easy_margin}")

    def magnitudes(self, batch: GatheredBatch) -> torch.Tensor:
        """a_i = ‖z_i‖ clipped to [l_a, u_a], with its gradient inside the bounds."""
        return batch.norms().clamp(self.l_a, self.u_a)

    def logits(self, cosine, local, margins, batch: GatheredBatch):
        a = self.magnitudes(batch).unsqueeze(1)
        m = (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m
        on_shard, index, target = _target(cosine, local)
        margin = self.margin_cosine(target, m.to(target.dtype))  # cos(θ + m(a)), the continuous fallback past θ*
        if self.easy_margin:
            margin = torch.where(target > 0, margin, target)
        return (cosine * self.s).scatter(1, index, torch.where(on_shard, margin, target) * self.s)

    def regulariser(self, batch: GatheredBatch):
        a = self.magnitudes(batch)
        g = (a / self.u_a ** 2 + 1 / a).mean()
        return once_over_ranks(self.lambda_g * g, batch.comm), {"mag_g": g.detach(), "magnitude": a.mean().detach()}
