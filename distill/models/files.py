"""Model files: `student.pt` (weights + what rebuilds them) and loading any model for profile/eval/export.

A `student.pt` holds only tensors and plain values, so it loads with `torch.load(weights_only=True)`:

    {"format": "facedistill.student/1", "arch": name, "kwargs": {...constructor args...},
     "state_dict": {...}, "extra": {...}}

`arch` is a name of the model registry (distill/models/registry.py), students and teacher architectures alike.
"""

from __future__ import annotations

import os

from torch import nn

from distill.compat import upgrade_model_kwargs
from distill.models.registry import canonical_name, create_model, create_model_to_load
from distill.utils.checkpoint import atomic_torch_save, extract_state_dict, load_state_dict_strict, safe_torch_load
from distill.utils.digest import check_recorded_file
from distill.utils.errors import CheckpointError, ConfigError

STUDENT_FORMAT = "facedistill.student/1"


def model_input_size(model: nn.Module) -> int | None:
    """The square input side a model was built for, when it records one."""
    return getattr(model, "config", {}).get("input_size")


def model_embedding_size(model: nn.Module) -> int:
    """Every registered model records its embedding size in `.config`."""
    return model.config["embedding_size"]


def save_student(path, model: nn.Module, arch: str, kwargs: dict | None = None, extra: dict | None = None) -> None:
    """Write `student.pt` atomically (distill.utils.checkpoint.atomic_torch_save): weights plus what rebuilds the
    model (`create_model(arch, **kwargs)`; kwargs default to the model's `.config`), nothing executable.
    A model built with a classifier (timm's `num_classes > 0`) is saved as its embedding model, without it."""
    kwargs = dict(kwargs) if kwargs is not None else dict(model.config)
    state = model.state_dict()
    if getattr(model, "num_classes", 0):
        kwargs.pop("num_classes", None)
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    payload = {"format": STUDENT_FORMAT, "arch": arch, "kwargs": kwargs,
               "state_dict": {k: v.detach().cpu() for k, v in state.items()}}
    if extra:
        payload["extra"] = extra
    atomic_torch_save(payload, path)


def is_student_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == STUDENT_FORMAT


def load_student(path, map_location="cpu"):
    """Rebuild a model from `student.pt` (strict load). Returns (model, payload). A stage's student.pt or best.pt
    must be the file its result.json records (distill.utils.digest.check_recorded_file): eval, export, compare
    --export and the IJB hook all read through here."""
    check_recorded_file(path)
    payload = safe_torch_load(path, map_location=map_location)
    if not is_student_checkpoint(payload):
        raise CheckpointError(f"{path}: not a facedistill student checkpoint (no 'format': {STUDENT_FORMAT!r})")
    payload["kwargs"] = upgrade_model_kwargs(canonical_name(payload["arch"]), payload["kwargs"])
    model = create_model_to_load(payload["arch"], **payload["kwargs"])
    load_state_dict_strict(model, payload["state_dict"], source=path)
    return model, payload


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
    (then `arch` names its architecture, e.g. r100), or a model name (random weights). An insightface `.onnx`
    file is run by ONNX Runtime as a teacher (`teachers.build_teacher`; `distill eval` and `distill ijb` take one).
    """
    if not os.path.exists(source):
        if os.sep in source or source.endswith((".pt", ".pth", ".onnx")):
            raise ConfigError(f"{source}: model file not found")
        model = create_model(source, **({"input_size": input_size} if input_size else {}))
        return model.eval(), model_input_size(model)
    if source.endswith(".onnx"):
        raise ConfigError(f"{source}: an ONNX file; this loader reads torch files (student.pt, a state dict); "
                          f"`distill eval` and `distill ijb` run an .onnx model (as a teacher: teachers.build_teacher)")
    check_recorded_file(source)  # a stage's file: the one its result.json records
    payload = safe_torch_load(source)
    if is_student_checkpoint(payload):
        recorded = payload.get("arch")
        if arch is not None and recorded is not None and canonical_name(arch) != canonical_name(recorded):
            raise ConfigError(f"{source}: --arch {arch} given, but this student.pt records arch {recorded}; "
                              f"drop --arch (a student.pt says what it holds) or give the right file")
        model, _ = load_student(source)
        return model.eval(), model_input_size(model)
    if arch is None:
        raise ConfigError(f"{source}: a plain state dict; say which architecture it holds with --arch "
                          f"(e.g. --arch r100)")
    state = extract_state_dict(payload, source)
    if input_size is None and canonical_name(arch).startswith("iresnet"):
        input_size = _iresnet_input_size(state)
    if input_size is None:
        raise ConfigError(f"{source}: cannot infer the input size of this {arch} checkpoint; pass --input-size")
    model = create_model_to_load(arch, input_size=input_size)
    load_state_dict_strict(model, state, source=source)
    return model.eval(), input_size
