"""The objective a stage trains (distill/losses/distillation.py: DistillationObjective): its distillation terms
from the experiment and the stage (distill/losses/terms.py), the projection `distill.project` asks for, and
what a feature term trains (FitNet's regressors, distill/train/feature_taps.py), built before the optimizer."""

from __future__ import annotations

from distill.losses.distillation import DistillationObjective
from distill.losses.terms import stage_terms
from distill.models.files import model_embedding_size
from distill.train.feature_taps import prepare_feature_loss


def stage_objective(cfg, spec, head, model, teacher, cache, device) -> DistillationObjective:
    """classification + the stage's terms (the short form distill.loss at StageSpec.alpha, or distill.terms, all
    at 0 in a stage that does not distil), on `device`."""
    project = None
    if cfg.distill.project == "linear" and spec.alpha > 0 and (teacher is not None or cache is not None):
        teacher_dim = cache.emb.shape[2] if cache is not None else teacher.embedding_size
        project = (model_embedding_size(model), int(teacher_dim))
    if cfg.distill.terms is None:
        objective = DistillationObjective(head, loss=cfg.distill.loss, alpha=spec.alpha, project=project)
    else:
        objective = DistillationObjective(head, terms=stage_terms(cfg.distill, spec.alpha), project=project)
    objective.to(device)
    prepare_feature_loss(objective, model, teacher, cache, device)
    return objective
