"""The feature maps a feature-map loss asks for (distill/losses/features.py), taken by forward hooks on the
modules timm's contract names in `feature_info` (distill/models/contract.py): the student's and the online
teacher's usual forward passes fill them, so DDP, compile and the embedding path are untouched. Under
train.compile the hooks fire inside the compiled call because distill/train/setup.py's CompiledOrEager has dynamo
guard on module hooks: a forward compiled before the taps were set (an earlier stage's, the shared teacher's) is
not reused without them."""

from __future__ import annotations

import contextlib

from torch import nn

from distill.losses.term_checks import Setting, check_terms
from distill.utils.errors import ConfigError


def _torch_model(model) -> nn.Module:
    """The module that holds the layers: through torch.compile's wrapper and the frozen teacher's."""
    model = getattr(model, "_orig_mod", model)
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and getattr(model, "feature_info", None) is None else model


def feature_list(model, role: str) -> list:
    """The model's feature_info as a list of dicts (num_chs, reduction, module); a model without one is refused."""
    info = getattr(model, "feature_info", None)
    if info is None:
        raise ConfigError(f"the {role} ({type(model).__name__}) has no feature_info: a feature-map loss needs "
                          f"models with timm's feature contract (the face models, timm backbones)")
    return list(info.info) if hasattr(info, "info") else list(info)


def stage_indices(stages, count: int, who: str) -> list:
    """Feature indices (negative: from the last) of a model with `count` features, checked."""
    taken = []
    for s in stages:
        i = int(s) + count if int(s) < 0 else int(s)
        if not 0 <= i < count:
            raise ConfigError(f"stage {s} of {who}: it has {count} feature stages (0..{count - 1}, or -1..-{count} "
                              f"from the last); choose the loss's stages among them")
        taken.append(i)
    return taken


def stage_features(student: nn.Module, teacher, stages) -> list:
    """[(role, model, [feature_info entry of each stage])] for the student and the teacher's torch model."""
    out = []
    for role, model in (("student", student), ("teacher", _torch_model(teacher))):
        info = feature_list(model, role)
        out.append((role, model, [info[i] for i in stage_indices(stages, len(info),
                                                                   f"the {role} ({type(model).__name__})")]))
    return out


class FeatureTaps:
    """Forward hooks keeping the maps of `stages` on the student and the teacher; `read()` gives (student maps,
    teacher maps) of the last forward passes and forgets them; `remove()` takes the hooks off (the teacher
    object serves the next stage too)."""

    def __init__(self, student: nn.Module, teacher, stages):
        self.maps = {"student": {}, "teacher": {}}
        self.handles = []
        self.count = len(tuple(stages))
        for role, model, infos in stage_features(student, teacher, stages):
            for slot, f in enumerate(infos):
                self.handles.append(model.get_submodule(f["module"]).register_forward_hook(self._keep(role, slot)))

    def _keep(self, role: str, slot: int):
        def hook(_module, _inputs, output):
            self.maps[role][slot] = output
        return hook

    def read(self) -> tuple:
        got = tuple([self.maps[role].get(slot) for slot in range(self.count)] for role in ("student", "teacher"))
        for role in self.maps:
            self.maps[role] = {}
        if any(m is None for maps in got for m in maps):
            raise RuntimeError("a feature map was not produced by the forward pass (a hooked module did not run)")
        return got

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.remove()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class TermTaps:
    """The FeatureTaps of each feature term of a stage: `read()` gives {term name: (student maps, teacher maps)}."""

    def __init__(self, student: nn.Module, teacher, feature_terms):
        self.taps = {}
        try:
            for term, kd in feature_terms:
                self.taps[term.name] = FeatureTaps(student, teacher, kd.stages)
        except BaseException:
            self.remove()
            raise

    def read(self) -> dict:
        return {name: taps.read() for name, taps in self.taps.items()}

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.remove()

    def remove(self) -> None:
        for taps in self.taps.values():
            taps.remove()


def taps_for(st):
    """A context holding the stage's TermTaps when a distillation term needs feature maps (the teacher then runs
    online), else None; leaving it takes the hooks off."""
    terms = st.objective.feature_terms()
    if not (st.signal is not None and terms):
        return contextlib.nullcontext(None)
    check_terms(st.objective.terms, Setting(cached=st.signal.online is None))
    return TermTaps(st.model, st.signal.online.teacher, terms)


def prepare_feature_loss(objective, model, signal, device) -> None:
    """Build what the feature terms train for these two models (FitNet's regressors: channels from both models'
    feature_info at its stages), on `device`, before the optimizer is made; `signal`: the teacher signal
    (teachers/signal.py), whose online teacher has the maps."""
    if signal is None or signal.online is None:
        return
    teacher = signal.online.teacher
    for _, kd in objective.feature_terms():
        if hasattr(kd, "build"):
            kd.build(*([f["num_chs"] for f in infos] for _, _, infos in stage_features(model, teacher, kd.stages)))
            kd.to(device)
