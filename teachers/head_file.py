"""The teacher's class centres as a file: its margin-softmax weights, one row per identity (`teacher.head`, or the
head in `teacher/last.pt` of a teacher trained by the run). Accepted files, each read with
torch.load(weights_only=True) (a file holding code is refused as every checkpoint is):
  - a tensor (classes, embedding);
  - a state dict holding one such matrix under `weight` (a margin head's, e.g. torch.save(head.state_dict()));
  - facedistill's last.pt (`head_weight`: every class, gathered from the ranks' shards);
  - arcface_torch's checkpoint_gpu_<rank>.pt (`state_dict_softmax_fc.weight`: that rank's classes).
A glob (`teacher.head: runs/r100/checkpoint_gpu_*.pt`) names the ranks' files of a partial-FC run: they are
concatenated in rank order (the number in the name), as arcface_torch splits its classes contiguously. The rows
must number data.train's identities and the columns the teacher's embedding size (both sizes are named otherwise).
A file that would train silently wrong is refused: integer centres (a float head cast or rounded: mostly zeros),
non-finite ones, and all-zero rows (a centre of no direction: its cosine with any embedding is undefined)."""

from __future__ import annotations

import glob
import os
import re

import torch

from distill.utils.checkpoint import safe_torch_load
from distill.utils.errors import ConfigError

_FILE_KINDS = "a (classes, embedding) tensor, a state dict with `weight`, facedistill's last.pt (head_weight) or " \
              "arcface_torch's checkpoint_gpu_<rank>.pt (state_dict_softmax_fc)"


def _rank_order(path: str) -> tuple:
    numbers = re.findall(r"\d+", os.path.basename(path))
    return (int(numbers[-1]) if numbers else -1, path)


def _matrix(obj, path: str) -> torch.Tensor:
    if isinstance(obj, dict):
        for key in ("head_weight", "state_dict_softmax_fc", "weight"):
            if key in obj:
                return _matrix(obj[key], f"{path} [{key}]")
        raise ConfigError(f"{path}: holds no class centres (keys {', '.join(map(str, list(obj)[:8])) or 'none'}); "
                          f"teacher.head takes {_FILE_KINDS}")
    if not torch.is_tensor(obj) or obj.dim() != 2:
        shape = tuple(obj.shape) if torch.is_tensor(obj) else type(obj).__name__
        raise ConfigError(f"{path}: the class centres must be a (classes, embedding) matrix, got {shape}; "
                          f"teacher.head takes {_FILE_KINDS}")
    if not obj.is_floating_point():
        raise ConfigError(f"teacher.head: {path} holds {str(obj.dtype).replace('torch.', '')} centres, not floats "
                          f"(a head cast to integers keeps only their integer parts); give the margin head's own "
                          f"float weights")
    return obj


def load_centres(source: str, num_classes: int | None, embedding_size: int | None = None) -> torch.Tensor:
    """The teacher's centres (num_classes, embedding) in float32 from `source` (a file or a glob of the ranks'
    files; see the module docstring), checked against data.train's identity count and the embedding size (each
    when given)."""
    paths = sorted(glob.glob(source), key=_rank_order) if glob.has_magic(source) else [source]
    if not paths or not all(os.path.isfile(p) for p in paths):
        missing = source if not paths else next(p for p in paths if not os.path.isfile(p))
        raise ConfigError(f"teacher.head: {missing} does not exist; give the teacher's class centres ({_FILE_KINDS})")
    parts = [_matrix(safe_torch_load(p), p) for p in paths]
    if len({p.shape[1] for p in parts}) > 1:
        raise ConfigError(f"teacher.head: the files {source} hold centres of different sizes "
                          f"{sorted({p.shape[1] for p in parts})}; give the files of one partial-FC run")
    centres = torch.cat([p.detach().float().cpu() for p in parts])
    if num_classes is not None and centres.shape[0] != num_classes:
        raise ConfigError(f"teacher.head: {source} holds centres of {centres.shape[0]} identities, data.train has "
                          f"{num_classes}: the centres must come from a teacher trained on this training set (its "
                          f"identities in the same order)")
    if embedding_size is not None and centres.shape[1] != embedding_size:
        raise ConfigError(f"teacher.head: {source} holds {centres.shape[1]}-d centres, the teacher's embeddings are "
                          f"{embedding_size}-d; give the head of this teacher")
    if not torch.isfinite(centres).all():
        raise ConfigError(f"teacher.head: {source} holds non-finite centres (NaN or Inf); give a healthy checkpoint")
    zero = (centres.norm(dim=1) == 0).nonzero().flatten()
    if len(zero):
        raise ConfigError(f"teacher.head: {source} holds {len(zero):,} all-zero centres of {centres.shape[0]:,} "
                          f"(first: row {int(zero[0])}); a centre needs a direction: give the head of a trained "
                          f"teacher")
    return centres
