"""Where computation runs and in what precision: the one device resolver (`device: auto|cpu|cuda|cuda:N`, checked
before any work), a model's device, and the autocast dtype a TrainConfig's `amp` asks for on a device."""

from __future__ import annotations

import itertools
import os

import torch

from distill.utils.errors import DistillError


def no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU or driver on this machine"


def resolve_device(device: str | None, key: str = "device") -> torch.device:
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` (this process's GPU; torchrun sets it from
    LOCAL_RANK) or `cuda:N`; a GPU that is not there is a DistillError naming `key` (checked before any work)."""
    device = device or "auto"
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise DistillError(f"{key} {device!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise DistillError(f"{key} {device!r}: only cpu and cuda devices are supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DistillError(f"{key} {device!r}: CUDA is not available ({no_cuda_reason()}); use cpu (or auto)")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise DistillError(f"{key} {device!r}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                           f"(cuda:0{f' .. cuda:{count - 1}' if count > 1 else ''}); use one of those or cpu")
    return parsed if parsed.index is not None else torch.device("cuda", torch.cuda.current_device())


def model_device(model) -> torch.device:
    """The device of a model's first parameter or buffer (CPU for a model with neither)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), where oneDNN's bf16 kernels are fast."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if callable(check))


def prefers_cpu_bf16(model) -> bool:
    """Whether a model's convolutions run faster in bf16 on such a CPU: the model says so with a class attribute
    `cpu_bf16 = True` (IResNet: dense 3x3 convolutions, faster in bf16); VarGFaceNet's grouped and depthwise
    convolutions are slower in bf16 and stay fp32 (the figures: docs/measurements.md)."""
    inner = getattr(model, "model", model)  # a FrozenTeacher wraps its model
    inner = getattr(inner, "module", inner)  # DDP
    return bool(getattr(type(inner), "cpu_bf16", False))


AMP_MODES = ("auto", "bf16", "fp16", "off")  # the values train.amp may take: what amp_settings reads


def amp_settings(train, device: torch.device, model=None):
    """(autocast dtype or None, whether a GradScaler is needed). `auto` is bf16 on CUDA — fp16 with a GradScaler
    on a GPU without bf16 (before Ampere: V100, T4) — and on a CPU bf16 only where the CPU has native bf16
    (cpu_has_bf16) and `model` runs faster in it (prefers_cpu_bf16), else off; an explicit bf16/fp16 is
    honoured on any device, `off` is float32 everywhere."""
    if train.amp == "off":
        return None, False
    if train.amp == "auto" and device.type != "cuda":
        return (torch.bfloat16, False) if model is not None and prefers_cpu_bf16(model) and cpu_has_bf16() \
            else (None, False)
    if train.amp == "fp16" or (train.amp == "auto" and not _bf16_supported(device)):
        return torch.float16, True
    return torch.bfloat16, False


def _bf16_supported(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def deterministic_cublas() -> None:
    """Ask cuBLAS for the fixed workspace that makes its matrix products repeat bit for bit (CUBLAS_WORKSPACE_CONFIG,
    PyTorch's reproducibility notes; deterministic mode may refuse a cuBLAS call without it). It is read when the
    process first uses cuBLAS, so `distill run` sets it right after reading a `deterministic: true` config; a value
    the user set is kept."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
