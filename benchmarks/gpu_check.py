"""The prepared GPU check: the throughput figures the GPU path is judged by, and the checks of what the CPU test
suite cannot see (the GPU-only and multi-rank paths), in one run, as ONE JSON line.

    benchmarks/gpu_check.sh                       # on a GPU machine: at most 10 minutes (--budget) on one H100/H200
    benchmarks/gpu_check.sh --device cpu --tiny   # the same code on a CPU with tiny sizes (the test suite runs it)

Throughput (every rate is images/s; every ratio is from the same run, so a noisy machine cancels out):
  train_img_s            VarGFaceNet (full size, 512-d; tiny: a small one) trained by the real loop
                         (distill.train.engine.run_stage) on in-memory stand-in faces: amp auto (bf16 on an
                         Ampere+ GPU), channels_last on CUDA, batch 256 at 112 px; `train_compiled_img_s` the
                         same with train.compile (inductor)
  kd_cached_time_ratio   time per image of cached-teacher distillation / plain training (goal <= 1.05)
  kd_online_time_ratio   the same with a frozen IResNet-100 run on every batch under the student's autocast
  teacher_infer_img_s    IResNet-100 inference (no grad, autocast, channels_last): the teacher-cache build rate
  loader                 RecordIO -> decoded, flipped, normalised batches by N loader workers (benchmarks/
                         bench_data.py), and `gpu_decode` with data.decode: cuda (CUDA only)
  peak_gpu_mem_gb        torch.cuda.max_memory_allocated over the throughput parts
  run                    experiments/synthetic_r100.yaml shortened by overrides (fewer identities and
                         images, train.max_steps per stage), baseline + 2 generations, its wall time and
                         each stage's held-out accuracy: the pipeline end to end, not the paper's numbers

Correctness (each a dict with `ok`; benchmarks/gpu_check_parts.py and gpu_check_procs.py say how each is checked):
  compile, compiled_fell_back   a compiled stage, then a compiled attention_transfer stage with the same teacher;
                         compiled_fell_back: whether any compiled callable of the check ran eagerly
  gpu_decode             50 steps of data.decode: cuda with a corruption canary, no host sync added (CUDA; on a CPU
                         its code runs on the CPU decoder as `cpu_stand_in`)
  fp16                   fp16 with a GradScaler, clip_grad and accumulate 2
  deterministic, resume  deterministic: true twice, bit for bit (unequal feature-map sizes); SIGTERM + resume
  ranks                  two ranks (torchrun; NCCL with two GPUs, else gloo) with PartialFC sampling, clip_grad and a
                         per-rank cache: equal parameter checksums
  loaded_teacher         a loaded teacher.checkpoint and a tiny synthetic IJB set: evaluation on the run's device

Medians of the engine's per-step images/s after warm-up steps (compile happens in the warm-up). Each part
that fails is reported as {"error": "..."} in its key instead of stopping the check; a part that cannot run here
says why ({"skipped": "needs CUDA"}), and at full size a part expected to end past --budget seconds is skipped
and says so (ESTIMATE_S: estimates, not yet measured on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)  # bench_kd, whose measurement the training figures reuse

import torch
from bench_args import count, run

# full: the sizes the issue asks for; tiny: the same code in seconds on a CPU (an IResNet-18 stands in for the
# IResNet-100 of the KD and inference figures, whose construction alone takes seconds; the shortened run's teacher is a
# VarGFaceNet there: an IResNet-100 trained for two steps still has its initial BatchNorm statistics, and its
# eval-mode embeddings overflow float16, which the teacher cache refuses)
SMALL_STUDENT = {"embedding_size": 128, "multiplier": 0.5, "last_channels": 128, "units": [1, 1, 1]}
SIZES = {
    "full": dict(size=112, batch=256, steps=30, warmup=5, infer_batches=20, loader_images=10000, workers="1,4,8",
                 run_ids=300, run_images_per_id=16, run_holdout=100, run_pairs=1000, run_teacher_steps=150,
                 run_student_steps=80, run_teacher="iresnet100", teacher="iresnet100",
                 student={"embedding_size": 512},
                 # the correctness parts (gpu_check_parts.py, gpu_check_procs.py): a small student and teacher
                 check_size=112, check_batch=32, check_steps=4, check_classes=64, check_student=SMALL_STUDENT,
                 check_teacher="iresnet18", check_teacher_size=64, decode_steps=50, fp16_steps=20, fp16_batch=128,
                 repeat_steps=8, rank_steps=6, ijb_templates=8, child_timeout=180, rank_timeout_minutes=2),
    "tiny": dict(size=32, batch=8, steps=2, warmup=1, infer_batches=2, loader_images=64, workers="1",
                 run_ids=8, run_images_per_id=4, run_holdout=4, run_pairs=40, run_teacher_steps=2,
                 run_student_steps=2, run_teacher="vargfacenet", teacher="iresnet18",
                 student={"embedding_size": 32, "multiplier": 0.5, "last_channels": 64, "units": [1, 1, 1]},
                 check_size=32, check_batch=8, check_steps=2, check_classes=8,
                 check_student={"embedding_size": 32, "multiplier": 0.5, "last_channels": 64, "units": [1, 1, 1]},
                 check_teacher="vargfacenet", check_teacher_kwargs={"multiplier": 0.5, "last_channels": 64,
                                                                    "units": [1, 1, 1]},
                 check_teacher_size=16, decode_steps=6, fp16_steps=2, fp16_batch=8,
                 repeat_steps=3, rank_steps=2, ijb_templates=4, child_timeout=180, rank_timeout_minutes=2),
}

# Seconds each part is expected to take at full size on one H100-class GPU: estimates from the sizes (no GPU has run
# this version yet); a part that would end past --budget is skipped and says so, so the check stays within it
ESTIMATE_S = {"training": 150, "teacher_infer_img_s": 10, "data_dir": 30, "compile": 90, "gpu_decode": 25,
              "fp16": 15, "deterministic": 45, "ranks": 45, "loaded_teacher": 30, "loader": 35, "run": 110}


def _config(args, s, compile_: bool):
    from distill.config.schema import build_config

    return build_config({
        "name": "gpu_check", "device": args.device,
        "data": {"train": "stand-in", "input_size": s["size"], "num_workers": args.workers},
        "student": dict(s["student"]),
        "train": {"batch_size": s["batch"], "max_steps": s["steps"] + s["warmup"], "log_every": 1,
                  "checkpoint_every": 10 ** 9, "amp": "auto", "compile": compile_},
    })


def training_rates(args, s, tmp) -> dict:
    """Plain, compiled, cached-teacher and online-teacher training through the engine, on the same data
    (bench_kd's measurement, plus the compiled student)."""
    from bench_kd import kd_rates, throughput, untrained_teacher

    from distill.data.standin import StandInFaces

    data = StandInFaces(classes=max(2, s["batch"] // 2), per_class=max(4, (s["steps"] + s["warmup"]) * 2 + 2),
                        size=s["size"])
    cfg = _config(args, s, compile_=False)
    kd = kd_rates(cfg, data, tmp, untrained_teacher(s["teacher"], s["size"], s["student"]["embedding_size"]),
                  warmup=s["warmup"])
    out = {"train_img_s": kd["plain_img_s"]}
    try:
        out["train_compiled_img_s"] = throughput(_config(args, s, True), data, os.path.join(tmp, "compiled"), 0.0,
                                                 warmup=s["warmup"])
    except Exception as err:  # noqa: BLE001 - reported, the rest goes on
        out["train_compiled_img_s"] = {"error": f"{type(err).__name__}: {err}"[:300]}
    out.update(kd_cached_img_s=kd["cached_img_s"], kd_online_img_s=kd["online_img_s"],
               kd_cached_time_ratio=kd["cached_time_ratio"], kd_online_time_ratio=kd["online_time_ratio"])
    return out


def teacher_inference_rate(args, s) -> float:
    """IResNet-100 forward passes as the cache build runs them (no grad, the run's autocast, channels_last on CUDA)."""
    from distill.config.schema import TrainConfig
    from distill.utils.device import amp_settings

    device = torch.device(args.device)
    from bench_kd import untrained_teacher

    model = untrained_teacher(s["teacher"], s["size"]).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    dtype, _ = amp_settings(TrainConfig(), device)
    x = torch.randn(s["batch"], 3, s["size"], s["size"], device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)

    def batch():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model(x)

    for _ in range(2):
        batch()
    _sync(device)
    start = time.perf_counter()
    for _ in range(s["infer_batches"]):
        batch()
    _sync(device)
    return s["infer_batches"] * s["batch"] / (time.perf_counter() - start)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(args, s, root) -> str:
    """A small synthetic RecordIO set at the check's image size (the loader's input and the shortened run's data)."""
    from distill.data.synthetic import ensure_synthetic

    path = os.path.join(root, "synthetic_r100_check")
    ensure_synthetic(path, ids=s["run_ids"], images_per_id=s["run_images_per_id"], size=s["size"],
                     pairs=s["run_pairs"], holdout_ids=s["run_holdout"], seed=0)
    return path


def loader_rates(args, s, data_dir) -> dict:
    """bench_data.py on the synthetic set: N CPU workers, and GPU decoding when the device is CUDA."""
    import bench_data

    argv = [data_dir, "--images", str(s["loader_images"]), "--workers", s["workers"],
            "--batch-size", str(min(s["batch"], 256)), "--json"]
    out = {"cpu": _json_of(bench_data.main, argv, "bench_data")}
    if args.device.startswith("cuda"):
        out["gpu_decode"] = _json_of(bench_data.main, argv + ["--decode", "cuda"], "bench_data")
    return out


def _in_process(main_fn, argv, name: str) -> tuple:
    """(exit status, what it printed on stdout, on stderr) of a command's main(argv) run in this process (a second
    interpreter would spend seconds importing torch and facedistill again); torch's thread count restored after.
    What it printed on stderr is passed on to the check's stderr."""
    threads, printed, errors = torch.get_num_threads(), io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
            code = run(functools.partial(main_fn, argv), name)
    finally:
        torch.set_num_threads(threads)
        print(errors.getvalue(), file=sys.stderr, end="")
    return code, printed.getvalue(), errors.getvalue()


def _json_of(main_fn, argv, name: str) -> dict:
    code, printed, errors = _in_process(main_fn, argv, name)
    lines = [ln for ln in printed.splitlines() if ln.startswith("{")]
    if code or not lines:
        return {"error": f"exit {code}: {(errors or printed).strip()[-400:]}"}
    return json.loads(lines[-1])


def shortened_run(args, s, data_dir, out_dir) -> dict:
    """experiments/synthetic_r100.yaml, shortened by overrides only: teacher stage, baseline, 2 generations."""
    experiment = os.path.join(HERE, "..", "experiments", "synthetic_r100.yaml")
    overrides = [
        f"device={args.device}", f"data.train={data_dir}", f"data.val=[{data_dir}/synth_val.bin]",
        f"data.input_size={s['size']}", f"data.synthetic.ids={s['run_ids']}",
        f"data.synthetic.images_per_id={s['run_images_per_id']}", f"data.synthetic.holdout_ids={s['run_holdout']}",
        f"data.synthetic.pairs={s['run_pairs']}", f"data.synthetic.size={s['size']}",
        f"data.num_workers={args.workers}", f"teacher.arch={s['run_teacher']}", f"teacher.input_size={s['size']}",
        f"teacher.train.max_steps={s['run_teacher_steps']}",
        f"teacher.train.batch_size={s['batch']}", f"train.max_steps={s['run_student_steps']}",
        f"train.batch_size={s['batch']}", "generations=2", "tracking.wandb=disabled",
    ]
    if s["student"] != {"embedding_size": 512}:  # tiny: the same smaller VarGFaceNet as student and teacher
        for key, value in s["student"].items():
            value = "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else value
            overrides += [f"student.{key}={value}", f"teacher.{key}={value}"]
    from distill.cli import main as distill_main

    start = time.perf_counter()
    code, printed, errors = _in_process(distill_main, ["run", experiment, "--out", out_dir, "--no-progress",
                                                       *overrides], "distill")
    print(printed, file=sys.stderr, end="")
    result = {"seconds": round(time.perf_counter() - start, 1), "exit": code}
    if code:
        result["error"] = (errors or printed).strip()[-600:]
        return result
    for stage in ("teacher", "baseline", "gen1", "gen2"):
        path = os.path.join(out_dir, stage, "result.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                r = json.load(f)
            accs = [m["acc_mean"] for m in r.get("metrics", {}).values()]
            result[stage] = {"steps": r["steps"], "train_seconds": r["train_seconds"],
                             "acc": round(sum(accs) / len(accs), 4) if accs else None}
    return result


def _part(results: dict, key: str, fn, *a, keys: tuple = ()):
    """results[key] = fn(*a) (a function returning several parts: results.update for `keys`), or {"error": ...}
    for each of them when it raises; its wall time in part_seconds."""
    start = time.perf_counter()
    try:
        value = fn(*a)
        if keys:
            results.update({k: value[k] for k in keys})
        else:
            results[key] = value
    except Exception as err:  # noqa: BLE001 - one failing part must not hide the others' figures
        failed = {"error": f"{type(err).__name__}: {err}"[:400], "where": traceback.format_exc(limit=3)[-400:]}
        results.update({k: dict(failed) for k in (keys or (key,))})
    results.setdefault("part_seconds", {})[key] = round(time.perf_counter() - start, 1)


def compiled_fell_back(root: str, results: dict):
    """True when any compiled callable of the check ran eagerly (result.json's compile_fell_back of the compiled
    throughput stage and of the compile part's stages), False when none did, None when none was recorded."""
    reasons = []
    path = os.path.join(root, "train", "compiled", "result.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            reasons.append(json.load(f).get("compile_fell_back"))
    part = results.get("compile")
    if isinstance(part, dict) and "stages" in part:
        reasons += [st["compile_fell_back"] for st in part["stages"].values()]
    known = [r for r in reasons if isinstance(r, dict)]
    if not known:
        return None
    return any(v is not None for r in known for v in r.values())


PARTS = ("train", "teacher", "loader", "run", "compile", "gpu_decode", "fp16", "deterministic", "ranks",
         "loaded_teacher")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: the same code in seconds (CPU tests)")
    p.add_argument("--workers", type=count(0), default=None,
                   help="loader workers of the training runs (default 8, tiny 0)")
    p.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {','.join(PARTS)} "
                                              f"(deterministic also leaves out resume)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of train_compiled_img_s (the tests use eager: no code generation)")
    p.add_argument("--keep", default=None, help="keep the check's files in this folder (default: a temporary one)")
    p.add_argument("--threads", type=count(1), default=None,
                   help="CPU threads of torch with --device cpu (default: up to 4; the tests use 1 beside other work)")
    p.add_argument("--budget", type=count(60), default=600,
                   help="seconds the full-size check may take: a part expected to end past it is skipped (default "
                        "600)")
    args = p.parse_args(argv)
    s = SIZES["tiny" if args.tiny else "full"]
    import distill.train.setup
    distill.train.setup.COMPILE_BACKEND = args.compile_backend
    args.workers = args.workers if args.workers is not None else (0 if args.tiny else 8)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device here; run with --device cpu --tiny for the CPU parts"}))
        return 2
    skip = {x for x in args.skip.split(",") if x}
    unknown = skip - set(PARTS)
    if unknown:
        p.error(f"--skip: unknown part(s) {', '.join(sorted(unknown))}; the parts are {', '.join(PARTS)}")
    if args.device == "cpu":
        torch.set_num_threads(args.threads or max(1, min(4, os.cpu_count() or 1)))
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    results = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
               "torch": torch.__version__, "sizes": "tiny" if args.tiny else "full", "input_size": s["size"],
               "batch_size": s["batch"], "loader_workers": args.workers, "compile_backend": args.compile_backend,
               "teacher_arch": s["teacher"]}
    start = time.perf_counter()

    def part(key, fn, *a, keys=()):
        """Run a part unless skipped or, at full size, expected to end past the budget."""
        name = {"training": "train", "teacher_infer_img_s": "teacher", "data_dir": None}.get(key, key)
        if name in skip:
            return
        if not args.tiny and time.perf_counter() - start + ESTIMATE_S.get(key, 0) > args.budget:
            why = f"time budget: {time.perf_counter() - start:.0f} s spent, ~{ESTIMATE_S[key]} s more > --budget"
            results.update({k: {"skipped": why} for k in (keys or (key,))})
            return
        _part(results, key, fn, *a, keys=keys)

    from gpu_check_parts import compile_stages, fp16_scaler, gpu_decode, loaded_teacher
    from gpu_check_procs import deterministic_and_resume, start_forkserver, two_ranks

    if cuda and not {"deterministic", "ranks"} <= skip:
        torch.cuda.init()  # the children's start method follows it (gpu_check_procs._context)
        start_forkserver()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or tmp
        os.makedirs(root, exist_ok=True)
        part("training", training_rates, args, s, os.path.join(root, "train"))
        if isinstance(results.get("training"), dict) and "error" not in results["training"] \
                and "skipped" not in results["training"]:  # flat keys; a failure stays under "training"
            results.update(results.pop("training"))
        part("teacher_infer_img_s", teacher_inference_rate, args, s)
        if cuda:
            results["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
        data_dir = None
        if not {"loader", "run", "gpu_decode", "loaded_teacher"} <= skip:
            part("data_dir", make_data, args, s, root)
            data_dir = results.pop("data_dir", None)
        no_data = {"error": f"no synthetic data set: {data_dir}"} if not isinstance(data_dir, str) else None
        part("compile", compile_stages, args, s, os.path.join(root, "compile"))
        results["compiled_fell_back"] = compiled_fell_back(root, results)
        if no_data is None:
            part("gpu_decode", gpu_decode, args, s, data_dir, root)
        part("fp16", fp16_scaler, args, s, root)
        part("deterministic", deterministic_and_resume, args, s, os.path.join(root, "repeat"),
             keys=("deterministic", "resume"))
        part("ranks", two_ranks, args, s, os.path.join(root, "ranks"))
        if no_data is None:
            part("loaded_teacher", loaded_teacher, args, s, data_dir, os.path.join(root, "loaded_teacher"))
            part("loader", loader_rates, args, s, data_dir)
            part("run", shortened_run, args, s, data_dir, os.path.join(root, "run"))
        else:
            results.update({k: dict(no_data) for k in ("gpu_decode", "loaded_teacher", "loader", "run")
                            if k not in skip})
    results["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "gpu_check"))
