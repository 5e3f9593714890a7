"""Distillation cost: images/s of plain student training vs cached-teacher and online-teacher distillation.

All three run the real training loop (distill.train.engine.run_stage) on the same stand-in data, student and
settings, in one process, so only the teacher path differs:
  (a) plain    alpha 0, no teacher
  (b) cached   alpha 7, teacher embeddings read from a memory-mapped float16 cache
  (c) online   alpha 7, a frozen IResNet-100 run on every batch at the same input size
  (d) online + attention_transfer, (e) online + fitnet: distill.terms [equivalent_angular ×7, the feature
      loss ×1 at its default stages], the maps taken by hooks (distill/train/feature_taps.py); printed as the
      time per student image against (b), the cached embedding-only run (a feature loss needs the online teacher)
Target: (b) costs at most 5% more time per image than (a). Throughput is the median of the per-step
images/s the engine logs, skipping the first steps (warm-up).

    python benchmarks/bench_kd.py [--input-size 64] [--batch-size 16] [--steps 6] [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_args
from bench_args import count, run

import teachers
from distill.config.schema import build_config
from distill.data.standin import StandInFaces
from distill.train.engine import StageSpec, run_stage
from distill.train.tracking import read_metrics
from teachers.cache import build_cache

WARMUP = 2


def _config(args, distill: dict | None = None):
    return build_config({**({"distill": distill} if distill else {}),
        "name": "bench_kd", "device": args.device,
        "data": {"train": "stand-in", "input_size": args.input_size, "num_workers": 0},
        "student": {"embedding_size": 512},
        "train": {"batch_size": args.batch_size, "max_steps": args.steps + WARMUP, "log_every": 1,
                  "checkpoint_every": 10 ** 9, "amp": "auto"},
    })


def throughput(cfg, data, out, alpha, teacher=None, cache=None, warmup: int = WARMUP) -> float:
    """Median of the per-step images/s the engine logs for one stage, after `warmup` steps."""
    spec = StageSpec("bench", "vargfacenet", cfg.student.model_kwargs(cfg.data.input_size), cfg.train, alpha=alpha)
    run_stage(cfg, spec, out, data, {}, teacher=teacher, cache=cache, progress=False)
    rates = [m["train/images_per_s"] for m in read_metrics(out) if "train/images_per_s" in m][warmup:]
    return statistics.median(rates)


def untrained_teacher(arch: str, size: int, dim: int = 512):
    """An untrained IResNet re-initialised small (arcface_torch's init overflows to inf); the cost is the same."""
    model = teachers.build_teacher({"arch": arch, "input_size": size, "embedding_size": dim})
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
            m.weight.data.mul_(0.2)
    return model


def kd_rates(cfg, data, tmp: str, teacher, warmup: int = WARMUP, feature_losses: tuple = ()) -> dict:
    """Images/s of (a) plain training, (b) a cached teacher, (c) `teacher` run online, through the engine on the
    same data and settings (cfg.student's embedding size), and the time ratios of (b) and (c) against (a); for
    each of `feature_losses`, the online teacher with that feature term beside the paper's loss, and its time
    per image against (b)."""
    plain = throughput(cfg, data, os.path.join(tmp, "plain"), 0.0, warmup=warmup)
    # The cache's contents do not change its read cost: fill it with a cheap frozen stand-in teacher.
    torch.manual_seed(0)
    size, dim = cfg.data.input_size, cfg.student.embedding_size
    cheap = teachers.FrozenTeacher(nn.Sequential(nn.Flatten(), nn.Linear(3 * size ** 2, dim)),
                                   {"kind": "bench"}, size, dim)
    cache = build_cache(cheap, data, os.path.join(tmp, "cache"), progress=False)
    cached = throughput(cfg, data, os.path.join(tmp, "cached"), 7.0, cache=cache, warmup=warmup)
    online = throughput(cfg, data, os.path.join(tmp, "online"), 7.0, teacher=teacher, warmup=warmup)
    rates = {"plain_img_s": plain, "cached_img_s": cached, "online_img_s": online,
             "cached_time_ratio": plain / cached, "online_time_ratio": plain / online}
    for loss in feature_losses:  # the two-term objective of distill.terms, the teacher online
        terms = {"terms": [{"loss": "equivalent_angular", "alpha": 7}, {"loss": loss, "alpha": 1}]}
        fcfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, loss=None, alpha=None, **terms))
        rate = throughput(fcfg, data, os.path.join(tmp, loss), fcfg.distill.weight, teacher=teacher, warmup=warmup)
        rates[f"{loss}_img_s"], rates[f"{loss}_vs_cached_time_ratio"] = rate, cached / rate
    return rates


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input-size", type=count(16), default=64, help="image side (default 64)")
    p.add_argument("--batch-size", type=count(1), default=16, help="images per step (default 16)")
    p.add_argument("--steps", type=count(1), default=6, help="timed steps per mode (after 2 warm-up steps)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train (default cpu)")
    p.add_argument("--threads", type=count(1), default=2, help="torch threads (default 2)")
    p.add_argument("--feature-losses", default="attention_transfer,fitnet",
                   help="feature losses measured with the online teacher (comma-separated; empty: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = _config(args)
    n = args.batch_size * (args.steps + WARMUP)
    data = StandInFaces(classes=max(2, n // 4), per_class=4, size=args.input_size)

    with tempfile.TemporaryDirectory() as tmp:  # the engine puts the online teacher in channels_last on CUDA
        features = tuple(f for f in args.feature_losses.split(",") if f)
        rates = kd_rates(cfg, data, tmp, untrained_teacher("iresnet100", args.input_size), feature_losses=features)
    plain, cached, online = rates["plain_img_s"], rates["cached_img_s"], rates["online_img_s"]
    result = {**rates, "input_size": args.input_size, "batch_size": args.batch_size, "device": args.device,
              "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"student VarGFaceNet, teacher IResNet-100, {args.input_size}px, batch {args.batch_size}, {args.device}")
        print(f"  (a) plain training        {plain:9.1f} img/s")
        print(f"  (b) cached teacher        {cached:9.1f} img/s   time/image vs (a): {plain / cached:.3f}x "
              f"(target <= 1.05)")
        print(f"  (c) online IResNet-100    {online:9.1f} img/s   time/image vs (a): {plain / online:.3f}x")
        for mark, loss in zip("defgh", features, strict=False):  # a mark for each feature loss measured
            rate = rates[f"{loss}_img_s"]
            print(f"  ({mark}) online + {loss:<19}{rate:6.1f} img/s   time/image vs (b): {cached / rate:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "bench_kd"))
