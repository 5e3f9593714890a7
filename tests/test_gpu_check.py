"""benchmarks/gpu_check.sh, the prepared GPU check: every part of it runs here on the CPU with
tiny sizes, and it prints the one JSON line with every documented key, with figures that are figures."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _number(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_gpu_check_runs_every_part_on_cpu_and_prints_one_json_line(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "WANDB_MODE": "disabled"}
    done = subprocess.run([str(SCRIPT), "--device", "cpu", "--tiny", "--compile-backend", "eager",
                           "--keep", str(tmp_path), "--threads", "1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout  # one JSON line, nothing else on stdout
    r = json.loads(lines[0])
    assert r["device"] == "cpu" and r["sizes"] == "tiny"
    for key in ("train_img_s", "train_compiled_img_s", "kd_cached_img_s", "kd_online_img_s", "kd_cached_time_ratio",
                "kd_online_time_ratio", "teacher_infer_img_s"):
        assert _number(r[key]), (key, r[key])
    assert r["kd_cached_time_ratio"] == r["train_img_s"] / r["kd_cached_img_s"]
    loader = r["loader"]["cpu"]
    assert _number(loader["per_worker_img_s"]) and _number(loader["workers"]["1"])
    run = r["run"]
    assert run["exit"] == 0, run
    for stage in ("teacher", "baseline", "gen1", "gen2"):  # the shortened synthetic_r100.yaml, end to end
        assert run[stage]["steps"] == 2 and 0.0 <= run[stage]["acc"] <= 1.0
    assert (tmp_path / "run" / "gen2" / "student.pt").exists()


def test_gpu_check_without_cuda_says_so(monkeypatch, capsys):
    # in this process (the shell wrapper is run above): a second interpreter would spend its time importing torch
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT.with_suffix(".py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    import distill.train.setup
    monkeypatch.setattr(distill.train.setup, "COMPILE_BACKEND", distill.train.setup.COMPILE_BACKEND)  # main sets it
    assert gpu_check.main([]) == 2
    assert "no CUDA device here" in json.loads(capsys.readouterr().out)["error"]
