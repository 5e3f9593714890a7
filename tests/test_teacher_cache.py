"""Teacher cache: rows equal the teacher's output per (image, flip); stale caches rebuild; builds resume."""

import json

import pytest
import torch

import teachers
from distill.teacher_cache import build_cache
from tiny import TinyFaces


def _teacher(seed=0):
    torch.manual_seed(seed)
    t = teachers.build_teacher({"arch": "iresnet18", "input_size": 16, "embedding_size": 32})
    with torch.no_grad():  # an untrained IResNet's outputs reach 1e5; a trained one's are O(1)
        t.model.fc.weight.mul_(1e-4)
    return t


class CountingTeacher(torch.nn.Module):
    """Delegates to a frozen teacher, counts images, and can fail after `fail_after` batches."""

    def __init__(self, inner, fail_after=None):
        super().__init__()
        self.inner, self.images, self.batches, self.fail_after = inner, 0, 0, fail_after
        self.input_size, self.embedding_size = inner.input_size, inner.embedding_size

    def fingerprint(self):
        return self.inner.fingerprint()

    def forward(self, x):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.batches += 1
        self.images += len(x) // 2
        return self.inner(x)


def test_rows_match_the_teacher_on_original_and_flipped_images(tmp_path):
    data, teacher = TinyFaces(classes=4, per_class=5), _teacher()
    cache = build_cache(teacher, data, str(tmp_path), batch_size=7, progress=False)
    assert len(cache) == 20
    idx = torch.tensor([0, 3, 19, 3])
    flipped = torch.tensor([False, True, True, False])
    expected = torch.stack([teacher(data.get(int(i), bool(f))[None])[0] for i, f in zip(idx, flipped)])
    got = cache.lookup(idx, flipped)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=2e-3, atol=2e-3 * expected.abs().max())  # float16 storage
    assert not torch.allclose(got[1], got[3])  # flip matters


def test_reused_when_fresh_and_rebuilt_when_stale(tmp_path):
    data = TinyFaces(classes=4, per_class=5)
    counting = CountingTeacher(_teacher())
    build_cache(counting, data, str(tmp_path), batch_size=8, progress=False)
    assert counting.images == 20
    build_cache(counting, data, str(tmp_path), batch_size=8, progress=False)
    assert counting.images == 20  # fresh: nothing recomputed

    other = CountingTeacher(_teacher(seed=1))  # other weights -> other fingerprint
    logs = []
    build_cache(other, data, str(tmp_path), batch_size=8, progress=False, log=logs.append)
    assert other.images == 20 and "stale" in logs[0] and "teacher" in logs[0]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["key"]["teacher"] == other.fingerprint() and manifest["rows_done"] == 20

    changed = TinyFaces(classes=4, per_class=5, seed=9)
    build_cache(other, changed, str(tmp_path), batch_size=8, progress=False, log=logs.append)
    assert other.images == 40 and "dataset" in logs[-1]


def test_interrupted_build_resumes_and_equals_a_fresh_build(tmp_path):
    data = TinyFaces(classes=4, per_class=10)
    inner = _teacher()
    failing = CountingTeacher(inner, fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        build_cache(failing, data, str(tmp_path / "a"), batch_size=4, flush_every=1, progress=False)
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["rows_done"] == 12
    resumed = CountingTeacher(inner)
    logs = []
    a = build_cache(resumed, data, str(tmp_path / "a"), batch_size=4, progress=False, log=logs.append)
    assert resumed.images == 40 - 12 and "resuming" in logs[0]
    b = build_cache(inner, data, str(tmp_path / "b"), batch_size=4, progress=False)
    assert (a.emb == b.emb).all()


def test_embeddings_beyond_float16_are_an_error_not_inf(tmp_path):
    torch.manual_seed(0)
    wild = teachers.build_teacher({"arch": "iresnet18", "input_size": 16, "embedding_size": 32})
    with pytest.raises(ValueError, match="beyond float16's range.*teacher.cache: false"):
        build_cache(wild, TinyFaces(classes=2, per_class=2), str(tmp_path), progress=False)
