"""The objective a stage trains (distill/losses/distillation.py: DistillationObjective): its distillation terms
from the experiment and the stage (distill/losses/terms.py), the projection `distill.project` asks for, and
what a feature term trains (FitNet's regressors, distill/train/feature_taps.py), built before the optimizer."""

from __future__ import annotations

from distill.losses.distillation import DistillationObjective
from distill.losses.term_checks import Setting, check_terms
from distill.losses.terms import stage_terms
from distill.models.files import model_embedding_size
from distill.train.feature_taps import prepare_feature_loss
from distill.train.state import started_terms


def stage_objective(cfg, spec, head, model, signal, device, last=None, log=None) -> DistillationObjective:
    """classification + the stage's terms (distill/losses/terms.py: stage_terms, every term at 0 in a stage that
    does not distil), on `device`; `signal`: the stage's teacher signal (teachers/signal.py). `last`: the stage's
    last.pt when it resumes (distill/train/state.py: read_last); its terms keep the options they started with
    (state.started_terms, notes to `log`)."""
    project = None
    if cfg.distill.project == "linear" and spec.alpha > 0 and signal is not None:
        project = (model_embedding_size(model), int(signal.embedding_size))
    terms = started_terms(stage_terms(cfg.distill, spec.alpha), last, spec.name, log)
    if signal is not None:  # what the terms need against what this stage has (the sizes: preflight's, and each
        # loss's own shape check; a teacher given to run_stage need not state its embedding size)
        check_terms(terms, Setting(cached=signal.online is None, centres=bool(signal.centres_source),
                                   images_per_id=cfg.data.images_per_id or 0, batch_size=spec.train.batch_size))
    objective = DistillationObjective(head, terms=terms, project=project)
    objective.to(device)
    prepare_feature_loss(objective, model, signal, device)
    prepare_centres(objective, head, signal)
    prepare_head(objective, head)
    return objective


def prepare_centres(objective, head, signal) -> None:
    """Give the terms that need them the teacher's class centres, read by the stage's teacher signal
    (TeacherSignal.centres: teacher.head, or the last.pt of the teacher trained here), before the optimizer is made
    (ProxylessKD freezes the head it inherits)."""
    terms = objective.centre_terms()
    if not terms:
        return
    check_terms(objective.terms, Setting(centres=bool(signal is not None and signal.centres_source)))
    full = signal.centres(head.num_classes)
    for _, fn in terms:
        fn.set_centres(full, head)


def prepare_head(objective, head) -> None:
    """Let each active term that defines `prepare_head(head)` set up the head before the optimizer is made (AdaDistill
    with train_centres false freezes the centres, which then move only by its blend)."""
    for _, fn, _ in objective.active():
        if hasattr(fn, "prepare_head"):
            fn.prepare_head(head)
