"""Packing an identity-per-folder image tree into insightface RecordIO (behind `distill data pack`)."""

from __future__ import annotations

import os

from distill.data.folders import read_file, scan_image_tree
from distill.data.images import JPEG_SOI, decode_chw, encode_jpeg
from distill.data.recordio_writer import write_insightface_rec
from distill.errors import DataFormatError


def pack_image_tree(src, out, quality: int = 95, progress: bool = False) -> dict:
    """Pack `src/<identity>/<image>` into `out/train.rec`, `train.idx`, `property` (insightface layout).

    Classes follow the sorted folder names. JPEG files are stored as they are (no re-encoding loss);
    other formats are encoded to JPEG at `quality`. Every image is decoded once to check it and its
    size: all must share one size, which `property` records.
    """
    classes, samples = scan_image_tree(src)
    # property needs the size before the first record is written: read it from the first image.
    first_hw = tuple(decode_chw(read_file(samples[0][0]), samples[0][0]).shape[1:])

    def encoded():
        from tqdm import tqdm

        for path, class_id in tqdm(samples, desc="pack", unit="img", disable=not progress):
            data = read_file(path)
            chw = decode_chw(data, path)
            hw = tuple(chw.shape[1:])
            if hw != first_hw:
                raise DataFormatError(
                    f"{path}: image is {hw[0]}x{hw[1]} but the first image was {first_hw[0]}x{first_hw[1]}; "
                    f"a packed dataset holds one image size (align and crop faces to one size first)"
                )
            if data[:2] != JPEG_SOI:
                data = encode_jpeg(chw.permute(1, 2, 0).numpy(), quality=quality)
            yield class_id, data

    n = write_insightface_rec(out, encoded(), num_classes=len(classes), image_size=first_hw)
    return {"images": n, "identities": len(classes), "image_size": first_hw, "out": os.fspath(out)}
