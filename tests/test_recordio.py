"""RecordIO: the MXNet-written fixtures read exactly, the writer round-trips and frames like MXNet, bad files fail
clearly."""

import hashlib
import io
import json
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from distill.cli import main as distill_main
from distill.data import RecordIO, RecordIODataset, rebuild_index, write_insightface_rec
from distill.data.images import encode_jpeg
from distill.data.recordio import MAGIC, MAGIC_BYTES
from distill.data.recordio_writer import RecordWriter, frame_record, pack_payload
from distill.utils.errors import DataFormatError


def sha1(a):
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.fixture
def rec_dir(fixtures):
    return fixtures / "insightface_rec"


@pytest.fixture
def truth(rec_dir):
    return json.loads((rec_dir / "truth.json").read_text())


@pytest.fixture
def rec_copy(rec_dir, tmp_path):
    """A writable copy of the insightface fixture (the fixtures themselves are never modified)."""
    out = tmp_path / "rec"
    out.mkdir()
    for name in ("train.rec", "train.idx", "property"):
        shutil.copy(rec_dir / name, out / name)
    return out


def jpeg(seed, size=32):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * 7 + seed * 13, y * 5 + seed * 29, (x + y) * 3], -1) % 256
    img = (img + rng.integers(0, 20, img.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ---- the MXNet-written fixtures -------------------------------------------------------------

def test_insightface_fixture_every_key_label_and_pixels_match_truth(rec_dir, truth):
    rec = RecordIO(rec_dir)
    assert len(rec) == truth["num_images"] == 24
    assert rec.keys.tolist() == [e["key"] for e in truth["images"]] == list(range(1, 25))
    assert rec.num_classes == truth["num_classes"] == 6
    for e in truth["images"]:
        assert rec.label(e["key"]) == e["label"]
        img = rec.image(e["key"])
        assert img.shape == (112, 112, 3) and img.dtype == np.uint8
        # Our decoder is libjpeg-turbo like OpenCV's: pixels are bit-identical, not just close.
        assert sha1(img) == e["rgb_sha1"], f"key {e['key']}"
        assert img.mean() == pytest.approx(e["rgb_mean"], abs=1e-9)
    assert rec.labels().tolist() == [e["label"] for e in truth["images"]]


def test_im2rec_fixture_every_key_label_and_pixels_match_truth(rec_dir, truth):
    rec = RecordIO(rec_dir / "im2rec" / "train.rec")  # the .rec path, no header record, no property
    assert rec.identity_keys is None
    assert rec.keys.tolist() == [e["key"] for e in truth["im2rec_images"]] == list(range(24))
    for e in truth["im2rec_images"]:
        assert rec.label(e["key"]) == e["label"]
        assert sha1(rec.image(e["key"])) == e["rgb_sha1"], f"key {e['key']}"
    assert rec.num_classes == 6  # from the labels, as there is no header or property file


def test_header_and_identity_records(rec_dir, truth):
    rec = RecordIO(rec_dir)
    flag, label, _, _ = rec.header(0)
    assert flag == 2 and label == (25.0, 31.0)
    assert rec.identity_keys == (25, 31)
    # Array labels [class, 1.0] (flag 2) and scalar labels (flag 0) alternate in this fixture.
    assert rec.header(1)[:2] == (2, (0.0, 1.0))
    assert rec.header(2)[:2] == (0, 0.0)
    labels = [e["label"] for e in truth["images"]]
    for c in range(6):
        first, end = rec.identity_range(c)
        assert [k for k, lab in zip(range(1, 25), labels, strict=True) if lab == c] == list(range(first, end))
    with pytest.raises(KeyError):
        rec.image(99)


# ---- framing and the writer -----------------------------------------------------------------

def test_writer_reframes_the_mxnet_fixture_byte_for_byte(rec_dir, tmp_path):
    src = RecordIO(rec_dir)
    order = [int(line.split()[0]) for line in (rec_dir / "train.idx").read_text().splitlines()]
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for key in order:
            w.write(key, src.read_payload(key))
    assert (tmp_path / "train.rec").read_bytes() == (rec_dir / "train.rec").read_bytes()
    assert (tmp_path / "train.idx").read_text() == (rec_dir / "train.idx").read_text()


def test_frame_record_splits_at_aligned_magic_words_like_dmlc():

    def frame(cflag, n):
        return struct.pack("<II", MAGIC, (cflag << 29) | n)

    # Magic at aligned offsets 4 and 8 (back to back) and at unaligned offset 14: two cuts.
    payload = b"abcd" + MAGIC_BYTES + MAGIC_BYTES + b"xy" + MAGIC_BYTES + b"z"
    expected = frame(1, 4) + b"abcd" + frame(2, 0) + frame(3, 7) + b"xy" + MAGIC_BYTES + b"z" + b"\0"
    assert frame_record(payload) == expected
    assert frame_record(b"hello") == frame(0, 5) + b"hello" + b"\0\0\0"
    assert frame_record(MAGIC_BYTES) == frame(1, 0) + frame(3, 0)


def test_write_insightface_rec_round_trip_with_split_records(tmp_path):
    images = [jpeg(i) for i in range(7)]
    # Raw payloads with the magic word at aligned and unaligned offsets (the image starts at byte 24).
    images[2] = images[2] + b"\0" * (-len(images[2]) % 4) + MAGIC_BYTES + b"tail" + MAGIC_BYTES
    images[4] = MAGIC_BYTES * 3 + b"q" + MAGIC_BYTES + b"rest"
    classes = [0, 0, 0, 2, 2, 3, 3]  # class 1 has no images: an empty identity range
    n = write_insightface_rec(tmp_path, zip(classes, images, strict=True), num_classes=4, image_size=(32, 32))
    assert n == 7
    assert (tmp_path / "property").read_text() == "4,32,32"
    raw = (tmp_path / "train.rec").read_bytes()
    cflags = set()
    off = 0
    while off < len(raw):
        magic, lrec = struct.unpack_from("<II", raw, off)
        assert magic == MAGIC
        cflags.add(lrec >> 29)
        off += 8 + (lrec & (2**29 - 1)) + (-(lrec & (2**29 - 1)) % 4)
    assert cflags == {0, 1, 2, 3}, "the payloads must have exercised split records"
    rec = RecordIO(tmp_path)
    assert rec.keys.tolist() == list(range(1, 8)) and rec.num_classes == 4
    assert rec.header(0)[1] == (8.0, 12.0)
    assert [rec.identity_range(c) for c in range(4)] == [(1, 4), (4, 4), (4, 6), (6, 8)]
    for key, (c, data) in enumerate(zip(classes, images, strict=True), 1):
        head, got = rec.record(key)
        assert got == data and rec.label(key) == c and head[0] == 0
    assert rec.labels().tolist() == classes
    assert sha1(rec.image(1)) == sha1(np.asarray(Image.open(io.BytesIO(images[0])).convert("RGB")))
    # The idx lists keys in write order: images, identities, then the header.
    order = [int(line.split()[0]) for line in (tmp_path / "train.idx").read_text().splitlines()]
    assert order == list(range(1, 12)) + [0]


def test_write_insightface_rec_rejects_unsorted_classes_and_leaves_no_files(tmp_path):
    with pytest.raises(DataFormatError, match="sorted by class id"):
        write_insightface_rec(tmp_path, [(1, jpeg(0)), (0, jpeg(1))], num_classes=2, image_size=32)
    assert not list(tmp_path.iterdir())
    with pytest.raises(DataFormatError, match="outside 0..1"):
        write_insightface_rec(tmp_path, [(2, jpeg(0))], num_classes=2, image_size=32)


def make_tree(root, classes):
    for name, kinds in classes.items():
        (root / name).mkdir(parents=True)
        for i, kind in enumerate(kinds):
            data = jpeg(sum(map(ord, name)) + 17 * i)  # deterministic: str hash() is salted per process
            if kind == "png":
                buf = io.BytesIO()
                Image.open(io.BytesIO(data)).save(buf, format="PNG")
                data = buf.getvalue()
            (root / name / f"{i:03d}.{kind}").write_bytes(data)


def test_pack_command_round_trip(tmp_path, capsys):
    src, out = tmp_path / "faces", tmp_path / "packed"
    make_tree(src, {"zoe": ["jpg", "png"], "adam": ["jpg", "jpg", "jpg"], "mia": ["png"]})
    assert distill_main(["data", "pack", str(src), str(out)]) == 0
    assert "6 images of 3 identities" in capsys.readouterr().out
    assert (out / "property").read_text() == "3,32,32"
    rec = RecordIO(out)
    files = [("adam", 0), ("adam", 1), ("adam", 2), ("mia", 0), ("zoe", 0), ("zoe", 1)]
    for key, (name, i) in enumerate(files, 1):
        path = next((src / name).glob(f"{i:03d}.*"))
        head, data = rec.record(key)
        assert rec.label(key) == ["adam", "mia", "zoe"].index(name)
        if path.suffix == ".jpg":
            assert data == path.read_bytes()  # JPEGs are stored untouched
        else:  # PNGs become JPEG at quality 95: close to the source pixels, not identical
            source = np.asarray(Image.open(path).convert("RGB"))
            assert data == encode_jpeg(source, quality=95)
            assert np.abs(rec.image(key).astype(int) - source.astype(int)).mean() < 6
    # Packing again into the same folder needs --force.
    assert distill_main(["data", "pack", str(src), str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_pack_rejects_mixed_image_sizes(tmp_path):
    src = tmp_path / "faces"
    make_tree(src, {"a": ["jpg"]})
    Image.new("RGB", (40, 40)).save(src / "a" / "big.jpg")
    with pytest.raises(DataFormatError, match=r"big\.jpg: image is 40x40 but the first image was 32x32"):
        from distill.data.pack import pack_image_tree
        pack_image_tree(src, tmp_path / "out")


# ---- the torch Dataset ----------------------------------------------------------------------

def test_dataset_items_normalised_flipped_and_reproducible(rec_dir):
    ds = RecordIODataset(rec_dir, flip=True)
    assert len(ds) == 24 and ds.num_classes == 6
    raw = torch.from_numpy(RecordIO(rec_dir).image(5)).permute(2, 0, 1).float()
    expected = (raw / 255 - 0.5) / 0.5
    assert torch.equal(ds.get(4, False), expected)  # index 4 is key 5
    assert torch.equal(ds.get(4, True), expected.flip(-1))
    torch.manual_seed(0)
    items = [ds[i] for i in range(24)]
    torch.manual_seed(0)
    again = [ds[i] for i in range(24)]
    flips = [it[3] for it in items]
    assert flips == [it[3] for it in again] and 0 < sum(flips) < 24
    for i, (img, label, index, flipped) in enumerate(items):
        assert index == i and label == RecordIO(rec_dir).label(i + 1)
        assert img.dtype == torch.float32 and img.shape == (3, 112, 112)
        assert torch.equal(img, ds.get(i, flipped))
    assert not any(RecordIODataset(rec_dir, flip=False)[i][3] for i in range(24))
    assert RecordIODataset(rec_dir, input_size=56).get(0, False).shape == (3, 56, 56)


def test_reader_pickles_without_its_file_handle_and_works_in_dataloader_workers(rec_dir):
    rec = RecordIO(rec_dir)
    rec.image(1)  # opens the handle in this process
    clone = pickle.loads(pickle.dumps(rec))
    assert clone._fd is None and sha1(clone.image(3)) == sha1(rec.image(3))
    ds = RecordIODataset(rec_dir)

    def run():
        loader = torch.utils.data.DataLoader(ds, batch_size=6, num_workers=2,
                                             generator=torch.Generator().manual_seed(7))
        return [(b[1].tolist(), b[2].tolist(), b[3].tolist(), b[0]) for b in loader]

    first, second = run(), run()
    assert [b[1] for b in first] == [list(range(i, i + 6)) for i in range(0, 24, 6)]
    assert [b[0] for b in first] == [RecordIO(rec_dir).labels()[i:i + 6].tolist() for i in range(0, 24, 6)]
    for a, b in zip(first, second, strict=True):  # same generator seed -> same flips in the workers
        assert a[2] == b[2] and torch.equal(a[3], b[3])


# ---- bad input ------------------------------------------------------------------------------

def test_missing_idx_says_reindex_and_reindex_rebuilds_it(rec_copy, rec_dir, capsys):
    (rec_copy / "train.idx").unlink()
    with pytest.raises(DataFormatError, match=r"distill data reindex .*train\.rec") as err:
        RecordIO(rec_copy)
    assert "train.idx" in str(err.value)
    assert distill_main(["data", "reindex", str(rec_copy)]) == 0
    assert "31 records" in capsys.readouterr().out
    assert (rec_copy / "train.idx").read_text() == (rec_dir / "train.idx").read_text()
    assert RecordIO(rec_copy).labels().tolist() == RecordIO(rec_dir).labels().tolist()
    assert distill_main(["data", "reindex", str(rec_copy)]) == 2  # exists: needs --force


def test_reindex_im2rec_uses_the_record_ids(rec_dir, tmp_path):
    shutil.copy(rec_dir / "im2rec" / "train.rec", tmp_path / "train.rec")
    n, rule = rebuild_index(tmp_path / "train.rec")
    assert n == 24 and "im2rec" in rule
    assert (tmp_path / "train.idx").read_text() == (rec_dir / "im2rec" / "train.idx").read_text()


def test_truncated_rec(rec_copy, rec_dir, tmp_path):
    data = (rec_copy / "train.rec").read_bytes()
    (rec_copy / "train.rec").write_bytes(data[:56000])  # cuts key 24; identity and header records are gone
    with pytest.raises(DataFormatError, match=r"key 0 points to byte offset 56412.*truncated") as err:
        RecordIO(rec_copy)
    assert str(rec_copy / "train.rec") in str(err.value)
    # im2rec has no trailing records, so the index loads and the cut record fails when read.
    im2 = tmp_path / "im2"
    im2.mkdir()
    shutil.copy(rec_dir / "im2rec" / "train.idx", im2 / "train.idx")
    raw = (rec_dir / "im2rec" / "train.rec").read_bytes()
    (im2 / "train.rec").write_bytes(raw[: len(raw) - 1000])
    rec = RecordIO(im2)
    assert rec.label(22) == 5
    last = rec.offset(23)
    with pytest.raises(DataFormatError, match=rf"key 23 \(record at byte {last}\).*truncated"):
        rec.image(23)
    with pytest.raises(DataFormatError, match="truncated"):
        rebuild_index(im2 / "train.rec", tmp_path / "x.idx")


def test_bad_magic_at_an_offset(rec_copy):
    raw = bytearray((rec_copy / "train.rec").read_bytes())
    raw[9668:9672] = b"\xde\xad\xbe\xef"  # key 5's frame
    (rec_copy / "train.rec").write_bytes(bytes(raw))
    rec = RecordIO(rec_copy)
    with pytest.raises(DataFormatError, match=r"train\.rec: key 5 \(record at byte 9668\).*0xEFBEADDE"):
        rec.image(5)
    assert rec.label(6) == 1  # the rest of the file is still readable
    with pytest.raises(DataFormatError, match="bad magic word 0xEFBEADDE at byte 9668"):
        rebuild_index(rec_copy / "train.rec", rec_copy / "other.idx")


def test_idx_pointing_past_the_end_or_malformed(rec_copy):
    idx = rec_copy / "train.idx"
    lines = idx.read_text().splitlines()
    lines[2] = "3\t1000000000"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"train\.idx: key 3 points to byte offset 1000000000.*reindex"):
        RecordIO(rec_copy)
    lines[2] = "3\t48x60"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"train\.idx: line 3 is b'3\\t48x60'"):
        RecordIO(rec_copy)
    lines[2] = "2\t2620"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match="key 2 appears more than once"):
        RecordIO(rec_copy)


def write_raw_insightface(path, labels, num_classes, images=None):
    """insightface layout written record by record, so labels can disagree with the header."""
    with RecordWriter(path / "train.rec", path / "train.idx") as w:
        for key, label in enumerate(labels, 1):
            w.write(key, pack_payload(0, label, key, 0, images[key - 1] if images else jpeg(key)))
        n = len(labels)
        for c in range(num_classes):
            w.write(n + 1 + c, pack_payload(2, (1, n + 1) if c == 0 else (n + 1, n + 1), 0))
        w.write(0, pack_payload(2, (n + 1, n + 1 + num_classes), 0))


def test_label_outside_the_header_identity_range(tmp_path):
    write_raw_insightface(tmp_path, [0.0, 1.0, 7.0, 2.5], num_classes=2)
    rec = RecordIO(tmp_path)
    assert rec.label(2) == 1
    off = rec.offset(3)
    with pytest.raises(DataFormatError,
                       match=rf"train\.rec: key 3 \(record at byte {off}\) has label 7\.0.*range 0\.\.1"):
        rec.label(3)
    with pytest.raises(DataFormatError, match=r"key 4 .* has label 2\.5"):
        rec.label(4)
    with pytest.raises(DataFormatError, match="key 3"):
        RecordIODataset(tmp_path)[2]


def test_undecodable_image(tmp_path):
    write_raw_insightface(tmp_path, [0.0, 1.0], 2, images=[jpeg(1), b"\xff\xd8\xff\xe0 not really a jpeg"])
    rec = RecordIO(tmp_path)
    assert rec.image(1).shape == (32, 32, 3)
    off = rec.offset(2)
    with pytest.raises(DataFormatError, match=rf"train\.rec: key 2 \(record at byte {off}\): cannot decode image"):
        rec.image(2)
    with pytest.raises(DataFormatError, match=rf"key 2 \(record at byte {off}\): cannot decode"):
        RecordIODataset(tmp_path).get(1, False)


def test_index_pointing_into_a_split_record_is_refused(tmp_path):
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(0, pack_payload(0, 0.0, 0, 0, b"\xff\xd8" + b"\0\0" + MAGIC_BYTES + b"rest"))
    (tmp_path / "train.idx").write_text("0\t0\n1\t36\n")  # 36: the second part (cflag 3)
    rec = RecordIO(tmp_path)
    assert rec.record(0)[1] == b"\xff\xd8" + b"\0\0" + MAGIC_BYTES + b"rest"
    with pytest.raises(DataFormatError, match=r"key 1 \(record at byte 36\).*cflag 3"):
        rec.header(1)
