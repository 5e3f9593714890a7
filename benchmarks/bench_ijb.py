"""Does `distill ijb` embed at the model's rate? Its end-to-end embedding of a synthetic IJB-C set against the
two things it cannot avoid: decoding and aligning every image, and the model's own batch inference.

On one synthetic IJB-C set (`distill data synth-ijb`, --templates 300 is about 1,000 images) and one model
(a student.pt, or the quickstart's student architecture with random weights: speed does not depend on the
weights), in one process, with the thread plan `distill ijb` uses (distill/utils/threads.py; --workers as
`distill ijb --workers`):
  decode     reading, decoding and aligning every image in this process (AlignedFaces), images/s
  model      the model alone on the already-aligned images, face and mirror in one batch as distill ijb
             runs it, on the plan's torch threads, images/s
  embed      distill.eval.ijb.embed_images end to end (DataLoader workers, model, features), images/s
  ratio      embed time / (decode time + 2 x model time): the goal is <= 1 (an evaluation takes no longer
             than twice the model's batch inference plus decoding and alignment)

    python benchmarks/bench_ijb.py [--student student.pt] [--templates 300] [--root DIR] [--workers 8]
        [--batch-size 128] [--threads N] [--json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_args
from bench_args import count, run

from distill.config.files import read_yaml_mapping
from distill.data.ijb import AlignedFaces, read_ijb_meta
from distill.data.synth_ijb import read_manifest, write_synthetic_ijb
from distill.eval.ijb import embed_images
from distill.models.files import load_student, model_input_size
from distill.models.registry import create_model
from distill.utils.threads import apply_threads, plan_threads

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "experiments", "quickstart.yaml")


def quickstart_student():
    """(model, input size): the quickstart's student architecture, randomly initialised."""
    cfg = read_yaml_mapping(QUICKSTART)
    student = dict(cfg["student"])
    arch = student.pop("arch")
    size = int(cfg["data"]["input_size"])
    return create_model(arch, input_size=size, **student), size


def _rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else float("inf")


def measure(model, meta, input_size: int, workers: int, batch_size: int) -> dict:
    """The three timings (see the module docstring) of `model` on `meta`'s images, in this process."""
    model.eval()
    faces = AlignedFaces(meta, input_size)
    t0 = time.perf_counter()
    items = [faces[k] for k in range(len(faces))]
    decode_s = time.perf_counter() - t0
    errors = [e for _, _, e in items if e]
    if errors:
        raise SystemExit(f"bench_ijb: {errors[0]}")
    x = torch.stack([t for _, t, _ in items])
    with torch.no_grad():
        model(torch.cat([x[:batch_size], x[:batch_size].flip(3)]))  # warm-up: first-call allocations
        t0 = time.perf_counter()
        for i in range(0, len(x), batch_size):
            b = x[i:i + batch_size]
            model(torch.cat([b, b.flip(3)]))
        model_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    embed_images(model, meta, input_size, batch_size=batch_size, workers=workers, progress=False)
    embed_s = time.perf_counter() - t0
    n = len(x)
    return {"images": n, "decode_s": decode_s, "model_s": model_s, "embed_s": embed_s,
            "decode_img_s": _rate(n, decode_s), "model_img_s": _rate(n, model_s), "embed_img_s": _rate(n, embed_s),
            "ratio": embed_s / (decode_s + 2 * model_s)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", help="a student.pt (default: the quickstart's student, random weights)")
    parser.add_argument("--root", help="a synthetic (or real) IJB root to read instead of writing one")
    parser.add_argument("--templates", type=count(2), default=300,
                        help="templates of the synthetic set (300: ~1,000 images)")
    parser.add_argument("--workers", type=count(0), default=min(8, os.cpu_count() or 1),
                        help="loader workers asked for, as distill ijb --workers (the thread policy caps them)")
    parser.add_argument("--batch-size", type=count(1), default=128, help="images per batch (default 128)")
    parser.add_argument("--threads", type=count(1), default=None, help="torch threads (default: the thread policy)")
    parser.add_argument("--quick", action="store_true", help="a 20-template set (for the test suite)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if args.student and not os.path.isfile(args.student):
        parser.error(f"--student {args.student}: no such file")
    plan = apply_threads(plan_threads(args.workers, override=args.threads, key="--threads"))
    if args.student:
        model, _ = load_student(args.student)
        input_size = int(model_input_size(model) or 112)
    else:
        model, input_size = quickstart_student()
    templates = 20 if args.quick else args.templates
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = os.path.join(tmp, "ijb")
            write_synthetic_ijb(root, templates=templates)
        target = (read_manifest(root) or {}).get("target", "IJBC")
        result = measure(model, read_ijb_meta(root, target), input_size, plan.workers, args.batch_size)
    result.update(threads=plan.threads, workers=plan.workers, input_size=input_size,
                  model=args.student or "quickstart student (random weights)")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['images']} images at {input_size} px, {plan.describe()}")
        for what in ("decode", "model", "embed"):
            print(f"  {what:<7} {result[what + '_s']:7.2f} s  {result[what + '_img_s']:8.0f} img/s")
        print(f"  embed / (decode + 2 x model) = {result['ratio']:.2f}  (goal <= 1)")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "bench_ijb"))
