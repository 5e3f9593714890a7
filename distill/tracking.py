"""Metrics of a stage: always a local `metrics.jsonl`, optionally mirrored to Weights & Biases.

One JSON object per line: {"step": int, "time": unix seconds, <metric>: value, ...}, with metric names
`train/<term>` (every loss term by name, lr, images_per_s) and `val/<set>/<metric>`. `distill compare`
reads these files, so comparing runs never needs W&B.
"""

from __future__ import annotations

import json
import os
import time


class Tracker:
    """Local metrics log of one stage (rank 0 only writes)."""

    def __init__(self, stage_dir: str, rank: int = 0):
        self.path = os.path.join(stage_dir, "metrics.jsonl")
        self.rank = rank

    def log(self, metrics: dict, step: int) -> None:
        if self.rank != 0 or not metrics:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the log matches the resumed run."""
        if self.rank != 0 or not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if _step_of(line) <= step]
        if len(kept) != len(lines):
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)

    def finish(self, result: dict | None = None, student_path: str | None = None) -> None:
        """The stage ended: `result` is its result.json content, `student_path` its student.pt."""


def stage_tracker(cfg, run_dir: str, stage: str, generation: int, init_from: str | None, rank: int = 0) -> Tracker:
    """The tracker of one stage of an experiment (the generations driver calls this for every stage)."""
    return Tracker(os.path.join(run_dir, stage), rank=rank)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except ValueError:  # a torn last line from a kill: drop it
        return 1 << 62


def read_metrics(stage_dir: str) -> list:
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    return out
