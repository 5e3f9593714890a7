"""data.decode: cuda's shared code, run on the CPU: decode_batch gives bit for bit the CPU path's tensors, falls back
to the CPU decoder for non-JPEGs, and EncodedPlanned + collate_encoded + decode_batch rebuild PlannedDataset's batches.
The CUDA branch itself (nvJPEG) is not executed here."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from distill.data import ImageFolderDataset, RecordIODataset, write_insightface_rec
from distill.data.datasets import PlannedDataset
from distill.data.gpu_decode import (
    EncodedPlanned,
    _gpu_can_decode,
    check_decode,
    collate_encoded,
    decode_batch,
    jpeg_frame,
)
from distill.data.images import decode_chw, to_input_tensor
from distill.data.standin import StandInFaces
from distill.train.epoch_plan import plan_epoch
from distill.utils.errors import ConfigError, DataFormatError

CPU = torch.device("cpu")


def picture(seed, size=(40, 36)):
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 7 + seed * 13, y * 5 + seed * 29, (x + y) * 3], -1) % 256
    return (img + rng.integers(0, 40, img.shape)).clip(0, 255).astype(np.uint8)


def encode(rgb, fmt="JPEG", mode="RGB", **kw):
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format=fmt, **kw)
    return buf.getvalue()


def cpu_path(encoded, flips, input_size):
    return torch.stack([to_input_tensor(decode_chw(bytes(e), "test"), flip=bool(f), input_size=input_size)
                        for e, f in zip(encoded, flips, strict=True)])


@pytest.fixture
def rec(fixtures):
    return RecordIODataset(fixtures / "insightface_rec")


# ---- decode_batch against the CPU path ----------------------------------------------------------

@pytest.mark.parametrize("input_size", [None, 112, 96])
def test_fixture_jpegs_bit_identical_to_the_dataset_with_flips(fixtures, input_size):
    ds = RecordIODataset(fixtures / "insightface_rec", input_size=input_size)
    n = len(ds)
    for flips in (torch.zeros(n, dtype=torch.bool), torch.arange(n) % 3 == 1):
        encoded = [ds.encoded(i)[0] for i in range(n)]
        got = decode_batch([torch.frombuffer(bytearray(e), dtype=torch.uint8) for e in encoded], flips, CPU,
                           input_size)
        want = torch.stack([ds.item(i, bool(flips[i]))[0] for i in range(n)])
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, want)  # bit for bit, resize (112 -> 96) included


def test_encoded_is_the_record_payload_and_label(rec):
    for i in (0, 5, len(rec) - 1):
        data, label = rec.encoded(i)
        assert data[:2] == b"\xff\xd8" and label == rec.item(i, False)[1]
        assert torch.equal(to_input_tensor(decode_chw(data, "x")), rec.get(i, False))


def test_synthetic_jpegs_and_fallbacks_bit_identical():
    """4:2:0, 4:4:4, progressive, grey and CMYK JPEGs, and PNGs (RGB, RGBA, grey) in one batch."""
    rgb = [picture(s) for s in range(9)]
    encoded = [
        encode(rgb[0], quality=90),
        encode(rgb[1], quality=75, subsampling=0),  # 4:4:4
        encode(rgb[2], quality=85, progressive=True),
        encode(rgb[3], mode="L"),  # grey JPEG: decode_jpeg(mode=RGB) gives 3 equal channels, as PIL's convert
        encode(rgb[4], mode="CMYK"),
        encode(rgb[5], fmt="PNG"),
        encode(rgb[6], fmt="PNG", mode="RGBA"),
        encode(rgb[7], fmt="PNG", mode="L"),
        encode(rgb[8], quality=95),
    ]
    flips = torch.tensor([0, 1, 1, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    for size in (None, 32, (48, 40)):
        assert torch.equal(decode_batch(encoded, flips, CPU, size), cpu_path(encoded, flips, size))
    grey = decode_batch([encoded[3]], torch.zeros(1, dtype=torch.bool), CPU)
    assert grey.shape == (1, 3, 40, 36) and torch.equal(grey[0, 0], grey[0, 1]) and torch.equal(grey[0, 1], grey[0, 2])


def test_jpeg_frame_reads_precision_and_components():
    img = picture(1)
    assert jpeg_frame(encode(img)) == (8, 3)
    assert jpeg_frame(encode(img, mode="L")) == (8, 1)  # grey and CMYK: decoded on the CPU under data.decode: cuda
    assert jpeg_frame(encode(img, mode="CMYK")) == (8, 4)
    assert _gpu_can_decode(np.frombuffer(encode(img), np.uint8))
    assert not _gpu_can_decode(np.frombuffer(encode(img, mode="L"), np.uint8))
    assert not _gpu_can_decode(np.frombuffer(encode(img, mode="CMYK"), np.uint8))
    assert jpeg_frame(encode(img, progressive=True)) == (8, 3)
    assert jpeg_frame(b"\xff\xd8\xff\xda\x00\x08") is None  # scan before any frame header
    assert jpeg_frame(encode(img)[:20]) is None  # truncated before the frame header


def test_a_broken_image_raises_the_cpu_paths_error_naming_it():
    good = encode(picture(0))
    broken = good[:2] + b"\x00" * 40
    flips = torch.zeros(3, dtype=torch.bool)
    with pytest.raises(DataFormatError, match=r"train.rec: key 7: cannot decode image"):
        decode_batch([good, broken, good], flips, CPU, where=["a", "train.rec: key 7", "c"])
    with pytest.raises(DataFormatError, match="image 1 of the batch: empty image"):
        decode_batch([good, b"", good], flips, CPU)


def test_image_folder_of_mixed_sizes_and_formats(tmp_path):
    for k, (size, fmt) in enumerate([((40, 36), "JPEG"), ((30, 30), "PNG"), ((36, 44), "JPEG")]):
        folder = tmp_path / f"id{k % 2}"
        folder.mkdir(exist_ok=True)
        (folder / f"{k}.{fmt.lower()}").write_bytes(encode(picture(k, size), fmt=fmt))
    ds = ImageFolderDataset(tmp_path, input_size=32)
    encoded = [ds.encoded(i)[0] for i in range(len(ds))]
    assert encoded[0] == open(ds.samples[0][0], "rb").read()
    flips = torch.tensor([1, 0, 1], dtype=torch.bool)
    want = torch.stack([ds.item(i, bool(flips[i]))[0] for i in range(len(ds))])
    assert torch.equal(decode_batch(encoded, flips, CPU, 32, where=ds.where), want)


# ---- the encoded loader against PlannedDataset ------------------------------------------------------

def batches(loader):
    return [tuple(b) for b in loader]


@pytest.mark.parametrize("workers", [0, 1])
def test_encoded_loader_rebuilds_planned_batches_exactly(rec, workers):
    plan = plan_epoch(len(rec), batch_size=8, seed=3, epoch=1, flip=True)
    if workers:
        plan = plan[:2]
    kw = dict(batch_sampler=plan, num_workers=workers)
    want = batches(DataLoader(PlannedDataset(rec), **kw))
    got = batches(DataLoader(EncodedPlanned(rec), collate_fn=collate_encoded, **kw))
    assert len(got) == len(want)
    for (enc, y, idx, flipped), (x0, y0, idx0, flipped0) in zip(got, want, strict=True):
        assert isinstance(enc, list) and all(e.dtype == torch.uint8 and e.dim() == 1 for e in enc)
        for t, other in ((y, y0), (idx, idx0), (flipped, flipped0)):
            assert t.dtype == other.dtype and torch.equal(t, other)
        x = decode_batch(enc, flipped, CPU, rec.input_size, where=lambda i, idx=idx: rec.where(int(idx[i])))
        assert torch.equal(x, x0)
    assert any(bool(b[3].any()) for b in got) and not all(bool(b[3].all()) for b in got)  # both flips seen


def test_encoded_item_and_collate_shapes(rec):
    items = [EncodedPlanned(rec)[(i, f)] for i, f in ((3, 1), (-1, 0))]
    assert items[1][2] == len(rec) - 1 and items[0][3] is True and items[1][3] is False
    enc, y, idx, flipped = collate_encoded(items)
    assert [bytes(e.numpy()) for e in enc] == [rec.encoded(3)[0], rec.encoded(len(rec) - 1)[0]]
    assert idx.tolist() == [3, len(rec) - 1] and flipped.tolist() == [True, False] and y.dtype == torch.int64


def test_png_record_set_decodes_through_the_fallback(tmp_path):
    images = [encode(picture(s, (24, 24)), fmt="PNG") for s in range(4)] + [encode(picture(9, (24, 24)), mode="L")]
    write_insightface_rec(tmp_path, zip([0, 0, 1, 1, 1], images, strict=True), num_classes=2, image_size=24)
    ds = RecordIODataset(tmp_path, input_size=24)
    plan = [[(4, 1), (0, 1), (2, 0), (1, 0), (3, 1)]]
    (x0, y0, i0, f0), = batches(DataLoader(PlannedDataset(ds), batch_sampler=plan))
    (enc, y, i, f), = batches(DataLoader(EncodedPlanned(ds), batch_sampler=plan, collate_fn=collate_encoded))
    assert torch.equal(decode_batch(enc, f, CPU, 24), x0) and torch.equal(y, y0)


# ---- check_decode -------------------------------------------------------------------------------

def test_check_decode_on_a_cpu_device_names_the_key(rec):
    check_decode("cpu", CPU, rec)  # the default asks nothing
    with pytest.raises(ConfigError, match=r"key 'data\.decode': cuda decodes JPEGs on the GPU, but this run's "
                                          r"device is cpu \(.+\); set data\.decode: cpu"):
        check_decode("cuda", CPU, rec)
    with pytest.raises(ValueError, match=r"data\.decode 'gpu' is not one of cpu, cuda"):
        check_decode("gpu", CPU)


def test_check_decode_refuses_sets_without_encoded_images(rec, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # get past the device check on this CPU machine
    cuda = torch.device("cuda", 0)
    check_decode("cuda", cuda, rec)
    with pytest.raises(ConfigError, match=r"key 'data\.decode': cuda needs a training set stored as encoded "
                                          r"images.*StandInFaces.*set data\.decode: cpu"):
        check_decode("cuda", cuda, StandInFaces())
    write_insightface_rec(tmp_path, [(0, encode(picture(0), fmt="PNG"))], num_classes=1, image_size=(40, 36))
    with pytest.warns(UserWarning, match="not a JPEG"):
        check_decode("cuda", cuda, RecordIODataset(tmp_path))


# ---- nvJPEG failures and the training stream (the CUDA calls patched: no GPU here) --------------------------

def test_nvjpeg_failure_decodes_on_the_cpu_counted_and_said_once_per_stage(monkeypatch):
    import distill.data.gpu_decode as gpu_decode
    from distill.utils.errors import UserNote

    def nvjpeg(tensors, device):
        raise RuntimeError("Error while decoding JPEG images: nvjpegDecodeBatched failed: 7")

    monkeypatch.setattr(gpu_decode, "_on_gpu", lambda device: True)  # the CUDA branch, on this CPU
    monkeypatch.setattr(gpu_decode, "_decode_on_gpu", nvjpeg)
    encoded = [encode(picture(s)) for s in range(3)] + [encode(picture(3), fmt="PNG")]
    flips = torch.tensor([0, 1, 0, 1], dtype=torch.bool)
    stats = {"images": 0, "cpu_fallback": 0}  # one stage's
    with pytest.warns(UserNote, match=r"nvJPEG failed on a batch of 3 images \(.*nvjpegDecodeBatched failed: 7\); "
                                      r"decoded on the CPU instead.*decode\.cpu_fallback"):
        got = decode_batch(encoded, flips, CPU, 32, stats=stats)
    assert torch.equal(got, cpu_path(encoded, flips, 32))  # the CPU path's pixels
    assert stats == {"images": 4, "cpu_fallback": 3}  # the PNG is the CPU's by design, not a fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per stage: the second fallback is only counted
        decode_batch(encoded, flips, CPU, 32, stats=stats)
    assert stats == {"images": 8, "cpu_fallback": 6}

    def out_of_memory(tensors, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(gpu_decode, "_decode_on_gpu", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # never hidden behind the CPU decoder
        decode_batch(encoded, flips, CPU, 32, stats=stats)


def test_the_cpu_device_counts_images_and_no_fallback():
    stats = {"images": 0, "cpu_fallback": 0}
    decode_batch([encode(picture(0)), encode(picture(1))], torch.zeros(2, dtype=torch.bool), CPU, stats=stats)
    assert stats == {"images": 2, "cpu_fallback": 0}


def test_nvjpeg_writes_side_stream_memory_and_the_training_stream_waits_for_it(monkeypatch):
    """Outputs allocated with a side stream current (its pool: no queued kernel uses that memory), the training
    stream made to wait for it, every output marked as used by the training stream (its block not reused early)."""
    import contextlib

    import distill.data.gpu_decode as gpu_decode

    log, current = [], ["training"]

    class Stream:
        def __init__(self, device=None, name="side"):
            self.name = name
            if device is not None:
                log.append(("new stream", device))

        def wait_stream(self, other):
            log.append(("wait", self.name, other.name))

    training = Stream(name="training")

    @contextlib.contextmanager
    def stream(s):
        current.append(s.name)
        yield
        current.pop()

    def decode(tensors, device):
        log.append(("decode", current[-1], device))
        return [torch.zeros(3, 2, 2, dtype=torch.uint8) for _ in tensors]

    monkeypatch.setattr(gpu_decode, "_DECODE_STREAMS", {})
    monkeypatch.setattr(gpu_decode, "_decode_jpegs", decode)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: training)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: log.append(("record", s.name)))
    for _ in range(2):
        assert len(gpu_decode._decode_on_gpu([b"a", b"b"], torch.device("cuda"))) == 2
    cuda1 = torch.device("cuda", 1)
    batch = [("decode", "side", cuda1), ("wait", "training", "side"), ("record", "training"), ("record", "training")]
    assert log == [("new stream", cuda1)] + batch + batch  # one side stream per device, made once
