"""Two gloo ranks running the training engine (run_stage), forked in-process as tests/test_heads.py does:
`train.clip_grad` leaves the replicas identical and equal to one process holding every class; under accumulation
DDP reduces once per update (no_sync); each rank resumes its own RNG state from last.pt; a NaN loss, read from the
device only at the next log line or checkpoint, still stops both ranks naming its first step, nothing saved after;
result.json reports a compiled model that fell back to eager on any rank and the images every rank decoded
(data.decode: cuda); the stage's tracker finishes before the ranks' last barrier.

The model is a BatchNorm-free linear face model registered for these tests: with it, two ranks of 8 images are
the same computation as one process with the global batch of 16 (BatchNorm would normalise per rank)."""

import contextlib
import dataclasses
import json
import multiprocessing
import re
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import FIXTURES
from tiny import TinyFaces, tiny_config
from torch import nn

import distill.models.registry
import distill.train.engine as engine
import teachers
from distill.data import RecordIODataset
from distill.models.registry import register_model
from distill.train.engine import StageSpec, TrainingDiverged, run_stage
from distill.train.tracking import Tracker
from distill.utils.checkpoint import safe_torch_load

CLASSES, EMB, SIDE = 7, 32, 16  # 7 classes: shards of 4 and 3, so the ranks' heads draw different random numbers
KWARGS = {"embedding_size": EMB, "input_size": SIDE}


def ddp_test_flat_face(embedding_size: int = EMB, input_size: int = SIDE):
    """Flatten + Linear: no BatchNorm, so a sharded batch trains as the whole batch does."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * input_size * input_size, embedding_size))
    model.config = dict(embedding_size=embedding_size, input_size=input_size)
    return model


def _stage(tmp, name: str, world: int, alpha: float = 0.0, distill=None, deterministic=True, margin=None, **train):
    """One stage of 3 updates of a global batch of 16 images, every rank's head starting from the same centres."""
    cfg = tiny_config(train={"max_steps": 3, "batch_size": 16 // world, "log_every": 3, "checkpoint_every": 3,
                             **train}, distill=distill or {}, deterministic=deterministic, margin=margin or {})
    return cfg, StageSpec(name, "ddp_test_flat_face", dict(KWARGS), cfg.train, alpha=alpha,
                          head_from=str(tmp / "head.pt"))


@contextlib.contextmanager
def _capturing(out):
    """Save every rank's trained parameters (model, all class centres) where the stage finishes."""
    real = engine._finish

    def finish(st, val_sets, tracker):
        torch.save({"model": st.model.state_dict(), "head": st.head.full_weight(),
                    "objective": st.objective.training_state(), "scale": st.scaler.get_scale()},
                   out / f"{st.spec.name}-rank{st.rank}.pt")
        return real(st, val_sets, tracker)

    engine._finish = finish
    try:
        yield
    finally:
        engine._finish = real


class _CountingDDP(nn.parallel.DistributedDataParallel):
    """DDP whose reducer passes are counted (bucket 0 is reduced once per pass); `today` turns no_sync off."""
    passes, today = 0, False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting(state, bucket):
            _CountingDDP.passes += bucket.index() == 0
            return allreduce_hook(state, bucket)

        self.register_comm_hook(None, counting)

    def no_sync(self):
        return contextlib.nullcontext() if _CountingDDP.today else super().no_sync()


def _worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        # clipped steps: every replica the same, and (in the test) equal to one process
        cfg, spec = _stage(tmp, "clipped", 2, clip_grad=0.05)
        with _capturing(tmp):
            run_stage(cfg, spec, str(tmp / "clipped"), TinyFaces(classes=CLASSES), {}, progress=False)

        # distillation through a learned projection (a module outside DDP, averaged and clipped by hand)
        torch.manual_seed(123)  # the same random teacher on both ranks
        teacher = teachers.build_teacher(tiny_config().teacher.spec())
        cfg, spec = _stage(tmp, "projected", 2, alpha=7.0, distill={"project": "linear"}, clip_grad=0.05)
        with _capturing(tmp):
            run_stage(cfg, spec, str(tmp / "projected"), TinyFaces(classes=CLASSES), {}, teacher=teacher,
                      progress=False)

        # fp16: an overflow in rank 1's shard of the head alone, at the second step; both ranks must skip it
        real_build = engine._build

        def overflowing(*args, **kwargs):
            st = real_build(*args, **kwargs)
            if rank == 1:
                st.head.weight.register_hook(lambda g: g * float("inf") if st.micro == 1 else g)
            return st

        engine._build = overflowing
        cfg, spec = _stage(tmp, "overflow", 2, deterministic=False, amp="fp16", clip_grad=0.05)
        with _capturing(tmp):
            run_stage(cfg, spec, str(tmp / "overflow"), TinyFaces(classes=CLASSES), {}, progress=False)
        engine._build = real_build

        # accumulate=2: DDP reduces once per update; the parameters are those of a reduction per micro-batch
        nn.parallel.DistributedDataParallel = _CountingDDP  # this forked process only
        for today in (False, True):
            _CountingDDP.passes, _CountingDDP.today = 0, today
            cfg, spec = _stage(tmp, f"accumulated-today{int(today)}", 2, accumulate=2, batch_size=4)
            with _capturing(tmp):
                run_stage(cfg, spec, str(tmp / spec.name), TinyFaces(classes=CLASSES), {}, progress=False)
            torch.save(_CountingDDP.passes, tmp / f"passes-today{int(today)}-rank{rank}.pt")

        # train.compile where rank 1's compiled student fell back to eager
        class FellBack:
            def __init__(self, model):
                self.model, self.fallback = model, "stand-in: no compiler here" if rank == 1 else None

            def __call__(self, x):
                return self.model(x)

        engine.maybe_compile = lambda model, train, what: FellBack(model)
        # and the order of the stage's last waits: rank 0's tracker (a W&B upload) finishes before the barrier
        events, real_barrier = [], engine.barrier

        class Recording(Tracker):
            def finish(self, result=None, student_path=None):
                events.append("tracker finished")

        engine.barrier = lambda: events.append("barrier") or real_barrier()
        cfg, spec = _stage(tmp, "compiled", 2, compile=True, max_steps=1)
        run_stage(cfg, spec, str(tmp / "compiled"), TinyFaces(classes=CLASSES), {}, progress=False,
                  tracker=Recording(str(tmp / "compiled"), rank=rank))
        engine.barrier = real_barrier
        (tmp / f"events-rank{rank}.txt").write_text(",".join(events))

        # data.decode: cuda (run on the CPU with the device check lifted, as tests/test_gpu_path.py does)
        engine.check_decode = lambda decode, device, dataset=None: None
        cfg = tiny_config(data={"decode": "cuda"}, train={"batch_size": 4, "lr_batch_size": 8, "max_steps": 2})
        run_stage(cfg, StageSpec("decoded", "ddp_test_flat_face", dict(KWARGS), cfg.train), str(tmp / "decoded"),
                  RecordIODataset(FIXTURES / "insightface_rec", input_size=SIDE), {}, progress=False)

        # a NaN image in rank 1's batch of step 3 (plan_epoch of 112 images, seed 0); checked at step 4
        cfg, spec = _stage(tmp, "diverged", 2, max_steps=6, log_every=4, checkpoint_every=2)
        try:
            run_stage(cfg, spec, str(tmp / "diverged"), TinyFaces(classes=CLASSES, nan_index=42), {}, progress=False)
        except TrainingDiverged as err:
            (tmp / f"diverged-rank{rank}.txt").write_text(str(err))

        # resume: stop right after the first last.pt, then resume; each rank must get its own RNG state back, and
        # end where an uninterrupted run ends (PartialFC's sampling draws from each rank's generator; the head
        # shard's momentum is the rank's own)
        cfg, spec = _stage(tmp, "resumed", 2, checkpoint_every=2, max_steps=4, margin={"sample_rate": 0.5})
        with _capturing(tmp):
            run_stage(cfg, dataclasses.replace(spec, name="whole"), str(tmp / "whole"), TinyFaces(classes=CLASSES),
                      {}, progress=False)
        real_save, real_resume = engine.save_state, engine.resume_state

        def save_then_stop(st):
            real_save(st)
            torch.save(torch.get_rng_state(), tmp / f"rng-saved-rank{st.rank}.pt")
            raise KeyboardInterrupt

        def resume_then_stop(st, log):
            real_resume(st, log)
            torch.save(torch.get_rng_state(), tmp / f"rng-resumed-rank{st.rank}.pt")
            raise KeyboardInterrupt

        for patch in ((save_then_stop, real_resume), (real_save, resume_then_stop)):
            engine.save_state, engine.resume_state = patch
            with contextlib.suppress(KeyboardInterrupt):
                run_stage(cfg, spec, str(tmp / "resumed"), TinyFaces(classes=CLASSES), {}, progress=False)
        engine.save_state, engine.resume_state = real_save, real_resume
        with _capturing(tmp):
            run_stage(cfg, spec, str(tmp / "resumed"), TinyFaces(classes=CLASSES), {}, progress=False)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run the worker's stages on two gloo ranks once; the files they leave, and the one-process reference."""
    tmp = tmp_path_factory.mktemp("ddp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distill.models.registry, "_MODELS", dict(distill.models.registry._MODELS))
        register_model(ddp_test_flat_face)
        torch.save({"head_weight": torch.randn(CLASSES, EMB, generator=torch.Generator().manual_seed(1)) * 0.1},
                   tmp / "head.pt")
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        torch.multiprocessing.start_processes(_worker, args=(tmp,), nprocs=2, join=True, start_method=method)
        cfg, spec = _stage(tmp, "clipped", 1, clip_grad=0.05)
        with _capturing(tmp / "one"):
            (tmp / "one").mkdir()
            run_stage(cfg, spec, str(tmp / "one" / "clipped"), TinyFaces(classes=CLASSES), {}, progress=False)
    return tmp


def _params(path) -> dict:
    state = torch.load(path)
    return {**{f"model.{k}": v for k, v in state["model"].items()}, "head": state["head"],
            **{f"objective.{k}": v for k, v in state["objective"].items()}}


def test_clipped_replicas_stay_identical_and_equal_one_process(two_ranks):
    rank0, rank1 = (_params(two_ranks / f"clipped-rank{r}.pt") for r in range(2))
    one = _params(two_ranks / "one" / "clipped-rank0.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the DDP replicas drifted apart"
    start = torch.load(two_ranks / "head.pt")["head_weight"]
    assert not torch.allclose(one["head"], start, atol=1e-3)  # it trained
    for k in one:  # the clip factor is the one of one process holding every class and the whole batch
        torch.testing.assert_close(rank0[k], one[k], rtol=0, atol=2e-7)


def test_replicas_of_a_projection_outside_ddp_start_and_stay_identical(two_ranks):
    rank0, rank1 = (_params(two_ranks / f"projected-rank{r}.pt") for r in range(2))
    assert any(k.startswith("objective.projection") for k in rank0)
    assert [k for k in rank0 if not torch.equal(rank0[k], rank1[k])] == []


def test_an_fp16_overflow_in_one_shard_skips_the_step_on_every_rank(two_ranks):
    rank0, rank1 = (torch.load(two_ranks / f"overflow-rank{r}.pt") for r in range(2))
    assert rank0["scale"] == rank1["scale"] < 65536.0  # the same steps skipped (the scale halved at each)
    assert all(torch.equal(rank0["model"][k], rank1["model"][k]) for k in rank0["model"])


def test_accumulation_reduces_once_per_update_with_the_same_result(two_ranks):
    passes = {today: [torch.load(two_ranks / f"passes-today{today}-rank{r}.pt") for r in range(2)]
              for today in (0, 1)}
    assert passes[1] == [6, 6]  # a reduction per micro-batch: 3 updates of 2
    assert passes[0] == [3, 3]  # no_sync: one per update
    for r in range(2):
        now, today = (_params(two_ranks / f"accumulated-today{t}-rank{r}.pt") for t in (0, 1))
        for k in now:
            torch.testing.assert_close(now[k], today[k], rtol=0, atol=2e-7)


def test_each_rank_resumes_its_own_rng_state_and_head_momentum(two_ranks):
    saved = [torch.load(two_ranks / f"rng-saved-rank{r}.pt") for r in range(2)]
    resumed = [torch.load(two_ranks / f"rng-resumed-rank{r}.pt") for r in range(2)]
    assert not torch.equal(saved[0], saved[1])  # the ranks' generators had parted (their shards' draws)
    assert torch.equal(resumed[0], saved[0]) and torch.equal(resumed[1], saved[1])
    for r in range(2):  # and the resumed run ends bit for bit where the uninterrupted one does, on every rank
        whole, resumed = (_params(two_ranks / f"{name}-rank{r}.pt") for name in ("whole", "resumed"))
        assert [k for k in whole if not torch.equal(whole[k], resumed[k])] == []


def test_a_nan_loss_stops_both_ranks_naming_its_first_step_and_saves_nothing_after(two_ranks):
    for r in range(2):
        said = (two_ranks / f"diverged-rank{r}.txt").read_text()
        assert re.search(r"non-finite at step 3 \(term\(s\): [^)]*loss_cls", said), said
        assert "last good checkpoint" in said
    kept = safe_torch_load(two_ranks / "diverged" / "last.pt")
    assert kept["step"] == 2 and all(torch.isfinite(v).all() for v in kept["model"].values())


def test_the_tracker_finishes_before_the_ranks_wait_for_each_other(two_ranks):
    """Rank 0's W&B upload happens while the other ranks wait in the stage's barrier (gloo, dist.timeout_minutes),
    not in the next stage's first NCCL collective."""
    for r in range(2):
        assert (two_ranks / f"events-rank{r}.txt").read_text() == "tracker finished,barrier"


def test_result_json_says_a_compiled_model_fell_back_on_any_rank_and_counts_every_ranks_decoding(two_ranks):
    result = json.loads((two_ranks / "compiled" / "result.json").read_text())
    assert result["compile_fell_back"] == {"student": "stand-in: no compiler here", "teacher": None}
    assert "compile_fell_back" not in json.loads((two_ranks / "clipped" / "result.json").read_text())
    # 2 steps x 2 ranks x 4 images, decoded in the engine; none fell back to the CPU
    decoded = json.loads((two_ranks / "decoded" / "result.json").read_text())
    assert decoded["decode"] == {"images": 16, "cpu_fallback": 0}
    assert "decode" not in result
