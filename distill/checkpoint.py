"""Safe checkpoint reading and strict state-dict loading shared by students, teachers and the engine.

Writing goes through distill/atomic.py (atomic_torch_save here, atomic_write_json/atomic_write_text there).
`torch.load` always runs with `weights_only=True`: a file that needs arbitrary objects unpickled is
refused. Loads are strict: a mismatch names the first missing and unexpected keys and shape errors,
and the model is left untouched (never a partial load).
"""

from __future__ import annotations

import os
import pickle

import torch

from distill.atomic import atomic_open
from distill.errors import CheckpointError, UnsafeFileError


def safe_torch_load(path, map_location="cpu"):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeFileError(
            f"{path}: refused to load: it needs arbitrary Python objects unpickled, which could run code "
            f"({str(err).splitlines()[0][:200]}). Re-save only the state dict (torch.save(model.state_dict(), ...)) "
            f"from a trusted environment."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from None


def extract_state_dict(obj, source) -> dict:
    """A plain state dict from what people save: a state dict, or a dict holding one under a common key.
    A `module.` prefix (saved from DDP) is stripped."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "backbone", "student"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source}: no state dict found (expected a dict of tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _preview(keys, n=5) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict, source="checkpoint") -> None:
    """Load all-or-nothing; on any mismatch raise CheckpointError naming keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"{source}: does not match {type(model).__name__} "
                 f"({len(state_dict)} entries in the file, {len(expected)} in the model)"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_preview(shapes, 3)}")
        parts.append("check the architecture/depth the checkpoint was trained with")
        raise CheckpointError("; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def atomic_torch_save(obj, path) -> None:
    """Write a checkpoint so that a crash, kill or full disk never leaves a broken file at `path`
    (distill.atomic.atomic_open); on failure the previous file stays intact and CheckpointError says so."""
    with atomic_open(path, "wb", what="the checkpoint", error=CheckpointError) as f:
        torch.save(obj, f)


def capture_rng_state() -> dict:
    """Every random state training depends on, as tensors and plain values (weights_only-loadable)."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [int(v) for v in random.getstate()[1]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
