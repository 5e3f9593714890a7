"""Frozen teachers: `build_teacher(spec)` is the one entry point for every kind of teacher.

    build_teacher({"kind": "iresnet", "depth": 100, "checkpoint": "backbone.pth"})
    build_teacher({"kind": "timm", "name": "resnet50", "checkpoint": "teacher.pt"})
    build_teacher({"kind": "onnx", "checkpoint": "buffalo_l/w600k_r50.onnx"})

The returned `FrozenTeacher` takes a batch normalised (x/255-0.5)/0.5 (RGB, NCHW) and returns raw
(not normalised) embeddings. It is frozen by construction: parameters have requires_grad=False, it
stays in eval mode even when a parent module calls `.train()`, its forward runs under no_grad, so
its weights and BatchNorm statistics never change.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from distill.checkpoint import extract_state_dict, load_state_dict_strict, safe_torch_load
from distill.errors import ConfigError, UnknownNameError
from teachers.iresnet import LAYERS, IResNet
from teachers.timm_backbone import TimmBackbone


class FrozenTeacher(nn.Module):
    def __init__(self, model: nn.Module, spec: dict, input_size: int, embedding_size: int):
        super().__init__()
        self.model = model
        self.spec = dict(spec)
        self.input_size = input_size
        self.embedding_size = embedding_size
        for p in self.model.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        """Always eval: a parent's `.train()` must not switch on dropout or BatchNorm updates."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def fingerprint(self) -> str:
        """SHA-256 of every tensor of the state dict (names, shapes, dtypes, bytes): keys the teacher cache.
        A model whose weights are not torch tensors (an ONNX file) supplies its own `fingerprint()`."""
        if callable(getattr(self.model, "fingerprint", None)):
            return self.model.fingerprint()
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()


def _iresnet(spec):
    depth = spec.get("depth", 100)
    if depth not in LAYERS:
        raise ConfigError(f"teacher.depth: IResNet depth must be one of {sorted(LAYERS)}, got {depth!r}")
    return IResNet(depth=depth, num_features=spec.get("embedding_size", 512), input_size=spec.get("input_size", 112))


def _timm(spec):
    if "name" not in spec:
        raise ConfigError("teacher.name: a timm teacher needs the timm model name (e.g. name: resnet50)")
    import timm
    if spec["name"] not in timm.list_models():
        raise UnknownNameError(f"teacher.name: {spec['name']!r} is not a timm model (see timm.list_models())")
    return TimmBackbone(spec["name"], embedding_size=spec.get("embedding_size", 512),
                        pretrained=spec.get("pretrained", False), input_size=spec.get("input_size", 112),
                        model_kwargs=spec.get("model_kwargs"))


def _onnx(spec):
    if not spec.get("checkpoint"):
        raise ConfigError("teacher.checkpoint: an onnx teacher needs the .onnx file (e.g. checkpoint: w600k_r50.onnx)")
    from teachers.onnx import OnnxTeacherModel  # onnxruntime is an optional extra
    return OnnxTeacherModel(spec["checkpoint"], providers=spec.get("providers"))


# kind -> (builder, keys the spec may hold besides 'kind' and 'checkpoint')
def _facedistill(spec):
    """A model of this toolkit's registry as teacher (e.g. a longer-trained or wider VarGFaceNet)."""
    if "arch" not in spec:
        raise ConfigError("teacher: kind 'facedistill' needs 'arch' (a registered model name, e.g. vargfacenet)")
    from distill.models import create_model
    kwargs = dict(spec.get("model_kwargs") or {})
    kwargs.setdefault("input_size", spec.get("input_size", 112))
    return create_model(spec["arch"], **kwargs)


TEACHER_KINDS = {
    "facedistill": (_facedistill, {"arch", "model_kwargs", "embedding_size", "input_size"}),
    "iresnet": (_iresnet, {"depth", "embedding_size", "input_size"}),
    "timm": (_timm, {"name", "embedding_size", "input_size", "pretrained", "model_kwargs"}),
    "onnx": (_onnx, {"providers"}),
}


def build_teacher(spec: dict) -> FrozenTeacher:
    """Build, load (strictly, weights_only) and freeze the teacher a spec describes."""
    spec = dict(spec)
    kind = spec.get("kind")
    if kind not in TEACHER_KINDS:
        raise UnknownNameError(f"teacher.kind: unknown teacher kind {kind!r}; known kinds: {', '.join(sorted(TEACHER_KINDS))}")
    builder, allowed = TEACHER_KINDS[kind]
    unknown = sorted(set(spec) - allowed - {"kind", "checkpoint"})
    if unknown:
        raise ConfigError(f"teacher: unknown key(s) {unknown} for kind {kind!r}; allowed: {sorted(allowed | {'checkpoint'})}")
    model = builder(spec)
    if spec.get("checkpoint") and not getattr(model, "loads_own_checkpoint", False):
        path = spec["checkpoint"]
        load_state_dict_strict(model, extract_state_dict(safe_torch_load(path), path), source=path)
    # a model that reads its sizes from its file (ONNX) knows them better than the spec's defaults
    return FrozenTeacher(model, spec, input_size=getattr(model, "input_size", None) or spec.get("input_size", 112),
                         embedding_size=getattr(model, "embedding_size", None) or spec.get("embedding_size", 512))
