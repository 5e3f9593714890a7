"""What a dataset holds (images, identities, per identity, image size) and a PNG grid of it (`distill data inspect`).

Reads an insightface/im2rec RecordIO (folder or .rec), an identity-per-folder image tree, or a
verification .bin. The grid has one row per identity and one column per image; for a .bin, each
row holds pairs side by side with a bar under each pair: green for "same", red for "different".
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from distill.utils.errors import DataFormatError

_GAP = 2          # pixels between tiles
_BAR = 4          # height of the same/different bar under a .bin pair
_SAME, _DIFFERENT = (40, 170, 60), (200, 40, 40)


def _spread(n: int, k: int) -> np.ndarray:
    """k indices spread evenly over range(n), so a grid shows the whole dataset, not only its start."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(np.int64)) if n else np.zeros(0, np.int64)


def _counts(labels: np.ndarray) -> dict:
    per_id = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    per_id = per_id[per_id > 0]
    return {
        "images": int(len(labels)),
        "identities": int(len(per_id)),
        "per_identity": (int(per_id.min()), float(np.median(per_id)), int(per_id.max())) if len(per_id) else None,
    }


def _open(path):
    """(description, rows, first) for the dataset at `path`: `rows(n_rows, n_cols)` lists the images to draw
    (a list per row), `first` holds the first image (empty for an empty dataset)."""
    path = os.fspath(path)
    if path.endswith(".bin") and os.path.isfile(path):
        from distill.data.verification import load_verification_bin

        images, issame = load_verification_bin(path)
        info = {"kind": "verification .bin", "images": len(images), "pairs": len(issame),
                "same": int(np.sum(issame)), "different": int(len(issame) - np.sum(issame))}

        def rows(n_rows, n_cols):
            per_row = max(1, n_cols // 2)
            picked = _spread(len(issame), n_rows * per_row)
            return [[(images[2 * k], images[2 * k + 1], bool(issame[k])) for k in picked[r:r + per_row]]
                    for r in range(0, len(picked), per_row)]

        return info, rows, [images[0]] if images else []
    if (os.path.isfile(path) and path.endswith(".rec")) or os.path.isfile(os.path.join(path, "train.rec")):
        from distill.data.recordio import RecordIO

        rec = RecordIO(path)
        labels = rec.labels()
        layout = "insightface" if rec.identity_keys is not None else "im2rec"
        info = {"kind": f"RecordIO ({layout} layout)", **_counts(labels)}
        keys = rec.keys

        def load(i):
            return rec.image(int(keys[i]))
    elif os.path.isdir(path):
        from distill.data.folders import read_file, scan_image_tree
        from distill.data.images import decode_image

        names, samples = scan_image_tree(path)
        labels = np.array([c for _, c in samples], dtype=np.int64)
        info = {"kind": "image folder tree", **_counts(labels)}

        def load(i):
            return decode_image(read_file(samples[i][0]), samples[i][0])
    else:
        raise DataFormatError(
            f"{path}: not a dataset; pass a folder holding train.rec, a .rec file, a verification .bin, "
            f"or a folder with one sub-folder of images per identity"
        )
    # Labels are sorted by identity in every layout we write; argsort keeps it right for any order.
    order = np.argsort(labels, kind="stable")
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]]) if len(labels) else []
    bounds = list(zip(starts, list(starts[1:]) + [len(labels)], strict=True))

    def rows(n_rows, n_cols):
        return [[load(int(i)) for i in order[a:b][:n_cols]]
                for a, b in (bounds[j] for j in _spread(len(bounds), n_rows))]

    return info, rows, [load(0)] if len(labels) else []


def inspect_dataset(path, grid=None, rows: int = 8, cols: int = 8) -> dict:
    """Describe the dataset at `path`; with `grid`, also write a PNG of sample images there."""
    info, get_rows, first = _open(path)
    info["path"] = os.fspath(path)
    info["image_size"] = tuple(first[0].shape[:2]) if first else None
    if grid is not None:
        drawn = get_rows(rows, cols)
        sizes = {im.shape[:2] for row in drawn for item in row
                 for im in (item[:2] if isinstance(item, tuple) else (item,))}
        if len(sizes) > 1:
            info["image_sizes_seen"] = sorted(sizes)
        write_grid(drawn, grid, tile=info["image_size"])
        info["grid"] = os.fspath(grid)
    return info


def write_grid(rows, out_path, tile) -> None:
    """Tile images into one PNG: rows of images, or rows of (a, b, same) pairs with a coloured bar."""
    th, tw = tile if tile else (112, 112)
    pairs = bool(rows and rows[0] and isinstance(rows[0][0], tuple))
    per_item = 2 if pairs else 1
    n_cols = max((len(r) for r in rows), default=1) * per_item
    row_h = th + (_BAR + _GAP if pairs else 0)
    pair_gap = 3 * _GAP if pairs else 0  # pairs stand apart from each other
    width = n_cols * (tw + _GAP) + (n_cols // per_item) * pair_gap + _GAP
    height = len(rows) * (row_h + _GAP) + _GAP
    canvas = Image.new("RGB", (max(width, 1), max(height, 1)), (255, 255, 255))
    for r, row in enumerate(rows):
        y = _GAP + r * (row_h + _GAP)
        x = _GAP
        for item in row:
            images = item[:2] if pairs else (item,)
            for im in images:
                tile_im = Image.fromarray(np.asarray(im, np.uint8))
                if tile_im.size != (tw, th):
                    tile_im = tile_im.resize((tw, th), Image.BICUBIC)
                canvas.paste(tile_im, (x, y))
                x += tw + _GAP
            if pairs:
                bar = Image.new("RGB", (2 * tw + _GAP, _BAR), _SAME if item[2] else _DIFFERENT)
                canvas.paste(bar, (x - 2 * (tw + _GAP), y + th + _GAP))
                x += pair_gap
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    canvas.save(out_path, format="PNG")


def format_report(info: dict) -> str:
    lines = [f"{info['path']}: {info['kind']}"]
    if "pairs" in info:
        lines.append(f"  pairs         {info['pairs']:,} ({info['same']:,} same, {info['different']:,} different)")
        lines.append(f"  images        {info['images']:,}")
    else:
        lines.append(f"  images        {info['images']:,}")
        lines.append(f"  identities    {info['identities']:,}")
        if info["per_identity"]:
            lo, med, hi = info["per_identity"]
            lines.append(f"  per identity  min {lo} / median {med:g} / max {hi}")
    if info["image_size"]:
        h, w = info["image_size"]
        lines.append(f"  image size    {h}x{w} (first image)")
    if info.get("image_sizes_seen"):
        lines.append("  sizes in grid " + ", ".join(f"{h}x{w}" for h, w in info["image_sizes_seen"]))
    if info.get("grid"):
        lines.append(f"  grid          {info['grid']}")
    return "\n".join(lines)
