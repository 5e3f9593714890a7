"""Read MXNet RecordIO (`train.rec` + `train.idx`) in insightface and im2rec layouts, without MXNet.

Only the index lives in memory (two int64 arrays: ~16 bytes a record, ~93 MB for MS1MV2's 5.8M
images); records are read on demand with `os.pread`, so one object serves any number of DataLoader
workers: it pickles without its file handle and each process opens its own (docs/formats.md §1).
"""

from __future__ import annotations

import math
import os
import struct

import numpy as np

from distill.utils.errors import DataFormatError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_MASK = (1 << 29) - 1
# IRHeader: flag uint32, label float32, id uint64, id2 uint64 (24 bytes, little-endian as written on x86).
IRHEADER = struct.Struct("<IfQQ")
_FRAME = struct.Struct("<II")


def resolve_rec_path(path) -> tuple:
    """(train.rec, train.idx) from a dataset folder or a `.rec` file path."""
    path = os.fspath(path)
    rec = os.path.join(path, "train.rec") if os.path.isdir(path) else path
    if not os.path.isfile(rec):
        raise DataFormatError(f"{rec}: RecordIO file not found; pass a folder holding train.rec or the .rec file")
    return rec, os.path.splitext(rec)[0] + ".idx"


def _parse_idx_slow(text: bytes, idx_path: str) -> np.ndarray:
    """Line-by-line parse, only to name the first bad line when the fast parse fails."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            rows.append((int(parts[0]), int(parts[1])))
        except ValueError:
            raise DataFormatError(
                f"{idx_path}: line {lineno} is {line[:60]!r}, not '<key>\\t<byte offset>'. "
                f"Rebuild the index from the .rec with `distill data reindex --force {idx_path[:-4]}.rec`"
            ) from None
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def read_idx(idx_path: str, rec_path: str) -> tuple:
    """(keys, offsets) sorted by key, as int64 arrays. Parsed in C (~1 s for 5.8M lines)."""
    if not os.path.isfile(idx_path):
        raise DataFormatError(
            f"{idx_path}: index file missing for {rec_path}. Rebuild it by scanning the .rec: "
            f"`distill data reindex --force {rec_path}`"
        )
    with open(idx_path, "rb") as f:
        text = f.read().rstrip()
    lines = text.count(b"\n") + 1 if text else 0
    try:
        pairs = np.fromstring(text, dtype=np.int64, sep=" ").reshape(-1, 2) if text else np.zeros((0, 2), np.int64)
        if len(pairs) != lines:  # a line with one or three numbers would shift every pair after it
            raise ValueError
    except ValueError:
        pairs = _parse_idx_slow(text, idx_path)
    keys, offsets = pairs[:, 0], pairs[:, 1]
    order = np.argsort(keys, kind="stable")
    keys, offsets = np.ascontiguousarray(keys[order]), np.ascontiguousarray(offsets[order])
    dup = np.flatnonzero(keys[1:] == keys[:-1])
    if len(dup):
        raise DataFormatError(
            f"{idx_path}: key {keys[dup[0]]} appears more than once; the index is corrupt. "
            f"Rebuild it with `distill data reindex --force {rec_path}`"
        )
    size = os.path.getsize(rec_path)
    bad = np.flatnonzero((offsets < 0) | (offsets % 4 != 0) | (offsets + 8 > size))
    if len(bad):
        k = bad[0]
        raise DataFormatError(
            f"{idx_path}: key {keys[k]} points to byte offset {offsets[k]}, which is not a record start inside "
            f"{rec_path} ({size} bytes); the .rec is truncated or the index belongs to another file. "
            f"Rebuild the index with `distill data reindex --force {rec_path}` or re-copy the dataset"
        )
    return keys, offsets


class RecordIO:
    """Random access to the records of an MXNet indexed RecordIO file, by key.

    insightface layout (record 0 is a header whose label is [N+1, N+1+num_ids]): image keys are
    1..N and keys N+1.. are identity records. im2rec layout (no header): every key is an image.
    `keys` holds the image keys, sorted; `label(key)` the class id; `image(key)` the RGB pixels.
    """

    def __init__(self, path):
        self.rec_path, self.idx_path = resolve_rec_path(path)
        self._fd, self._pid = None, None
        self._idx_keys, self._idx_offsets = read_idx(self.idx_path, self.rec_path)
        self.identity_keys = None  # (first, end) key range of identity records, insightface layout only
        self._num_classes = None
        self._labels = None
        if self._has_key(0) and self._is_header_record(0):
            flag, label, _, _ = self.header(0)
            start, stop = label[0], label[1]
            finite = math.isfinite(start) and math.isfinite(stop)
            if not (finite and start == int(start) >= 1 and stop == int(stop) >= start):
                raise DataFormatError(
                    f"{self.rec_path}: header record 0 at byte {self.offset(0)} has label {list(label)}, "
                    f"not [N+1, N+1+num_ids] with 1 <= N+1 <= N+1+num_ids; the file is corrupt"
                )
            self.identity_keys = (int(start), int(stop))
            self._num_classes = int(stop) - int(start)
            self.keys = np.arange(1, int(start), dtype=np.int64)
            missing = self.keys[~self._has_keys(self.keys)]
            if len(missing):
                raise DataFormatError(
                    f"{self.idx_path}: header record 0 says images are keys 1..{int(start) - 1}, but key "
                    f"{missing[0]} is not in the index ({len(missing)} missing). Rebuild the index with "
                    f"`distill data reindex --force {self.rec_path}`"
                )
        else:
            self.keys = self._idx_keys.copy()
            self._num_classes = self._property_num_classes()

    # ---- index -------------------------------------------------------------------------------

    def _has_keys(self, keys: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(self._idx_keys, keys), len(self._idx_keys) - 1)
        return self._idx_keys[pos] == keys if len(self._idx_keys) else np.zeros(len(keys), bool)

    def _has_key(self, key: int) -> bool:
        return bool(self._has_keys(np.array([key], dtype=np.int64))[0])

    def offset(self, key) -> int:
        """Byte offset of a record in the .rec (from the index); KeyError if the key is not indexed."""
        pos = int(np.searchsorted(self._idx_keys, key))
        if pos == len(self._idx_keys) or self._idx_keys[pos] != key:
            raise KeyError(f"key {key} is not in {self.idx_path}")
        return int(self._idx_offsets[pos])

    def _property_num_classes(self):
        prop = os.path.join(os.path.dirname(self.rec_path), "property")
        try:
            with open(prop, encoding="ascii") as f:
                return int(f.read().split(",")[0])
        except (OSError, ValueError, UnicodeDecodeError):
            return None  # optional file; labels decide then

    # ---- raw records -------------------------------------------------------------------------

    def _file(self) -> int:
        # One descriptor per process: a descriptor inherited through fork shares nothing harmful with
        # pread (no file position), but a pickled object arriving in a spawned worker has none at all.
        if self._pid != os.getpid():
            self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._pid = os.getpid()
        return self._fd

    def _pread(self, n: int, offset: int) -> bytes:
        if hasattr(os, "pread"):
            return os.pread(self._file(), n, offset)
        os.lseek(self._file(), offset, os.SEEK_SET)  # pragma: no cover - Windows
        return os.read(self._file(), n)

    def read_payload(self, key, limit=None) -> bytes:
        """The record's payload, split parts joined with the magic word put back between them.
        With `limit`, stop once that many bytes are read (enough for a header)."""
        offset = start = self.offset(key)
        parts, total = [], 0
        while True:
            frame = self._pread(8, offset)
            if len(frame) < 8:
                raise self._corrupt(key, start, offset, "the file ends inside a record frame (truncated .rec)")
            magic, lrec = _FRAME.unpack(frame)
            if magic != MAGIC:
                raise self._corrupt(key, start, offset, f"expected the magic word 0x{MAGIC:08X}, found 0x{magic:08X}")
            cflag, length = lrec >> 29, lrec & LENGTH_MASK
            if cflag not in ((0, 1) if offset == start else (2, 3)):
                where = "starts a record" if offset == start else "continues a split record"
                raise self._corrupt(key, start, offset, f"a part with cflag {cflag} where the index {where}")
            want = length if limit is None else min(length, limit - total)
            data = self._pread(want, offset + 8)
            if len(data) < want:
                raise self._corrupt(key, start, offset,
                                    f"the part claims {length} bytes but the file ends first (truncated .rec)")
            parts.append(data)
            total += len(data)
            if cflag in (0, 3) or (limit is not None and total >= limit):
                break
            parts.append(MAGIC_BYTES)
            total += 4
            offset += 8 + length + (-length % 4)
        return b"".join(parts)

    def _corrupt(self, key, start, offset, what) -> DataFormatError:
        return DataFormatError(
            f"{self.rec_path}: key {key} (record at byte {start}): at byte {offset}, {what}. "
            f"The .rec is damaged or {self.idx_path} does not belong to it; re-copy the dataset or rebuild the "
            f"index with `distill data reindex --force {self.rec_path}`"
        )

    def _parse_header(self, key, payload: bytes) -> tuple:
        if len(payload) < IRHEADER.size:
            raise DataFormatError(
                f"{self.rec_path}: key {key} (record at byte {self.offset(key)}) is {len(payload)} bytes, "
                f"shorter than the 24-byte IRHeader; the file is corrupt"
            )
        flag, label, id_, id2 = IRHEADER.unpack_from(payload)
        if flag > 0:
            if len(payload) < IRHEADER.size + 4 * flag:
                raise DataFormatError(
                    f"{self.rec_path}: key {key} (record at byte {self.offset(key)}): IRHeader flag {flag} "
                    f"announces {flag} label floats but the record holds {len(payload) - 24} bytes after the header"
                )
            label = struct.unpack_from(f"<{flag}f", payload, IRHEADER.size)
        return flag, label, id_, id2

    def header(self, key) -> tuple:
        """(flag, label, id, id2): label is a float (flag 0) or a tuple of `flag` floats."""
        payload = self.read_payload(key, limit=IRHEADER.size)
        flag = IRHEADER.unpack_from(payload)[0] if len(payload) >= IRHEADER.size else 0
        if flag > 0:  # the label floats follow the fixed header
            payload = self.read_payload(key, limit=IRHEADER.size + 4 * flag)
        return self._parse_header(key, payload)

    def _is_header_record(self, key) -> bool:
        # A header has an array label and no image; an im2rec image with an array label ([class, aligned])
        # has flag > 0 too, so the empty image is what tells them apart.
        flag = self.header(key)[0]
        return flag >= 2 and len(self.read_payload(key, limit=IRHEADER.size + 4 * flag + 1)) == IRHEADER.size + 4 * flag

    def record(self, key) -> tuple:
        """(header, encoded image bytes) of one record, read in one pass."""
        payload = self.read_payload(key)
        head = self._parse_header(key, payload)
        return head, payload[IRHEADER.size + 4 * head[0]:]

    # ---- images and labels -------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """From header record 0, else the `property` file, else the largest label + 1 (one pass)."""
        if self._num_classes is None:
            labels = self.labels()
            self._num_classes = int(labels.max()) + 1 if len(labels) else 0
        return self._num_classes

    def class_of(self, key, head) -> int:
        """The class id in an image's IRHeader (element 0 of an array label), checked."""
        flag, label = head[0], head[1]
        value = label[0] if flag > 0 else label
        nc = self._num_classes
        if not math.isfinite(value) or value != int(value) or value < 0 or (nc is not None and value >= nc):
            bound = f"the header's identity range 0..{nc - 1}" if nc is not None else "0 or more"
            raise DataFormatError(
                f"{self.rec_path}: key {key} (record at byte {self.offset(key)}) has label {value}, "
                f"not an integer class id in {bound}; the labels do not match the dataset header"
            )
        return int(value)

    def label(self, key) -> int:
        return self.class_of(key, self.header(key))

    def image(self, key) -> np.ndarray:
        """H×W×3 uint8 RGB pixels of an image record."""
        from distill.data.images import decode_image

        _, data = self.record(key)
        return decode_image(data, f"{self.rec_path}: key {key} (record at byte {self.offset(key)})")

    def identity_range(self, class_id: int) -> tuple:
        """[first_key, end_key) of one identity's images, from its identity record (insightface layout)."""
        if self.identity_keys is None:
            raise DataFormatError(f"{self.rec_path}: no header record 0, so no identity records (im2rec layout)")
        flag, label, _, _ = self.header(self.identity_keys[0] + int(class_id))
        if flag < 2:
            raise DataFormatError(f"{self.rec_path}: identity record for class {class_id} has no [first, end) label")
        return int(label[0]), int(label[1])

    def labels(self) -> np.ndarray:
        """Class id of every image key (aligned with `keys`), cached. One header read per identity in
        insightface layout (85k reads for MS1MV2, not 5.8M); otherwise one header read per image."""
        if self._labels is None:
            labels = np.full(len(self.keys), -1, dtype=np.int64)
            if self.identity_keys is not None:
                n = len(self.keys)
                for c in range(self._num_classes):
                    first, end = self.identity_range(c)
                    if not 1 <= first <= end <= n + 1:
                        raise DataFormatError(
                            f"{self.rec_path}: identity record of class {c} (key {self.identity_keys[0] + c}) has "
                            f"range [{first}, {end}), outside the image keys 1..{n}; the file is corrupt"
                        )
                    labels[first - 1 : end - 1] = c
                if (labels < 0).any():
                    key = int(self.keys[np.flatnonzero(labels < 0)[0]])
                    raise DataFormatError(
                        f"{self.rec_path}: image key {key} lies in no identity record's [first, end) range; "
                        f"the identity records do not cover the images"
                    )
            else:
                for i, key in enumerate(self.keys):
                    labels[i] = self.label(int(key))
            self._labels = labels
        return self._labels

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        layout = "insightface" if self.identity_keys is not None else "im2rec"
        return f"RecordIO({self.rec_path!r}, {len(self)} images, {layout} layout)"

    # ---- processes ---------------------------------------------------------------------------

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"], state["_pid"] = None, None  # each process opens its own
        return state

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._pid = None, None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
