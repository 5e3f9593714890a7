"""What a teacher cache's rows are a function of (teachers/cache.py keys its manifest with `cache_key`): the
teacher's weights, the training set's fingerprint, the preprocessing (the resize to the teacher's input side is
teachers/signal.py's) and the autocast the rows were made under."""

from __future__ import annotations

from distill.utils.errors import DataFormatError

CACHE_FORMAT = 1


PREPROCESSING = {"normalize": "(x/255-0.5)/0.5", "flip": "horizontal", "dtype": "float16"}


def dataset_fingerprint(dataset) -> str:
    """The training set's fingerprint (what keys the cache and a trained teacher's identity), computed once per
    dataset object: hashing MS1M's index, or stat-ing every file of an image tree, is not repeated per use."""
    fp = getattr(dataset, "_facedistill_fingerprint", None)
    if fp is not None:
        return fp
    fingerprint = getattr(dataset, "fingerprint", None)
    if fingerprint is None:
        raise DataFormatError(f"{type(dataset).__name__} has no fingerprint(); the teacher cache cannot tell "
                              f"whether it is stale (use teacher.cache: false for this dataset)")
    fp = fingerprint()
    try:
        dataset._facedistill_fingerprint = fp
    except AttributeError:  # a dataset that takes no attributes: computed again next time
        pass
    return fp


def cache_key(teacher, dataset, amp_dtype=None) -> dict:
    """What the rows are a function of; a build under autocast (`amp_dtype`, on a GPU) is keyed by it too."""
    key = {
        "format": CACHE_FORMAT,
        "teacher": teacher.fingerprint(),
        "dataset": dataset_fingerprint(dataset),
        "preprocessing": {**PREPROCESSING, "teacher_input_size": teacher.input_size,
                          "data_input_size": getattr(dataset, "input_size", None)},
        "num_samples": len(dataset),
        "dim": teacher.embedding_size,
    }
    if amp_dtype is not None:
        key["autocast"] = str(amp_dtype).replace("torch.", "")
    return key
