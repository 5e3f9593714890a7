"""The teacher signal: what a training step gets from its frozen teacher, and the one place that knows how the
teacher runs.

    signal.embed(x, index, flipped) -> float32 (B, dim) on x's device

`x` is the step's batch (normalised, on the device, each image already flipped or not), `index` and `flipped` say
which training images and views it holds. Two implementations:

- `OnlineTeacher` runs the teacher on `x`. It owns the teacher's facts: the resize to its input side
  (`match_input_size`), its autocast (`amp_dtype`), its memory format (`channels_last`), its embedding size, and
  the teacher itself (`online.teacher`, whose feature maps a feature-map term hooks).
- `CachedTeacher` reads the rows of a teacher cache (teachers/cache.py) at `index, flipped`. The cache is filled
  through an `OnlineTeacher` (`embed_pairs`), so both give the same targets up to the cache's float16 rounding.

`online_signal(teacher, train, device)` derives the teacher's settings once from the run's TrainConfig:
    autocast       train.amp for the teacher's own model on the device (distill.utils.device.amp_settings: bf16
                   on CUDA; on a bf16 CPU for a model that runs faster in it, e.g. IResNet); the cache's key
                   records it, so cached rows and an online teacher run under the same one
    memory format  online: the batch's (train.channels_last; null: NHWC on CUDA), so the batch is not copied;
                   a cache build: NHWC on CUDA, NCHW elsewhere, whatever the students' setting, since a cache's
                   rows serve every run whose key matches and the key does not record a memory format
`stage_signal(teacher, cache, train, device)` is the signal a stage trains with (the engine calls it once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.utils.device import amp_settings
from distill.utils.errors import ConfigError
from teachers.cache_key import cache_key
from teachers.head_file import load_centres


def match_input_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a normalised batch to the teacher's input side when the data is stored at another size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class TeacherSignal:
    """What the training step asks of a teacher; `online` is the teacher run on the batch (None when cached), whose
    feature maps the feature terms hook; `centres_source` is the file of its class centres (teacher.head, or the
    last.pt of a teacher trained by the run; None: not known), read by `centres`."""

    online: OnlineTeacher | None = None
    embedding_size: int
    centres_source: str | None = None

    def centres(self, num_classes: int | None) -> torch.Tensor:
        """The teacher's class centres (classes, embedding) in float32, checked against `num_classes`."""
        if not self.centres_source:
            raise ConfigError("the teacher's class centres are not known: set teacher.head (the teacher's margin-head "
                              "weights), or let the run train the teacher")
        return load_centres(self.centres_source, num_classes)

    def embed(self, x: torch.Tensor, index: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compiled(self, wrap) -> TeacherSignal:
        """This signal with its teacher's forward pass called through `wrap(module)` (torch.compile)."""
        return self

    @property
    def compile_fallback(self) -> str | None:
        """Why the compiled teacher runs in eager mode (the wrapper's one-line `fallback`: a compile failure);
        None when it is not compiled or compiled fine."""
        return None


class OnlineTeacher(TeacherSignal):
    """A frozen teacher run on the batch: on `device`, under autocast `amp_dtype` (None: float32), NHWC when
    `channels_last` (None: on CUDA)."""

    def __init__(self, teacher, device="cpu", amp_dtype: torch.dtype | None = None, channels_last: bool | None = None):
        self.teacher = teacher
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.channels_last = self.device.type == "cuda" if channels_last is None else bool(channels_last)
        self._forward = teacher
        teacher.to(self.device)
        teacher.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    @property
    def online(self) -> OnlineTeacher:
        return self

    @property
    def input_size(self) -> int:
        return self.teacher.input_size

    @property
    def embedding_size(self) -> int:
        return self.teacher.embedding_size

    def compiled(self, wrap) -> OnlineTeacher:
        out = object.__new__(OnlineTeacher)
        out.__dict__.update(self.__dict__)
        out._forward = wrap(self.teacher)
        return out

    @property
    def compile_fallback(self) -> str | None:
        return None if self._forward is self.teacher else getattr(self._forward, "fallback", None)

    def for_cache(self) -> OnlineTeacher:
        """The same teacher, device and autocast in the memory format a cache build uses (module docstring)."""
        return OnlineTeacher(self.teacher, self.device, self.amp_dtype)

    def cache_key(self, dataset) -> dict:
        """What the cache rows of this teacher over `dataset` are a function of (teachers/cache_key.py)."""
        return cache_key(self.teacher, dataset, self.amp_dtype)

    def fingerprint(self) -> str:
        return self.teacher.fingerprint()

    def describe(self) -> str:
        return f"{str(self.amp_dtype).replace('torch.', '')} autocast" if self.amp_dtype is not None else "float32"

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher on a batch already at its input size: float32 embeddings."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.amp_dtype,
                                             enabled=self.amp_dtype is not None):
            return self._forward(x).float()

    def embed(self, x: torch.Tensor, index=None, flipped=None) -> torch.Tensor:
        return self._run(match_input_size(x, self.input_size))

    def embed_pairs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2, dim): each un-flipped image of `x` and its horizontal flip, in one forward pass of 2B images
        (what a cache row holds)."""
        x = match_input_size(x.to(self.device, non_blocking=True), self.input_size)
        both = self._run(torch.cat([x, torch.flip(x, dims=[3])]))
        return both.reshape(2, len(x), -1).transpose(0, 1)


class CachedTeacher(TeacherSignal):
    """The rows of a teacher cache (teachers/cache.py: TeacherCache) for the batch's images and views."""

    def __init__(self, cache):
        self.cache = cache
        self.embedding_size = int(cache.emb.shape[2])

    def embed(self, x: torch.Tensor, index: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        return self.cache.lookup(index, flipped).to(x.device, non_blocking=True)


def teacher_autocast(train, device: torch.device, teacher) -> torch.dtype | None:
    """The autocast dtype the teacher runs under: train.amp for the teacher's own model on `device`."""
    return amp_settings(train, device, teacher)[0]


def signal_cache_key(teacher, dataset, train, device) -> dict:
    """The cache key (teachers/cache_key.py) of the rows `online_signal(teacher, train, device)` fills over
    `dataset`, without placing the teacher on the device."""
    return cache_key(teacher, dataset, teacher_autocast(train, torch.device(device), teacher))


def online_signal(teacher, train, device) -> OnlineTeacher:
    """`teacher` (a FrozenTeacher) run online with the settings the run's TrainConfig gives it (module docstring)."""
    device = torch.device(device)
    return OnlineTeacher(teacher, device, teacher_autocast(train, device, teacher), train.channels_last)


def stage_signal(teacher, cache, train, device, centres: str | None = None) -> TeacherSignal | None:
    """A stage's teacher signal: `teacher` when it is one already; else the rows of `cache` (a TeacherCache) when
    given, else the frozen `teacher` run online (online_signal); None without either. `centres`: the file of the
    teacher's class centres (StageSpec.centres), kept as the signal's `centres_source` when given."""
    if isinstance(teacher, TeacherSignal):
        signal = teacher
    elif cache is not None:
        signal = CachedTeacher(cache)
    else:
        signal = online_signal(teacher, train, device) if teacher is not None else None
    if signal is not None and centres:
        signal.centres_source = centres
    return signal
