"""The cost of checking the files a run reads back (distill/utils/digest.py, teachers/cache_digest.py).

  (a) SHA-256's rate on this CPU over a file of --mb MB (from the page cache: the CPU's share of the cost; a cold
      read adds the disk's), one thread (a stage's files) and the teacher cache's threads over 64 MiB blocks;
  (b) what that makes of a 5.8M-image cache of 512-d rows (5.8M x 2 views x 512 x 2 bytes);
  (c) with --quickstart: the seconds a run of experiments/quickstart.yaml spends hashing (every stage at one step,
      so the files have the quickstart's sizes), then those of a rerun of the finished directory by a new process
      (the teacher's files and the cache checked again).

    python benchmarks/bench_digest.py [--mb 256] [--quickstart]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_args
from bench_args import count, run  # noqa: E402

import distill.utils.digest as digest  # noqa: E402
import teachers.cache as cache  # noqa: E402
from teachers.cache_digest import BLOCK_BYTES, block_digests  # noqa: E402

FULL_CACHE_BYTES = 5_800_000 * 2 * 512 * 2


def _best(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def sha256_rates(mb: int) -> dict:
    """MB/s of one thread (file_sha256) and of the cache check (block_digests, 64 MiB blocks) over `mb` MB."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "blob")
        with open(path, "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(1 << 20))
        size = os.path.getsize(path)

        def one_thread():
            digest._SHA256.clear()
            digest.file_sha256(path)

        blocks = _best(lambda: block_digests(path, 1024, BLOCK_BYTES // 1024, size // 1024))
        single = _best(one_thread)
    return {"mb": size / 1e6, "one_thread_mb_s": size / 1e6 / single, "blocks_mb_s": size / 1e6 / blocks,
            "threads": max(1, min(4, os.cpu_count() or 1))}


class _Timer:
    """Wraps module.name and adds the seconds spent in it."""

    def __init__(self, module, name: str):
        self.module, self.name, self.real, self.seconds = module, name, getattr(module, name), 0.0
        setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.real(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t


def quickstart() -> dict:
    """Seconds spent hashing in a quickstart-sized run (stages of one step) and in a rerun of it."""
    from distill.config.schema import load_config
    from distill.run.context import silent_logger
    from distill.run.experiment import run_experiment

    cfg = load_config("experiments/quickstart.yaml", ["teacher.train.max_steps=10", "train.max_steps=1",
                                                      "tracking.wandb=disabled"])
    timers = [_Timer(digest, "file_sha256"), _Timer(cache, "new_record"), _Timer(cache, "damaged_blocks")]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for what in ("run", "rerun"):
            digest._SHA256.clear()  # as a new process: nothing hashed yet
            cache._CHECKED.clear()
            for t in timers:
                t.seconds = 0.0
            t0 = time.perf_counter()
            run_experiment(cfg, os.path.join(tmp, "run"), progress=False, logger=silent_logger())
            out[what] = {"wall_s": time.perf_counter() - t0, **{t.name: t.seconds for t in timers}}
        run = os.path.join(tmp, "run")
        out["files_mb"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(run) for f in fs
                              if f.endswith((".pt", ".pth", ".f16"))) / 1e6
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=count(1), default=256, help="size of the file hashed (MB, default 256)")
    parser.add_argument("--quickstart", action="store_true",
                        help="also time the checks of a quickstart-sized run (minutes, from the repository root)")
    args = parser.parse_args(argv)
    r = {"sha256": sha256_rates(args.mb)}
    r["full_cache"] = {"gb": FULL_CACHE_BYTES / 1e9,
                       "seconds_one_thread": FULL_CACHE_BYTES / 1e6 / r["sha256"]["one_thread_mb_s"],
                       "seconds_blocks": FULL_CACHE_BYTES / 1e6 / r["sha256"]["blocks_mb_s"]}
    if args.quickstart:
        r["quickstart"] = quickstart()
    print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "bench_digest"))
