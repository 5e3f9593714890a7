"""Student registry: each student is a timm-registered factory; `student.pt` files rebuild them.

`create_student(name, **kwargs)` builds any registered student; `timm.create_model(name, ...)` works
too once `distill` is imported. A student checkpoint (`student.pt`) holds only tensors and plain
values, so it loads with `torch.load(weights_only=True)`:

    {"format": "facedistill.student/1", "arch": name, "kwargs": {...constructor args...},
     "state_dict": {...}}
"""

from __future__ import annotations

import os

import torch
from timm.models import register_model

from distill.errors import CheckpointError, UnknownNameError
from distill.students.vargfacenet import VarGFaceNet

STUDENT_FORMAT = "facedistill.student/1"
STUDENTS: dict = {}

# keyword arguments timm.create_model passes that a face student has no use for
_TIMM_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only", "num_classes",
                "in_chans", "global_pool", "drop_rate", "scriptable", "exportable", "no_jit")


def register_student(fn):
    """Register a student factory `fn(**kwargs) -> nn.Module` under its function name, here and in timm."""

    def factory(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"{fn.__name__}: no pretrained weights are published; load a student.pt instead")
        for key in _TIMM_KWARGS:
            kwargs.pop(key, None)
        return fn(**kwargs)

    factory.__name__ = factory.__qualname__ = fn.__name__
    factory.__module__ = __name__
    factory.__doc__ = fn.__doc__
    STUDENTS[fn.__name__] = fn
    register_model(factory)
    return fn


@register_student
def vargfacenet(**kwargs):
    """VarGFaceNet as in the paper: S=8, SE, PReLU, stride-1 head, 1024-channel embedding block."""
    return VarGFaceNet(**kwargs)


@register_student
def vargfacenet_depthwise(**kwargs):
    """The paper's MobileNet-style baseline: VarGFaceNet with depthwise convolutions (S=1)."""
    return VarGFaceNet(**{"group_size": 1, **kwargs})


def create_student(name: str, **kwargs):
    if name not in STUDENTS:
        raise UnknownNameError(f"unknown student {name!r}; registered students: {', '.join(sorted(STUDENTS))}")
    return STUDENTS[name](**kwargs)


def student_kwargs(model) -> dict:
    """The constructor arguments that rebuild `model` (students keep them in `.config`)."""
    return dict(model.config)


def save_student(path, model, arch: str, kwargs: dict | None = None, extra: dict | None = None) -> None:
    """Write `student.pt` atomically: weights plus what rebuilds the model (`distill.models.create_model(
    arch, **kwargs)`; kwargs default to the model's `.config`), nothing executable."""
    payload = {"format": STUDENT_FORMAT, "arch": arch, "kwargs": dict(kwargs) if kwargs is not None else student_kwargs(model),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if extra:
        payload["extra"] = extra
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_student_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == STUDENT_FORMAT


def load_student(path, map_location="cpu"):
    """Rebuild a student from `student.pt` (strict load). Returns (model, payload)."""
    from distill.checkpoint import load_state_dict_strict, safe_torch_load
    from distill.models import create_model  # students and teacher architectures alike

    payload = safe_torch_load(path, map_location=map_location)
    if not is_student_checkpoint(payload):
        raise CheckpointError(f"{path}: not a facedistill student checkpoint (no 'format': {STUDENT_FORMAT!r})")
    model = create_model(payload["arch"], **payload["kwargs"])
    load_state_dict_strict(model, payload["state_dict"], source=path)
    return model, payload
