"""The GPU check's correctness parts that run in its own process (benchmarks/gpu_check.py calls them; each returns
the dict that goes under its key of the check's JSON line, with `ok` saying whether what it checks held):

  compile        a compiled stage distilling from an online teacher without feature taps, then a compiled
                 attention_transfer stage in the same process with the same teacher object: the second must
                 take its feature maps (dynamo must not reuse the first stage's hook-less code) and neither
                 may have run eagerly (result.json's compile_fell_back)
  gpu_decode     data.decode: cuda for 50 steps with a corruption canary that adds no host synchronisation:
                 every training batch the engine decodes is checksummed on the GPU against a reference decoded
                 beforehand with the device synchronised, read once at the end; and result.json's
                 decode counts (images, cpu_fallback)
  fp16           train.amp fp16 (GradScaler) with train.clip_grad and train.accumulate 2: finite losses, a sane
                 loss scale, every step done
  loaded_teacher a run (distill.run.experiment) with a loaded teacher.checkpoint and a tiny synthetic IJB set:
                 every forward pass outside training (the teacher's evaluation, its cache, IJB) ran on the run's
                 device, and every stage has its IJB result

The process-based parts (deterministic, resume, ranks) are benchmarks/gpu_check_procs.py.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import warnings

import torch

from distill.config.schema import build_config
from distill.train.tracking import read_metrics

# --------------------------------------------------------------------------------------- shared

def check_config(args, s: dict, **sections):
    """A stage config of the check: the check's student, size and batch, stand-in data, no evaluation, one log
    line a step, no periodic checkpoint; `sections` merged over it (dicts key by key, the rest replaced)."""
    raw = {
        "name": "gpu_check", "device": args.device, "seed": 0,
        "data": {"train": "stand-in", "input_size": s["check_size"], "num_workers": 0},
        "student": dict(s["check_student"]),
        "train": {"batch_size": s["check_batch"], "max_steps": 4, "log_every": 1, "checkpoint_every": 10 ** 9,
                  "amp": "auto", "lr": 0.1, "lr_batch_size": 512},
    }
    if args.tiny or args.device == "cpu":  # beside the test suite's other work; and forked children (procs)
        raw["train"]["threads"] = 1
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) \
            else value
    return build_config(raw)


def teacher_spec(s: dict, size: int) -> dict:
    """The check's teacher (s["check_teacher"] with s["check_teacher_kwargs"]) at input side `size`, as
    teachers.build_teacher and the config's teacher section take it."""
    return {"arch": s["check_teacher"], "input_size": size, "embedding_size": s["check_student"]["embedding_size"],
            **s.get("check_teacher_kwargs", {})}


def check_teacher(s: dict, seed: int = 0, size: int | None = None):
    """The online teacher of the check's stages (the same weights in every process: `seed`), untrained, by default
    at its own input side, s["check_teacher_size"], smaller than the students': its feature maps are smaller than
    theirs, so a feature loss resizes (the case deterministic CUDA kernels must cover)."""
    from bench_kd import untrained_teacher

    import teachers

    torch.manual_seed(seed)
    spec = teacher_spec(s, size or s["check_teacher_size"])
    if spec["arch"].startswith("iresnet") and len(spec) == 3:  # re-initialised small: its outputs stay finite
        return untrained_teacher(spec["arch"], spec["input_size"], spec["embedding_size"])
    return teachers.build_teacher(spec)


def standin(s: dict, size: int | None = None, batch: int | None = None, steps: int = 8):
    """In-memory stand-in faces of s["check_classes"] identities: `steps` batches an epoch (at most 8)."""
    from distill.data.standin import StandInFaces

    classes = s["check_classes"]  # more steps than 8 go round the epoch again: the set stays small in memory
    per_class = max(2, math.ceil((batch or s["check_batch"]) * min(steps, 8) / classes))
    return StandInFaces(classes=classes, per_class=per_class, size=size or s["check_size"])


def run_check_stage(cfg, name: str, out: str, data, teacher=None, cache=None) -> dict:
    """One stage through the real loop (distill.train.engine.run_stage), distilling when the config says so."""
    from distill.train.engine import StageSpec, run_stage

    spec = StageSpec(name, cfg.student.arch, cfg.student.model_kwargs(cfg.data.input_size), cfg.train,
                     alpha=cfg.distill.weight if teacher is not None or cache is not None else 0.0)
    return run_stage(cfg, spec, out, data, {}, teacher=teacher, cache=cache, progress=False)


def read_result(stage_dir: str) -> dict:
    with open(os.path.join(stage_dir, "result.json"), encoding="utf-8") as f:
        return json.load(f)


def fell_back(result: dict) -> dict | None:
    """result.json's compile_fell_back ({"student": reason|None, "teacher": reason|None}), None if not recorded."""
    return result.get("compile_fell_back")


def tensors_sha256(state: dict) -> str:
    """sha256 of a state dict's tensors (names, dtypes, shapes, bytes) in name order: equal iff bit-identical."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not torch.is_tensor(t):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def student_sha256(stage_dir: str) -> str:
    """tensors_sha256 of the weights in a stage's student.pt (params and buffers)."""
    from distill.models.files import load_student

    model, _ = load_student(os.path.join(stage_dir, "student.pt"))
    return tensors_sha256(model.state_dict())


def metric(stage_dir: str, key: str) -> list:
    """Every logged value of `key` in a stage's metrics.jsonl."""
    return [m[key] for m in read_metrics(stage_dir) if key in m]


@contextlib.contextmanager
def replaced(module, name: str, value):
    """module.name = value for the block (a spy on what the engine calls), restored after."""
    if not hasattr(module, name):
        raise RuntimeError(f"{module.__name__} has no {name}: the check's spy must follow the code it watches")
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


# --------------------------------------------------------------------------------------- compile

def compile_stages(args, s: dict, root: str) -> dict:
    """A compiled stage distilling from an online teacher without feature maps, then a compiled
    attention_transfer stage with the same teacher object, in this process."""
    teacher = check_teacher(s)
    data = standin(s, steps=s["check_steps"])
    stages = {
        "plain": {"loss": "equivalent_angular", "alpha": 7},
        "attention_transfer": {"terms": [{"loss": "equivalent_angular", "alpha": 7},
                                         {"loss": "attention_transfer", "alpha": 1}]},
    }
    out, ok = {}, True
    for name, distill in stages.items():
        cfg = check_config(args, s, train={"compile": True, "max_steps": s["check_steps"]}, distill=distill)
        stage_dir = os.path.join(root, name)
        result = run_check_stage(cfg, name, stage_dir, data, teacher=teacher)
        reasons = fell_back(result)
        entry = {"steps": result["steps"], "compile_fell_back": reasons if reasons is not None else "not recorded"}
        ok &= result["steps"] == s["check_steps"] and reasons is not None and not any(reasons.values())
        if name == "attention_transfer":
            at = metric(stage_dir, "train/loss_kd/attention_transfer")
            entry["attention_transfer_loss"] = at[-1] if at else None
            ok &= bool(at) and all(math.isfinite(v) for v in at)
        out[name] = entry
    return {"ok": bool(ok), "stages": out}


# --------------------------------------------------------------------------------------- GPU decoding

def _flip_symmetric_weights(side_h: int, side_w: int, device) -> torch.Tensor:
    """int64 weights (3, H, W), equal at x and W-1-x: a checksum that a mirror image leaves unchanged but that
    changes when rows, columns pairs or channels move or when pixels are half written."""
    x = torch.arange(side_w)
    col = torch.minimum(x, side_w - 1 - x) + 1
    row = torch.arange(side_h) * 131 + 7
    return ((row[:, None] * 1009 + col[None, :] * 17)[None] * torch.tensor([1, 3, 7])[:, None, None]).to(device)


def _key(encoded) -> bytes:
    data = encoded.numpy().tobytes() if torch.is_tensor(encoded) else bytes(encoded)
    return hashlib.blake2b(data, digest_size=16).digest()


class DecodeCanary:
    """Per-image checksums of what the engine's batches decode to, compared on the device with a reference
    decoded before training (torchvision's decode_jpeg on the device, then the device synchronised, so no race
    can touch it). The comparison adds no host synchronisation: a mismatch count is kept on the device and read
    once (`read`). Checksums are of the 0..255 levels (a normalised value v is level 127.5·v + 127.5 exactly),
    weighted symmetrically so that flipped images check against the same reference."""

    def __init__(self, dataset, device, chunk: int = 256):
        from torchvision.io import ImageReadMode, decode_jpeg

        self.device = torch.device(device)
        self.reference, self.images = {}, 0
        self.bad = torch.zeros((), dtype=torch.int64, device=self.device)
        self.weights = None
        for start in range(0, len(dataset), chunk):
            encoded = [torch.frombuffer(bytearray(dataset.encoded(i)[0]), dtype=torch.uint8)
                       for i in range(start, min(len(dataset), start + chunk))]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its codecs
                decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            sums = self.checksum(torch.stack(decoded).to(torch.int64)).tolist()
            self.reference.update(zip((_key(e) for e in encoded), sums, strict=True))

    def checksum(self, levels: torch.Tensor) -> torch.Tensor:
        """(B,) int64 weighted sums of (B, 3, H, W) integer levels."""
        if self.weights is None or self.weights.shape[-2:] != levels.shape[-2:]:
            self.weights = _flip_symmetric_weights(levels.shape[-2], levels.shape[-1], levels.device)
        return (levels * self.weights).sum(dim=(1, 2, 3))

    def spy(self, decode):
        """`decode` (gpu_decode.decode_batch, as the engine calls it) with every batch it returns checked."""
        def checked(encoded, flipped, device, *a, **kw):
            x = decode(encoded, flipped, device, *a, **kw)
            expected = torch.tensor([self.reference.get(_key(e), -1) for e in encoded], dtype=torch.int64)
            if x.device.type == "cuda":
                expected = expected.pin_memory()
            expected = expected.to(x.device, non_blocking=True)
            levels = (x.detach().float() * 127.5 + 127.5).round_().to(torch.int64)
            self.bad += (self.checksum(levels) != expected).sum()
            self.images += len(encoded)
            return x
        return checked

    def read(self) -> dict:
        """{"checked": images, "mismatched": images whose decode differed from the reference} (one sync)."""
        return {"checked": self.images, "mismatched": int(self.bad)}


def _cpu_difference(dataset, device, n: int = 64) -> dict:
    """How far the device's JPEG decode is from the CPU's on the first `n` images (levels; nvJPEG is not
    bit-identical to libjpeg-turbo: a few levels near colour edges are expected, not tens)."""
    from distill.data.gpu_decode import decode_batch

    encoded = [dataset.encoded(i)[0] for i in range(min(n, len(dataset)))]
    flips = torch.zeros(len(encoded), dtype=torch.bool)
    gpu = decode_batch(encoded, flips, device).cpu()
    cpu = decode_batch(encoded, flips, "cpu")
    diff = ((gpu - cpu) * 127.5).abs()
    return {"max_levels": round(float(diff.max()), 2), "mean_levels": round(float(diff.mean()), 4)}


def gpu_decode(args, s: dict, data_dir: str, root: str) -> dict:
    """s["decode_steps"] steps of the full student with data.decode: cuda, every batch checked (DecodeCanary).
    On a CPU it says it needs CUDA, and runs the same code as `cpu_stand_in`: the engine's data.decode: cuda path
    and the canary on the CPU decoder (the run's refusal of data.decode: cuda on a CPU device bypassed), all the
    GPU run checks but nvJPEG and its stream."""
    import distill.train.engine as engine

    if torch.device(args.device).type == "cuda":
        return _gpu_decode(args, s, data_dir, root)
    with replaced(engine, "check_decode", lambda *a, **kw: None):
        return {"skipped": "needs CUDA", "cpu_stand_in": _gpu_decode(args, s, data_dir, root)}


def _gpu_decode(args, s: dict, data_dir: str, root: str) -> dict:
    import distill.train.engine as engine
    from distill.data import open_training_set

    steps, size = s["decode_steps"], s["size"]
    train_set = open_training_set(data_dir, flip=True, input_size=size)
    first = train_set.encoded(0)[0]
    from distill.data.images import decode_chw
    if tuple(decode_chw(bytes(first), "image 0").shape[-2:]) != (size, size):
        raise RuntimeError(f"{data_dir}: the canary compares levels, so its images must be stored at {size} px")
    canary = DecodeCanary(train_set, args.device)
    cfg = check_config(args, s, data={"train": data_dir, "input_size": size, "decode": "cuda",
                                      "num_workers": args.workers},
                       student=dict(s["student"]),  # two log lines: each reads the loss (a host sync)
                       train={"batch_size": s["batch"], "max_steps": steps, "log_every": max(1, steps // 2)})
    stage_dir = os.path.join(root, "gpu_decode")
    with replaced(engine, "decode_batch", canary.spy(engine.decode_batch)):
        result = run_check_stage(cfg, "gpu_decode", stage_dir, train_set)
    counts = result.get("decode")
    check = canary.read()
    rates = metric(stage_dir, "train/images_per_s")
    out = {"steps": result["steps"], "canary": check, "decode": counts if counts is not None else "not recorded",
           "vs_cpu_decode": _cpu_difference(train_set, args.device),
           "img_s_second_half": round(rates[-1], 1) if rates else None}
    out["ok"] = (result["steps"] == steps and check["mismatched"] == 0 and check["checked"] == steps * s["batch"]
                 and counts is not None and counts.get("images") == steps * s["batch"]
                 and counts.get("cpu_fallback") == 0)
    return out


# --------------------------------------------------------------------------------------- fp16

def fp16_scaler(args, s: dict, root: str) -> dict:
    """train.amp fp16 (a GradScaler) with clip_grad and accumulate 2: finite losses, a sane scale, all steps."""
    from distill.utils.checkpoint import safe_torch_load

    steps = s["fp16_steps"]
    cfg = check_config(args, s, student=dict(s["student"]) if not args.tiny else dict(s["check_student"]),
                       train={"amp": "fp16", "clip_grad": 1.0, "accumulate": 2, "max_steps": steps,
                              "batch_size": s["fp16_batch"], "checkpoint_every": steps})
    stage_dir = os.path.join(root, "fp16")
    result = run_check_stage(cfg, "fp16", stage_dir, standin(s, batch=s["fp16_batch"], steps=2 * steps))
    losses = metric(stage_dir, "train/loss")
    scaler = safe_torch_load(os.path.join(stage_dir, "last.pt")).get("scaler") or {}
    scale = scaler.get("scale")
    # GradScaler starts at 2^16 and halves on every step whose gradients overflowed (growth needs 2,000 good steps).
    # A margin loss (s = 64) overflows float16 in its first steps until the scale is ~2^10: sane is a scale that
    # did not collapse (>= 16: at most 12 halvings) nor overflow, and, in a run longer than 12 steps, applied updates
    skipped = round(math.log2(65536.0 / scale)) if scale and math.isfinite(scale) and scale > 0 else None
    applied = steps - skipped if skipped is not None else None
    return {"ok": bool(result["steps"] == steps and losses and all(math.isfinite(v) for v in losses)
                       and scale is not None and 16.0 <= scale <= 65536.0 and (steps <= 12 or applied >= 1)),
            "steps": result["steps"], "loss_first_last": [losses[0], losses[-1]] if losses else None,
            "scale": scale, "overflow_steps": skipped, "updates_applied": applied}


# --------------------------------------------------------------------------------------- loaded teacher + IJB

@contextlib.contextmanager
def no_grad_forward_devices():
    """Counts, by device type, the module forward calls made with gradients off (evaluation, cache builds,
    IJB embedding; not training) with a tensor input: a spy on where evaluation runs. The CPU forward pass of
    torch's FLOP counter (a stage's gflops in result.json) is counted apart, as flop_counter."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    counts = collections.Counter()

    def hook(module, inputs):
        if torch.is_grad_enabled():
            return
        if _get_current_dispatch_mode() is not None:  # torch's FLOP counter: result.json's gflops, on the CPU
            counts["flop_counter"] += 1
            return
        first = next((t for t in inputs if torch.is_tensor(t)), None)
        if first is not None:
            counts[first.device.type] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield counts
    finally:
        handle.remove()


def _stderr_logger() -> logging.Logger:
    log = logging.getLogger("gpu_check.loaded_teacher")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def loaded_teacher(args, s: dict, data_dir: str, root: str) -> dict:
    """distill run with teacher.checkpoint (an untrained IResNet's weights) and a tiny synthetic IJB set."""
    from distill.data.synth_ijb import write_synthetic_ijb
    from distill.run.experiment import run_experiment

    size = s["size"]
    os.makedirs(root, exist_ok=True)
    checkpoint = os.path.join(root, "backbone.pth")
    torch.save(check_teacher(s, size=size).model.state_dict(), checkpoint)
    ijb_root = os.path.join(root, "IJBC")
    if not os.path.exists(os.path.join(ijb_root, "synth_ijb.json")):
        write_synthetic_ijb(ijb_root, templates=s["ijb_templates"], seed=0, force=True)
    cfg = build_config({
        "name": "gpu_check_loaded_teacher", "device": args.device, "seed": 0,
        "data": {"train": data_dir, "val": [os.path.join(data_dir, "synth_val.bin")], "input_size": size,
                 "num_workers": args.workers, "ijb": {"root": ijb_root, "target": "IJBC", "batch_size": 64}},
        "teacher": {**teacher_spec(s, size), "checkpoint": checkpoint, "cache": True},
        "student": dict(s["check_student"]),
        "train": {"batch_size": s["check_batch"], "max_steps": s["check_steps"], "log_every": 1,
                  "checkpoint_every": 10 ** 9, **({"threads": 1} if args.tiny else {})},
        "baseline": False, "generations": 1, "tracking": {"wandb": "disabled"},
    })
    run_dir = os.path.join(root, "run")
    with no_grad_forward_devices() as counts:
        run_experiment(cfg, run_dir, progress=False, logger=_stderr_logger())
    want = torch.device(args.device).type
    stages = {}
    for name in ("teacher", "gen1"):
        path = os.path.join(run_dir, name, "result.json")
        ijb = read_result(os.path.dirname(path)).get("ijb") if os.path.exists(path) else None
        stages[name] = {"ijb_tar_at_far_1e-2": ijb["tar_at_far"]["1e-2"] if ijb else None,
                        "ijb_images": ijb.get("images") if ijb else None}
    elsewhere = sum(n for kind, n in counts.items() if kind not in (want, "flop_counter"))
    return {"ok": bool(counts[want] > 0 and elsewhere == 0 and all(v["ijb_images"] for v in stages.values())),
            "no_grad_forwards": dict(counts), "expected_device": want, "stages": stages}
