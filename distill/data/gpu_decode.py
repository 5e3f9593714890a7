"""data.decode: cuda — loader workers only read encoded images; whole batches are decoded, flipped, resized
and normalised on the training device.

With `data.decode: cpu` (the default) every loader worker reads a record, decodes the JPEG with libjpeg-turbo
(torchvision.io.decode_jpeg on the CPU), flips, resizes and normalises (distill/data/datasets.py): about one
CPU core per few thousand images/s (benchmarks/bench_data.py measures it). With `data.decode: cuda` the
workers do the read alone (`EncodedPlanned` + `collate_encoded`: the record's bytes as a uint8 tensor) and
the training process calls `decode_batch`, one batched `torchvision.io.decode_jpeg(list, device=cuda)`
(nvJPEG) per batch, then flip, resize and normalise as batched tensor ops on the GPU.

Which pixels come out:
- `decode_batch` on a CPU device (what the tests run) decodes with the very decoder of the CPU path
  (decode_jpeg on the CPU for JPEG, PIL for the rest) and gives bit-identical tensors to
  `to_input_tensor(decode_chw(bytes), flip, input_size)`, resize included.
- Flip and normalisation are exact on any device: normalisation is a 256-entry table computed on the CPU with
  the CPU path's own operations, looked up on the device (so CUDA's reciprocal-multiply for a division by a
  CPU scalar never enters).
- The JPEG decode itself is NOT bit-identical on CUDA: nvJPEG (as torchvision creates it, default flags) has
  its own IDCT and does not use libjpeg-turbo's smooth ("fancy") chroma upsampling, so pixels of 4:2:0/4:2:2
  JPEGs typically differ from the CPU decoder by a few levels near colour edges (the test suite runs on a CPU
  and does not measure it); `benchmarks/bench_data.py --decode cuda` prints the max and mean difference
  against the CPU decoder. A teacher cache filled from CPU-decoded images therefore holds the
  teacher's view of very slightly different pixels than a cuda-decoded student sees.
- Resize (stored size != data.input_size) on CUDA runs `F.interpolate(bicubic, antialias)` on the GPU:
  same formula, different kernel and summation order, so results are expected to differ from the CPU's by
  float rounding only (not measured here); not bit-exact. The tests compare the resize case bit for bit only
  on the CPU device.
- JPEGs other than 8-bit 3-component ones (grey, whose RGB expansion by nvJPEG is unverified here; CMYK/YCCK;
  12-bit; an unparseable header) and every non-JPEG image (PNG, BMP ...) are decoded on the CPU in the training
  process, one by one, exactly as the CPU path does (so a broken record raises the same DataFormatError).

Ordering with the training stream (`_decode_on_gpu`). torchvision's CUDA decode_jpeg allocates its outputs on the
caller's current stream, then has nvJPEG write them from a private stream that does not wait for the caller's
stream (pytorch/vision#9606; nvJPEG's hardware engine does not even honour the stream it is given). The caching
allocator hands out a block as soon as it is freed on its stream, so on the training stream the decoder can be
given memory that queued kernels of the previous step are still to read, and overwrite it. Here the decode runs
with a side stream of our own current, used for nothing else: its outputs come from that stream's pool, whose
blocks are never in use by queued work (no kernel runs on it, and every output is marked `record_stream(training)`,
so its block returns to the pool only once the training stream's work queued before its release has run). nvJPEG
therefore writes memory nothing else reads or writes, whenever it writes. The training stream then waits for the
side stream (which torchvision makes wait for its decode), so every later use of the images is ordered after the
decode. What this relies on: the caching allocator's per-stream pools and record_stream (PyTorch's documented
semantics), and torchvision allocating the outputs on the current stream. What it costs: no host synchronisation;
an event and a stream wait per batch, and one more batch of uint8 images held while the step reads the last one.
The CPU waits for nothing but the decode itself (decode_jpeg returns once its stream is done). benchmarks/
gpu_check.sh decodes 50 steps with a corruption canary on a GPU; were it ever to find corruption, the fallback is
`torch.cuda.current_stream().synchronize()` before each decode (the previous step drained: correct whatever the
allocator does, at the cost of the CPU/GPU overlap).

When nvJPEG raises on a batch, the batch is decoded on the CPU (the CPU path's decoder), counted in `stats`
(`cpu_fallback`), and said once per `stats` (a stage) as a UserNote with the error; a CUDA out-of-memory error is
raised, not worked around.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from distill.data.datasets import PlannedDataset
from distill.data.images import JPEG_SOI, _tv_decode_jpeg, decode_chw
from distill.utils.errors import ConfigError, UserNote

if _tv_decode_jpeg is not None:
    from torchvision.io import ImageReadMode

DECODES = ("cpu", "cuda")


def check_decode(decode: str, device, dataset=None) -> None:
    """Refuse `data.decode` settings this run cannot honour, before any work: an unknown value; cuda on a run
    whose device is not a GPU (or without a usable CUDA); a torchvision without decode_jpeg; a training set
    that cannot hand out encoded images. Warns (UserNote) when the set's first image is not a JPEG."""
    if decode not in DECODES:  # the config loader has refused these already: a caller's mistake
        raise ValueError(f"data.decode {decode!r} is not one of {', '.join(DECODES)}")
    if decode != "cuda":
        return
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        from distill.utils.device import no_cuda_reason

        reason = (no_cuda_reason() if not torch.cuda.is_available()
                  else "the key 'device' chose it, though a GPU is available")
        raise ConfigError(f"key 'data.decode': cuda decodes JPEGs on the GPU, but this run's device is {device} "
                          f"({reason}); set data.decode: cpu (or device: cuda)")
    if _tv_decode_jpeg is None:
        raise ConfigError("key 'data.decode': cuda needs torchvision.io.decode_jpeg, which this torchvision lacks; "
                          "install a torchvision built with its image extension, or set data.decode: cpu")
    if dataset is None:
        return
    from distill.data.datasets import FaceDataset

    encoded = getattr(type(dataset), "encoded", None)
    if encoded is None or encoded is FaceDataset.encoded:
        what = getattr(dataset, "source", type(dataset).__name__)
        raise ConfigError(f"key 'data.decode': cuda needs a training set stored as encoded images (a RecordIO "
                          f"train.rec or an image folder); {type(dataset).__name__} ({what}) makes its images in "
                          f"memory and has no encoded bytes to hand out; set data.decode: cpu")
    if len(dataset):
        data, _ = dataset.encoded(0)
        if bytes(data[:2]) != JPEG_SOI:
            warnings.warn(f"data.decode: cuda: the first image of {dataset.source} is not a JPEG; images that are "
                          f"not JPEGs are decoded on the CPU in the training process, one at a time (slower than "
                          f"data.decode: cpu, which spreads them over the loader workers)", UserNote, stacklevel=2)


def _as_uint8(data) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    # bytearray: torch.frombuffer needs a writable buffer (it warns on bytes)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class EncodedPlanned(PlannedDataset):
    """PlannedDataset for data.decode: cuda: item (index, flip) of the epoch plan is
    `(uint8 1-D tensor of the encoded image, label, index, flipped)`, read and not decoded."""

    def __getitem__(self, item):
        index, flip = item
        index = self.dataset._check_index(int(index))
        data, label = self.dataset.encoded(index)
        return _as_uint8(data), label, index, bool(flip)


def collate_encoded(items) -> tuple:
    """Items of EncodedPlanned -> `(list of uint8 1-D tensors, labels int64, indices int64, flipped bool)`,
    the last three as default_collate makes them from PlannedDataset. The encoded images are views into one
    buffer, so a batch crosses from a loader worker in one shared-memory block rather than one per image."""
    sizes = [len(it[0]) for it in items]
    flat = torch.cat([it[0] for it in items]) if items else torch.empty(0, dtype=torch.uint8)
    encoded = list(torch.split(flat, sizes)) if items else []
    labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
    indices = torch.tensor([it[2] for it in items], dtype=torch.int64)
    flipped = torch.tensor([bool(it[3]) for it in items], dtype=torch.bool)
    return encoded, labels, indices, flipped


# ------------------------------------------------------------------------------------------- decoding

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD9)}  # TEM, RSTn, SOI, EOI: markers without a length


def jpeg_frame(data: bytes):
    """(sample precision, components) from a JPEG's frame header, None when it cannot be found."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker in _SOF:
            return (data[i + 4], data[i + 9]) if i + 10 <= n else None
        if marker == 0xDA or length < 2:  # scan data before any frame header: malformed
            return None
        i += 2 + length
    return None


def _gpu_can_decode(data) -> bool:
    frame = jpeg_frame(memoryview(data).tobytes())
    return frame is not None and frame[0] == 8 and frame[1] == 3


def _decode_jpegs(tensors: list, device: torch.device) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its codecs
        return _tv_decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


_DECODE_STREAMS = {}  # device -> the side stream nvJPEG's outputs are allocated on (module docstring)


def _decode_on_gpu(tensors: list, device: torch.device) -> list:
    """decode_jpeg on CUDA, ordered with the training stream (the current stream): see the module docstring."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    training = torch.cuda.current_stream(device)
    if device not in _DECODE_STREAMS:
        _DECODE_STREAMS[device] = torch.cuda.Stream(device)
    side = _DECODE_STREAMS[device]
    with torch.cuda.stream(side):  # outputs from the side stream's pool: memory no queued kernel uses
        images = _decode_jpegs(tensors, device)
    training.wait_stream(side)  # every later use of the images comes after the decode
    for img in images:
        img.record_stream(training)  # its block is not handed to the next decode before the step has read it
    return images


def _on_gpu(device: torch.device) -> bool:
    return device.type == "cuda"


def _fell_back(stats: dict | None, count: int, err: Exception) -> None:
    """nvJPEG raised on a batch of `count` images, decoded on the CPU instead: counted, and said once per `stats`."""
    first = stats is None or not stats.get("cpu_fallback")
    if stats is not None:
        stats["cpu_fallback"] = stats.get("cpu_fallback", 0) + count
    if first:
        reason = " ".join(str(err).split())[:300]
        warnings.warn(f"data.decode: cuda: nvJPEG failed on a batch of {count} images ({reason}); decoded on the "
                      f"CPU instead. Later fallbacks in this stage are counted, not shown (result.json: "
                      f"decode.cpu_fallback)", UserNote, stacklevel=3)


_TABLES = {}


def _normalise_table(device: torch.device) -> torch.Tensor:
    """float32 value of every uint8 level after to_input_tensor's own operations, computed on the CPU, kept on
    `device`."""
    if device not in _TABLES:
        table = torch.arange(256, dtype=torch.uint8).float().div_(255).sub_(0.5).div_(0.5)
        _TABLES[device] = table.to(device)
    return _TABLES[device]


def _where(where, i: int) -> str:
    if where is None:
        return f"image {i} of the batch"
    return where(i) if callable(where) else where[i]


def decode_batch(encoded: list, flipped: torch.Tensor, device, input_size=None, where=None,
                 stats: dict | None = None) -> torch.Tensor:
    """Encoded images (uint8 1-D CPU tensors, or bytes) -> float32 (B, 3, S, S) on `device`, mirrored where
    `flipped`, resized (bicubic, antialiased) when they differ from `input_size` (int or (H, W); None keeps the
    stored size), normalised (x/255 - 0.5)/0.5: the batch PlannedDataset + default_collate would give.

    JPEGs are decoded in one `decode_jpeg(list, device=device)` call (nvJPEG on CUDA); other images, and JPEGs
    nvJPEG does not take, through the CPU path's decoder. `where` names item i for errors: a callable i -> str
    or a list of str (e.g. `lambda i: dataset.where(int(indices[i]))`). `stats` (a stage's dict): `images` grows by
    the batch's images, `cpu_fallback` by those decoded on the CPU because nvJPEG raised. Pixel differences on
    CUDA and the ordering with the training stream: see the module docstring."""
    device = torch.device(device)
    tensors = [e if torch.is_tensor(e) else _as_uint8(e) for e in encoded]
    n = len(tensors)
    if n == 0:
        raise ValueError("decode_batch: empty batch")
    flipped = torch.as_tensor(flipped, dtype=torch.bool).reshape(-1)
    if len(flipped) != n:
        raise ValueError(f"decode_batch: {n} images but {len(flipped)} flips")
    on_gpu = _on_gpu(device)
    if stats is not None:
        stats["images"] = stats.get("images", 0) + n
    raw = [t.numpy() for t in tensors]  # zero-copy views, for header checks and the CPU decoder

    images = [None] * n
    fast = []  # items decode_jpeg decodes as one batch: JPEGs (on CUDA: those nvJPEG takes)
    for i, r in enumerate(raw):
        if _tv_decode_jpeg is not None and r[:2].tobytes() == JPEG_SOI and (not on_gpu or _gpu_can_decode(r)):
            fast.append(i)
    failed = None  # (images, error) when nvJPEG raised on the batch
    if fast:
        decode = _decode_on_gpu if on_gpu else _decode_jpegs
        try:
            for i, img in zip(fast, decode([tensors[i].contiguous() for i in fast], device), strict=True):
                images[i] = img
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as err:
            if not on_gpu:
                for i in fast:  # the same decoder one by one raises DataFormatError naming the broken image
                    decode_chw(raw[i].tobytes(), _where(where, i))
                raise
            # one image nvJPEG refuses fails the whole call: the CPU decoder takes the batch (and names a broken one)
            failed = (len(fast), err)
    for i in range(n):
        if images[i] is None:
            images[i] = decode_chw(raw[i].tobytes(), _where(where, i)).to(device, non_blocking=True)
    if failed:  # the CPU decoded them all (a broken image has raised above, naming itself)
        _fell_back(stats, *failed)

    size = None
    if input_size is not None:
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    shapes = {tuple(img.shape) for img in images}
    if len(shapes) == 1:
        return _transform(torch.stack(images), flipped.to(device), size)
    # images of different sizes (an image folder): transformed one by one, then stacked like default_collate
    return torch.cat([_transform(img[None], flipped[i:i + 1].to(device), size) for i, img in enumerate(images)])


def _transform(x: torch.Tensor, flipped: torch.Tensor, size) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32, as to_input_tensor does per image (resize, flip, normalise)."""
    flip = flipped.view(-1, 1, 1, 1)
    if size is None or tuple(x.shape[-2:]) == size:
        x = torch.where(flip, x.flip(-1), x)  # flipping before or after normalising is the same
        return _normalise_table(x.device)[x.int()]
    x = F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False, antialias=True).clamp_(0, 255)
    x = torch.where(flip, x.flip(-1), x)
    if x.device.type == "cpu":
        return x.div_(255).sub_(0.5).div_(0.5).contiguous()
    # a 0-dim device tensor keeps true division (a CPU-scalar divisor is a reciprocal multiply on CUDA)
    return x.div_(torch.tensor(255.0, device=x.device)).sub_(0.5).div_(0.5).contiguous()
