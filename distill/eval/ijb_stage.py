"""`data.ijb` in an experiment: every finished stage is also evaluated on IJB-B/IJB-C (distill/eval/ijb.py's protocol).

After a stage has finished (never during training), its model is run once over the IJB images, on the run's device
(under torchrun each rank embeds its share: distill/eval/spread.py), and the template-pair ROC is read at FAR
1e-6 .. 1e-1 (distill.eval.far.IJB_FARS). The numbers go into the stage's result.json under `ijb`, with the root
and target they came from (so a stage is not evaluated twice and a changed `data.ijb` is evaluated again), into its
W&B run as `ijb/<target>/tar_at_far_1e-4` etc., and into the summary and `distill compare` tables
(SUMMARY_IJB_FARS). The IJB meta files are read before any training, so a wrong root fails first.

result.json's `ijb.tar_at_far` is keyed '1e-6' .. '1e-1' (distill.eval.far.far_key); a result keyed as
eval_ijbc.py's columns ('1e-06', '1e-05', '0.0001', '0.001', '0.01', '0.1') is read as those keys (the readers
pass results through distill.eval.far.normalise_results), so such a run directory needs no new evaluation.
"""

from __future__ import annotations

import os

import numpy as np

from distill.eval.far import IJB_FARS, far_key, normalise_far_keys
from distill.eval.ijb import embed_images, protocol_name, verify
from distill.eval.spread import gather_rows, on_rank0


def ijb_key(ijb_cfg) -> dict:
    return {"root": os.path.abspath(ijb_cfg.root), "target": ijb_cfg.target}


def read_meta(ijb_cfg):
    """The IJB meta files of `data.ijb` (a DataFormatError naming the file when one is missing or malformed)."""
    from distill.data.ijb import read_ijb_meta
    return read_ijb_meta(ijb_cfg.root, ijb_cfg.target)


def evaluate_ijb(model, input_size: int, ijb_cfg, meta=None, workers: int = 2, progress: bool = False,
                 model_name: str | None = None, device=None) -> dict:
    """{"root", "target", "protocol", "tar_at_far": {'1e-6': TAR, ...}, "auc", "images", "templates", "pairs"}.

    Call it on every rank of a torchrun job: each rank embeds its share of the images on `device` (default: where
    the model is), whole batches (distill/eval/spread.py), so the features are the one process's; rank 0 pools and
    scores them once, and every rank gets the result."""
    meta = meta if meta is not None else read_meta(ijb_cfg)
    n, batch = len(meta.names), ijb_cfg.batch_size

    def embed(start, stop):  # the rows of this rank's share (the others stay zero in embed_images's array)
        indices = None if (start, stop) == (0, n) else np.arange(start, stop)
        return embed_images(model, meta, input_size, indices=indices, batch_size=batch, workers=workers,
                            device=device, progress=progress, model_name=model_name)[start:stop].copy()

    parts = gather_rows(embed, n, batch, f"{meta.target} images")

    def score():
        feats = np.zeros((n, next(v for *_, v in parts if v is not None).shape[1]), dtype=np.float32)
        for start, stop, value in parts:
            if value is not None:
                feats[start:stop] = value
        result, _, _, _ = verify(meta, feats)
        return {**ijb_key(ijb_cfg), "protocol": protocol_name(), **result}

    return on_rank0(score, f"{meta.target} template verification")


def ijb_scalars(ijb: dict) -> dict:
    """The W&B scalars of a stage's IJB result: ijb/<target>/tar_at_far_1e-4 ..., ijb/<target>/auc."""
    tars = normalise_far_keys(ijb["tar_at_far"])
    out = {f"ijb/{ijb['target']}/tar_at_far_{far_key(far)}": tars[far_key(far)] for far in IJB_FARS}
    out[f"ijb/{ijb['target']}/auc"] = ijb["auc"]
    return out


def needs_ijb(result: dict, ijb_cfg) -> bool:
    """Whether a finished stage's result lacks an IJB evaluation of this root and target."""
    done = result.get("ijb") or {}
    return ijb_cfg is not None and {k: done.get(k) for k in ("root", "target")} != ijb_key(ijb_cfg)
