"""Safe checkpoint reading and strict state-dict loading shared by students, teachers and the engine.

Writing goes through distill/utils/atomic.py (atomic_torch_save here, atomic_write_json/atomic_write_text there).
`torch.load` always runs with `weights_only=True`: a file that needs arbitrary objects unpickled is
refused. Loads are strict: a mismatch names the first missing and unexpected keys and shape errors,
and the model is left untouched (never a partial load).
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import zipfile

import torch

from distill.compat import upgrade_state_dict
from distill.utils.atomic import atomic_open
from distill.utils.errors import CheckpointError, UnsafeFileError


def _pickle_globals(data: bytes) -> list:
    """The `module.name` globals a pickle refers to, read with pickletools (which never executes anything)."""
    names, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - a damaged pickle: report what was read before the damage
        pass
    return names


def _what_it_is(path: str, head: bytes) -> str | None:
    """What a file that is not a PyTorch checkpoint looks like, or None when it may be one."""
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None  # a zip (torch.save) or a bare pickle (torch.save with _use_new_zipfile_serialization=False)
    if path.endswith(".onnx") or (head[:1] == b"\x08" and b"\x12" in head[:16]):
        return "looks like ONNX; for an ONNX teacher use teacher.onnx (or teachers.build_teacher({'onnx': ...}))"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "unrecognised content"


def _refusal(path: str, err: Exception) -> UnsafeFileError:
    """Name the globals that make a checkpoint unsafe, without repeating torch's advice to turn weights_only off."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                data = b"".join(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
        except zipfile.BadZipFile:
            data = b""
    allowed = ("collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
               "torch.FloatStorage", "torch.LongStorage", "torch.HalfStorage", "torch.IntStorage",
               "torch.DoubleStorage", "torch.BFloat16Storage", "torch.ByteStorage", "torch.BoolStorage",
               "torch._tensor._rebuild_from_type_v2", "torch.Size")
    names = [n for n in dict.fromkeys(_pickle_globals(data)) if n not in allowed]
    said = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if said and said.group(1) not in names:
        names.insert(0, said.group(1))
    what = f"it names {', '.join(names[:3])}" if names else "it needs objects a weights-only load does not build"
    return UnsafeFileError(f"{path}: refused to load: {what}, which could run code when unpickled. Load only "
                           f"checkpoints of tensors: re-save the state dict (torch.save(model.state_dict(), ...)) "
                           f"in an environment you trust.")


def safe_torch_load(path, map_location="cpu"):
    """torch.load with weights_only=True; anything else is refused with a message that says what the file is."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    with open(path, "rb") as f:
        head = f.read(64)
    kind = _what_it_is(path, head)
    if kind is not None:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint: {kind}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refusal(path, err) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as err:
        said = str(err).splitlines()[0].split(". ")[0][:200] if str(err) else ""
        if "central directory" in said or isinstance(err, EOFError) or not said:
            said = "truncated or damaged: " + (said or "the file ends early")
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({said})") from None


def extract_state_dict(obj, source) -> dict:
    """A plain state dict from what people save: a state dict, or a dict holding one under a common key.
    A `module.` prefix (saved from DDP) and `_orig_mod.` (a torch.compile'd module, saved by other tools) are
    stripped."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "backbone", "student"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source}: no state dict found (expected a dict of tensors)")
    for prefix in ("_orig_mod.", "module.", "_orig_mod."):  # compile(DDP(m)) and DDP(compile(m)) alike
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _preview(keys, n=5) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict, source="checkpoint") -> None:
    """Load all-or-nothing; on any mismatch raise CheckpointError naming keys and shapes. Legacy key names of the
    model's modules are renamed first (distill.compat.upgrade_state_dict)."""
    state_dict = upgrade_state_dict(model, state_dict)
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
    (distill.utils.atomic.atomic_open); on failure the previous file stays intact and CheckpointError says so."""
    with atomic_open(path, "wb", what="the checkpoint", error=CheckpointError) as f:
        torch.save(obj, f)


def capture_rng_state(device=None) -> dict:
    """Every random state training depends on, as tensors and plain values (weights_only-loadable): torch's CPU
    generator, numpy's, Python's and, when `device` is a GPU, that GPU's (only this process's own device: under
    torchrun each rank saves and restores its own GPU's generator)."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [int(v) for v in random.getstate()[1]],
    }
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device=None) -> None:
    """Set the generators `capture_rng_state` read. The GPU's only when `device` is a GPU: its own state, or, from
    a file that holds every GPU's (written before states were per device), the entry of this device's index."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((3, tuple(state["python"]), None))
    cuda = state.get("cuda")
    if cuda is None or device is None or torch.device(device).type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # torch.cuda.get_rng_state_all() of the process that saved it
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        if index >= len(cuda):
            return  # that process saw fewer GPUs: this device's generator keeps its seeded state
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)
