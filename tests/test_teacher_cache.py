"""Teacher cache: rows equal the teacher's output per (image, flip); stale caches rebuild; builds resume;
every rank builds its slice, and the bytes do not depend on the number of ranks."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from forked_ranks import call_ranks
from tiny import TinyFaces

import teachers
from distill.run.context import run_logger
from distill.utils.errors import DistillError
from teachers.cache import build_cache, rank_slice
from teachers.signal import OnlineTeacher

BATCH = 6  # 40 rows: 7 batches, the last one short; 2 ranks get rows 0..17 and 18..39


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
    expected = torch.stack([teacher(data.get(int(i), bool(f))[None])[0] for i, f in zip(idx, flipped, strict=True)])
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
    build_cache(other, data, str(tmp_path), batch_size=8, progress=False, logger=run_logger(logs.append))
    assert other.images == 20 and "stale" in logs[0] and "teacher" in logs[0]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["key"]["teacher"] == other.fingerprint() and manifest["rows_done"] == 20

    changed = TinyFaces(classes=4, per_class=5, seed=9)
    build_cache(other, changed, str(tmp_path), batch_size=8, progress=False, logger=run_logger(logs.append))
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
    a = build_cache(resumed, data, str(tmp_path / "a"), batch_size=4, progress=False, logger=run_logger(logs.append))
    assert resumed.images == 40 - 12 and "resuming" in logs[0]
    b = build_cache(inner, data, str(tmp_path / "b"), batch_size=4, progress=False)
    assert (a.emb == b.emb).all()


def test_embeddings_beyond_float16_are_an_error_not_inf(tmp_path):
    torch.manual_seed(0)
    wild = teachers.build_teacher({"arch": "iresnet18", "input_size": 16, "embedding_size": 32})
    with pytest.raises(ValueError, match="beyond float16's range.*teacher.cache: false"):
        build_cache(wild, TinyFaces(classes=2, per_class=2), str(tmp_path), progress=False)


# ------------------------------------------------------------------------------ built by every rank

def cache_data():
    return TinyFaces(classes=4, per_class=10)


def _bytes(directory) -> bytes:
    return (Path(directory) / "embeddings.f16").read_bytes()


class BatchSensitive(CountingTeacher):
    """A teacher whose rows depend on their batch-mates (as float reductions may): only batches that are the
    one-process build's batches give its bytes."""

    def forward(self, x):
        return super().forward(x) + 1e-2 * len(x)


def test_slices_are_contiguous_whole_batches_covering_every_row():
    for n, bs, world in [(40, 6, 2), (40, 6, 3), (5, 4, 3), (128, 8, 4), (7, 128, 2), (1000, 128, 7)]:
        slices = [rank_slice(n, bs, r, world) for r in range(world)]
        assert slices[0][0] == 0 and slices[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:], strict=False))
        assert all(start % bs == 0 and (stop % bs == 0 or stop == n) for start, stop in slices)
        sizes = sorted(-(-(stop - start) // bs) for start, stop in slices)
        assert sizes[-1] - sizes[0] <= 1  # batches shared out evenly


def test_ranks_in_turn_give_the_one_process_bytes_and_name_the_missing_slice(tmp_path):
    data, inner = TinyFaces(classes=4, per_class=5), _teacher()  # 20 rows, batch 8: rank 0 rows 0..7, rank 1 8..19
    one = build_cache(BatchSensitive(inner), data, str(tmp_path / "one"), batch_size=8, progress=False)
    two = str(tmp_path / "two")
    with pytest.raises(DistillError, match="finds no teacher cache build.*torchrun --nproc_per_node=2"):
        build_cache(BatchSensitive(inner), data, two, batch_size=8, progress=False, rank=1, world_size=2)
    with pytest.raises(DistillError, match=r"progress.rank1.json: rank 1's slice of the teacher cache \(rows 8..19\) "
                                           r"is not finished \(0/12 rows\).*torchrun --nproc_per_node=2"):
        build_cache(BatchSensitive(inner), data, two, batch_size=8, progress=False, rank=0, world_size=2)
    second = BatchSensitive(inner)
    with pytest.raises(DistillError, match="rank 0 marks the cache finished once every slice is built"):
        build_cache(second, data, two, batch_size=8, progress=False, rank=1, world_size=2)
    assert second.images == 12
    last = BatchSensitive(inner)
    cache = build_cache(last, data, two, batch_size=8, progress=False, rank=0, world_size=2)
    assert last.images == 0 and _bytes(two) == _bytes(one.directory)
    assert (cache.emb == one.emb).all()
    assert sorted(os.listdir(two)) == ["embeddings.f16", "manifest.json"]  # the progress files are gone


def test_an_unfinished_build_of_another_teacher_is_rebuilt_not_resumed(tmp_path):
    data = cache_data()
    with pytest.raises(KeyboardInterrupt):
        build_cache(CountingTeacher(_teacher(), fail_after=2), data, str(tmp_path / "a"), batch_size=BATCH,
                    flush_every=1, progress=False)
    other, logs = CountingTeacher(_teacher(seed=1)), []
    build_cache(other, data, str(tmp_path / "a"), batch_size=BATCH, progress=False, logger=run_logger(logs.append))
    assert other.images == 40 and "stale (changed: teacher)" in logs[0] and "from scratch" in logs[0]
    build_cache(_teacher(seed=1), data, str(tmp_path / "b"), batch_size=BATCH, progress=False)
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """(root, one-process cache bytes, rank results) after tests/cache_child.py ran in 2 ranks (forked, torchrun's
    environment: tests/forked_ranks.py)."""
    root = tmp_path_factory.mktemp("ranks")
    torch.set_num_threads(1)
    build_cache(_teacher(), cache_data(), str(root / "one"), batch_size=BATCH, progress=False)
    shutil.copytree(root / "one", root / "reuse")
    import cache_child  # here: it imports this module's helpers

    call_ranks(root, 2, cache_child.main, str(root))
    results = [json.loads((root / f"result.rank{r}.json").read_text()) for r in range(2)]
    return root, _bytes(root / "one"), results


def test_two_ranks_build_the_same_bytes_as_one_process(two_ranks):
    root, one, results = two_ranks
    assert [r["two"]["images"] for r in results] == [18, 22]  # each rank embedded its own slice, once
    assert all(r["two"]["error"] is None for r in results)
    assert _bytes(root / "two") == one
    manifest = json.loads((root / "two" / "manifest.json").read_text())
    assert manifest["rows_done"] == 40 and manifest["world_size"] == 2
    assert not list((root / "two").glob("progress.*"))


def test_a_build_stopped_on_one_rank_resumes_each_slice_where_it_stopped(two_ranks):
    root, one, results = two_ranks
    killed = [r["killed"] for r in results]
    assert killed[1]["error"] == "KeyboardInterrupt: simulated kill"
    assert killed[0]["error"].startswith("DistillError: ")
    assert "stopped on rank 1 (KeyboardInterrupt" in killed[0]["error"]
    after = results[0]["after_kill"]
    assert after["progress.rank0.json"]["rows_done"] == 18  # rank 0's slice was finished
    assert after["progress.rank1.json"]["rows_done"] == 12  # rank 1 stopped in its third batch (two recorded)
    assert after["manifest.json"]["rows_done"] < 40  # not marked finished
    resumed = [r["resumed"] for r in results]
    assert [r["images"] for r in resumed] == [0, 10] and all(r["error"] is None for r in resumed)
    assert "resuming an interrupted build at 30/40 rows (rank 0: 18, rank 1: 12)" in resumed[0]["logs"][0]
    assert _bytes(root / "resumed") == one


def test_a_finished_cache_is_reused_by_any_world_size(two_ranks):
    root, one, results = two_ranks
    assert [r["reuse"]["images"] for r in results] == [0, 0]  # built by 1 process, reused by 2
    again = CountingTeacher(_teacher())
    build_cache(again, cache_data(), str(root / "two"), batch_size=BATCH, progress=False)
    assert again.images == 0  # built by 2 processes, reused by 1


def test_an_unfinished_build_of_world_size_2_is_rebuilt_by_world_size_1(two_ranks, tmp_path):
    root, one, results = two_ranks
    assert [r["partial"]["images"] for r in results] == [18, 6]
    shutil.copytree(root / "partial", tmp_path / "partial")
    teacher, logs = CountingTeacher(_teacher()), []
    build_cache(teacher, cache_data(), str(tmp_path / "partial"), batch_size=BATCH, progress=False,
                logger=run_logger(logs.append))
    assert teacher.images == 40  # nothing of the 2-process slices is mixed in
    assert "started with world size 2 and this run has world size 1" in logs[0] and "from scratch" in logs[0]
    assert _bytes(tmp_path / "partial") == one
    assert json.loads((tmp_path / "partial" / "manifest.json").read_text())["world_size"] == 1


def test_a_build_under_autocast_is_keyed_by_it_and_close_to_float32(tmp_path):
    """A run on a GPU builds its cache on the device under the students' autocast (train.amp): the rows are the
    bf16 teacher's (close to float32's, not equal), and a float32 cache is not reused for it (rebuilt, said so)."""
    data, logs = TinyFaces(classes=4, per_class=5), []
    counting = CountingTeacher(_teacher())
    full = build_cache(counting, data, str(tmp_path), batch_size=8, progress=False)
    f32 = full.lookup(torch.arange(20), torch.zeros(20, dtype=torch.bool)).clone()
    del full
    bf16 = build_cache(OnlineTeacher(counting, amp_dtype=torch.bfloat16), data, str(tmp_path), batch_size=8,
                       progress=False, logger=run_logger(logs.append))
    assert counting.images == 40 and "stale" in logs[0] and "autocast" in logs[0]
    assert json.loads((tmp_path / "manifest.json").read_text())["key"]["autocast"] == "bfloat16"
    got = bf16.lookup(torch.arange(20), torch.zeros(20, dtype=torch.bool))
    assert not torch.equal(got, f32)
    torch.testing.assert_close(got, f32, rtol=0.05, atol=0.05 * float(f32.abs().max()))
