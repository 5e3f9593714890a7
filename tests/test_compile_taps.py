"""train.compile with feature-map losses and its fallback (distill/train/setup.py): compiled stages keep their
feature taps after earlier compiled stages (dynamo reuses a forward compiled without hooks unless it guards on
them), and a compile failure is reported while any other error (an out-of-memory, NCCL's) propagates."""

import warnings

import pytest
import torch
from tiny import TinyFaces, tiny_config
from torch import nn

import distill.train.setup
import teachers
from distill.train.engine import StageSpec, run_stage
from distill.train.feature_taps import FeatureTaps
from distill.train.setup import CompiledOrEager
from distill.utils.errors import UserNote
from teachers.signal import OnlineTeacher


@pytest.fixture
def eager_backend(monkeypatch):
    """dynamo traces the model but leaves code generation out (inductor takes minutes on 2 cores)."""
    monkeypatch.setattr(distill.train.setup, "COMPILE_BACKEND", "eager")


def _spec(cfg, name, alpha):
    return StageSpec(name, "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=alpha, generation=1)


def test_a_compiled_attention_transfer_stage_after_a_compiled_plain_stage_keeps_its_taps(tmp_path, eager_backend):
    """The baseline (no teacher) compiles a hook-less forward of the student's class, which dynamo would reuse for
    the next stage's new student; the attention_transfer stage after it still gets its maps and trains the
    student it trains without compile. (The teacher shared by stages: the Pyramid test below.)"""
    weights = {}
    for flag in (True, False):
        cfg = tiny_config(distill={"loss": "attention_transfer"}, teacher={"cache": False},
                          train={"max_steps": 1, "checkpoint_every": 1, "compile": flag})
        run_stage(cfg, _spec(cfg, "baseline", 0.0), str(tmp_path / f"baseline-{flag}"), TinyFaces(), {},
                  progress=False)
        torch.manual_seed(5)
        teacher = teachers.build_teacher(cfg.teacher.spec())
        out = tmp_path / f"gen1-{flag}"
        assert run_stage(cfg, _spec(cfg, "gen1", 5.0), str(out), TinyFaces(), {}, teacher=teacher,
                         progress=False)["steps"] == 1
        weights[flag] = torch.load(out / "student.pt", weights_only=True)["state_dict"]
    for k, v in weights[False].items():
        torch.testing.assert_close(weights[True][k], v, rtol=1e-4, atol=1e-5, msg=k)


class Pyramid(nn.Module):
    """Three conv stages and timm's feature contract: a model FeatureTaps can hook, traced in a blink."""

    input_size, embedding_size = 8, 4

    def __init__(self):
        super().__init__()
        self.s0, self.s1, self.s2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 2, 1)
        self.feature_info = [dict(num_chs=4, reduction=2 ** i, module=f"s{i}") for i in range(3)]

    def forward(self, x):
        return self.s2(torch.relu(self.s1(torch.relu(self.s0(x))))).mean((2, 3))


def test_taps_of_a_fitnet_stage_then_of_another_stage_fire_in_compiled_calls(eager_backend):
    """As a run does: a plain stage's student and the shared teacher compiled without hooks; then fitnet's taps
    (stage -2) on a new student of the same class and on that teacher; then another stage's taps (-1, 0) after
    those came off. Every compiled call fills the current taps with eager's maps, and a removed tap stays empty."""
    torch.manual_seed(0)
    teacher, x = Pyramid(), torch.randn(2, 3, 8, 8)
    CompiledOrEager(Pyramid(), "student")(x), CompiledOrEager(teacher, "teacher")(x)  # the plain stage
    previous = None
    for stages in ((-2,), (-1, 0)):
        student = Pyramid()
        forward, teacher_forward = CompiledOrEager(student, "student"), CompiledOrEager(teacher, "teacher")
        with FeatureTaps(student, teacher, stages) as taps:
            forward(x), teacher_forward(x)
            got = taps.read()
            student(x), teacher(x)  # eager
            want = taps.read()
        for mine, eager in zip(got, want, strict=True):
            assert len(mine) == len(stages) and all(torch.equal(a, b) for a, b in zip(mine, eager, strict=True))
        assert previous is None or previous.maps == {"student": {}, "teacher": {}}
        previous = taps
    assert forward.fallback is None and teacher_forward.fallback is None


def _backend_raising(error, when):
    """A torch.compile backend that raises `error` while compiling, or from the compiled code when it runs."""
    def backend(gm, example_inputs):
        if when == "compile":
            raise error

        def run(*args):
            raise error
        return run
    return backend


def _dist_error():
    return torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp, unhandled system error")


@pytest.mark.parametrize("error,when", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "run"),
    (torch.OutOfMemoryError("CUDA out of memory (while autotuning)"), "compile"),
    (_dist_error(), "run"),
    (RuntimeError("the model's own error"), "run"),
], ids=["oom", "oom-compiling", "nccl", "model-error"])
def test_an_error_that_is_not_a_compile_failure_propagates_instead_of_running_eager(monkeypatch, error, when):
    monkeypatch.setattr(distill.train.setup, "COMPILE_BACKEND", _backend_raising(error, when))
    torch._dynamo.reset()
    ran_eager = []
    model = Pyramid()
    model.register_forward_pre_hook(lambda *a: ran_eager.append(not torch.compiler.is_compiling()))
    forward = CompiledOrEager(model, "student")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserNote)  # no "running it in eager mode"
        with pytest.raises(type(error)) as raised:
            forward(torch.randn(2, 3, 8, 8))
    assert raised.value is error  # itself, also where dynamo wrapped it while compiling
    assert forward.fallback is None and forward.compiled is not None and not any(ran_eager)


def test_a_backend_failure_falls_back_with_its_reason_and_the_signal_reports_it(monkeypatch):
    monkeypatch.setattr(distill.train.setup, "COMPILE_BACKEND",
                        _backend_raising(RuntimeError("no C compiler here"), "compile"))
    torch._dynamo.reset()
    teacher = OnlineTeacher(Pyramid())
    assert teacher.compile_fallback is None  # not compiled
    compiled = teacher.compiled(lambda m: CompiledOrEager(m, "teacher"))
    assert compiled.compile_fallback is None  # not tried yet
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserNote, match="torch.compile of the teacher failed .*no C compiler here.*eager mode"):
        torch.testing.assert_close(compiled.embed(x), teacher.embed(x))
    assert compiled.compile_fallback == "RuntimeError: no C compiler here"
    assert compiled._forward.compiled is None  # eager from now on


@pytest.mark.parametrize("message,falls_back", [("torch.compile is not supported on Python 3.15+", True),
                                                ("something else went wrong", False)])
def test_torch_compile_refused_by_this_python_runs_eager_and_nothing_else_does(monkeypatch, message, falls_back):
    def refusing(module, **kw):
        raise RuntimeError(message)

    monkeypatch.setattr(torch, "compile", refusing)
    model, x = Pyramid(), torch.randn(2, 3, 8, 8)
    if not falls_back:
        with pytest.raises(RuntimeError, match=message):
            CompiledOrEager(model, "student")
        return
    with pytest.warns(UserNote, match="not supported on Python 3.15"):
        forward = CompiledOrEager(model, "student")
    assert forward.fallback == f"RuntimeError: {message}"
    torch.testing.assert_close(forward(x), model(x))
