"""The thread policy (distill/utils/threads.py): its arithmetic, what it reads (affinity, cgroup quota, busy
cores, OMP_NUM_THREADS), the stage's log line and record, resume with the count a stage started with, and
bf16 autocast on a CPU only where it is chosen for."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from tiny import TinyFaces, stop_at_first_checkpoint, tiny_config

import distill.utils.device
import distill.utils.threads
from distill.run.context import run_logger
from distill.train.engine import StageSpec, run_stage
from distill.utils.device import amp_settings
from distill.utils.errors import ConfigError
from distill.utils.threads import (
    GPU_WORKERS,
    available_cores,
    busy_cores,
    cgroup_cpu_limit,
    loader_workers,
    plan_threads,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QUIET = {}  # an environment without OMP_NUM_THREADS


@pytest.mark.parametrize("cores,workers,busy,threads,kept", [
    (2, 0, 0.0, 2, 0),   # the quiet 2-core machine: both cores
    (2, 0, 1.0, 1, 0),   # one other busy process: one thread, never a descheduled one
    (2, 0, 0.4, 2, 0),   # a little background load rounds away
    (2, 2, 0.0, 1, 1),   # workers capped at cores - 1: the computing process keeps a core
    (8, 4, 0.0, 4, 4),
    (8, 4, 2.6, 1, 4),   # 8 - 4 workers - 3 busy
    (1, 2, 0.0, 1, 0),   # one core: no workers, one thread
    (16, 0, 20.0, 1, 0),  # never below one
])
def test_the_policys_arithmetic(cores, workers, busy, threads, kept):
    plan = plan_threads(workers, cores=cores, busy=busy, environ=QUIET)
    assert (plan.threads, plan.workers, plan.source) == (threads, kept, "policy")
    assert plan.threads + plan.workers <= max(cores, 2) or plan.threads == 1


def test_overrides_win_and_say_so():
    planned = plan_threads(0, override=3, cores=2, busy=1.0, environ=QUIET)
    assert planned.describe() == "3 torch threads (set by train.threads)"
    plan = plan_threads(0, cores=2, busy=0.0, environ={"OMP_NUM_THREADS": "1"})
    assert (plan.threads, plan.source) == (1, "OMP_NUM_THREADS")
    assert plan_threads(0, override=2, key="--threads", cores=2, environ={"OMP_NUM_THREADS": "1"}).threads == 2
    with pytest.raises(ConfigError, match=r"--threads 0: must be at least 1"):
        plan_threads(0, override=0, key="--threads", environ=QUIET)


def test_the_description_names_cores_busy_cores_and_capped_workers():
    text = plan_threads(2, cores=2, busy=0.0, environ=QUIET).describe()
    assert text == "1 torch thread (2 cores, 1 loader worker of the 2 asked for)"
    assert plan_threads(0, cores=2, busy=1.2, environ=QUIET).describe() == \
        "1 torch thread (2 cores, 1.2 busy with other processes)"


def test_cores_are_the_affinity_mask_capped_by_the_cgroup_quota(tmp_path):
    assert available_cores(affinity={0, 1, 2, 3}, quota=1.5) == 2
    assert available_cores(affinity={0, 1, 2, 3}, quota=8.0) == 4
    assert available_cores(affinity={5}, quota=0.2) == 1
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(str(v2)) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(str(v2)) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000")
    (v1 / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpu_limit(str(tmp_path / "v1")) == 3.0
    (v1 / "cpu.cfs_quota_us").write_text("-1")
    assert cgroup_cpu_limit(str(tmp_path / "v1")) is None


def test_a_busy_process_is_seen():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cores(window=0.3) >= 0.5
    finally:
        spin.kill()
        spin.wait()


def _spec(cfg):
    return StageSpec("baseline", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=0.0)


def test_loader_workers_default_to_none_on_a_cpu_and_some_on_a_gpu():
    from distill.config.schema import DataConfig
    assert DataConfig().num_workers is None  # data.num_workers: null unless an experiment sets it
    assert loader_workers(None, "cpu") == 0 and loader_workers(None, "cuda") == GPU_WORKERS == 2
    assert loader_workers(3, "cpu") == 3 and loader_workers(0, "cuda") == 0  # a set count is kept


@pytest.mark.parametrize("workers, planned", [(None, "2 torch threads (2 cores)"),
                                               (1, "1 torch thread (2 cores, 1 loader worker)")])
def test_a_stage_with_the_default_workers_runs_none_on_a_cpu(workers, planned, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the policy decides, on 2 quiet cores
    monkeypatch.setattr(distill.utils.threads, "available_cores", lambda: 2)
    monkeypatch.setattr(distill.utils.threads, "busy_cores", lambda *a, **k: 0.0)
    lines, threads = [], torch.get_num_threads()
    cfg = tiny_config(data={"num_workers": workers}, train={"max_steps": 2})
    try:
        run_stage(cfg, _spec(cfg), str(tmp_path), TinyFaces(), {}, progress=False, logger=run_logger(lines.append))
    finally:
        torch.set_num_threads(threads)
    assert f"baseline: on cpu, {planned}" in lines, lines


def test_the_stage_logs_and_records_its_thread_count(tmp_path):
    lines = []
    cfg = tiny_config(train={"max_steps": 2, "threads": 1})
    result = run_stage(cfg, _spec(cfg), str(tmp_path), TinyFaces(), {}, progress=False, logger=run_logger(lines.append))
    assert any(ln.startswith("baseline: on cpu, 1 torch thread (set by train.threads)") for ln in lines), lines
    assert result["threads"] == 1 and json.loads((tmp_path / "result.json").read_text())["threads"] == 1
    assert torch.load(tmp_path / "last.pt", weights_only=True)["threads"] == 1


def test_a_stage_resumes_with_the_thread_count_it_started_with(tmp_path, monkeypatch):
    """Its digits depend on the count: a policy that would now choose 2 keeps the 1 of last.pt."""
    cfg = tiny_config(train={"max_steps": 4, "checkpoint_every": 2})
    spec = _spec(cfg)
    stop_at_first_checkpoint(cfg, spec, tmp_path, monkeypatch)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["threads"] == 1  # OMP_NUM_THREADS=1 (conftest)
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(distill.utils.threads, "available_cores", lambda: 2)
    monkeypatch.setattr(distill.utils.threads, "busy_cores", lambda window=0.2: 0.0)
    lines = []
    try:
        result = run_stage(cfg, spec, str(tmp_path), TinyFaces(), {}, progress=False, logger=run_logger(lines.append))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)
    assert any("1 torch thread (set by its last.pt)" in ln for ln in lines), lines
    assert result["threads"] == 1


def test_cpu_bf16_only_for_models_that_ask_on_cpus_that_have_it(monkeypatch):
    from distill.config.schema import TrainConfig
    from distill.models.registry import create_model

    teacher = create_model("iresnet18", input_size=16, embedding_size=8)
    student = create_model("vargfacenet", input_size=16, embedding_size=8, multiplier=0.25, last_channels=32,
                           units=[1, 1, 1])
    cpu = torch.device("cpu")
    monkeypatch.setattr(distill.utils.device, "cpu_has_bf16", lambda: True)
    assert amp_settings(TrainConfig(), cpu, teacher) == (torch.bfloat16, False)
    assert amp_settings(TrainConfig(), cpu, student) == (None, False)  # slower in bf16: stays float32
    assert amp_settings(TrainConfig(), cpu) == (None, False)
    assert amp_settings(TrainConfig(amp="off"), cpu, teacher) == (None, False)
    assert amp_settings(TrainConfig(amp="bf16"), cpu, student) == (torch.bfloat16, False)
    monkeypatch.setattr(distill.utils.device, "cpu_has_bf16", lambda: False)
    assert amp_settings(TrainConfig(), cpu, teacher) == (None, False)


def _bench_cpu():
    spec = importlib.util.spec_from_file_location("bench_cpu", os.path.join(REPO, "benchmarks", "bench_cpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("workload", ["student_train", "teacher_train", "student_eval"])
def test_bench_cpu_child_measures_each_workload(workload, capsys):
    bench = _bench_cpu()
    assert bench.main(["--child", json.dumps({"workload": workload, "threads": 1, "steps": 1, "batch": 4,
                                              "size": 16})]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["img_s"] > 0 and out["threads"] == 1


def test_bench_cpu_measures_loaded_beside_a_live_busy_process_and_prints_the_ratios(monkeypatch, capsys):
    bench = _bench_cpu()
    spinners = []

    class Busy(bench.Busy):
        def __enter__(self):
            spinners.append(super().__enter__().proc)
            return self

    calls = []

    def measure(setting, workload, steps, batch):  # the child processes are tested above; here, the parent
        loaded = bool(spinners) and spinners[-1].poll() is None
        calls.append((setting["threads"], workload, loaded, steps, batch))
        rate = {"policy": 300.0, 2: 350.0}[setting["threads"]] / (3.0 if loaded else 1.0)
        return {"img_s": rate, "threads": 1 if setting["threads"] == "policy" else 2}

    monkeypatch.setattr(bench, "Busy", Busy)
    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert bench.main(["--quick", "--json", "--workload", "student_eval"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(map(repr, (c[:3] for c in calls))) == sorted(map(repr, [
        (2, "student_eval", False), ("policy", "student_eval", False),
        (2, "student_eval", True), ("policy", "student_eval", True)]))
    assert all(c[3:] == (2, 8) for c in calls)  # --quick: 2 steps at batch 8
    assert all(p.poll() is not None for p in spinners)  # every busy process was stopped
    rates = out["images_per_s"]["student_eval"]
    assert rates["new"] == {"quiet": 300.0, "loaded": 100.0, "threads": 1}
    assert out["ratios"]["student_eval"] == {"new_loaded_over_best_quiet": round(100 / 350, 3),
                                             "new_quiet_over_old_quiet": round(300 / 350, 3),
                                             "old_loaded_over_best_quiet": round(350 / 3 / 350, 3)}


def test_own_ticks_count_this_process_its_descendants_and_kernel_threads_but_not_others(tmp_path):
    """busy_cores subtracts these from the machine's total: a kernel thread flushing the files this run just wrote
    (it made the quickstart's teacher start on one thread) is no competitor; an unrelated process is."""
    me = os.getpid()

    def proc(pid, comm, ppid, flags, utime, stime):
        (tmp_path / str(pid)).mkdir()
        rest = ["S", ppid, 0, 0, 0, 0, flags] + [0] * 4 + [utime, stime] + [0] * 8
        (tmp_path / str(pid) / "stat").write_text(f"{pid} ({comm}) " + " ".join(map(str, rest)))

    proc(me, "python (me)", 1, 0, 100, 10)
    proc(me + 1, "worker", me, 0, 5, 1)                  # a loader worker
    proc(me + 2, "grandchild", me + 1, 0, 2, 0)         # its child
    proc(me + 3, "kworker/u8:2-flush", 2, 0x00200000, 7, 30)  # kernel thread
    proc(me + 4, "other job", 1, 0, 1000, 0)             # a competitor
    (tmp_path / "self").mkdir()
    assert distill.utils.threads._own_jiffies(str(tmp_path)) == 110 + 6 + 2 + 37


def test_bench_cpu_compile_study_weighs_compile_time_against_a_quickstart_stage(monkeypatch, capsys):
    bench = _bench_cpu()

    def measure(setting, workload, steps, batch, compile_backend=None, amp=None):
        assert setting["threads"] == "policy" and amp == "auto"
        if compile_backend:
            return {"img_s": 200.0, "first_step_s": 31.0, "amp": None}
        return {"img_s": 100.0, "first_step_s": 1.0, "amp": None}

    monkeypatch.setattr(bench, "measure", measure)
    assert bench.main(["--compile", "--json", "--steps", "3"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from distill.config.schema import load_config
    cfg = load_config(os.path.join(REPO, "experiments", "quickstart.yaml"))
    images = cfg.data.synthetic.ids * cfg.data.synthetic.images_per_id
    student = out["compile"]["student_train"]
    assert out["backend"] == "inductor" and student["compile_s"] == 30.0
    assert student["stage_images"] == cfg.train.epochs * images
    assert student["stage_saved_s"] == round(student["stage_images"] / 200.0, 1)  # half the eager time saved
    assert student["pays"] == (student["stage_saved_s"] > 30.0)
    assert out["compile"]["teacher_train"]["stage_images"] == cfg.teacher.train.epochs * images
