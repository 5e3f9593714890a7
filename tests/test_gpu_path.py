"""The GPU throughput switches, on the CPU where their code paths exist: train.compile (no `_orig_mod.` in any
file, compiled <-> eager resume, eager fallback with a warning), train.optimizer_impl, the stage's one loader
with persistent workers, and the log line on precision and the online teacher."""

import os
import warnings

import pytest
import torch
from tiny import TinyFaces, tiny_config, whole_and_resumed

import distill.train.setup
import distill.utils.device
import teachers
from distill.run.context import run_logger
from distill.train.engine import StageSpec, _build, run_stage
from distill.train.epoch_plan import StagePlan, plan_epoch
from distill.utils.checkpoint import extract_state_dict, safe_torch_load
from distill.utils.errors import ConfigError, UserNote


def _spec(cfg, name="gen1", alpha=7.0):
    return StageSpec(name, "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=alpha, generation=1)


def _teacher(cfg):
    torch.manual_seed(0)
    return teachers.build_teacher(cfg.teacher.spec())


def _train(cfg, out, **kw):
    return run_stage(cfg, _spec(cfg), str(out), TinyFaces(), {}, teacher=_teacher(cfg), progress=False, **kw)


@pytest.fixture
def eager_backend(monkeypatch):
    """dynamo traces the model but leaves code generation out (inductor takes minutes on 2 cores)."""
    monkeypatch.setattr(distill.train.setup, "COMPILE_BACKEND", "eager")


def test_compile_trains_what_eager_trains_and_saves_plain_keys(tmp_path, eager_backend):
    """train.compile: the student and the online teacher go through torch.compile (the counter proves dynamo
    ran), yet last.pt and student.pt hold the plain module's keys and the same weights as without compile."""
    import torch._dynamo.utils as dynamo_utils

    weights = {}
    for flag in (False, True):
        dynamo_utils.counters.clear()
        cfg = tiny_config(train={"max_steps": 2, "checkpoint_every": 2, "compile": flag})
        _train(cfg, tmp_path / str(flag))
        frames = sum(dynamo_utils.counters["frames"].values())
        assert (frames > 0) is flag
        last = safe_torch_load(tmp_path / str(flag) / "last.pt")
        student = safe_torch_load(tmp_path / str(flag) / "student.pt")
        for keys in (last["model"], student["state_dict"]):
            assert not any("_orig_mod" in k or k.startswith("module.") for k in keys)
        weights[flag] = student["state_dict"]
    assert weights[True].keys() == weights[False].keys()
    for k, v in weights[False].items():
        torch.testing.assert_close(weights[True][k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("first,then", [(True, False), (False, True)])
def test_a_compiled_run_resumes_uncompiled_and_back(tmp_path, monkeypatch, eager_backend, first, then):
    """Stopped after its first checkpoint with compile `first`, resumed with compile `then`: the resumed stage
    ends where one uninterrupted run ends (the switch is not part of what a checkpoint must agree on)."""
    cfg = tiny_config(train={"max_steps": 4, "checkpoint_every": 2, "compile": first})
    other = tiny_config(train={"max_steps": 4, "checkpoint_every": 2, "compile": then})
    real = run_stage
    calls = []

    def switching(c, spec, *args, **kw):  # the rerun (the resume) uses the other setting
        calls.append(c)
        return real(other if len(calls) == 3 else c, _spec(other) if len(calls) == 3 else spec, *args, **kw)

    monkeypatch.setattr("distill.train.engine.run_stage", switching)
    whole, stopped, resumed = whole_and_resumed(cfg, _spec(cfg), _teacher(cfg), tmp_path, monkeypatch)
    assert stopped["step"] == 2 and resumed["step"] == 4 == whole["step"]
    for k, v in whole["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=1e-4, atol=1e-5)


def test_compile_failure_falls_back_to_eager_with_one_warning(tmp_path, monkeypatch):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C compiler here")

    monkeypatch.setattr(distill.train.setup, "COMPILE_BACKEND", broken_backend)
    made = []

    class Recorded(distill.train.setup.CompiledOrEager):
        def __init__(self, module, what):
            super().__init__(module, what)
            made.append(self)

    monkeypatch.setattr(distill.train.setup, "CompiledOrEager", Recorded)
    import torch._dynamo
    torch._dynamo.reset()
    cfg = tiny_config(train={"max_steps": 2, "checkpoint_every": 2, "compile": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _train(cfg, tmp_path / "run")
    notes = [str(w.message) for w in caught if issubclass(w.category, UserNote) and "train.compile" in str(w.message)]
    assert result["steps"] == 2
    assert len(notes) == 2  # the student once, the online teacher once; then eager without further words
    assert all("eager mode" in n and "no C compiler here" in n for n in notes)
    assert {("student" in n) for n in notes} == {True, False}
    # and each wrapper keeps the reason, for the stage's result and gpu_check to report
    assert sorted(m.what for m in made) == ["student", "teacher"]
    assert all(m.fallback == "RuntimeError: no C compiler here" and m.compiled is None for m in made)


def test_checkpoints_saved_by_compiled_modules_elsewhere_load():
    """A state dict saved from a torch.compile'd module (keys `_orig_mod.`, also under DDP) is read as plain."""
    sd = {"conv.weight": torch.zeros(1), "bn.bias": torch.ones(1)}
    for prefix in ("_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        assert extract_state_dict({f"{prefix}{k}": v for k, v in sd.items()}, "x.pth").keys() == sd.keys()


@pytest.mark.parametrize("impl,expect", [("off", {"foreach": False}), ("foreach", {"foreach": True}),
                                         ("fused", {"fused": True}), ("auto", {"fused": None})])
def test_optimizer_impl_picks_the_kernel(tmp_path, impl, expect):
    cfg = tiny_config(train={"optimizer_impl": impl})
    st = _build(cfg, _spec(cfg, alpha=0.0), str(tmp_path), TinyFaces(), None, None)
    for key, value in expect.items():
        assert st.optimizer.defaults.get(key) == value


def test_optimizer_impls_train_the_same_student(tmp_path):
    weights = {}
    for impl in ("off", "foreach", "fused"):
        cfg = tiny_config(train={"max_steps": 3, "checkpoint_every": 3, "optimizer_impl": impl})
        _train(cfg, tmp_path / impl)
        weights[impl] = safe_torch_load(tmp_path / impl / "student.pt")["state_dict"]
    for impl in ("foreach", "fused"):
        for k, v in weights["off"].items():
            torch.testing.assert_close(weights[impl][k], v, rtol=1e-4, atol=1e-5)


def test_fused_where_the_optimizer_has_none_names_the_key(tmp_path):
    cfg = tiny_config(train={"optimizer": "lamb", "optimizer_impl": "fused"})
    with pytest.raises(ConfigError, match=r"train\.optimizer_impl.*lamb.*no fused kernel"):
        _build(cfg, _spec(cfg, alpha=0.0), str(tmp_path), TinyFaces(), None, None)


def test_stage_plan_runs_across_epochs_from_any_position():
    per_epoch = 5

    def plan(epoch):
        return plan_epoch(100, 16, 3, epoch, True)[:per_epoch]  # 6 planned, 5 used: the stage's batches_per_epoch

    flat = [b for e in range(4) for b in plan(e)]
    for start in (0, 3, 5, 7):
        assert list(StagePlan(plan, per_epoch, start, 11)) == flat[start:start + 11]
    assert len(StagePlan(plan, per_epoch, 3, 11)) == 11


def test_persistent_workers_see_the_batches_of_the_single_process_loader(tmp_path):
    """Two workers alive for the whole stage (12 updates over two epochs of 8 batches) train the very
    student that the in-process loader trains: same batches, same flips, across the epoch boundary."""
    weights = {}
    for workers in (0, 2):
        cfg = tiny_config(train={"max_steps": 12, "checkpoint_every": 12},
                          data={"num_workers": workers, "prefetch_factor": 2})
        run_stage(cfg, _spec(cfg, alpha=0.0), str(tmp_path / str(workers)), TinyFaces(), {}, progress=False)
        weights[workers] = safe_torch_load(tmp_path / str(workers) / "student.pt")["state_dict"]
    for k, v in weights[0].items():
        assert torch.equal(weights[2][k], v), k


def test_prefetch_factor_below_one_is_refused():
    with pytest.raises(ConfigError, match=r"data\.prefetch_factor.*at least 1"):
        tiny_config(data={"prefetch_factor": 0})


def test_the_log_says_the_online_teacher_runs_under_the_students_autocast(tmp_path):
    lines = []
    cfg = tiny_config(train={"max_steps": 1, "checkpoint_every": 1, "amp": "bf16"}, teacher={"cache": False})
    _train(cfg, tmp_path / "online", logger=run_logger(lines.append))
    assert any("gen1: on cpu, 1 torch thread" in ln and ", bfloat16 autocast" in ln
               and "online teacher under bfloat16 autocast (the same as the student)" in ln
               for ln in lines), lines
    quiet = []
    cfg = tiny_config(train={"max_steps": 1, "checkpoint_every": 1})
    run_stage(cfg, _spec(cfg, alpha=0.0), str(tmp_path / "plain"), TinyFaces(), {}, progress=False,
              logger=run_logger(quiet.append))
    assert not any("autocast" in ln for ln in quiet)


@pytest.mark.parametrize("bf16,expect", [(True, (torch.bfloat16, False)), (False, (torch.float16, True))])
def test_auto_precision_on_a_gpu_is_bf16_or_fp16_with_a_scaler(monkeypatch, bf16, expect):
    """amp: auto on CUDA is bf16 where the GPU has it and fp16 + GradScaler before Ampere; off on the CPU."""
    from distill.config.schema import TrainConfig
    from distill.utils.device import amp_settings

    monkeypatch.setattr(distill.utils.device, "_bf16_supported", lambda device: bf16)
    assert amp_settings(TrainConfig(), torch.device("cuda", 0)) == expect
    assert amp_settings(TrainConfig(), torch.device("cpu")) == (None, False)
    assert amp_settings(TrainConfig(amp="bf16"), torch.device("cuda", 0)) == (torch.bfloat16, False)


def test_gpu_decode_path_trains_the_student_the_cpu_path_trains(tmp_path, monkeypatch, fixtures):
    """data.decode: cuda through the engine (the loader hands out encoded records, _micro_step decodes the batch):
    run on the CPU device with the device check lifted, it trains bit for bit the student of data.decode: cpu."""
    import distill.train.engine
    from distill.data import RecordIODataset

    monkeypatch.setattr(distill.train.engine, "check_decode", lambda decode, device, dataset=None: None)
    real, decoded = distill.train.engine.decode_batch, []
    monkeypatch.setattr(distill.train.engine, "decode_batch",
                        lambda enc, *a, **kw: decoded.append(len(enc)) or real(enc, *a, **kw))
    weights = {}
    for decode in ("cpu", "cuda"):
        cfg = tiny_config(data={"decode": decode, "num_workers": 1},
                          train={"batch_size": 8, "lr_batch_size": 8, "max_steps": 4, "checkpoint_every": 4})
        train_set = RecordIODataset(fixtures / "insightface_rec", input_size=16)
        run_stage(cfg, _spec(cfg, alpha=0.0), str(tmp_path / decode), train_set, {}, progress=False)
        weights[decode] = safe_torch_load(tmp_path / decode / "student.pt")["state_dict"]
    assert decoded == [8] * 4  # the cuda run decoded its four batches in the engine; the cpu run none
    for k, v in weights["cpu"].items():
        assert torch.equal(weights["cuda"][k], v), k


def test_gpu_decode_on_a_cpu_run_is_a_config_error_before_training(tmp_path, fixtures):
    from distill.data import RecordIODataset

    cfg = tiny_config(data={"decode": "cuda"})
    with pytest.raises(ConfigError, match=r"key 'data\.decode': cuda .* device is cpu"):
        run_stage(cfg, _spec(cfg, alpha=0.0), str(tmp_path), RecordIODataset(fixtures / "insightface_rec"), {},
                  progress=False)
    assert not (tmp_path / "last.pt").exists()


def test_a_broken_image_under_gpu_decode_names_its_record(tmp_path, monkeypatch, fixtures):
    """data.decode: cuda decodes in the training step, not in the loader: a damaged record is still named by its
    file, key and byte offset, as the CPU path names it."""
    import distill.train.engine
    from distill.data import RecordIODataset
    from distill.utils.errors import DataFormatError

    class Damaged(RecordIODataset):
        def encoded(self, index):
            data, label = super().encoded(index)
            return (data[:40] if index == 3 else data), label

    monkeypatch.setattr(distill.train.engine, "check_decode", lambda decode, device, dataset=None: None)
    train_set = Damaged(fixtures / "insightface_rec", input_size=16)
    cfg = tiny_config(data={"decode": "cuda"}, train={"batch_size": 24, "lr_batch_size": 24, "max_steps": 1})
    with pytest.raises(DataFormatError) as err:
        run_stage(cfg, _spec(cfg, alpha=0.0), str(tmp_path), train_set, {}, progress=False)
    assert train_set.where(3) in str(err.value)


@pytest.mark.parametrize("deterministic", [False, True])
def test_cudnn_benchmark_is_on_for_fixed_size_inputs_unless_deterministic(tmp_path, deterministic):
    """Every batch has the configured size, so cuDNN may time its algorithms once per shape; a deterministic run
    may not (the timing picks algorithms by speed, which differ from run to run)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = deterministic  # the opposite of what the stage must set
    try:
        cfg = tiny_config(deterministic=deterministic)
        _build(cfg, _spec(cfg, alpha=0.0), str(tmp_path), TinyFaces(), None, None)
        assert torch.backends.cudnn.benchmark is (not deterministic)
    finally:
        torch.backends.cudnn.benchmark = before
        torch.use_deterministic_algorithms(False)


def test_a_deterministic_run_asks_cublas_for_its_fixed_workspace(tmp_path, monkeypatch):
    """PyTorch's reproducibility notes: deterministic cuBLAS products need CUBLAS_WORKSPACE_CONFIG, read when the
    process first uses cuBLAS; a stage sets it (a value the user gave is kept)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cfg = tiny_config(deterministic=True)
    try:
        _build(cfg, _spec(cfg, alpha=0.0), str(tmp_path), TinyFaces(), None, None)
    finally:
        torch.use_deterministic_algorithms(False)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    distill.utils.device.deterministic_cublas()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
