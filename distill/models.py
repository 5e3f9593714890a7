"""Build any known architecture by name, or load a model file, for profile/eval/export.

Names: every registered student (`vargfacenet`, ...), IResNet teachers (`iresnet18..iresnet200`, or
arcface_torch's short names `r18..r200`), and any timm backbone as `timm/<name>` (embedding head added).
"""

from __future__ import annotations

import os

from torch import nn

from distill.checkpoint import extract_state_dict, load_state_dict_strict, safe_torch_load
from distill.errors import ConfigError, UnknownNameError
from distill.students import STUDENTS, create_student, is_student_checkpoint, load_student
from teachers.iresnet import LAYERS, IResNet
from teachers.timm_backbone import TimmBackbone

IRESNET_NAMES = {**{f"iresnet{d}": d for d in LAYERS}, **{f"r{d}": d for d in LAYERS}}


def model_names() -> list:
    return sorted(STUDENTS) + sorted(IRESNET_NAMES, key=lambda n: (n[0] == "r", IRESNET_NAMES[n])) + ["timm/<name>"]


def create_model(name: str, input_size: int | None = None, **kwargs) -> nn.Module:
    """A fresh (randomly initialised) model of architecture `name`; `input_size` defaults to 112."""
    size = {"input_size": input_size} if input_size else {}
    if name in STUDENTS:
        return create_student(name, **size, **kwargs)
    if name in IRESNET_NAMES:
        return IResNet(depth=IRESNET_NAMES[name], **size, **kwargs)
    if name.startswith("timm/"):
        import timm
        if name[5:] not in timm.list_models():
            raise UnknownNameError(f"unknown timm model {name[5:]!r} (see timm.list_models())")
        return TimmBackbone(name[5:], **size, **kwargs)
    raise UnknownNameError(f"unknown model {name!r}; registered names: {', '.join(model_names())}")


def model_input_size(model: nn.Module) -> int | None:
    """The square input side a model was built for, when it records one."""
    return getattr(model, "config", {}).get("input_size")


def _iresnet_input_size(state_dict: dict) -> int | None:
    """arcface_torch's fc takes 512 * side^2 features; side = input_size / 16 (112 -> 7)."""
    w = state_dict.get("fc.weight")
    if w is None or w.shape[1] % 512:
        return None
    side = round((w.shape[1] // 512) ** 0.5)
    return side * 16 if side * side * 512 == w.shape[1] else None


def load_model(source: str, arch: str | None = None, input_size: int | None = None):
    """Load `source` -> (model in eval mode, input_size).

    `source` is a facedistill `student.pt`, a plain state dict such as arcface_torch's `backbone.pth`
    (then `arch` names its architecture, e.g. r100), or a model name (random weights).
    """
    if not os.path.exists(source):
        if os.sep in source or source.endswith((".pt", ".pth")):
            raise ConfigError(f"{source}: model file not found")
        model = create_model(source, input_size=input_size)
        return model.eval(), model_input_size(model)
    payload = safe_torch_load(source)
    if is_student_checkpoint(payload):
        model, _ = load_student(source)
        return model.eval(), model_input_size(model)
    if arch is None:
        raise ConfigError(f"{source}: a plain state dict; say which architecture it holds with --arch (e.g. --arch r100)")
    state = extract_state_dict(payload, source)
    if input_size is None and arch in IRESNET_NAMES:
        input_size = _iresnet_input_size(state)
    if input_size is None:
        raise ConfigError(f"{source}: cannot infer the input size of this {arch} checkpoint; pass --input-size")
    model = create_model(arch, input_size=input_size)
    load_state_dict_strict(model, state, source=source)
    return model.eval(), input_size
