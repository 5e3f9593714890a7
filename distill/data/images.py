"""Decode encoded face images to RGB arrays, encode JPEG, and turn images into normalised tensors."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from distill.utils.errors import DataFormatError

# Decoder choice. JPEG goes through torchvision.io.decode_jpeg, everything else through PIL: on the
# fixture JPEGs decode_jpeg as called here is about 2x PIL (docs/measurements.md). Both link libjpeg-turbo
# with the same default IDCT and upsampling, so both give pixels SHA-1-identical to OpenCV's (the fixtures'
# truth): the choice changes speed, never pixels.
# torchvision 0.29 marks its image codecs deprecated in favour of torchcodec (not a dependency);
# decode_jpeg exists in every torchvision setup.cfg admits, and without it we fall back to PIL
# with identical output. Its per-call DeprecationWarning is silenced locally (a module-level
# filter does not survive test runners that reset filters).
try:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _tv_decode_jpeg
except ImportError:  # pragma: no cover - depends on the installed torchvision
    _tv_decode_jpeg = None


def _decode_torchvision(data: bytes) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # bytearray: torch.frombuffer needs a writable buffer (it warns on bytes).
        return _tv_decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


JPEG_SOI = b"\xff\xd8"


def _decode_pil(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    if im.mode != "RGB":  # grey, CMYK, palette, RGBA: the training data is RGB
        im = im.convert("RGB")
    return np.array(im)  # a writable copy: torch.from_numpy warns on PIL's read-only view


def decode_chw(data, where: str) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor 3xHxW, RGB. `where` names the file and key for errors."""
    if not isinstance(data, bytes):
        data = bytes(data)
    if not data:
        raise DataFormatError(f"{where}: empty image (0 bytes); the record holds no encoded image")
    try:
        if _tv_decode_jpeg is not None and data[:2] == JPEG_SOI:
            return _decode_torchvision(data)
        return torch.from_numpy(_decode_pil(data)).permute(2, 0, 1)
    except (RuntimeError, OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        head = data[:8].hex(" ")
        reason = str(err).strip().splitlines()[-1][:160] if str(err).strip() else type(err).__name__
        raise DataFormatError(
            f"{where}: cannot decode image ({len(data)} bytes starting {head}): {reason}. "
            f"The file is corrupt or the record is not an encoded image; re-pack it from the source images"
        ) from None


def decode_image(data, where: str) -> np.ndarray:
    """Encoded image bytes -> H×W×3 uint8 RGB numpy array (C-contiguous)."""
    return np.ascontiguousarray(decode_chw(data, where).permute(1, 2, 0).numpy())


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """H×W×3 uint8 RGB -> JPEG bytes (PIL, 4:2:0 like OpenCV's default)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8), "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def to_input_tensor(chw_uint8: torch.Tensor, flip: bool = False, input_size=None) -> torch.Tensor:
    """uint8 3xHxW -> float32 3xHxW normalised (x/255 - 0.5)/0.5 as arcface_torch does.

    `flip` mirrors left-right. `input_size` (int or (H, W)) resizes with bicubic interpolation
    when the image differs from it; None keeps the stored size.
    """
    x = chw_uint8.float()
    if input_size is not None:
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
            x = x.clamp_(0, 255)
    if flip:
        x = x.flip(-1)
    return x.div_(255).sub_(0.5).div_(0.5).contiguous()
