"""Frozen-teacher embeddings computed once (each image and its horizontal flip), memory-mapped float16.

The teacher is the expensive half of distillation (IResNet-100 is 24 GFLOPs an image against the
student's 1). With flipping as the only augmentation, each image has exactly two teacher outputs, so
they are computed once and training reads row `[index, flipped]` instead of running the teacher.

Layout of a cache directory (distill/utils/layout.py: CacheLayout):
    embeddings.f16        raw float16 array, shape (num_samples, 2, dim); [:, 0] original, [:, 1] flipped
    manifest.json         what the rows were computed from (teacher weights hash, dataset fingerprint,
                          preprocessing), the build's world size, batch size and id, `rows_done`
                          (num_samples when finished) and, once finished, a SHA-256 per block of rows (`digest`,
                          teachers/cache_digest.py). Written by rank 0 alone.
    progress.rank<R>.json during a build only: rank R's slice (start, stop) and how many of its rows are on
                          disk. Written by rank R alone, atomically, after an fsync of those rows.

Under torchrun every rank builds: rank r embeds a contiguous slice of whole batches (rank_slice) into the
one pre-allocated file (each rank writes its own byte range); rank 0 prepares the build first and marks it
finished (rows_done = num_samples, progress files removed) once every rank is through and every slice is
vouched for. Since each batch is the batch a one-process build would run, a finished cache is
byte-identical whatever the world size, and is reused as it is by any number of processes.

The rows are filled through the online teacher signal (teachers/signal.py: OnlineTeacher.embed_pairs): the same
resize, autocast and forward pass that teach online, so cached and online targets agree up to float16 rounding.

A finished cache is checked against its block digests whenever a run opens it (rank 0, before any process reads
a row): a block whose bytes changed since (a disk error, a file overwritten in place) has its rows embedded again,
in the batches of the first build, with a note naming the file and the blocks; where the file cannot be written,
the run is refused, naming them. A cache finished before digests were recorded has them computed and recorded
on its first open (one note). A process checks a file it has checked unchanged (size, mtime, inode) once.

A manifest that disagrees with the current teacher/dataset/preprocessing marks the cache stale: it is
rebuilt. An interrupted build resumes each rank's slice from its last recorded batch, provided it is
resumed with the same world size and batch size; otherwise (or from another teacher or data) it is
rebuilt from scratch, never mixed, and the log says why.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

import numpy as np
import torch
from tqdm import tqdm

import distill.utils.dist as ddp
from distill.utils.atomic import WriteError, atomic_write_json, read_json
from distill.utils.digest import file_state
from distill.utils.errors import DataFormatError, DistillError
from distill.utils.layout import CacheLayout
from teachers.cache_digest import (
    DIGEST_KEY,
    block_digests,
    damaged_blocks,
    describe_blocks,
    new_record,
    record_is_valid,
)
from teachers.cache_file import allocate, pwrite_all
from teachers.signal import OnlineTeacher


class TeacherCache:
    """Read side: `lookup(indices, flipped) -> float32 tensor (B, dim)`."""

    def __init__(self, directory: str, num_samples: int, dim: int):
        self.directory = directory
        self.path = CacheLayout(directory).rows
        self.emb = np.memmap(self.path, dtype=np.float16, mode="r", shape=(num_samples, 2, dim))

    def __len__(self) -> int:
        return self.emb.shape[0]

    def lookup(self, indices: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        rows = self.emb[indices.cpu().numpy(), flipped.cpu().numpy().astype(np.int64)]
        return torch.from_numpy(rows.astype(np.float32))


class _Rows(torch.utils.data.Dataset):
    """Un-flipped images `start`..`stop - 1`, for the build loader."""

    def __init__(self, dataset, start: int, stop: int):
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        return self.dataset.get(self.start + i, False)


def rank_slice(num_samples: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) that process `rank` of `world_size` embeds: a contiguous run of whole batches of the
    one-process build (batch b is rows [b*batch_size, (b+1)*batch_size)), the batches shared out as evenly as
    integers allow. Every batch the teacher sees is then a batch of the one-process build, so its float
    reductions, and the bytes written, are the same whatever the number of processes."""
    batches = -(-num_samples // batch_size)
    lo, hi = rank * batches // world_size, (rank + 1) * batches // world_size
    return min(lo * batch_size, num_samples), min(hi * batch_size, num_samples)


def progress_path(directory: str, rank: int) -> str:
    """Process `rank`'s own progress file: written by that process alone, atomically."""
    return CacheLayout(directory).progress(rank)


def _slice_done(directory: str, manifest: dict, rank: int, world_size: int, num_samples: int) -> int:
    """Rows of `rank`'s slice that its progress file vouches for in the build `manifest` describes; 0 without a
    valid file (the slice is then embedded again, which writes the same bytes)."""
    batch_size = manifest["batch_size"]
    start, stop = rank_slice(num_samples, batch_size, rank, world_size)
    p = read_json(progress_path(directory, rank))
    if not isinstance(p, dict) or p.get("build") != manifest.get("build") \
            or (p.get("start"), p.get("stop")) != (start, stop):
        return 0
    done = p.get("rows_done")
    if not isinstance(done, int) or not 0 <= done <= stop - start or (done % batch_size and done != stop - start):
        return 0
    return done


def _changed(key: dict, other) -> list:
    other = other if isinstance(other, dict) else {}
    return [k for k in key if other.get(k) != key[k]]


def recorded_identity(directory: str):
    """The teacher identity a cache's manifest records (teachers/prepare.py), or None (none recorded, or no cache)."""
    manifest = read_json(CacheLayout(directory).manifest)
    return manifest.get("teacher_identity") if isinstance(manifest, dict) else None


def record_identity(directory: str, identity: dict) -> None:
    """Record `identity` in a cache's manifest (rank 0; the rows are unchanged)."""
    path = CacheLayout(directory).manifest
    manifest = read_json(path)
    if isinstance(manifest, dict) and ddp.is_main():
        atomic_write_json(path, {**manifest, "teacher_identity": identity})


def _prepare(directory: str, key: dict, world_size: int, batch_size: int, log: logging.Logger,
             identity=None) -> dict:
    """Rank 0, before any process embeds: the manifest of a finished cache (reused), of an unfinished build of
    this teacher, data and slicing (resumed), or of a new build (stale or foreign rows are never mixed in: a
    new build id, the progress files removed, the file allocated afresh)."""
    n, dim = key["num_samples"], key["dim"]
    manifest_path, emb_path = CacheLayout(directory).manifest, CacheLayout(directory).rows
    nbytes = n * 2 * dim * 2
    manifest = read_json(manifest_path)
    why = None
    if not isinstance(manifest, dict):
        if os.path.exists(manifest_path):
            why = f"{manifest_path} is unreadable"
    elif manifest.get("key") != key:
        why = f"stale (changed: {', '.join(_changed(key, manifest.get('key'))) or 'format'})"
    elif not (os.path.exists(emb_path) and os.path.getsize(emb_path) == nbytes):
        why = "stale (changed: file size)"
    elif manifest.get("rows_done") == n and DIGEST_KEY in manifest and not record_is_valid(manifest[DIGEST_KEY], n):
        why = f"{manifest_path}'s block digests are damaged (its rows cannot be checked)"
    elif manifest.get("rows_done") == n:
        return manifest  # finished: reused by any number of processes (its bytes do not depend on it)
    elif "build" not in manifest:
        why = "the unfinished build there records no build id (no per-process progress to resume from)"
    elif manifest.get("world_size") != world_size:
        why = (f"the unfinished build there was started with world size {manifest.get('world_size')} and this run "
               f"has world size {world_size}: its rows are sliced differently and are not mixed in")
    elif manifest.get("batch_size") != batch_size:
        why = (f"the unfinished build there was started with batch size {manifest.get('batch_size')} and this run "
               f"has batch size {batch_size}: its batches are not mixed in")
    if manifest is not None and why is None:  # an unfinished build of this teacher, data and slicing
        done = [_slice_done(directory, manifest, r, world_size, n) for r in range(world_size)]
        ranks = f" ({', '.join(f'rank {r}: {d}' for r, d in enumerate(done))})" if world_size > 1 else ""
        log.info(f"teacher cache: resuming an interrupted build at {sum(done)}/{n} rows{ranks}")
        allocate(emb_path, nbytes, fresh=False)
        return manifest
    if why is not None:
        log.info(f"teacher cache: {why}, rebuilding {directory} from scratch")
    manifest = {"key": key, "world_size": world_size, "batch_size": batch_size, "build": uuid.uuid4().hex,
                "rows_done": 0, **({"teacher_identity": identity} if identity is not None else {})}
    atomic_write_json(manifest_path, manifest)  # the new build id first: older progress files no longer count
    for path in CacheLayout(directory).progress_files():
        os.remove(path)
    allocate(emb_path, nbytes, fresh=True)
    return manifest


def _joined(directory: str, key: dict, rank: int, world_size: int, batch_size: int) -> dict:
    """A non-zero rank: the build rank 0 prepared, checked to be of this process's teacher, data and slicing."""
    manifest_path = CacheLayout(directory).manifest
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        differs = f" (rank {rank} differs in: {', '.join(_changed(key, manifest.get('key')))})" \
            if isinstance(manifest, dict) else ""
        raise DistillError(f"{manifest_path}: rank {rank} finds no teacher cache build of its teacher and data"
                           f"{differs}; every process must load the same teacher and dataset, and all "
                           f"{world_size} must start together (torchrun --nproc_per_node={world_size}) so that "
                           f"rank 0 prepares the build")
    if manifest.get("rows_done") != key["num_samples"] and \
            (manifest.get("world_size"), manifest.get("batch_size")) != (world_size, batch_size):
        raise DistillError(f"{manifest_path}: the unfinished teacher cache build there is for world size "
                           f"{manifest.get('world_size')} with batch size {manifest.get('batch_size')}, and rank "
                           f"{rank} runs with world size {world_size} and batch size {batch_size}; start all "
                           f"{world_size} processes together (torchrun --nproc_per_node={world_size}) with the same "
                           f"settings so that rank 0 prepares the build for them")
    return manifest


def _settle(err, collective: bool, step: str, directory: str) -> None:
    """Every rank learns whether any rank failed at `step` (no rank is left waiting for another): the rank that
    failed raises its own exception, the others a DistillError naming it (distill.utils.dist.any_failure, through
    the process group's waits: gloo, bounded by dist.timeout_minutes)."""
    failed = ddp.any_failure(err, collective)
    if failed:
        r, note = failed
        raise DistillError(f"{directory}: the teacher cache {step} stopped on rank {r} ({note}); the rows "
                           f"written so far are kept: see rank {r}'s message, then rerun the same command with "
                           f"the same number of processes to resume")


def _embed(online: OnlineTeacher, dataset, directory: str, manifest: dict, rank: int, world_size: int, start: int,
           stop: int, done: int, batch_size: int, num_workers: int, progress: bool, flush_every: int) -> None:
    """Rows `start + done`..`stop - 1` (both views, through `online`), written in place; the progress file follows
    the flushed rows."""
    n, dim = manifest["key"]["num_samples"], manifest["key"]["dim"]
    files = CacheLayout(directory)
    loader = torch.utils.data.DataLoader(_Rows(dataset, start + done, stop), batch_size=batch_size,
                                         num_workers=num_workers, shuffle=False)
    row = start + done
    where = f" (rank {rank} of {world_size})" if world_size > 1 else ""
    bar = tqdm(total=stop - start, initial=done, unit="img", desc=f"teacher cache{where}",
               disable=not progress or rank != 0, dynamic_ncols=True, leave=False)

    def record():  # the rows reach the disk before the progress file vouches for them
        os.fsync(fd)
        atomic_write_json(files.progress(rank), {"build": manifest["build"], "rank": rank, "world_size": world_size,
                                                 "start": start, "stop": stop, "rows_done": row - start})
        if rank == 0:  # a summary for people; each rank's own file is what a resumed build trusts
            total = sum(_slice_done(directory, manifest, r, world_size, n) for r in range(world_size))
            if total < n:  # n (finished) is written by rank 0 once every rank is through
                manifest["rows_done"] = total
                atomic_write_json(files.manifest, manifest)

    fd = os.open(files.rows, os.O_RDWR)
    try:
        for i, x in enumerate(loader):
            pwrite_all(fd, _rows_bytes(online, x, row), row * 2 * dim * 2)
            row += len(x)
            bar.update(len(x))
            if (i + 1) % flush_every == 0:
                record()
        record()
    finally:
        os.close(fd)
        bar.close()


def _rows_bytes(online: OnlineTeacher, x: torch.Tensor, row: int) -> bytes:
    """The float16 bytes of images `x` (rows `row`..) and their flips through the teacher, checked finite and in
    float16's range."""
    both = online.embed_pairs(x).cpu().numpy()  # (B, 2, dim): [:, 0] original, [:, 1] flipped
    if not np.isfinite(both).all():
        raise DataFormatError(f"teacher produced NaN/Inf embeddings for rows {row}..{row + len(x) - 1}")
    peak = float(np.abs(both).max())
    if peak > float(np.finfo(np.float16).max):  # would be stored as inf
        raise DataFormatError(f"teacher embeddings reach {peak:.3g} (rows {row}..{row + len(x) - 1}), beyond "
                              f"float16's range; is the teacher trained? Use teacher.cache: false to teach online")
    return np.ascontiguousarray(both.astype(np.float16)).tobytes()


_CHECKED: set = set()  # (file_state of embeddings.f16, its block digests): checked by this process, unchanged since


def _open_for_repair(path: str) -> int:
    """A descriptor to write rows of `path` into (OSError where the file cannot be written)."""
    return os.open(path, os.O_RDWR)


def _repair_spans(blocks: list, rows_per_block: int, n: int, batch_size: int) -> list:
    """The rows [start, stop) to embed again for `blocks`, widened to whole batches of the first build (so each
    batch the teacher sees is one it saw then, and writes the same bytes), overlapping spans merged."""
    spans = []
    for b in blocks:
        start = b * rows_per_block // batch_size * batch_size
        stop = min(n, -(-min(n, (b + 1) * rows_per_block) // batch_size) * batch_size)
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], stop))
        else:
            spans.append((start, stop))
    return spans


def _checked_rows(online: OnlineTeacher, dataset, directory: str, manifest: dict, num_workers: int,
                  log: logging.Logger) -> dict:
    """Rank 0, opening a finished cache: its rows checked against the block digests its manifest records (computed
    and recorded first for a cache finished without them); damaged blocks embedded again through `online`, or,
    where the file cannot be written, a DataFormatError naming it. Returns the manifest (its digests current)."""
    files = CacheLayout(directory)
    n, dim = manifest["key"]["num_samples"], manifest["key"]["dim"]
    row_bytes = 2 * dim * 2
    record = manifest.get(DIGEST_KEY)
    if record is None:
        manifest[DIGEST_KEY] = new_record(files.rows, row_bytes, n)
        try:
            atomic_write_json(files.manifest, manifest)
            kept = "recorded now: later opens check them"
        except WriteError as err:
            kept = f"not recorded ({err})"
        log.info(f"teacher cache: note: {directory} was finished by an earlier facedistill without block digests: "
                 f"its rows are used as they are, and their digests are {kept}")
        _CHECKED.add((file_state(files.rows), tuple(manifest[DIGEST_KEY]["blocks"])))
        return manifest
    if (file_state(files.rows), tuple(record["blocks"])) in _CHECKED:
        return manifest
    bad = damaged_blocks(files.rows, record, row_bytes, n)
    if bad:
        _repair(online, dataset, directory, manifest, bad, num_workers, log)
    _CHECKED.add((file_state(files.rows), tuple(manifest[DIGEST_KEY]["blocks"])))
    return manifest


def _repair(online: OnlineTeacher, dataset, directory: str, manifest: dict, bad: list, num_workers: int,
            log: logging.Logger) -> None:
    """Embed the rows of the damaged blocks `bad` again, in the first build's batches, and record the digests of
    every block written (the same as before when the teacher reproduces its bytes)."""
    files = CacheLayout(directory)
    n, dim, batch_size = manifest["key"]["num_samples"], manifest["key"]["dim"], manifest["batch_size"]
    record = manifest[DIGEST_KEY]
    rows_per_block = record["block_rows"]
    where = describe_blocks(bad, rows_per_block, n)
    try:
        fd = _open_for_repair(files.rows)
    except OSError as err:
        raise DataFormatError(f"{files.rows}: {where} of the teacher cache no longer match the digests recorded when "
                              f"it was finished (the file was changed or damaged since), and the file cannot be "
                              f"rewritten here ({err.strerror or err}); restore it from a copy, or make it writable "
                              f"(or delete {directory}) so that the next run embeds those rows again") from None
    spans = _repair_spans(bad, rows_per_block, n, batch_size)
    log.info(f"teacher cache: note: {files.rows}: {where} no longer match the digests recorded when the cache was "
             f"finished (changed or damaged on disk since); embedding rows "
             f"{', '.join(f'{a}..{b - 1}' for a, b in spans)} again with the teacher")
    try:
        for start, stop in spans:
            loader = torch.utils.data.DataLoader(_Rows(dataset, start, stop), batch_size=batch_size,
                                                 num_workers=num_workers, shuffle=False)
            row = start
            for x in loader:
                pwrite_all(fd, _rows_bytes(online, x, row), row * 2 * dim * 2)
                row += len(x)
        os.fsync(fd)
    finally:
        os.close(fd)
    written = sorted({b for a, z in spans for b in range(a // rows_per_block, -(-z // rows_per_block))})
    now = block_digests(files.rows, 2 * dim * 2, rows_per_block, n, written)
    differ = [b for b in written if now[b] != record["blocks"][b]]
    if differ:  # the teacher did not reproduce its bytes (kernels that are not bit-reproducible): the new rows count
        record["blocks"] = [now.get(b, d) for b, d in enumerate(record["blocks"])]
        atomic_write_json(files.manifest, manifest)
        log.info(f"teacher cache: rebuilt; {describe_blocks(differ, rows_per_block, n)} differ in bits from the "
                 f"first build (the teacher's kernels do not reproduce them bit for bit): their new digests are "
                 f"recorded")
    else:
        log.info(f"teacher cache: rebuilt; {where} are again the bytes the cache was finished with")


def _finish(directory: str, manifest: dict, world_size: int, seconds: float) -> None:
    """Rank 0, after every rank is through: check each slice is vouched for, mark the cache finished with the
    digests of its blocks."""
    n = manifest["key"]["num_samples"]
    for r in range(world_size):
        start, stop = rank_slice(n, manifest["batch_size"], r, world_size)
        done = _slice_done(directory, manifest, r, world_size, n)
        if done < stop - start:
            raise DistillError(f"{progress_path(directory, r)}: rank {r}'s slice of the teacher cache (rows "
                               f"{start}..{stop - 1}) is not finished ({done}/{stop - start} rows); the cache is "
                               f"complete only when all {world_size} processes have built their slices: rerun the "
                               f"same command with all of them (torchrun --nproc_per_node={world_size}) to finish it")
    manifest["rows_done"] = n
    manifest["seconds"] = manifest.get("seconds", 0.0) + seconds
    rows = CacheLayout(directory).rows
    manifest[DIGEST_KEY] = new_record(rows, 2 * manifest["key"]["dim"] * 2, n)
    atomic_write_json(CacheLayout(directory).manifest, manifest)
    _CHECKED.add((file_state(rows), tuple(manifest[DIGEST_KEY]["blocks"])))
    for path in CacheLayout(directory).progress_files():
        os.remove(path)


def build_cache(teacher, dataset, directory: str, batch_size: int = 128, num_workers: int = 0,
                progress: bool = True, flush_every: int = 20, logger: logging.Logger | None = None,
                rank: int | None = None, world_size: int | None = None, identity: dict | None = None) -> TeacherCache:
    """Fill (or reuse, or resume) the cache of `teacher` over `dataset` in `directory`, on every rank.

    `teacher`: the online teacher signal that fills the rows (teachers/signal.py: OnlineTeacher, with the run's
    device and autocast: an IResNet-100 embeds on the GPU in bf16 and NHWC; rows made under autocast are keyed by
    its dtype), or a frozen teacher, then run on the CPU in float32.
    Each of the `world_size` processes (default: distill.utils.dist's, i.e. torchrun's) embeds its own slice
    (rank_slice: whole batches, contiguous) into the one file; rank 0 alone prepares the build and marks it
    finished once all slices are. Call it on every rank, each with the same arguments; `rank` and
    `world_size` override distill.utils.dist's (tests; collectives are used only when a process group exists).
    A finished cache is byte-identical whatever the number of processes that built it (same teacher, data and
    batch_size), so any number reuses it; an unfinished one is resumed only by the same teacher, data,
    world size and batch size, and rebuilt from scratch otherwise (the log says why).
    `identity`: the teacher's identity (teachers/prepare.py), recorded in the manifest of a new build.
    `logger`: where the build's notes go (the run's; default this module's logger)."""
    log = logger or logging.getLogger(__name__)
    online = (teacher if isinstance(teacher, OnlineTeacher) else OnlineTeacher(teacher)).for_cache()
    rank = ddp.rank() if rank is None else rank
    world = ddp.world_size() if world_size is None else world_size
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not a rank of a world of size {world}")
    collective = world > 1 and ddp.is_distributed()
    os.makedirs(directory, exist_ok=True)
    key = online.cache_key(dataset)
    n, dim = key["num_samples"], key["dim"]
    t0 = time.perf_counter()

    err, manifest = None, None  # 1. rank 0 reuses, resumes or starts the build; the others wait for it
    if rank == 0:
        try:
            manifest = _prepare(directory, key, world, batch_size, log, identity)
            if manifest.get("rows_done") == n:  # a finished cache: its rows are the ones it was finished with
                manifest = _checked_rows(online, dataset, directory, manifest, num_workers, log)
        except BaseException as e:  # noqa: BLE001 - reported to every rank, then re-raised
            err = e
    _settle(err, collective, "preparation", directory)
    if rank != 0:  # 2. every rank checks that it is the build of its own teacher, data and slicing
        try:
            manifest = _joined(directory, key, rank, world, batch_size)
        except BaseException as e:  # noqa: BLE001 - reported to every rank (_settle), then re-raised
            err = e
    _settle(err, collective, "preparation", directory)
    if manifest.get("rows_done") == n:
        return TeacherCache(directory, n, dim)

    start, stop = rank_slice(n, manifest["batch_size"], rank, world)  # 3. each rank embeds its own slice
    done = _slice_done(directory, manifest, rank, world, n)
    if start + done < stop:
        try:
            _embed(online, dataset, directory, manifest, rank, world, start, stop, done, manifest["batch_size"],
                   num_workers, progress, flush_every)
        except BaseException as e:  # noqa: BLE001 - reported to every rank (_settle), then re-raised
            err = e
    _settle(err, collective, "build", directory)

    if rank == 0:  # 4. all are through: rank 0 checks every slice and marks the cache finished
        try:
            _finish(directory, manifest, world, time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001 - reported to every rank (_settle), then re-raised
            err = e
    _settle(err, collective, "completion", directory)
    final = read_json(CacheLayout(directory).manifest)
    if rank != 0 and not (isinstance(final, dict) and final.get("rows_done") == n):
        raise DistillError(f"{directory}: rank {rank} has built its slice of the teacher cache, and rank 0 marks the "
                           f"cache finished once every slice is built: start all {world} processes together "
                           f"(torchrun --nproc_per_node={world}) to finish it")
    return TeacherCache(directory, n, dim)
