"""Read and write insightface verification sets (`lfw.bin`, ...) through a restricted unpickler."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np

from distill.data.images import decode_image
from distill.utils.atomic import atomic_open
from distill.utils.errors import DataFormatError, UnsafeFileError


class _NdarrayToken:
    """Stands for numpy.ndarray inside the pickle: it can be named but not called, so the file cannot
    allocate arrays of a size it chooses; array data arrives only through BUILD, bounded by the file."""


def _reconstruct(cls, shape, dtype_code):
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') followed by BUILD with its state.
    if cls is not _NdarrayToken or tuple(shape) != (0,):
        raise pickle.UnpicklingError("numpy _reconstruct called other than as numpy pickles arrays")
    return np.ndarray((0,), np.uint8)


def _dtype(spec, align=False, copy=False):
    # Only the dtypes a .bin can hold: uint8 image bytes, and bool for an issame array.
    if spec not in ("u1", "b1", b"u1", b"b1"):
        raise pickle.UnpicklingError(f"numpy dtype {spec!r} is not uint8 or bool")
    return np.dtype(spec.decode() if isinstance(spec, bytes) else spec, align, copy)


def _latin1_encode(text, encoding="latin1", errors="strict"):
    # Python 3 pickles bytes for protocol 2 as _codecs.encode(str, 'latin1'); nothing else is needed.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"codecs.encode with {type(text).__name__} and {encoding!r}")
    return text.encode("latin1")


# Every global a real .bin needs, mapped to a narrow stand-in. Anything else is refused unrun.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NdarrayToken,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        # latin1 turns Python 2 `str` images into str with one char per byte; we encode them back.
        super().__init__(file, encoding="latin1")
        self._file, self._path = file, path

    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise UnsafeFileError(
                f"{self._path}: refused to load: the pickle asks for the global '{module}.{name}' (near byte "
                f"{self._file.tell()}), which a verification set never needs and which could run code. Nothing "
                f"was executed. Get the .bin from a trusted source, or rebuild it from the images with "
                f"distill.data.write_verification_bin"
            )
        return found

    def persistent_load(self, pid):
        raise UnsafeFileError(f"{self._path}: refused to load: the pickle uses persistent ids, which a .bin never does")


def _as_bytes(item, path, index) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):  # Python 2 str read with latin1
        return item.encode("latin1")
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise DataFormatError(
        f"{path}: image {index} is a {type(item).__name__}"
        f"{f' {item.dtype} {item.shape}' if isinstance(item, np.ndarray) else ''}, not encoded image bytes "
        f"(bytes, Python 2 str or 1-D uint8 array)"
    )


def _as_bool(value, path, index) -> bool:
    if isinstance(value, (bool, np.bool_)) or (type(value) is int and value in (0, 1)):
        return bool(value)
    raise DataFormatError(f"{path}: issame[{index}] is {value!r} ({type(value).__name__}), not a bool")


def read_verification_pickle(path) -> tuple:
    """(list of encoded image bytes, list of bools) from a `.bin`, structure checked, nothing decoded."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read verification set ({err.strerror or err})") from None
    buf = io.BytesIO(data)
    try:
        obj = _RestrictedUnpickler(buf, path).load()
    except UnsafeFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, UnicodeDecodeError, MemoryError, OverflowError) as err:
        what = "truncated" if isinstance(err, EOFError) or "truncated" in str(err) else "not a valid pickle"
        raise DataFormatError(
            f"{path}: {what} ({type(err).__name__}: {str(err)[:160]}; near byte {buf.tell()} of {len(data)}). "
            f"A verification .bin is a pickle of (images, issame); re-download or rebuild the file"
        ) from None
    if buf.tell() != len(data):
        raise DataFormatError(
            f"{path}: the pickle ends at byte {buf.tell()} but the file holds {len(data)} bytes; "
            f"the file is not a single .bin (concatenated or damaged)"
        )
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        shape = f"{type(obj).__name__} of length {len(obj)}" if isinstance(obj, (tuple, list)) else type(obj).__name__
        raise DataFormatError(f"{path}: expected the 2-tuple (images, issame), found a {shape}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise DataFormatError(f"{path}: the images are a {type(bins).__name__}, not a list of encoded images")
    if not isinstance(issame, (list, tuple, np.ndarray)) or (isinstance(issame, np.ndarray) and issame.ndim != 1):
        raise DataFormatError(f"{path}: issame is a {type(issame).__name__}, not a list of bools")
    if len(bins) != 2 * len(issame):
        raise DataFormatError(
            f"{path}: {len(issame)} pairs in issame need {2 * len(issame)} images, but the file holds {len(bins)} "
            f"images; pair k is images 2k and 2k+1, so the counts must agree"
        )
    images = [_as_bytes(item, path, i) for i, item in enumerate(bins)]
    flags = [_as_bool(v, path, i) for i, v in enumerate(issame)]
    return images, flags


def load_verification_bin(path) -> tuple:
    """(images: list of H×W×3 uint8 RGB arrays, issame: bool array of N) from an insightface `.bin`.

    Reads all three styles found in the wild (Python 2 str images, Python 3 bytes, 1-D uint8
    arrays) through an unpickler that admits only what those need; any other global (as in a
    malicious file) raises UnsafeFileError before anything runs. Pair k is images 2k and 2k+1.
    """
    path = os.fspath(path)
    encoded, flags = read_verification_pickle(path)
    images = [decode_image(data, f"{path}: image {i} (pair {i // 2})") for i, data in enumerate(encoded)]
    return images, np.array(flags, dtype=bool)


def write_verification_bin(path, encoded_images, issame) -> None:
    """Write a `.bin` as insightface's tools do today: a protocol-4 pickle of (list[bytes], list[bool]).
    Pair k is images 2k and 2k+1. Writing a pickle is safe; only loading one can run code."""
    images = [bytes(b) for b in encoded_images]
    flags = [bool(s) for s in issame]
    if len(images) != 2 * len(flags):
        raise ValueError(f"{len(flags)} pairs need {2 * len(flags)} images, got {len(images)}")
    with atomic_open(path, "wb") as f:
        pickle.dump((images, flags), f, protocol=4)
