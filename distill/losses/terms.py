"""Loss terms: what a stage distils with, composed in the experiment.

    distill:
      terms:
        - {loss: equivalent_angular, alpha: 7}
        - {loss: fitnet, alpha: 1, stages: [-2]}
        - {loss: attention_transfer, alpha: 10, name: at_last, stages: [-1]}

total = classification + Σ alpha_i × term_i. Each term has `loss` (a registered distillation loss), `alpha`
(its weight, a finite number >= 0; a term at 0 is not computed), optionally `name` (its log is
train/loss_kd/<name>; default the loss; two terms of one loss need names of their own) and the loss's own
options beside them (checked against the loss's signature when the config loads: an unknown option gets a
"did you mean", a value of the wrong type names its key). `distill.loss` + `distill.alpha` is the short form
of one term without options: `config_terms` turns either form into the list of terms, and every consumer (the
config checks, preflight, the objective, the run's descriptions) reads the terms only. alpha is a weight in
both forms, and a term's log and state-dict slot are the same in both (distill/losses/distillation.py). A term
whose loss owns the classification (adadistill) replaces the head's loss; at most one term may.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from distill.utils.errors import ConfigError

RESERVED = ("loss", "alpha", "name")


@dataclass(frozen=True)
class LossTerm:
    """One term of the objective: `alpha × loss(options)`, logged under `name`; `key`: where the config sets it
    ('distill.loss' for the short form, 'distill.terms[i]'; empty for a term built in code)."""
    name: str
    loss: str
    alpha: float
    options: dict = field(default_factory=dict)
    key: str = field(default="", compare=False)  # provenance, not part of what the term is

    def describe(self) -> str:
        """'fitnet (alpha 1, stages [-2])'; a named term: 'at_last: attention_transfer (alpha 10, ...)'."""
        label = self.loss if self.name == self.loss else f"{self.name}: {self.loss}"
        return f"{label} (" + ", ".join([f"alpha {self.alpha:g}"] + [f"{k} {v}" for k, v in self.options.items()]) + ")"


def parse_terms(entries, key: str = "distill.terms") -> list:
    """The `distill.terms` list as LossTerms, its structure checked (each a mapping with a `loss` name and a
    finite `alpha` >= 0, names unique); the options are checked against the losses by distill/config/checks.py."""
    if not isinstance(entries, list) or not entries:
        raise _error(key, f"must be a non-empty list of terms such as [{{loss: equivalent_angular, alpha: 7}}], "
                          f"got {entries!r}")
    terms, seen = [], {}
    for i, entry in enumerate(entries):
        here = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise _error(here, f"must be a mapping such as {{loss: fitnet, alpha: 1}}, got {entry!r}")
        loss = entry.get("loss")
        if not isinstance(loss, str) or not loss:
            raise _error(here + ".loss", f"is required: the registered distillation loss of this term, got {loss!r}")
        alpha = entry.get("alpha")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise _error(here + ".alpha", f"must be a finite number >= 0 (this term's weight), got {alpha!r}")
        name = entry.get("name", loss)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise _error(here + ".name", f"must be a word of letters, digits, _ . - (it names the log "
                                         f"train/loss_kd/<name>), got {name!r}")
        if name in seen:
            raise _error(here + ".name", f"{name!r} is already the name of {key}[{seen[name]}]: give each term of "
                                         f"one loss a name of its own (name: {loss}_2)")
        seen[name] = i
        options = {k: v for k, v in entry.items() if k not in RESERVED}
        terms.append(LossTerm(name=name, loss=loss, alpha=float(alpha), options=options, key=here))
    return terms


def config_terms(distill) -> list:
    """The terms of a `distill` config section: its `terms`, or the short form's one term (distill.loss at weight
    distill.alpha)."""
    if distill.terms is None:
        return [LossTerm(name=distill.loss, loss=distill.loss, alpha=float(distill.alpha), key="distill.loss")]
    return parse_terms(distill.terms)


def stage_terms(distill, alpha: float) -> list:
    """The terms of a stage whose distillation weight (StageSpec.alpha: the summed weights of its terms) is
    `alpha`. A student stage has the experiment's weight (distill.weight) and the terms as configured; a stage
    that does not distil (the baseline, the teacher) has 0 and every term at 0 (built, not computed: the
    objective's state has one layout in every stage); another weight scales the configured ones in proportion."""
    terms = config_terms(distill)
    total = sum(t.alpha for t in terms)
    if alpha == total:
        return terms
    if alpha <= 0 or total <= 0:
        return [replace(t, alpha=0.0) for t in terms]
    return [replace(t, alpha=float(alpha) * (t.alpha / total)) for t in terms]


def describe_terms(terms) -> str:
    """'equivalent_angular (alpha 7) + fitnet (alpha 1, stages [-2])', or 'none'."""
    active = [t for t in terms if t.alpha > 0]
    return " + ".join(t.describe() for t in active) if active else "none"


def _error(key: str, what: str) -> ConfigError:
    return ConfigError(f"key '{key}' {what}")
