"""Config keys as dotted paths: which may change between reruns of one run directory (HARMLESS), and a nested
config dict flattened to them (flat_dict). distill/run/rundir.py and teachers/prepare.py compare configs with them."""

from __future__ import annotations

# Keys that may change between reruns of one run directory without invalidating anything trained (how the
# work is done, not what is learned); a key under one of these prefixes is harmless too.
HARMLESS = ("generations", "tracking", "data.num_workers", "data.prefetch_factor", "data.decode", "train.log_every",
            "train.compile", "train.optimizer_impl", "train.channels_last", "train.threads", "device", "data.ijb")


def is_harmless(key: str) -> bool:
    return any(key == h or key.startswith(h + ".") for h in HARMLESS)


def flat_dict(d: dict, prefix: str = "") -> dict:
    """{'train.lr': 0.1, ...}: a nested config dict keyed by dotted paths (empty sections kept as values)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
