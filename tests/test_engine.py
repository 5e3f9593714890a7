"""The training engine: exact resume after a kill, preemption, divergence, config changes, safe saves."""

import contextlib
import errno
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from tiny import TinyFaces, tame, tiny_config

import teachers
from distill.models.files import load_student
from distill.train.engine import StageSpec, TrainingDiverged, run_stage
from distill.utils.checkpoint import safe_torch_load
from distill.utils.errors import CheckpointError

HERE = Path(__file__).resolve().parent


def _child_main(out: str) -> None:
    """engine_child.py's main, slowed so that it can be interrupted, its lines in OUT/../child.out; exits with
    its code (75: preempted)."""
    import engine_child
    with open(Path(out).parent / "child.out", "w") as log, contextlib.redirect_stdout(log):
        code = engine_child.main(out, 0.01)
    os._exit(code)


class _Child:
    """The stage to interrupt, in a forked copy of this process: the test's imports are done, so it starts in
    milliseconds where `python engine_child.py` spends seconds importing torch and timm. Popen's poll,
    send_signal and wait."""

    def __init__(self, out):
        self.out = Path(out)
        self.process = multiprocessing.get_context("fork").Process(target=_child_main, args=(str(out),))
        self.process.start()

    def poll(self):
        return self.process.exitcode

    def send_signal(self, sig) -> None:
        os.kill(self.process.pid, sig)

    def wait(self, timeout: float = 60) -> int:
        self.process.join(timeout)
        return self.process.exitcode

    def printed(self) -> str:
        return (self.out.parent / "child.out").read_text()


def _run(out, **train):
    cfg = tiny_config(train=train) if train else tiny_config()
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=7.0, generation=1)
    teacher = teachers.build_teacher(cfg.teacher.spec())
    return run_stage(cfg, spec, str(out), TinyFaces(), {}, teacher=teacher, progress=False), teacher


def _final_weights(stage_dir):
    return safe_torch_load(os.path.join(stage_dir, "student.pt"))["state_dict"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _child_in_this_process(out) -> None:
    """engine_child.py's stage run to the end in this process (the same code, seeds and one thread as the child):
    the uninterrupted reference and the resume after an interruption. Only the run that is killed or preempted
    needs a process of its own, and each process costs seconds of imports (torch, timm)."""
    import engine_child
    assert engine_child.main(str(out), 0.0) == 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _child_in_this_process(out)
    return out


def _wait_for_step(out, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the child finished before it could be interrupted"
        path = out / "last.pt"
        if path.exists():
            try:
                if safe_torch_load(path)["step"] >= step:
                    return
            except Exception:  # being replaced right now
                pass
        time.sleep(0.05)
    raise AssertionError("the child never reached the step")


def test_run_writes_the_stage_files(tmp_path):
    result, _ = _run(tmp_path)
    assert {"last.pt", "student.pt", "metrics.jsonl", "result.json"} <= set(os.listdir(tmp_path))
    assert json.loads((tmp_path / "result.json").read_text())["steps"] == result["steps"] == 12
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6, 8, 10, 12]
    for key in ("train/loss", "train/loss_cls", "train/loss_kd/equivalent_angular", "train/lr", "train/images_per_s"):
        assert key in lines[0]
    assert lines[-1]["train/loss"] < lines[0]["train/loss"]
    model, payload = load_student(tmp_path / "student.pt")
    assert payload["kwargs"]["embedding_size"] == 32 and model.eval()(torch.randn(1, 3, 16, 16)).shape == (1, 32)


def test_kill_then_rerun_equals_uninterrupted_bit_for_bit(tmp_path, uninterrupted):
    proc = _Child(tmp_path / "stage")
    tmp_path = tmp_path / "stage"
    _wait_for_step(tmp_path, 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = safe_torch_load(tmp_path / "last.pt")["step"]
    assert 4 <= killed_at < 12 and not (tmp_path / "student.pt").exists()
    _child_in_this_process(tmp_path)
    assert _same(_final_weights(tmp_path), _final_weights(uninterrupted))
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # the log was rewound to the checkpoint: no duplicated steps


def test_sigterm_checkpoints_and_exits_cleanly_then_resumes(tmp_path, uninterrupted):
    proc = _Child(tmp_path / "stage")
    tmp_path = tmp_path / "stage"
    _wait_for_step(tmp_path, 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 75 and "SIGTERM received" in proc.printed()
    assert safe_torch_load(tmp_path / "last.pt")["step"] < 12
    _child_in_this_process(tmp_path)
    assert _same(_final_weights(tmp_path), _final_weights(uninterrupted))


def test_nan_loss_stops_naming_step_and_term_and_keeps_the_checkpoint(tmp_path):
    cfg = tiny_config(train={"max_steps": 24, "checkpoint_every": 2})
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=7.0, generation=1)
    teacher = teachers.build_teacher(cfg.teacher.spec())
    # the poisoned image is in the 2nd epoch's plan somewhere after step 0
    data = TinyFaces(nan_index=5)
    with pytest.raises(TrainingDiverged, match=r"non-finite at step \d+ \(term\(s\): .*loss_cls") as err:
        run_stage(cfg, spec, str(tmp_path), data, {}, teacher=teacher, progress=False)
    if (tmp_path / "last.pt").exists():
        assert "last good checkpoint" in str(err.value)
        assert torch.isfinite(torch.cat([v.flatten().float() for v in
                                         safe_torch_load(tmp_path / "last.pt")["model"].values()])).all()
    assert not (tmp_path / "student.pt").exists()


def test_resume_with_a_breaking_config_change_is_refused(tmp_path):
    cfg = tiny_config(train={"max_steps": 4, "checkpoint_every": 2})
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=7.0, generation=1)
    run_stage(cfg, spec, str(tmp_path), TinyFaces(), {}, progress=False)
    (tmp_path / "result.json").unlink()
    changed = StageSpec("gen1", "vargfacenet", {**cfg.student.model_kwargs(16), "embedding_size": 64}, cfg.train,
                        alpha=7.0, generation=1)
    with pytest.raises(CheckpointError, match="model_kwargs differ"):
        run_stage(cfg, changed, str(tmp_path), TinyFaces(), {}, progress=False)
    with pytest.raises(CheckpointError, match="num_classes, num_samples differ"):
        run_stage(cfg, spec, str(tmp_path), TinyFaces(classes=4), {}, progress=False)


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _run(tmp_path, max_steps=4, checkpoint_every=2)
    before = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "result.json").unlink()

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous last.pt is intact"):
        _run(tmp_path, max_steps=8, checkpoint_every=2)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert not (tmp_path / "last.pt.tmp").exists()


def test_teacher_stays_frozen_through_distillation(tmp_path):
    cfg = tiny_config()
    teacher = teachers.build_teacher(cfg.teacher.spec())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=7.0, generation=1)
    run_stage(cfg, spec, str(tmp_path), TinyFaces(), {}, teacher=teacher, progress=False)
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    opt_state = safe_torch_load(tmp_path / "last.pt")["optimizer"]
    n_opt = sum(len(g["params"]) for g in opt_state["param_groups"])
    student = load_student(tmp_path / "student.pt")[0]
    assert n_opt == sum(1 for p in student.parameters() if p.requires_grad) + 1  # student + head weight


def test_gradient_accumulation_counts_micro_batches_and_scales_lr(tmp_path):
    cfg = tiny_config(train={"max_steps": 3, "accumulate": 2, "batch_size": 8, "clip_grad": 1.0,
                             "checkpoint_every": 3, "scheduler": "cosine", "min_lr": 0.05})
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=0.0, generation=1)
    result = run_stage(cfg, spec, str(tmp_path), TinyFaces(), {}, progress=False)
    ck = safe_torch_load(tmp_path / "last.pt")
    assert result["steps"] == ck["step"] == 3 and ck["micro"] == 6
    # lr 0.05 is given for a total batch of 16 = 8 x 2 accumulated: no scaling, and min_lr holds it there
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("train/loss_kd") for k in lines[0])  # alpha 0: plain training, no distillation term


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_paths_train_and_save_the_scaler(tmp_path, amp):
    """The autocast (+ GradScaler for fp16) code that CUDA runs, exercised on the CPU."""
    cfg = tiny_config(train={"max_steps": 4, "amp": amp, "checkpoint_every": 2}, deterministic=False)
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=7.0, generation=1)
    teacher = tame(teachers.build_teacher(cfg.teacher.spec()))
    run_stage(cfg, spec, str(tmp_path), TinyFaces(), {}, teacher=teacher, progress=False)
    ck = safe_torch_load(tmp_path / "last.pt")
    assert ck["step"] == 4
    assert (ck["scaler"] is not None) == (amp == "fp16")
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(x["train/loss"])) for x in lines if "train/loss" in x)


def test_init_from_a_plain_state_dict_or_a_student_pt(tmp_path):
    from distill.train.engine import _build

    """student.init may be a student.pt or any checkpoint holding this architecture's state dict (backbone.pth
    style, `module.` prefix and all); the stage is built with exactly those weights."""
    _run(tmp_path / "a", max_steps=2, checkpoint_every=2)
    weights = _final_weights(tmp_path / "a")
    torch.save({f"module.{k}": v for k, v in weights.items()}, tmp_path / "backbone.pth")
    cfg = tiny_config()
    for source in (tmp_path / "a" / "student.pt", tmp_path / "backbone.pth"):
        out = tmp_path / f"from-{source.name}"
        spec = StageSpec("gen2", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=0.0, generation=2,
                         init_from=str(source))
        st = _build(cfg, spec, str(out), TinyFaces(), teacher=None, cache=None)
        assert _same(st.model.state_dict(), weights)
