"""`distill data pack` (image tree -> insightface RecordIO) and `distill data reindex` (rebuild a .idx)."""

from __future__ import annotations

import os

from distill.data.folders import read_file, scan_image_tree
from distill.data.images import JPEG_SOI, decode_chw, encode_jpeg
from distill.data.recordio_writer import rebuild_index, write_insightface_rec
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


def _cmd_pack(args) -> int:
    out = args.out
    if os.path.exists(os.path.join(out, "train.rec")) and not args.force:
        raise DataFormatError(f"{out}: already holds train.rec; pass --force to overwrite it")
    info = pack_image_tree(args.src, out, quality=args.quality, progress=True)
    h, w = info["image_size"]
    print(f"packed {info['images']} images of {info['identities']} identities ({h}x{w}) into "
          f"{os.path.join(out, 'train.rec')}, train.idx, property")
    return 0


def _cmd_reindex(args) -> int:
    rec = os.path.join(args.rec, "train.rec") if os.path.isdir(args.rec) else args.rec
    if not os.path.isfile(rec):
        raise DataFormatError(f"{rec}: RecordIO file not found")
    idx = os.path.splitext(rec)[0] + ".idx"
    if os.path.exists(idx) and not args.force:
        raise DataFormatError(f"{idx}: already exists; pass --force to rebuild it from {rec}")
    n, rule = rebuild_index(rec, idx)
    print(f"wrote {idx}: {n} records ({rule})")
    return 0


def add_data_commands(data_sub) -> None:
    p = data_sub.add_parser("pack", help="pack an identity-per-folder image tree into insightface train.rec/.idx")
    p.add_argument("src", help="folder with one sub-folder of images per identity (classes sorted by name)")
    p.add_argument("out", help="output folder for train.rec, train.idx and property")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality for non-JPEG sources (JPEGs are kept as is)")
    p.add_argument("--force", action="store_true", help="overwrite an existing train.rec in OUT")
    p.set_defaults(func=_cmd_pack)

    p = data_sub.add_parser("reindex", help="rebuild a missing train.idx by scanning train.rec")
    p.add_argument("rec", help="the .rec file or the folder holding train.rec")
    p.add_argument("--force", action="store_true", help="overwrite an existing .idx")
    p.set_defaults(func=_cmd_reindex)
