"""ElasticFace heads (`elasticface_arc`, `elasticface_cos`): ArcFace and CosFace with a random margin per sample.

Boutros et al., "ElasticFace: Elastic Margin Loss for Deep Face Recognition", CVPRW 2022, arXiv 2109.09416; the
authors' code fdbtrs/ElasticFace, utils/losses.py (ElasticArcFace, ElasticCosFace) and config/config.py. Each
training step draws one margin per sample of the batch, m_i ~ N(m, σ), and uses it in place of ArcFace's or
CosFace's fixed margin:

    elasticface_arc: target logit s·cos(θ_y + m_i)         (m 0.5; σ 0.05, with `plus` 0.0175)
    elasticface_cos: target logit s·(cos θ_y − m_i)        (m 0.35; σ 0.05, with `plus` 0.02)

`plus: true` is ElasticFace+: the drawn margins are sorted and handed out by the target cosines. The authors'
code gives sample i the sorted margin at position order[i], where order lists the samples by target cosine,
highest first (`plus_pairing: code`, the default); `plus_pairing: ranked` gives the sample with the k-th highest
target cosine the k-th smallest margin (order[k] gets sorted[k]), the pairing the code's names suggest. The
authors sort within each GPU's batch (DDP, each process its own batch): `plus_batch: rank` (default) sorts each
rank's rows of the gathered batch among themselves, `plus_batch: global` the whole batch; one process: the same.

The draw. The head sees the global batch (every rank's rows gathered, margin_head.py), so every rank must draw the
same margins, and a resumed run the ones the uninterrupted run drew. Draw t (the head's t-th training forward,
counted from 0) comes from a CPU generator seeded with (seed + t·φ) mod 2⁶³ (φ the 64-bit golden-ratio constant,
so nearby seeds never share draws): torch.normal(m, σ, (batch,)) in float32, as the authors' float32 draw, moved
to the embeddings' device. `seed` defaults to one number drawn from torch's global generator when the head is
built: the engine seeds that generator from the run's seed and builds model and head in the same order on every
rank, so it is the same on every rank and again when a stage is rebuilt to resume. The head keeps (seed, draws)
in its head_state (MarginHead.head_state), which last.pt keeps. In evaluation mode nothing is drawn: the margin is m.

Their ArcFace margin is acos, + m_i, cos, differentiated, without a fallback past θ* = π − m_i; ours is
MarginHead's (cos θ·cos m_i − sin θ·sin m_i, the continuous fallback past θ*): the same values and gradients
wherever θ_y < π − m_i. docs/methods.md has the comparison.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.distributed as dist

from distill.losses.heads import register_head
from distill.losses.margin_head import HeadOptionError, MarginHead
from distill.utils.errors import ConfigError

Kind = Literal["arc", "cos"]
PlusPairing = Literal["code", "ranked"]
PlusBatch = Literal["rank", "global"]

# config/config.py of fdbtrs/ElasticFace: σ per loss (ElasticArcFace, ElasticArcFacePlus, ElasticCosFace, ...Plus)
AUTHORS_STD = {("arc", False): 0.05, ("arc", True): 0.0175, ("cos", False): 0.05, ("cos", True): 0.02}
GOLDEN = 0x9E3779B97F4A7C15  # 2⁶⁴/φ, odd: seed + t·GOLDEN visits every residue before repeating
SEED_RANGE = 2**63


def draw_seed(seed: int, draw: int) -> int:
    """The generator seed of draw `draw` of a head seeded `seed`."""
    return (int(seed) + int(draw) * GOLDEN) % SEED_RANGE


def _choice(name: str, value, allowed) -> None:
    if value not in get_args(allowed):
        raise HeadOptionError(name, f"elasticface: {name} must be one of {', '.join(get_args(allowed))}, got {value!r}")


class ElasticFace(MarginHead):
    """ArcFace (`kind` arc) or CosFace (`kind` cos) whose margin is drawn per sample, N(m, std), each training step."""

    takes_sample_margins = False  # its margins are its own draw: margin_distillation's are refused at config load

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5, *, kind: Kind = "arc",
                 std: float | None = None, plus: bool = False, plus_pairing: PlusPairing = "code",
                 plus_batch: PlusBatch = "rank", seed: int | None = None, **options):
        _choice("kind", kind, Kind)
        _choice("plus_pairing", plus_pairing, PlusPairing)
        _choice("plus_batch", plus_batch, PlusBatch)
        std = AUTHORS_STD[kind, bool(plus)] if std is None else float(std)
        if not (math.isfinite(std) and std >= 0):
            raise HeadOptionError("std", f"elasticface: std (the margins' standard deviation) must be a number >= 0, "
                                         f"got {std}")
        if seed is not None and not (isinstance(seed, int) and 0 <= seed < SEED_RANGE):
            raise HeadOptionError("seed", f"elasticface: seed must be an integer in [0, 2**63) or left out (drawn "
                                          f"from the run's seed), got {seed!r}")
        # drawn before the centres' initial values, while every rank's generator is still in the same state
        seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else seed
        margins = dict(m2=m) if kind == "arc" else dict(m3=m)
        super().__init__(embedding_size, num_classes, s=s, m1=1.0, **margins, **options)
        self.seed, self.draws = seed, 0
        self.kind, self.m, self.std = kind, float(m), std
        self.plus, self.plus_pairing, self.plus_batch = bool(plus), plus_pairing, plus_batch
        self._rows_per_rank = None  # every rank's batch size in this forward, for plus_batch rank

    def extra_repr(self) -> str:
        plus = f", plus_pairing={self.plus_pairing}, plus_batch={self.plus_batch}" if self.plus else ""
        return (f"{super().extra_repr()}, kind={self.kind}, m={self.m}, std={self.std}, plus={self.plus}{plus}, "
                f"seed={self.seed}")

    # -- the state a resume needs: which draw comes next (the same on every rank: rank 0's is saved)
    def head_state(self) -> dict:
        return {**super().head_state(), "seed": torch.tensor(self.seed), "draws": torch.tensor(self.draws)}

    def load_head_state(self, state: dict) -> None:
        state = dict(state)
        missing = sorted({"seed", "draws"} - set(state))
        if missing:
            raise ConfigError(f"margin head elasticface keeps state ['draws', 'seed'], the checkpoint lacks "
                              f"{missing}: it was written by another head")
        self.seed, self.draws = int(state.pop("seed")), int(state.pop("draws"))
        super().load_head_state(state)

    def draw_margins(self, n: int) -> torch.Tensor:
        """The next draw: n margins N(m, std), float32 on the CPU (the same on every rank and after a resume)."""
        generator = torch.Generator().manual_seed(draw_seed(self.seed, self.draws))
        self.draws += 1
        return torch.normal(self.m, self.std, (n,), generator=generator)

    def margin_cosine(self, cos: torch.Tensor, m2: torch.Tensor | None = None) -> torch.Tensor:
        """CosFace's per-sample margin is subtracted from the cosine; ArcFace's is MarginHead's m2."""
        if m2 is not None and self.kind == "cos":
            return cos - m2
        return super().margin_cosine(cos, m2)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor | None = None):
        """(loss, logs), as MarginHead's; the margins are this head's own draw (`margins` is refused)."""
        if self.training and self.plus and self.plus_batch == "rank" and self.world_size > 1:
            self._rows_per_rank = self.collectives().batch_sizes(embeddings.shape[0], embeddings.device)
        try:
            return super().forward(embeddings, labels, margins)
        finally:
            self._rows_per_rank = None

    def logits(self, cosine: torch.Tensor, local: torch.Tensor, margins, batch) -> torch.Tensor:
        """Scaled logits of the global batch: in training mode with this step's draw (paired by `plus`), else m."""
        if self.training:
            margins = self.draw_margins(cosine.shape[0]).to(device=cosine.device, dtype=cosine.dtype)
            if self.plus:
                margins = self._paired(margins, cosine, local)
        return self.apply_margin(cosine, local, margins)

    def _paired(self, margins: torch.Tensor, cosine: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """ElasticFace+: the sorted margins handed out by the target cosines (module docstring), per rank's rows or
        over the whole batch. The target cosine of a row lives on one rank's shard: summed over the ranks."""
        on_shard = local_labels >= 0
        target = cosine.detach().gather(1, local_labels.clamp(min=0).unsqueeze(1)).squeeze(1)
        target = self.collectives().all_reduce_(torch.where(on_shard, target, torch.zeros_like(target)),
                                                dist.ReduceOp.SUM)
        sizes = self._rows_per_rank or [len(margins)]
        out, start = torch.empty_like(margins), 0
        for n in sizes:
            rows = slice(start, start + n)
            ascending = margins[rows].sort(stable=True).values
            order = target[rows].argsort(descending=True, stable=True)
            if self.plus_pairing == "code":
                out[rows] = ascending[order]      # their margin[idicate_cosie]: row i gets sorted[order[i]]
            else:
                out[rows] = ascending[order.argsort()]  # the k-th highest target cosine gets the k-th smallest
            start += n
        return out


@register_head
def elasticface_arc(embedding_size, num_classes, s=64.0, m=0.5, std=None, plus=False, plus_pairing="code",
                    plus_batch="rank", seed=None, **options):
    """ElasticFace-Arc (ElasticFace+ with plus): target logit s·cos(θ + m_i), m_i ~ N(m, std) per sample and step."""
    return ElasticFace(embedding_size, num_classes, s=s, m=m, kind="arc", std=std, plus=plus,
                       plus_pairing=plus_pairing, plus_batch=plus_batch, seed=seed, **options)


@register_head
def elasticface_cos(embedding_size, num_classes, s=64.0, m=0.35, std=None, plus=False, plus_pairing="code",
                    plus_batch="rank", seed=None, **options):
    """ElasticFace-Cos (ElasticFace+ with plus): target logit s·(cos θ − m_i), m_i ~ N(m, std) per sample and step."""
    return ElasticFace(embedding_size, num_classes, s=s, m=m, kind="cos", std=std, plus=plus,
                       plus_pairing=plus_pairing, plus_batch=plus_batch, seed=seed, **options)
