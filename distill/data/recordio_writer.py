"""Write insightface-layout RecordIO (`train.rec`, `train.idx`, `property`) framed exactly as MXNet does.

What MXNet's `MXIndexedRecordIO` + `recordio.pack` would write, byte for byte, so that MXNet,
arcface_torch's `MXFaceDataset` and our own reader all read the result (docs/formats.md §1).
"""

from __future__ import annotations

import os
import struct
from array import array

import numpy as np

from distill.data.recordio import IRHEADER, LENGTH_MASK, MAGIC, MAGIC_BYTES
from distill.utils.atomic import atomic_open
from distill.utils.errors import DataFormatError


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
                    raise DataFormatError(f"{out_dir}: sample {key} (class {class_id}) is not non-empty encoded "
                                          f"image bytes")
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


def _scan_records(rec_path: str):
    """Yield (offset, flag, label values, id, image length) for every record, in file order."""
    size = os.path.getsize(rec_path)
    with open(rec_path, "rb", buffering=1 << 20) as f:
        offset = 0
        while offset < size:
            start, payload_len, prefix, first = offset, 0, [], True
            while True:  # the parts of one record
                frame = f.read(8)
                if len(frame) < 8:
                    raise DataFormatError(f"{rec_path}: the file ends inside the record frame at byte {offset} "
                                          f"(truncated .rec)")
                magic, lrec = struct.unpack("<II", frame)
                if magic != MAGIC:
                    raise DataFormatError(
                        f"{rec_path}: bad magic word 0x{magic:08X} at byte {offset} (record starting at byte {start}); "
                        f"the .rec is damaged from there on and cannot be indexed past it"
                    )
                cflag, length = lrec >> 29, lrec & LENGTH_MASK
                if cflag not in ((0, 1) if first else (2, 3)):
                    raise DataFormatError(f"{rec_path}: record part at byte {offset} has cflag {cflag} out of sequence")
                if offset + 8 + length > size:
                    raise DataFormatError(
                        f"{rec_path}: the record part at byte {offset} claims {length} bytes but the file ends at "
                        f"byte {size} (truncated .rec)"
                    )
                if not first:
                    prefix.append(MAGIC_BYTES)
                    payload_len += 4
                want = max(0, min(length, 1024 - payload_len))  # enough for the header and its label floats
                prefix.append(f.read(want))
                f.seek(length - want + (-length % 4), os.SEEK_CUR)
                payload_len += length
                offset += 8 + length + (-length % 4)
                first = False
                if cflag in (0, 3):
                    break
            head = b"".join(prefix)
            if len(head) < IRHEADER.size:
                raise DataFormatError(f"{rec_path}: record at byte {start} is {payload_len} bytes, shorter than an "
                                      f"IRHeader")
            flag, label, id_, _ = IRHEADER.unpack_from(head)
            n = min(flag, (len(head) - IRHEADER.size) // 4)
            values = struct.unpack_from(f"<{n}f", head, IRHEADER.size) if flag else (label,)
            yield start, flag, values, id_, payload_len - IRHEADER.size - 4 * flag


def rebuild_index(rec_path, idx_path=None) -> tuple:
    """Scan a `.rec` and write its `.idx`; return (records, rule used to assign keys).

    The `.rec` does not store keys, so they are inferred the way the writers assigned them:
    insightface layout (a record with an array label [N+1, N+1+num_ids], no image, N image records
    and num_ids identity records): that header is key 0 and the others are 1, 2, ... in file order,
    wherever the header sits. Otherwise (im2rec): im2rec writes IRHeader.id = key, so unique ids are
    the keys; failing that, file order 0, 1, ... as MXNet's rec2idx tool does.
    """
    rec_path = os.fspath(rec_path)
    idx_path = os.fspath(idx_path) if idx_path is not None else os.path.splitext(rec_path)[0] + ".idx"
    # array('q'): 8 bytes a record, not ~60 for a list of ints (Glint360K has 17M records).
    offsets, ids, headers, n_empty = array("q"), array("Q"), [], 0
    for offset, flag, values, id_, image_len in _scan_records(rec_path):
        offsets.append(offset)
        ids.append(id_)
        n_empty += image_len == 0
        if flag >= 2 and image_len == 0:
            headers.append((len(offsets) - 1, values))
    n_images = len(offsets) - n_empty
    n_identities = n_empty - 1
    header = [
        pos for pos, v in headers if v[0] == n_images + 1 and v[1] == n_images + 1 + n_identities
    ]
    if header:
        keys, rule = [0] * len(offsets), "insightface layout: header record is key 0, the others 1.. in file order"
        k = 1
        for pos in range(len(offsets)):
            if pos != header[0]:
                keys[pos], k = k, k + 1
    elif len(np.unique(np.frombuffer(ids, dtype=np.uint64))) == len(ids):
        keys, rule = ids, "no header (im2rec layout): keys are the IRHeader ids, as im2rec writes them"
    else:
        keys = list(range(len(offsets)))
        rule = "no header, ids not unique: keys are the file order 0.., as rec2idx does"
    with atomic_open(idx_path, "w", encoding="ascii", newline="\n") as f:
        f.writelines(f"{k}\t{o}\n" for k, o in zip(keys, offsets, strict=True))
    return len(offsets), rule
