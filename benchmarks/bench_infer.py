"""CPU inference speed of a deployed face model: PyTorch eager vs ONNX Runtime FP32 vs ONNX Runtime INT8.

Each model is exported exactly as `distill export --int8` writes it (BatchNorm folded; QDQ static
quantization, weights int8 per channel, activations uint8), calibrated here on stand-in faces (speed does
not depend on the calibration images; accuracy does: measure that with `distill export --check-bin`).
All three run in one process with the same thread count (torch.set_num_threads and ONNX Runtime's
intra_op_num_threads, inter-op 1):
  batch 1    latency, p50 and p90 over --iters runs (ms)
  batch 32   throughput, --batch-size images per run, median of --batch-iters runs (images/s)
Ratios are against eager (images/s at batch 32, and p50 speed-up at batch 1).
--threads defaults to 1: the number a serving process usually gets per model worker, and the steadiest on
a shared machine; pass --threads 2 (or the cores you have) to see the scaling.

    python benchmarks/bench_infer.py [--model vargfacenet|iresnet100|<registry name>] [--student student.pt]
        [--teacher] [--input-size 112] [--threads 1] [--iters 50] [--batch-size 32] [--batch-iters 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_args
from bench_args import count, run

from distill.data.standin import StandInFaces
from distill.deploy.export import INPUT_NAME, export_onnx
from distill.deploy.quantize import calibration_reader, quantize_file
from distill.models.files import load_model

WARMUP = 3


def _percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _time_runs(run, x, runs: int) -> list:
    for _ in range(WARMUP if len(x) == 1 else 1):
        run(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return times


def _measure(run, input_size: int, args) -> dict:
    rng = np.random.default_rng(0)
    one = rng.standard_normal((1, 3, input_size, input_size)).astype(np.float32)
    many = rng.standard_normal((args.batch_size, 3, input_size, input_size)).astype(np.float32)
    b1 = _time_runs(run, one, args.iters)
    bn = _time_runs(run, many, args.batch_iters)
    return {"b1_p50_ms": 1e3 * _percentile(b1, 50), "b1_p90_ms": 1e3 * _percentile(b1, 90),
            "batch_img_s": args.batch_size / statistics.median(bn)}


def _session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {INPUT_NAME: x})[0]


def bench_model(label: str, source: str, args, tmp: str) -> dict:
    model, recorded = load_model(source, input_size=None if os.path.exists(source) else args.input_size)
    size = recorded or args.input_size
    model = model.eval()
    fp32 = export_onnx(model, os.path.join(tmp, f"{label}.onnx"), size, fold_bn=True)
    int8 = os.path.join(tmp, f"{label}.int8.onnx")
    faces = StandInFaces(classes=8, per_class=max(1, args.calib_images // 8), size=size, flip=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = quantize_file(fp32, int8, calibration_reader(faces, np.arange(len(faces)), INPUT_NAME))

    def eager(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    result = {"source": source, "input_size": size,
              "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
              "fp32_mb": os.path.getsize(fp32) / 1e6, "int8_mb": os.path.getsize(int8) / 1e6,
              "int8_fp32_ops": summary["fp32"],
              "eager": _measure(eager, size, args),
              "ort_fp32": _measure(_session(fp32, args.threads), size, args),
              "ort_int8": _measure(_session(int8, args.threads), size, args)}
    e = result["eager"]
    result["ratios"] = {f"{k}_vs_eager_{m}": round(result[k][m] / e[m] if m == "batch_img_s"
                                                   else e[m] / result[k][m], 3)
                        for k in ("ort_fp32", "ort_int8") for m in ("batch_img_s", "b1_p50_ms")}
    return result


def _table(out: dict) -> str:
    lines = [f"threads {out['threads']}, torch {out['torch']}, onnxruntime {out['onnxruntime']}, "
             f"batch {out['batch_size']}; {out['machine']}",
             f"{'model':<12} {'runtime':<10} {'file MB':>8} {'b1 p50 ms':>10} {'b1 p90 ms':>10} "
             f"{'img/s':>9} {'img/s vs eager':>15}"]
    for label, r in out["models"].items():
        for key, name, mb in (("eager", "eager", None), ("ort_fp32", "ORT FP32", r["fp32_mb"]),
                              ("ort_int8", "ORT INT8", r["int8_mb"])):
            m = r[key]
            ratio = "1.00x" if key == "eager" else f"{r['ratios'][f'{key}_vs_eager_batch_img_s']:.2f}x"
            lines.append(f"{label:<12} {name:<10} {'-' if mb is None else f'{mb:.2f}':>8} {m['b1_p50_ms']:>10.2f} "
                         f"{m['b1_p90_ms']:>10.2f} {m['batch_img_s']:>9.1f} {ratio:>15}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vargfacenet",
                   help="registry name of the student (random weights; default vargfacenet)")
    p.add_argument("--student", default=None, help="a student.pt to benchmark instead of --model")
    p.add_argument("--teacher", action="store_true", help="also benchmark the IResNet-100 teacher, for contrast")
    p.add_argument("--input-size", type=count(16), default=112, help="image side for --model (default 112)")
    p.add_argument("--threads", type=count(1), default=1, help="torch and ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--iters", type=count(1), default=50, help="batch-1 runs timed (default 50)")
    p.add_argument("--batch-size", type=count(1), default=32, help="images per batch of the batch runs (default 32)")
    p.add_argument("--batch-iters", type=count(1), default=5, help="batch runs timed (default 5)")
    p.add_argument("--calib-images", type=count(1), default=64, help="stand-in faces calibrating the INT8 file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    out = {"threads": args.threads, "batch_size": args.batch_size, "iters": args.iters,
           "batch_iters": args.batch_iters, "torch": torch.__version__, "onnxruntime": ort.__version__,
           "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} logical CPUs".replace(
               "  ", " "),
           "models": {}}
    sources = [("student", args.student or args.model)] + ([("iresnet100", "iresnet100")] if args.teacher else [])
    with tempfile.TemporaryDirectory() as tmp:
        for label, source in sources:
            out["models"][label] = bench_model(label, source, args, tmp)
    print(json.dumps(out, indent=1) if args.json else _table(out))
    return out


if __name__ == "__main__":
    sys.exit(run(main, "bench_infer"))
