"""The teacher signal (teachers/signal.py): cached and online targets agree (the cache is filled through the online
signal), the teacher's settings are derived in one place, and the engine trains from either."""

import pytest
import torch
from tiny import TinyFaces, tiny_config

import teachers
from distill.config.schema import TrainConfig
from distill.utils.device import amp_settings
from distill.utils.errors import ConfigError
from teachers.cache import build_cache
from teachers.cache_key import cache_key
from teachers.signal import (
    CachedTeacher,
    OnlineTeacher,
    match_input_size,
    online_signal,
    signal_cache_key,
    stage_signal,
)

FP16_ROUNDING = 2.0 ** -11  # float16 keeps 11 significant bits: a stored row is within this of its value, relatively


def _teacher(input_size=16, seed=0):
    torch.manual_seed(seed)
    t = teachers.build_teacher({"arch": "iresnet18", "input_size": input_size, "embedding_size": 32})
    with torch.no_grad():  # an untrained IResNet's outputs reach 1e5; a trained one's are O(1)
        t.model.fc.weight.mul_(1e-4)
    return t


def _batch(data, indices, flips):
    """The batch the engine gets for these images: each already flipped or not."""
    x = torch.stack([data.get(i, f) for i, f in zip(indices, flips, strict=True)])
    return x, torch.tensor(indices), torch.tensor(flips)


@pytest.mark.parametrize("teacher_size", [16, 32])  # 32: the data (16 px) is resized to the teacher's input
def test_cached_and_online_targets_agree_within_float16_rounding(tmp_path, teacher_size):
    data = TinyFaces(classes=3, per_class=4)
    online = OnlineTeacher(_teacher(teacher_size))
    cached = CachedTeacher(build_cache(online, data, str(tmp_path), batch_size=5, progress=False))
    assert cached.embedding_size == online.embedding_size == 32 and cached.online is None and online.online is online
    for flips in ([False] * 6, [True] * 6, [False, True, True, False, True, False]):
        x, idx, flipped = _batch(data, [0, 3, 11, 5, 7, 2], flips)
        want, got = online.embed(x, idx, flipped), cached.embed(x, idx, flipped)
        assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape == (6, 32)
        assert torch.all((got - want).abs() <= FP16_ROUNDING * want.abs() + 1e-3 * FP16_ROUNDING * want.abs().max())
    x, idx, _ = _batch(data, [4, 4], [False, True])
    assert not torch.allclose(cached.embed(x, idx, torch.tensor([False, True]))[0], online.embed(x)[1])  # flip matters


def test_the_online_signal_resizes_to_the_teachers_input():
    x = torch.randn(2, 3, 16, 16)
    assert match_input_size(x, 16) is x
    assert match_input_size(x, 32).shape == (2, 3, 32, 32)
    online = OnlineTeacher(_teacher(32))
    torch.testing.assert_close(online.embed(x), online.teacher(match_input_size(x, 32)))


def test_the_teachers_settings_come_from_the_signal():
    """Autocast: train.amp for the teacher's own model (bf16 when asked; float32 when off); memory format: the
    batch's for an online teacher, the device's for a cache build; the cache key is the one the rows are made
    under, unchanged for a config that does not set them."""
    cpu, teacher, data = torch.device("cpu"), _teacher(), TinyFaces(classes=2, per_class=2)
    for amp in ("off", "bf16", "auto"):
        train = TrainConfig(amp=amp)
        signal = online_signal(teacher, train, cpu)
        assert signal.amp_dtype == amp_settings(train, cpu, teacher)[0]
        assert signal_cache_key(teacher, data, train, cpu) == cache_key(teacher, data, signal.amp_dtype)
    assert online_signal(teacher, TrainConfig(amp="bf16"), cpu).describe() == "bfloat16 autocast"
    assert "autocast" not in signal_cache_key(teacher, data, TrainConfig(amp="off"), cpu)
    assert online_signal(teacher, TrainConfig(channels_last=True), cpu).channels_last is True
    assert online_signal(teacher, TrainConfig(), cpu).channels_last is False  # null: only on CUDA
    assert online_signal(teacher, TrainConfig(channels_last=True), cpu).for_cache().channels_last is False


def test_a_cache_is_the_same_whatever_the_students_memory_format(tmp_path):
    """The rows do not depend on train.channels_last (the key does not record it): built through an online signal
    in NHWC, a cache on the CPU has the same bytes as one built through an NCHW signal."""
    data, rows = TinyFaces(classes=2, per_class=4), []
    for flag in (False, True):
        online = online_signal(_teacher(), TrainConfig(amp="off", channels_last=flag), torch.device("cpu"))
        build_cache(online, data, str(tmp_path / str(flag)), batch_size=4, progress=False)
        rows.append((tmp_path / str(flag) / "embeddings.f16").read_bytes())
    assert rows[0] == rows[1]


def test_a_stage_signal_is_cached_online_or_given(tmp_path):
    cfg, cpu, teacher, data = tiny_config(), torch.device("cpu"), _teacher(), TinyFaces(classes=2, per_class=2)
    cache = build_cache(teacher, data, str(tmp_path), progress=False)
    assert stage_signal(None, None, cfg.train, cpu) is None
    assert isinstance(stage_signal(teacher, None, cfg.train, cpu), OnlineTeacher)
    assert isinstance(stage_signal(teacher, cache, cfg.train, cpu), CachedTeacher)
    assert isinstance(stage_signal(None, cache, cfg.train, cpu), CachedTeacher)
    given = CachedTeacher(cache)
    assert stage_signal(given, None, cfg.train, cpu) is given


def test_the_signal_reads_the_teachers_class_centres_cached_or_online(tmp_path):
    cfg, cpu, teacher, data = tiny_config(), torch.device("cpu"), _teacher(), TinyFaces(classes=2, per_class=2)
    cache = build_cache(teacher, data, str(tmp_path), progress=False)
    centres = torch.randn(2, 32)
    torch.save({"weight": centres}, tmp_path / "head.pt")
    source = str(tmp_path / "head.pt")
    for signal in (stage_signal(teacher, None, cfg.train, cpu, centres=source),
                   stage_signal(None, cache, cfg.train, cpu, centres=source)):
        assert signal.centres_source == source and torch.equal(signal.centres(2), centres)
        with pytest.raises(ConfigError, match="holds centres of 2 identities, data.train has 3"):
            signal.centres(3)
    unknown = stage_signal(None, cache, cfg.train, cpu)
    assert unknown.centres_source is None
    with pytest.raises(ConfigError, match="class centres are not known: set teacher.head"):
        unknown.centres(2)
