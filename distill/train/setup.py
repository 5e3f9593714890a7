"""One stage's device, mixed precision, compile, optimizer, learning rate and schedule, from its TrainConfig (timm's
optimizers and schedulers), and the preemption signals a stage stops on."""

from __future__ import annotations

import re
import signal
import warnings
from contextlib import contextmanager

import torch
from timm.scheduler import create_scheduler_v2
from torch import nn

from distill.config.schema import TrainConfig
from distill.utils.device import amp_settings
from distill.utils.errors import ConfigError, UserNote


def use_channels_last(train: TrainConfig, device: torch.device) -> bool:
    """train.channels_last, or by default (null) on CUDA: NHWC convolutions are the fast path of tensor cores."""
    return device.type == "cuda" if train.channels_last is None else bool(train.channels_last)


def scaled_lr(train: TrainConfig, world: int) -> float:
    """lr is given for a total batch of lr_batch_size and scales linearly with the real total batch."""
    return train.lr * train.batch_size * world * train.accumulate / train.lr_batch_size


def create_scheduler(optimizer, train: TrainConfig, total_steps: int, steps_per_epoch: float):
    """timm scheduler stepped per optimizer update: epochs in the config become update counts here."""
    warmup = int(round(train.warmup_epochs * steps_per_epoch))
    common = dict(num_epochs=total_steps, warmup_epochs=warmup, min_lr=train.min_lr, warmup_lr=train.min_lr or 1e-6,
                  step_on_epochs=False, updates_per_epoch=1)
    if train.scheduler == "poly":
        # arcface_torch's warmup-poly: the decay starts where the warmup ends (timm's warmup_prefix), so the
        # lr at the end of the warmup is the full lr and reaches min_lr at the last step
        poly = {**common, "num_epochs": max(1, total_steps - warmup), "warmup_prefix": True}
        sched, _ = create_scheduler_v2(optimizer, sched="poly", decay_rate=train.poly_power, **poly)
    elif train.scheduler == "cosine":
        sched, _ = create_scheduler_v2(optimizer, sched="cosine", **common)
    else:
        milestones = [int(round(e * steps_per_epoch)) for e in train.decay_epochs]
        sched, _ = create_scheduler_v2(optimizer, sched="multistep", decay_milestones=milestones,
                                       decay_rate=train.decay_rate, **common)
    return sched


def create_optimizer(params, train: TrainConfig, world: int, device: torch.device):
    """timm's create_optimizer_v2 with the multi-tensor implementation train.optimizer_impl asks for: `auto` is
    the fused kernel on CUDA where the optimizer has one (SGD, AdamW, ...) and torch's default elsewhere;
    `fused` where the optimizer has none is a ConfigError naming the key."""
    from timm.optim import create_optimizer_v2

    common = dict(opt=train.optimizer, lr=scaled_lr(train, world), weight_decay=train.weight_decay,
                  momentum=train.momentum, filter_bias_and_bn=not train.decay_norm_and_bias)
    impl = train.optimizer_impl
    if impl == "off":
        return create_optimizer_v2(params, foreach=False, **common)
    if impl == "foreach":
        return create_optimizer_v2(params, foreach=True, **common)
    if impl == "fused" or (impl == "auto" and device.type == "cuda"):
        try:
            return create_optimizer_v2(params, fused=True, **common)
        except (TypeError, RuntimeError) as err:
            if impl == "fused":
                raise ConfigError(f"key 'train.optimizer_impl': fused, but the {train.optimizer} optimizer has no "
                                  f"fused kernel on {device.type} ({str(err).splitlines()[0][:160]}); use auto or "
                                  f"foreach") from None
    return create_optimizer_v2(params, **common)


# torch.compile's backend; tests set "eager" (dynamo's tracing without inductor's minutes of code generation)
COMPILE_BACKEND = "inductor"

_NO_COMPILER = re.compile(r"(dynamo|torch\.compile) is not supported on python", re.IGNORECASE)


def _chain(err: BaseException) -> list:
    """`err`, the backend's own error it wraps (dynamo's BackendCompilerFailed.inner_exception), its causes and
    the errors it was raised while handling."""
    seen = []
    while err is not None and all(err is not s for s in seen):
        seen.append(err)
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__
    return seen


def never_hidden(err: BaseException) -> BaseException | None:
    """The error in `err`'s chain that no eager rerun may stand in for: out of memory (torch.cuda.OutOfMemoryError
    is torch's), also one hit while compiling and wrapped by dynamo, and the distributed ones (NCCL's
    DistBackendError, a lost store or peer); None when there is none."""
    dist = torch.distributed
    kinds = (torch.OutOfMemoryError, MemoryError) + ((dist.DistError,) if dist.is_available() else ())
    return next((e for e in _chain(err) if isinstance(e, kinds)), None)


def compile_failure(err: BaseException) -> str | None:
    """The one-line reason when `err` means torch.compile could not compile (dynamo's and inductor's own exception
    types, "not supported on this Python"), so eager mode may stand in; None for every other error, which must
    propagate: never_hidden's, the model's own error raised by running code. A model error that dynamo meets
    while tracing (TorchRuntimeError) counts as a compile failure: the eager call that follows raises it as
    itself."""
    try:  # the base of BackendCompilerFailed, Unsupported, TorchRuntimeError, InductorError, ...
        from torch._dynamo.exc import TorchDynamoException as dynamo_error
    except Exception:  # no dynamo on this Python: only its refusal below counts
        dynamo_error = ()

    if never_hidden(err) is not None:
        return None
    inductor = type(err).__module__.startswith("torch._inductor")  # CppCompileError, InvalidCxxCompiler unwrapped
    if not (isinstance(err, dynamo_error) or inductor or _NO_COMPILER.search(str(err))):
        return None
    cause = getattr(err, "inner_exception", None) or err.__cause__ or err  # a backend's own error, when wrapped
    text = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ""
    return type(cause).__name__ + (f": {text}" if text else "")


class CompiledOrEager:
    """Calls `module` through torch.compile; when compiling fails (no C compiler, an unsupported Python, an op
    dynamo cannot trace: `compile_failure`), it runs the module in eager mode from then on, says so once (a
    UserNote) and keeps the one-line reason in `fallback` (None while compiled). Any other error propagates: an
    out-of-memory or a distributed error is never hidden behind an eager rerun.

    Feature taps: a compiled call runs with dynamo's guards on module hooks (skip_nnmodule_hook_guards off, for
    these calls only). dynamo's default skips them, so a forward compiled without hooks (the baseline stage's
    student, a teacher trained or compiled earlier: dynamo reuses code across instances of one class) would be
    reused once FeatureTaps hooks the next stage's models, and the hooks would never fire. Guarded, adding or
    removing hooks recompiles once; hooks of another FeatureTaps with the same code reuse the compiled code (the
    hook's closure is read at call time). torch._dynamo.reset() per stage was the alternative; it throws away
    every compiled frame of the process and still relies on hooks being in place before a stage's first call.

    Deliberately not an nn.Module: the compiled wrapper (whose state dict keys carry `_orig_mod.`) is only ever
    called, never saved; checkpoints and student.pt are written from the plain module, as without compile, so a
    compiled run resumes into an uncompiled one and back."""

    def __init__(self, module: nn.Module, what: str):
        self.module, self.what, self.compiled, self.fallback = module, what, None, None
        try:
            self.compiled = torch.compile(module, backend=COMPILE_BACKEND)
        except Exception as err:  # e.g. "torch.compile is not supported on Python 3.15+"
            if not self._fall_back(err):
                raise

    def _fall_back(self, err: Exception) -> bool:
        """Eager mode from now on, with the reason, when `err` is a compile failure; False (the caller re-raises)
        for any other error."""
        reason = compile_failure(err)
        if reason is None:
            return False
        self.compiled, self.fallback = None, reason
        warnings.warn(f"train.compile: torch.compile of the {self.what} failed ({reason}); running it in eager "
                      f"mode. Set train.compile: false to silence this", UserNote, stacklevel=3)
        return True

    def __getattr__(self, name):  # the module's own attributes (input_size, embedding_size, ...)
        if name == "module":
            raise AttributeError(name)
        return getattr(self.module, name)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
                    return self.compiled(*args, **kwargs)
            except Exception as err:
                kept = never_hidden(err)
                if kept is not None and kept is not err:  # dynamo's wrapper: raise what the caller can catch
                    raise kept from err
                if not self._fall_back(err):
                    raise
        return self.module(*args, **kwargs)


def maybe_compile(module: nn.Module, train: TrainConfig, what: str):
    """What to call for forward passes: the module through torch.compile when train.compile is set, else the
    module itself."""
    return CompiledOrEager(module, what) if train.compile else module


def describe_precision(name: str, train: TrainConfig, device: torch.device, online_teacher=None,
                       model=None) -> str | None:
    """How the stage computes, for its log line: autocast, memory format, compile, and the autocast of an online
    teacher (`online_teacher`: the OnlineTeacher signal run on every batch, teachers/signal.py, or None). None when
    there is nothing beyond float32 eager NCHW with a cache."""
    amp_dtype, scaler = amp_settings(train, device, model)
    parts = []
    if amp_dtype is not None:
        parts.append(f"{str(amp_dtype).replace('torch.', '')} autocast" + (" with a GradScaler" if scaler else ""))
    if use_channels_last(train, device):
        parts.append("channels_last")
    if train.compile:
        parts.append("torch.compile")
    if online_teacher is not None:
        same = " (the same as the student)" if online_teacher.amp_dtype == amp_dtype else ""
        parts.append(f"online teacher under {online_teacher.describe()}{same}")
    return ", ".join(parts) if parts else None


@contextmanager
def preemption_signals():
    """{"signal": None}, set to the signal's name when SIGTERM or SIGUSR1 arrives; handlers restored after."""
    stop, previous = {"signal": None}, {}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread: the caller handles preemption
            pass
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
