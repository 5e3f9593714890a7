"""Under torchrun no rank waits in a collective while rank 0 works alone for long, and a run's evaluations run on
its device: a loaded teacher's verification sets and every IJB evaluation are embedded on the run's device, each
rank its share (the same numbers as one process); a teacher.shared_cache lock held by another run for longer than
the process group's timeout is waited for in short exchanges, not in one collective. Two gloo ranks, forked."""

import json
import multiprocessing
import subprocess
import sys
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from tiny import TinyFaces, tiny_config

import distill.eval.ijb_stage
import distill.eval.verification
import distill.run.hooks
import distill.run.shared_teacher
import distill.run.teacher_stage
import teachers
from distill.data.synth_ijb import write_synthetic_ijb
from distill.eval.ijb_stage import evaluate_ijb, read_meta
from distill.eval.verification import evaluate_sets
from distill.run.context import RunContext, run_logger, silent_logger
from distill.run.hooks import StageHooks
from distill.run.plan import IJB, LOAD_TEACHER, PlannedStage
from distill.run.teacher_stage import run_teacher, teacher_cache
from distill.utils.device import model_device
from distill.utils.layout import RunLayout

SPEC = {"arch": "iresnet18", "input_size": 16, "embedding_size": 32}
LOADED = PlannedStage("teacher", LOAD_TEACHER, hooks=(IJB,))  # the plan's stage of a teacher loaded from its file
FAKE_IJB = {"tar_at_far": {k: 0.5 for k in ("1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1")}, "auc": 0.9}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny teacher's checkpoint, a 40-pair verification set (80 images: 64 + 16 in batches of 64), a synthetic
    IJB set (33 images: 16 + 17 in batches of 16) and the experiment config that loads the teacher."""
    tmp = tmp_path_factory.mktemp("rank_waits")
    torch.manual_seed(0)
    t = teachers.build_teacher(SPEC)
    with torch.no_grad():  # an untrained IResNet's outputs reach 1e5; a trained one's are O(1)
        t.model.fc.weight.mul_(1e-4)
    torch.save(t.model.state_dict(), tmp / "teacher.pt")
    rng = np.random.default_rng(0)
    val = {"pairs": (rng.integers(0, 256, (80, 16, 16, 3), dtype=np.uint8), np.arange(40) % 2 == 0)}
    write_synthetic_ijb(tmp / "ijb", templates=6)
    cfg = tiny_config(teacher={**SPEC, "checkpoint": str(tmp / "teacher.pt")}, tracking={"wandb": "disabled"},
                      data={"ijb": {"root": str(tmp / "ijb"), "target": "IJBC", "batch_size": 16}})
    return tmp, cfg, val


def _context(run_dir, rank=0, world=1, device="cpu", lines=None):
    log = run_logger(lines.append if lines is not None else None) if rank == 0 else silent_logger()
    return RunContext(RunLayout(str(run_dir)), torch.device(device), log, False, rank, world)


def _fork(worker, *args):
    # fork where the platform has it: the workers then skip re-importing torch (seconds each)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    torch.multiprocessing.start_processes(worker, args=args, nprocs=2, join=True, start_method=method)


def _join(tmp, rank, seconds):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2,
                            timeout=timedelta(seconds=seconds))


# ------------------------------------------------------------------------------ the run's device

def test_a_loaded_teacher_and_ijb_are_evaluated_on_the_runs_device(setup, tmp_path, monkeypatch):
    """`meta` stands for the GPU: the evaluations get the run's device and a model that is on it, and the teacher
    moved there stays frozen."""
    tmp, cfg, val = setup
    ctx = _context(tmp_path / "run", device="meta")
    seen = []

    def spy_sets(model, *args, **kw):
        seen.append(("sets", model_device(model).type, str(kw.get("device"))))
        return {}

    def spy_ijb(model, *args, **kw):
        seen.append(("ijb", model_device(model).type, str(kw.get("device"))))
        return {**distill.eval.ijb_stage.ijb_key(cfg.data.ijb), **FAKE_IJB}

    monkeypatch.setattr(distill.run.teacher_stage, "evaluate_sets", spy_sets)
    monkeypatch.setattr(distill.run.hooks, "evaluate_ijb", spy_ijb)
    hooks = StageHooks(cfg, ctx, SimpleNamespace(names=[""] * 3, pairs=[(0, 1)]))
    teacher, _, _ = run_teacher(ctx, cfg, LOADED, TinyFaces(), val, hooks)  # loaded on the CPU, evaluated, IJB
    student = teachers.build_teacher(cfg.teacher.spec()).model  # a finished stage's model, loaded on the CPU
    (tmp_path / "run" / "gen1").mkdir()
    hooks.ijb({"stage": "gen1"}, lambda: (student, 16))
    assert seen == [("sets", "meta", "meta"), ("ijb", "meta", "meta"), ("ijb", "meta", "meta")]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def _evaluation_worker(rank, tmp, cfg, val):
    _join(tmp, rank, 60)
    shares = {"pairs": [], "ijb": []}
    embed_pairs, embed_images = distill.eval.verification.embed_pairs, distill.eval.ijb_stage.embed_images

    def pairs_spy(model, images, *args, **kw):
        first = kw.get("first_index", 0)
        shares["pairs"].append([first, first + len(images)])
        return embed_pairs(model, images, *args, **kw)

    def ijb_spy(model, meta, *args, indices=None, **kw):
        shares["ijb"].append([int(indices[0]), int(indices[-1]) + 1] if indices is not None else [0, len(meta.names)])
        return embed_images(model, meta, *args, indices=indices, **kw)

    distill.eval.verification.embed_pairs, distill.eval.ijb_stage.embed_images = pairs_spy, ijb_spy
    try:
        ctx = _context(tmp / "run", rank, 2)
        (tmp / "run" / "gen1").mkdir(parents=True, exist_ok=True)
        hooks = StageHooks(cfg, ctx, read_meta(cfg.data.ijb))
        teacher, result, _ = run_teacher(ctx, cfg, LOADED, TinyFaces(), val, hooks)  # its sets and IJB
        ijb = hooks.ijb({"stage": "gen1"}, lambda: (teacher.model, 16))["ijb"]  # a student's IJB
        (tmp / f"rank{rank}.json").write_text(json.dumps({"shares": shares, "result": result, "ijb": ijb}))
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_the_evaluations_and_get_the_one_process_numbers(setup, tmp_path):
    tmp, cfg, val = setup
    _fork(_evaluation_worker, tmp_path, cfg, val)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["shares"]["pairs"] for r in ranks] == [[[0, 64]], [[64, 80]]]  # neither rank embeds alone
    assert [r["shares"]["ijb"] for r in ranks] == [[[0, 16]] * 2, [[16, 33]] * 2]  # the teacher's, the student's
    teacher = teachers.build_teacher(cfg.teacher.spec())
    one = json.loads(json.dumps({"metrics": evaluate_sets(teacher, val, 16, progress=False),
                                 "ijb": evaluate_ijb(teacher.model, 16, cfg.data.ijb, workers=0)}))
    for r in ranks:
        assert r["result"]["metrics"] == one["metrics"] and r["result"]["ijb"] == r["ijb"] == one["ijb"]
    written = json.loads((tmp_path / "run" / "teacher" / "result.json").read_text())
    assert written["metrics"] == one["metrics"] and written["ijb"] == one["ijb"]
    assert json.loads((tmp_path / "run" / "gen1" / "result.json").read_text())["ijb"] == one["ijb"]


# ------------------------------------------------------------------------------ the shared cache's lock

TIMEOUT, HELD = 2, 3.5  # seconds: the process group's timeout, and how long another run holds the lock


def _lock_worker(rank, tmp, cfg):
    _join(tmp, rank, TIMEOUT)
    distill.run.shared_teacher.POLL_SECONDS = 0.25
    lines, out = [], {}
    try:
        ctx = _context(tmp / "run", rank, 2, lines=lines)
        cache = teacher_cache(ctx, cfg, teachers.build_teacher(cfg.teacher.spec()), TinyFaces(classes=4, per_class=6),
                              folder=str(tmp / "pool" / "key"))
        out = {"rows": len(cache), "lines": lines, "error": None}
    except Exception as err:  # noqa: BLE001 - the test reads it
        out = {"error": f"{type(err).__name__}: {err}"}
    finally:
        (tmp / f"rank{rank}.json").write_text(json.dumps(out))
        dist.destroy_process_group()


def test_a_shared_cache_lock_held_past_the_timeout_is_waited_for_and_every_rank_builds(setup, tmp_path):
    _, cfg, _ = setup
    folder = tmp_path / "pool" / "key"
    folder.mkdir(parents=True)
    holder = subprocess.Popen(  # another run of the sweep, building the same cache
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(float(sys.argv[2]))",
         str(folder / ".lock"), str(HELD)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _fork(_lock_worker, tmp_path, cfg)
    finally:
        holder.kill()
        holder.wait()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["error"] for r in ranks] == [None, None]
    assert [r["rows"] for r in ranks] == [24, 24]
    waiting = f"teacher cache: waiting for {folder}'s lock, held by another run"
    assert ranks[0]["lines"].count(waiting) == 1
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rows_done"] == 24 and manifest["world_size"] == 2
