"""Images/s of RecordIODataset (read + decode + transform) in one process and with DataLoader workers, against PIL.

What the dataset does per item: `os.pread` of one record from train.rec, JPEG decode with
`torchvision.io.decode_jpeg`, then normalise and (randomly) flip (distill/data/datasets.py). It uses
torchvision's decoder because, measured on this project's 112x112 fixture JPEGs, it decodes ~1.4-1.9x
faster than PIL (both link libjpeg-turbo with the same IDCT and upsampling, so the pixels are the
same, identical to OpenCV's); non-JPEG records go through PIL (distill/data/images.py has the numbers).

The reference decodes the very same bytes, already in memory, with PIL (`Image.open` + RGB array) and
applies the same transform, so the ratio shows what the decoder choice and the reading cost together.
Worker figures time the steady state: the first batch (worker start-up) is left out. One torch thread
per process, so one process means one core.

    .venv/bin/python benchmarks/bench_data.py [PATH] [--images 2000] [--workers 0,1,2] [--json]

PATH is a folder with train.rec or a .rec file; without it a synthetic set is generated in a temp dir.
"""

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy and torch are imported, or their pools are already sized

import argparse
import io
import json
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from distill.data import RecordIODataset
from distill.data.images import decode_chw, to_input_tensor
from distill.data.synthetic import ensure_synthetic


def dataset_rate(ds, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        ds[i]
    return n / (time.perf_counter() - start)


def pil_rate(encoded: list, flips: list) -> float:
    start = time.perf_counter()
    for data, flip in zip(encoded, flips):
        im = Image.open(io.BytesIO(data))
        if im.mode != "RGB":
            im = im.convert("RGB")
        chw = torch.from_numpy(np.array(im)).permute(2, 0, 1)  # a writable copy, as torch wants
        to_input_tensor(chw, flip=flip)
    return len(encoded) / (time.perf_counter() - start)


def decode_rates(encoded: list) -> tuple:
    """(dataset decoder, PIL) images/s for decoding alone, to tell the decoder apart from read and transform."""
    start = time.perf_counter()
    for i, data in enumerate(encoded):
        decode_chw(data, f"image {i}")
    ours = len(encoded) / (time.perf_counter() - start)
    start = time.perf_counter()
    for data in encoded:
        np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return ours, len(encoded) / (time.perf_counter() - start)


def loader_rate(ds, n: int, workers: int, batch_size: int) -> float:
    subset = torch.utils.data.Subset(ds, range(n))
    loader = DataLoader(subset, batch_size=batch_size, num_workers=workers, shuffle=False)
    it = iter(loader)
    next(it)  # start-up and the first batch are not the steady state
    start, seen = time.perf_counter(), 0
    for batch in it:
        seen += len(batch[0])
    return seen / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="folder with train.rec or a .rec file (default: generate one)")
    parser.add_argument("--images", type=int, default=2000, help="images to time (default 2000)")
    parser.add_argument("--size", type=int, default=112, help="image size of the generated set (default 112)")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to time (default 0,1,2)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many rounds for the one-process figures")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.path
        if path is None:
            path = os.path.join(tmp, "synth")
            ids = max(1, -(-args.images // 20))
            ensure_synthetic(path, ids=ids, images_per_id=20, size=args.size, pairs=0, seed=0)
        ds = RecordIODataset(path)
        n = min(args.images, len(ds))
        rec = ds.rec
        encoded = [rec.record(int(k))[1] for k in rec.keys[:n]]
        flips = [bool(f) for f in np.random.default_rng(0).integers(0, 2, n)]
        # Interleave the rounds so a busy machine slows both sides alike; keep the best of each.
        dataset_img_s, pil_img_s, decode_ours, decode_pil = 0.0, 0.0, 0.0, 0.0
        for _ in range(args.rounds):
            dataset_img_s = max(dataset_img_s, dataset_rate(ds, n))
            pil_img_s = max(pil_img_s, pil_rate(encoded, flips))
            ours, pil = decode_rates(encoded)
            decode_ours, decode_pil = max(decode_ours, ours), max(decode_pil, pil)
        workers = {int(w): loader_rate(ds, n, int(w), args.batch_size) for w in args.workers.split(",")}
        shape = tuple(ds[0][0].shape)

    result = {
        "dataset_img_s": round(dataset_img_s, 1),
        "pil_img_s": round(pil_img_s, 1),
        "ratio": round(dataset_img_s / pil_img_s, 3),
        "workers": {str(k): round(v, 1) for k, v in workers.items()},
        "decode_only_img_s": {"dataset_decoder": round(decode_ours, 1), "pil": round(decode_pil, 1)},
        "images": n,
        "image_shape": list(shape),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{n} images {shape[1]}x{shape[2]}, one torch thread per process, {result['cpus']} CPUs")
    print(f"  RecordIODataset, one process (read + decode + transform): {dataset_img_s:8.0f} img/s")
    print(f"  PIL decode of the same bytes in memory + same transform:  {pil_img_s:8.0f} img/s")
    print(f"  ratio dataset / PIL:                                       {result['ratio']:8.2f}x")
    print(f"  decode only: dataset's decoder {decode_ours:.0f} img/s, PIL {decode_pil:.0f} img/s "
          f"({decode_ours / decode_pil:.2f}x)")
    for w, rate in workers.items():
        print(f"  DataLoader, {w} worker{'s' if w != 1 else ' '} (batch {args.batch_size}):                     {rate:8.0f} img/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
