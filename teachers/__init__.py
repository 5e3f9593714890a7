"""Frozen teachers: `build_teacher(spec)` is the one entry point for every teacher.

    build_teacher({"arch": "iresnet100", "checkpoint": "backbone.pth"})        # arcface_torch r100
    build_teacher({"arch": "timm/resnet50", "checkpoint": "teacher.pt", "embedding_size": 512})
    build_teacher({"arch": "vargfacenet", "checkpoint": "student.pt's state dict", "input_size": 32})
    build_teacher({"onnx": "buffalo_l/w600k_r50.onnx"})

`arch` is any name of the model registry (distill/models/registry.py) and the other keys are its keyword
arguments; an ONNX teacher is a file whose sizes are read from the graph. The returned `FrozenTeacher`
takes a batch normalised (x/255-0.5)/0.5 (RGB, NCHW) and returns raw (not normalised) embeddings. It is
frozen by construction: parameters have requires_grad=False, it stays in eval mode even when a parent
module calls `.train()`, its forward runs under no_grad, so its weights and BatchNorm statistics never
change.

The legacy spec form `{"kind": "iresnet", "depth": 100}` (kinds iresnet, timm, facedistill, onnx) still
works, with a ConfigDeprecationWarning saying what to write instead (`distill.compat.upgrade_legacy_teacher`).
"""

from __future__ import annotations

import hashlib
import json
import warnings

import torch
from torch import nn

from distill.compat import fingerprint_state_dict, upgrade_legacy_teacher
from distill.models.registry import check_model_kwargs, create_model, create_model_to_load
from distill.utils.checkpoint import extract_state_dict, load_state_dict_strict, safe_torch_load
from distill.utils.digest import check_recorded_file, file_state
from distill.utils.errors import ConfigDeprecationWarning, ConfigError


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
        A model whose weights are not torch tensors (an ONNX file) supplies its own `fingerprint()`.

        Hashed once while the tensors stay the ones it was computed over, unchanged in place (their storage and
        version counters); a teacher loaded from a checkpoint file that has not changed since (path, size,
        mtime, inode), with the same spec, reuses the digest of an earlier one in this process."""
        if callable(getattr(self.model, "fingerprint", None)):
            return self.model.fingerprint()
        tensors = fingerprint_state_dict(self.model)  # names as fingerprints define them
        state = _tensor_state(tensors)
        memo = self.__dict__.get("_fingerprint")
        if memo is not None and memo[0] == state:
            return memo[1]
        source, built_state = self.__dict__.get("_built_from") or (None, None)
        pristine = source is not None and built_state == state  # the weights as read from the file
        digest = _FINGERPRINTS.get(source) if pristine else None
        if digest is None:
            h = hashlib.sha256()
            for name, t in sorted(tensors.items()):
                t = t.detach().cpu().contiguous().reshape(-1)
                h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
            digest = h.hexdigest()
            if pristine:
                _FINGERPRINTS[source] = digest
        self.__dict__["_fingerprint"] = (state, digest)
        return digest


_FINGERPRINTS: dict = {}  # (checkpoint file's path, size, mtime_ns, inode; spec) -> fingerprint of the teacher


def _tensor_state(tensors: dict) -> tuple:
    """Which tensors these are and whether any changed in place: storage, layout and version counter of each."""
    return tuple((name, t.data_ptr(), t.storage_offset(), t._version, tuple(t.shape), t.stride(), t.dtype, t.device)
                 for name, t in tensors.items())


# ------------------------------------------------------------------------------------------ specs

def _onnx(spec):
    if not spec.get("onnx"):
        raise ConfigError("teacher.onnx: an ONNX teacher needs its .onnx file (e.g. onnx: w600k_r50.onnx)")
    extra = sorted(set(spec) - {"onnx", "providers"})
    if extra:
        raise ConfigError(f"teacher: an ONNX teacher takes only 'onnx' and 'providers' ({', '.join(extra)} given); "
                          f"its sizes are read from the file (112 when its input size is dynamic)")
    from teachers.onnx import OnnxTeacherModel  # onnxruntime is an optional extra
    return OnnxTeacherModel(spec["onnx"], providers=spec.get("providers"))


def build_teacher(spec: dict) -> FrozenTeacher:
    """Build, load (strictly, weights_only) and freeze the teacher a spec describes. A checkpoint that is a stage's
    file (a previous generation's student.pt, the trained teacher's backbone.pth) must be the one its result.json
    records (distill.utils.digest.check_recorded_file)."""
    spec, note = upgrade_legacy_teacher(spec, ConfigError)
    if note:
        warnings.warn(note, ConfigDeprecationWarning, stacklevel=2)
    source = None  # the checkpoint file the weights were read from, unchanged while they were read
    if "onnx" in spec:
        model = _onnx(spec)
    else:
        kwargs = {k: v for k, v in spec.items() if k not in ("arch", "checkpoint")}
        if not spec.get("arch"):
            raise ConfigError("teacher: say which model it is: arch: <registered name> (e.g. iresnet100) or onnx: "
                              "<file>")
        check_model_kwargs(spec["arch"], kwargs, section="teacher.", other_keys=("arch", "checkpoint", "onnx"))
        # a checkpoint fills every weight: no random initialisation first (create_model_to_load)
        model = (create_model_to_load if spec.get("checkpoint") else create_model)(spec["arch"], **kwargs)
        if spec.get("checkpoint"):
            path = spec["checkpoint"]
            before = file_state(path) if isinstance(path, str) else None
            if before is not None:  # a stage's student.pt or backbone.pth: the file its result.json records
                check_recorded_file(path)
            load_state_dict_strict(model, extract_state_dict(safe_torch_load(path), path), source=path)
            if before is not None and before == file_state(path):
                source = (*before, json.dumps(spec, sort_keys=True, default=repr))
    # a model that reads its sizes from its file (ONNX) knows them; registered models record them in .config
    sizes = {"input_size": 112, **getattr(model, "config", {})}  # 112: an ONNX graph of dynamic size
    teacher = FrozenTeacher(model, spec, input_size=getattr(model, "input_size", None) or sizes["input_size"],
                            embedding_size=getattr(model, "embedding_size", None) or sizes["embedding_size"])
    if source is not None:
        teacher.__dict__["_built_from"] = (source, _tensor_state(fingerprint_state_dict(model)))
    return teacher
