"""Images/s of the training data path: RecordIO -> decoded, flipped, normalised batches, per worker and for N workers.

What the dataset does per item: `os.pread` of one record from train.rec, JPEG decode with
`torchvision.io.decode_jpeg`, then flip (as the epoch plan says), resize when the stored size differs from
`--input-size`, and normalise (distill/data/datasets.py). It uses torchvision's decoder because, measured on
this project's 112x112 fixture JPEGs, it decodes ~1.4-1.9x faster than PIL (both link libjpeg-turbo with the
same IDCT and upsampling, so the pixels are the same, identical to OpenCV's); non-JPEG records go through PIL
(distill/data/images.py has the numbers).

One process: the reference decodes the very same bytes, already in memory, with PIL (`Image.open` + RGB array)
and applies the same transform, so the ratio shows what the decoder choice and the reading cost together.

Loader: what training runs (distill/train/engine.py): PlannedDataset over plan_epoch's batches (flips from the plan),
a DataLoader with `--workers` processes, `--batch-size`, `--prefetch` batches per worker. The one-worker rate is
the per-worker (per-core) rate; for N workers the efficiency is rate(N) / (N x rate(1)), measured in the same run,
so it shows what N processes on this machine's cores lose to each other (and to the main process). "Cores
needed" divides `--target-rate` (default 3000 img/s, roughly what one fast GPU trains a ResNet-50 student at)
by the per-worker rate; the training process needs its own core on top.

`--decode cuda` (data.decode: cuda, distill/data/gpu_decode.py) also times the GPU path: workers only read the
encoded bytes (EncodedPlanned + collate_encoded) and the main process decodes each batch with nvJPEG plus flip
and normalise on the GPU (decode_batch), synchronised per batch; and prints how far nvJPEG's pixels are from
the CPU decoder's on the first images (nvJPEG is not bit-identical to libjpeg-turbo). Without a CUDA GPU it
says so and stops.

Worker figures time the steady state: the first batch (worker start-up) is left out; best of `--rounds`,
rounds interleaved so a busy machine slows every figure alike. One torch thread per process, so one process
means one core.

    .venv/bin/python benchmarks/bench_data.py [PATH] [--images 2000] [--workers 1,2] [--batch-size 64]
        [--prefetch 4] [--target-rate 3000] [--input-size N] [--decode cpu|cuda] [--json]

PATH is a folder with train.rec or a .rec file; without it a synthetic set is generated in a temp dir.
"""

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy and torch are imported, or their pools are already sized

import argparse
import io
import json
import math
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from distill.data import RecordIODataset
from distill.data.datasets import PlannedDataset
from distill.data.gpu_decode import EncodedPlanned, collate_encoded, decode_batch
from distill.data.images import decode_chw, to_input_tensor
from distill.data.synthetic import ensure_synthetic
from distill.train.epoch_plan import plan_epoch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_args
from bench_args import count, run
from bench_args import counts as count_list


def dataset_rate(ds, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        ds[i]
    return n / (time.perf_counter() - start)


def pil_rate(encoded: list, flips: list, input_size=None) -> float:
    start = time.perf_counter()
    for data, flip in zip(encoded, flips, strict=True):
        im = Image.open(io.BytesIO(data))
        if im.mode != "RGB":
            im = im.convert("RGB")
        chw = torch.from_numpy(np.array(im)).permute(2, 0, 1)  # a writable copy, as torch wants
        to_input_tensor(chw, flip=flip, input_size=input_size)
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


def make_loader(ds, n: int, workers: int, batch_size: int, prefetch: int, encoded: bool) -> DataLoader:
    """The engine's loader over the first n images: plan_epoch's batches (flips from the plan)."""
    plan = plan_epoch(n, batch_size, seed=0, epoch=0, flip=True)
    extra = dict(prefetch_factor=prefetch) if workers > 0 else {}
    if encoded:
        return DataLoader(EncodedPlanned(ds), batch_sampler=plan, num_workers=workers, collate_fn=collate_encoded,
                          **extra)
    return DataLoader(PlannedDataset(ds), batch_sampler=plan, num_workers=workers, **extra)


def loader_rate(ds, n: int, workers: int, batch_size: int, prefetch: int, encoded=False, device=None) -> float:
    """Steady-state images/s of decoded, flipped, normalised batches. `encoded`: the workers only read the
    encoded bytes (data.decode: cuda's CPU side); with `device` too, each batch is then decoded there
    (decode_batch) and synchronised, as data.decode: cuda does."""
    it = iter(make_loader(ds, n, workers, batch_size, prefetch, encoded=encoded or device is not None))

    def finish(batch):
        if device is None:
            return len(batch[0])
        x = decode_batch(batch[0], batch[3], device, ds.input_size)
        torch.cuda.synchronize(device)
        return len(x)

    finish(next(it))  # start-up and the first batch are not the steady state
    start, seen = time.perf_counter(), 0
    for batch in it:
        seen += finish(batch)
    return seen / (time.perf_counter() - start)


def gpu_decode_only(ds, n: int, batch_size: int, device) -> tuple:
    """(images/s of decode_batch alone on the GPU, bytes already in memory; max and mean |GPU - CPU path| on
    the 0-255 scale over the first batches)."""
    plan = plan_epoch(n, batch_size, seed=0, epoch=0, flip=True)
    batches = [collate_encoded([EncodedPlanned(ds)[item] for item in b]) for b in plan]
    decode_batch(batches[0][0], batches[0][3], device, ds.input_size)  # nvJPEG and kernel start-up
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for enc, _, _, flipped in batches[1:]:
        decode_batch(enc, flipped, device, ds.input_size)
    torch.cuda.synchronize(device)
    rate = sum(len(b[0]) for b in batches[1:]) / max(time.perf_counter() - start, 1e-9)
    worst, total, count = 0.0, 0.0, 0
    for enc, _, idx, flipped in batches[:4]:
        gpu = decode_batch(enc, flipped, device, ds.input_size).cpu()
        cpu = torch.stack([ds.item(int(i), bool(f))[0] for i, f in zip(idx, flipped, strict=True)])
        diff = (gpu - cpu).abs() * 127.5  # normalised units back to pixel levels
        worst, total, count = max(worst, diff.max().item()), total + diff.sum().item(), count + diff.numel()
    return rate, worst, total / count


def cuda_absent_reason() -> str | None:
    if torch.version.cuda is None:
        return f"this torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU or driver on this machine"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="folder with train.rec or a .rec file (default: generate one)")
    parser.add_argument("--images", type=count(1), default=2000, help="images to time (default 2000)")
    parser.add_argument("--size", type=count(16), default=112, help="image size of the generated set (default 112)")
    parser.add_argument("--input-size", type=count(16), default=None,
                        help="data.input_size: images of another stored size are resized (default: stored size)")
    parser.add_argument("--workers", type=count_list(0), default="1,2",
                        help="DataLoader worker counts to time (default 1,2; 1 is always timed, it is the per-worker "
                             "baseline)")
    parser.add_argument("--batch-size", type=count(1), default=64, help="images per batch (default 64)")
    parser.add_argument("--prefetch", type=count(1), default=4,
                        help="batches each worker keeps ready (data.prefetch_factor)")
    parser.add_argument("--target-rate", type=float, default=3000.0,
                        help="images/s the GPU trains at, for the 'cores needed' line (default 3000)")
    parser.add_argument("--decode", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: also time data.decode: cuda (encoded bytes from the workers, nvJPEG on the GPU)")
    parser.add_argument("--rounds", type=count(1), default=3, help="best of this many rounds of every figure")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = None
    if args.decode == "cuda":
        reason = cuda_absent_reason()
        if reason:
            print(f"bench_data: --decode cuda times nvJPEG on the GPU, but {reason}; run without --decode cuda "
                  f"(the CPU path) or on a machine with a CUDA GPU", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
    counts = sorted({1, *args.workers})

    with tempfile.TemporaryDirectory() as tmp:
        path = args.path
        if path is None:
            path = os.path.join(tmp, "synth")
            ids = max(1, -(-args.images // 20))
            ensure_synthetic(path, ids=ids, images_per_id=20, size=args.size, pairs=0, seed=0)
        ds = RecordIODataset(path, input_size=args.input_size)
        n = min(args.images, len(ds))
        rec = ds.rec
        encoded = [rec.record(int(k))[1] for k in rec.keys[:n]]
        flips = [bool(f) for f in np.random.default_rng(0).integers(0, 2, n)]
        # Interleave the rounds so a busy machine slows both sides alike; keep the best of each.
        dataset_img_s, pil_img_s, decode_ours, decode_pil = 0.0, 0.0, 0.0, 0.0
        workers = dict.fromkeys(counts, 0.0)
        readers = dict.fromkeys(counts, 0.0)
        gpu_workers = dict.fromkeys(counts, 0.0) if device is not None else {}
        for _ in range(args.rounds):
            dataset_img_s = max(dataset_img_s, dataset_rate(ds, n))
            pil_img_s = max(pil_img_s, pil_rate(encoded, flips, args.input_size))
            ours, pil = decode_rates(encoded)
            decode_ours, decode_pil = max(decode_ours, ours), max(decode_pil, pil)
            for w in counts:
                workers[w] = max(workers[w], loader_rate(ds, n, w, args.batch_size, args.prefetch))
                readers[w] = max(readers[w], loader_rate(ds, n, w, args.batch_size, args.prefetch, encoded=True))
                if device is not None:
                    gpu_workers[w] = max(gpu_workers[w],
                                         loader_rate(ds, n, w, args.batch_size, args.prefetch, device))
        gpu_only = gpu_decode_only(ds, n, args.batch_size, device) if device is not None else None
        shape = tuple(ds[0][0].shape)

    def scaling(rates: dict) -> dict:
        one = rates[1]
        return {
            "workers": {str(k): round(v, 1) for k, v in rates.items()},
            "per_worker_img_s": round(one, 1),
            "efficiency": {str(k): round(v / (k * one), 3) for k, v in rates.items() if k > 1},
            "cores_needed": math.ceil(args.target_rate / one),
        }

    cpu_loader = scaling(workers)
    result = {
        "dataset_img_s": round(dataset_img_s, 1),
        "pil_img_s": round(pil_img_s, 1),
        "ratio": round(dataset_img_s / pil_img_s, 3),
        **cpu_loader,
        "encoded_reader": scaling(readers),  # data.decode: cuda's CPU side: workers read, nothing decodes
        "batch_size": args.batch_size,
        "prefetch": args.prefetch,
        "target_rate": args.target_rate,
        "decode_only_img_s": {"dataset_decoder": round(decode_ours, 1), "pil": round(decode_pil, 1)},
        "images": n,
        "image_shape": list(shape),
        "input_size": args.input_size,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    if device is not None:
        result["cuda"] = {
            **scaling(gpu_workers),
            "gpu": torch.cuda.get_device_name(device),
            "decode_batch_only_img_s": round(gpu_only[0], 1),
            "vs_cpu_path_max_abs_levels": round(gpu_only[1], 4),
            "vs_cpu_path_mean_abs_levels": round(gpu_only[2], 5),
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
    print_scaling("DataLoader, data.decode: cpu", workers, args)
    print_scaling("DataLoader of encoded bytes only (data.decode: cuda's CPU side: read, no decode)", readers, args)
    if device is not None:
        c = result["cuda"]
        print_scaling(f"DataLoader of encoded bytes + decode_batch on {c['gpu']}, data.decode: cuda", gpu_workers, args)
        print(f"  decode_batch alone on the GPU (bytes in memory):           {c['decode_batch_only_img_s']:8.0f} img/s")
        print(f"  nvJPEG vs CPU path, first batches: max |diff| {c['vs_cpu_path_max_abs_levels']:.2f} levels, "
              f"mean {c['vs_cpu_path_mean_abs_levels']:.4f} (0-255 scale)")
    return 0


def print_scaling(title: str, rates: dict, args) -> None:
    one = rates[1]
    print(f"  {title} (batch {args.batch_size}, prefetch {args.prefetch}):")
    for w, rate in rates.items():
        eff = f"   efficiency {rate / (w * one):5.2f} of {w} x one worker" if w > 1 else ""
        eff = "   (per-worker rate)" if w == 1 else eff
        print(f"    {w} worker{'s' if w != 1 else ' '}: {rate:8.0f} img/s{eff}")
    k = math.ceil(args.target_rate / one)
    print(f"    cores needed for {args.target_rate:.0f} img/s: {k} loader worker{'s' if k != 1 else ''} "
          f"at {one:.0f} img/s each (measured 1-worker rate), plus one for the training process")


if __name__ == "__main__":
    sys.exit(run(main, "bench_data"))
