"""benchmarks/gpu_check.sh, the prepared GPU check: every part of it runs here on the CPU with
tiny sizes, and it prints the one JSON line with every documented key, with figures that are figures; each
correctness part either held (`ok`) or says why it did not run (only data.decode: cuda needs a GPU)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
CORRECTNESS_PARTS = ("compile", "gpu_decode", "fp16", "deterministic", "resume", "ranks", "loaded_teacher")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _gpu_check(monkeypatch):
    """benchmarks/gpu_check.py as a module of this process, with its folder on sys.path (its parts' modules)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT.with_suffix(".py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    import distill.train.setup
    monkeypatch.setattr(distill.train.setup, "COMPILE_BACKEND", distill.train.setup.COMPILE_BACKEND)  # main sets it
    return gpu_check


def test_the_wrapper_runs_gpu_check_py_from_the_checkout_with_its_arguments(tmp_path):
    """gpu_check.sh checks that $PYTHON imports torch and facedistill, then runs gpu_check.py with its arguments from
    the checkout's root with the root on PYTHONPATH (a stand-in python reports how it was started)."""
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\n'
                    f"exec {sys.executable} -c 'import json, os, sys; "
                    "print(json.dumps([os.getcwd(), os.environ[\"PYTHONPATH\"], sys.argv[1:]]))' \"$@\"\n")
    stub.chmod(0o755)
    done = subprocess.run([str(SCRIPT), "--device", "cpu", "--tiny"], env={**os.environ, "PYTHON": str(stub)},
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    cwd, path, argv = json.loads(done.stdout)
    root = str(SCRIPT.parents[1])
    assert cwd == root and path.split(os.pathsep)[0] == root
    assert argv == ["benchmarks/gpu_check.py", "--device", "cpu", "--tiny"]


def test_gpu_check_runs_every_part_on_cpu_and_prints_one_json_line(tmp_path, monkeypatch, capfd):
    # in this process, its children forked from it (the shell wrapper: the test above): a fresh interpreter would
    # spend seconds importing torch and timm again
    gpu_check = _gpu_check(monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    argv = ["--device", "cpu", "--tiny", "--compile-backend", "eager", "--keep", str(tmp_path), "--threads", "1"]
    assert gpu_check.run(lambda: gpu_check.main(argv), "gpu_check") == 0
    stdout, stderr = capfd.readouterr()
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout  # one JSON line, nothing else on stdout
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
    for part in CORRECTNESS_PARTS:  # each held here, or says why it cannot run on a CPU
        assert r[part].get("ok") is True or r[part].get("skipped") == "needs CUDA", (part, r[part])
    decode = r["gpu_decode"]["cpu_stand_in"]  # its code on the CPU decoder: every batch checked and counted
    assert decode["ok"] and decode["canary"] == {"checked": 48, "mismatched": 0}
    assert decode["decode"] == {"images": 48, "cpu_fallback": 0}
    assert r["compiled_fell_back"] is False  # both compiled stages ran compiled (dynamo's eager backend)
    assert r["compile"]["stages"]["attention_transfer"]["attention_transfer_loss"] > 0
    assert r["deterministic"]["first"]["sha256"] == r["deterministic"]["second"]["sha256"]
    assert r["resume"]["exit_on_sigterm"] == 75 and r["resume"]["stopped_at_step"] < 3
    ranks = r["ranks"]["ranks"]
    assert [x["rank"] for x in ranks] == [0, 1] and ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    # evaluation ran on the run's device (the FLOP counter of result.json's gflops is counted apart)
    assert set(r["loaded_teacher"]["no_grad_forwards"]) - {"flop_counter"} == {"cpu"}


def test_gpu_check_without_cuda_says_so(monkeypatch, capsys):
    gpu_check = _gpu_check(monkeypatch)
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "no CUDA device here" in json.loads(capsys.readouterr().out)["error"]


def test_decode_canary_counts_a_corrupted_image_and_not_a_mirrored_one(monkeypatch):
    # the check's corruption canary, on the CPU decoder: a half-written image is counted, a flipped one is not
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import torch
    from gpu_check_parts import DecodeCanary

    from distill.data.gpu_decode import decode_batch
    from distill.data.images import encode_jpeg

    g = torch.Generator().manual_seed(0)
    images = [encode_jpeg(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy(), quality=90)
              for _ in range(4)]

    class Encoded:
        def __len__(self):
            return len(images)

        def encoded(self, i):
            return images[i], 0

    canary = DecodeCanary(Encoded(), "cpu")
    clean = canary.spy(decode_batch)
    clean(images, torch.tensor([False, True, False, True]), "cpu", 16)
    assert canary.read() == {"checked": 4, "mismatched": 0}

    def half_written(*a, **kw):
        x = decode_batch(*a, **kw)
        x[2, :, 8:] = -1.0  # the lower half of image 2 left black
        return x

    canary.spy(half_written)(images, torch.zeros(4, dtype=torch.bool), "cpu", 16)
    assert canary.read() == {"checked": 8, "mismatched": 1}
