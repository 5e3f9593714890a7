"""A tiny synthetic experiment file (seconds on CPU) for the tracking, compare and sweep tests (not a test module)."""

import copy
from pathlib import Path

import yaml


def tiny_experiment(data_dir, side: int = 32, **changes) -> dict:
    """Teacher (trained, 4 steps) -> baseline -> gen1 -> gen2, 4 steps each, evaluated at steps 2 and 4.
    side: the images' and models' input side (16, the smallest the models take, is a quarter of the convolutions
    of 32, for tests whose point is not the image size)."""
    data = str(data_dir)
    raw = {
        "name": "tiny",
        "seed": 0,
        "data": {"train": data, "val": [f"{data}/synth_val.bin"], "input_size": 32, "num_workers": 0,
                 "synthetic": {"ids": 12, "images_per_id": 6, "size": 32, "pairs": 40, "seed": 0, "holdout_ids": 8}},
        "teacher": {"arch": "iresnet18", "input_size": 32, "embedding_size": 32,
                    "train": {"batch_size": 24, "lr": 0.1, "lr_batch_size": 24, "max_steps": 4, "log_every": 2}},
        "student": {"embedding_size": 32, "multiplier": 0.5, "last_channels": 64, "units": [1, 1, 1]},
        "margin": {"s": 16, "m": 0.3},
        "train": {"batch_size": 24, "lr": 0.1, "lr_batch_size": 24, "max_steps": 4, "log_every": 1,
                  "eval_every": 2, "checkpoint_every": 4},
        "generations": 2,
        "tracking": {"wandb": "offline"},
    }
    raw = copy.deepcopy(raw)
    raw["data"]["input_size"] = raw["data"]["synthetic"]["size"] = raw["teacher"]["input_size"] = side
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return raw


def write_experiment(path, data_dir, side: int = 32, **changes) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(tiny_experiment(data_dir, side, **changes), sort_keys=False))
    return path
