"""Write insightface-layout RecordIO (`train.rec`, `train.idx`, `property`) framed exactly as MXNet does.

What MXNet's `MXIndexedRecordIO` + `recordio.pack` would write, byte for byte, so that MXNet,
arcface_torch's `MXFaceDataset` and our own reader all read the result (FORMATS.md §1).
"""

from __future__ import annotations

import os
import struct

from distill.data.recordio import IRHEADER, LENGTH_MASK, MAGIC, MAGIC_BYTES
from distill.errors import DataFormatError


def pack_payload(flag: int, label, id_: int, id2: int = 0, image: bytes = b"") -> bytes:
    """An image record as `recordio.pack` builds it: scalar label in the header (flag 0), or
    flag = len(label) with the float32 values after the header and the header label field 0."""
    if flag == 0:
        return IRHEADER.pack(0, float(label), id_, id2) + image
    values = [float(v) for v in label]
    if len(values) != flag:
        raise ValueError(f"flag {flag} needs {flag} label values, got {len(values)}")
    return IRHEADER.pack(flag, 0.0, id_, id2) + struct.pack(f"<{flag}f", *values) + image


def frame_record(payload: bytes) -> bytes:
    """The bytes dmlc-core's RecordIOWriter::WriteRecord emits for one payload.

    The reader finds records by the magic word, so wherever the magic word sits at a 4-byte
    aligned offset inside the payload the writer cuts the payload there and drops those 4 bytes
    (cflag 1 first part, 2 middle, 3 last); the reader puts them back. Parts between cuts are
    multiples of 4 long, so only the last part is padded.
    """
    length = len(payload)
    if length >= 1 << 29:
        raise ValueError(f"a RecordIO record must be shorter than 2**29 bytes, got {length}")
    out = []
    start = 0
    # Only aligned positions whose 4 bytes are whole inside the payload count (MXNet: i < lower_align).
    pos = payload.find(MAGIC_BYTES)
    while pos != -1 and pos + 4 <= length:
        if pos % 4 == 0:
            cflag = 1 if start == 0 else 2
            out.append(struct.pack("<II", MAGIC, (cflag << 29) | (pos - start)))
            out.append(payload[start:pos])
            start = pos + 4
            pos = payload.find(MAGIC_BYTES, start)
        else:
            pos = payload.find(MAGIC_BYTES, pos + 1)
    cflag = 3 if start else 0
    out.append(struct.pack("<II", MAGIC, (cflag << 29) | (length - start)))
    out.append(payload[start:])
    out.append(b"\0" * (-length % 4))
    return b"".join(out)


class RecordWriter:
    """Appends framed records to a `.rec` and `<key>\\t<offset>` lines to its `.idx`, in write order."""

    def __init__(self, rec_path, idx_path):
        self.rec_path, self.idx_path = os.fspath(rec_path), os.fspath(idx_path)
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", encoding="ascii", newline="\n")
        self._pos = 0

    def write(self, key: int, payload: bytes) -> None:
        data = frame_record(payload)
        self._idx.write(f"{int(key)}\t{self._pos}\n")
        self._rec.write(data)
        self._pos += len(data)

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _image_hw(image_size) -> tuple:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def write_insightface_rec(out_dir, samples, num_classes: int, image_size) -> int:
    """Write `train.rec`, `train.idx` and `property` in insightface layout; return the image count.

    `samples` yields `(class_id, encoded_image_bytes)` sorted by class id (streamed: nothing is held
    in memory). Images become keys 1..N (flag 0, scalar float label, id = key), then one identity
    record per class with label [first_key, end_key) (empty image), then the header record 0 with
    label [N+1, N+1+num_classes], written last as insightface's tools do. `image_size` is an int or
    (H, W), recorded in `property`. The files appear only when complete (written under a temporary
    name, then renamed), so an interrupted pack never leaves a valid-looking dataset.
    """
    out_dir = os.fspath(out_dir)
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    h, w = _image_hw(image_size)
    os.makedirs(out_dir, exist_ok=True)
    rec_path, idx_path = os.path.join(out_dir, "train.rec"), os.path.join(out_dir, "train.idx")
    tmp_rec, tmp_idx = rec_path + ".partial", idx_path + ".partial"
    # first_key[c] = key of class c's first image; classes without images get an empty range.
    first_key = [None] * num_classes
    key = 0
    try:
        with RecordWriter(tmp_rec, tmp_idx) as writer:
            previous = -1
            for class_id, image in samples:
                if int(class_id) != class_id or not 0 <= class_id < num_classes:
                    raise DataFormatError(
                        f"{out_dir}: sample {key} has class id {class_id!r}, outside 0..{num_classes - 1}; "
                        f"pass num_classes covering every class"
                    )
                class_id = int(class_id)
                if class_id < previous:
                    raise DataFormatError(
                        f"{out_dir}: sample {key} has class id {class_id} after class {previous}; "
                        f"samples must be sorted by class id (each identity's images contiguous)"
                    )
                if not isinstance(image, (bytes, bytearray, memoryview)) or len(image) == 0:
                    raise DataFormatError(f"{out_dir}: sample {key} (class {class_id}) is not non-empty encoded image bytes")
                key += 1
                if first_key[class_id] is None:
                    first_key[class_id] = key
                previous = class_id
                writer.write(key, pack_payload(0, float(class_id), key, 0, bytes(image)))
            num_images = key
            # Identity ranges: a class without images starts where the next class starts.
            end = num_images + 1
            ranges = [None] * num_classes
            for c in range(num_classes - 1, -1, -1):
                start = first_key[c] if first_key[c] is not None else end
                ranges[c] = (start, end)
                end = start
            for c, (start, stop) in enumerate(ranges):
                id_key = num_images + 1 + c
                writer.write(id_key, pack_payload(2, (start, stop), id_key, 0))
            writer.write(0, pack_payload(2, (num_images + 1, num_images + 1 + num_classes), 0, 0))
        os.replace(tmp_rec, rec_path)
        os.replace(tmp_idx, idx_path)
    except BaseException:
        for tmp in (tmp_rec, tmp_idx):
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    with open(os.path.join(out_dir, "property"), "w", encoding="ascii") as f:
        f.write(f"{num_classes},{h},{w}")
    return num_images
