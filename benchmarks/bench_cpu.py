"""CPU speed under the thread policy: training and evaluation images/s, quiet and beside one competing busy process.

Workloads, at the quickstart's sizes (experiments/quickstart.yaml, 32 px, batch 64):
  student_train   VarGFaceNet forward + backward + SGD step with its ArcFace head
  teacher_train   the IResNet-18 teacher, the same
  student_eval    VarGFaceNet inference, batch 128
Settings (each measured in its own child process, since OpenMP reads its environment when torch starts):
  old             torch's default thread count (every core), OpenMP's default (spinning) wait policy
  new             distill.utils.threads: the policy's thread count, chosen in the child as a stage chooses it
  threads=N ...   any other setting given with --setting (e.g. 'threads=2 OMP_WAIT_POLICY=PASSIVE')
Conditions: quiet, and `loaded` with one busy process (a Python spin loop this script starts and stops).

Printed (and with --json one JSON object): images/s per workload, setting and condition, and the ratios the
goals are about: loaded rate of `new` / quiet rate of the best setting (goal >= 0.8), quiet `new` / quiet
`old` (goal >= 1, within noise). All in one run, so the ratios compare like with like on a noisy machine.

    python benchmarks/bench_cpu.py [--json] [--quick] [--steps 12] [--setting 'threads=2 OMP_WAIT_POLICY=PASSIVE']
    python benchmarks/bench_cpu.py --compile [inductor] [--json]   train.compile: compile time against a stage's saving
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..")
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)  # bench_args
from bench_args import count
from bench_args import run as run_command

WORKLOADS = ("student_train", "teacher_train", "student_eval")
CONDITIONS = ("quiet", "loaded")


# ------------------------------------------------------------------------------------------ child: one figure

def _child(spec: dict) -> dict:
    """Images/s of one workload in this process (threads already fixed by the environment and spec)."""
    import torch

    from distill.config.schema import load_config
    from distill.losses.heads import head_from_config
    from distill.models.registry import create_model

    if spec["threads"] == "policy":  # decided here, in the condition being measured (a busy core is seen)
        from distill.utils.threads import apply_threads, plan_threads

        apply_threads(plan_threads(workers=0))
    else:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    size = spec.get("size", 32)
    cfg = load_config(os.path.join(REPO, "experiments", "quickstart.yaml"),
                      [f"data.input_size={size}", f"teacher.input_size={size}"])
    batch = spec["batch"]
    if spec["workload"] == "teacher_train":
        model = create_model(cfg.teacher.arch, **cfg.teacher.model)
    else:
        model = create_model(cfg.student.arch, **cfg.student.model_kwargs(size))
    x = torch.randn(batch, 3, size, size)
    steps, warmup, times = spec["steps"], 2, []
    forward = torch.compile(model, backend=spec["compile"]) if spec.get("compile") else model
    if spec.get("amp") == "auto":  # what a stage with train.amp: auto picks for this model on this CPU
        from distill.config.schema import TrainConfig
        from distill.utils.device import amp_settings

        spec["amp"] = "bf16" if amp_settings(TrainConfig(), torch.device("cpu"), model)[0] is not None else None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.get("amp") == "bf16")
    if spec["workload"] == "student_eval":
        model.eval()
        with torch.inference_mode():
            for _ in range(warmup + steps):
                t0 = time.perf_counter()
                with autocast:
                    forward(x)
                times.append(time.perf_counter() - t0)
    else:
        head = head_from_config(cfg.margin, model.config["embedding_size"], cfg.data.synthetic.ids)
        labels = torch.randint(0, cfg.data.synthetic.ids, (batch,))
        opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
        model.train()
        for _ in range(warmup + steps):
            t0 = time.perf_counter()
            with autocast:
                emb = forward(x)
            loss, _ = head(emb.float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    return {"img_s": batch / statistics.median(times[warmup:]), "threads": torch.get_num_threads(),
            "first_step_s": times[0], "amp": spec.get("amp")}


# ------------------------------------------------------------------------------------------ parent

def parse_setting(text: str) -> dict:
    """'threads=2 OMP_WAIT_POLICY=PASSIVE' -> {"threads": 2, "env": {"OMP_WAIT_POLICY": "PASSIVE"}}."""
    out = {"threads": None, "env": {}}
    for part in text.split():
        key, _, value = part.partition("=")
        if not value:
            raise SystemExit(f"--setting {text!r}: write KEY=VALUE pairs (threads=N, or environment variables)")
        if key == "threads":
            out["threads"] = int(value)
        else:
            out["env"][key] = value
    return out


def measure(setting: dict, workload: str, steps: int, batch: int, compile_backend=None, amp=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env.update(setting["env"])
    spec = {"workload": workload, "threads": setting["threads"], "steps": steps,
            "batch": batch * 2 if workload == "student_eval" else batch, "compile": compile_backend,
            "amp": amp}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise SystemExit(f"bench_cpu: the measurement of {workload} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class Busy:
    """One competing busy process (a spin loop), started on entry and stopped on exit."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def run(settings: dict, steps: int, batch: int, workloads=WORKLOADS) -> dict:
    rates = {w: {name: {} for name in settings} for w in workloads}
    for condition in CONDITIONS:
        for workload in workloads:
            for name, setting in settings.items():
                if condition == "loaded":
                    with Busy():
                        r = measure(setting, workload, steps, batch)
                else:
                    r = measure(setting, workload, steps, batch)
                rates[workload][name][condition] = round(r["img_s"], 1)
                rates[workload][name]["threads"] = r["threads"]
    ratios = {}
    for workload, by in rates.items():
        best_quiet = max(v["quiet"] for v in by.values())
        ratios[workload] = {"new_loaded_over_best_quiet": round(by["new"]["loaded"] / best_quiet, 3),
                            "new_quiet_over_old_quiet": round(by["new"]["quiet"] / by["old"]["quiet"], 3),
                            "old_loaded_over_best_quiet": round(by["old"]["loaded"] / best_quiet, 3)}
    return {"cores": os.cpu_count(), "settings": settings, "images_per_s": rates, "ratios": ratios}


def compile_study(steps: int, batch: int, backend: str = "inductor") -> dict:
    """train.compile on this CPU: for each training workload (quiet, the new thread policy), the compile time
    (first compiled step less first eager step) against the time a quickstart stage saves at the compiled rate.
    A stage's images: its epochs times the training set of experiments/quickstart.yaml."""
    from distill.config.schema import load_config

    cfg = load_config(os.path.join(REPO, "experiments", "quickstart.yaml"))
    images = cfg.data.synthetic.ids * cfg.data.synthetic.images_per_id
    stage_images = {"student_train": cfg.train.epochs * images, "teacher_train": cfg.teacher.train.epochs * images}
    policy, out = {"threads": "policy", "env": {}}, {}
    for workload, stage in stage_images.items():
        eager = measure(policy, workload, steps, batch, amp="auto")
        compiled = measure(policy, workload, steps, batch, compile_backend=backend, amp="auto")
        compile_s = compiled["first_step_s"] - eager["first_step_s"]
        saved_s = stage / eager["img_s"] - stage / compiled["img_s"]
        out[workload] = {"amp": eager["amp"], "eager_img_s": round(eager["img_s"], 1),
                         "compiled_img_s": round(compiled["img_s"], 1),
                         "compile_s": round(compile_s, 1), "stage_images": stage,
                         "stage_eager_s": round(stage / eager["img_s"], 1), "stage_saved_s": round(saved_s, 1),
                         "pays": saved_s > compile_s}
    return {"backend": backend, "compile": out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.add_argument("--quick", action="store_true", help="a few steps at batch 8 (the test suite: seconds)")
    p.add_argument("--steps", type=count(1), default=12, help="timed steps per figure after 2 warm-up steps")
    p.add_argument("--setting", action="append", default=[], metavar="'threads=N VAR=VALUE ...'",
                   help="another setting to measure beside old and new (repeatable)")
    p.add_argument("--workload", action="append", choices=WORKLOADS, default=None,
                   help="measure only these workloads (repeatable; default all)")
    p.add_argument("--compile", metavar="BACKEND", nargs="?", const="inductor", default=None,
                   help="instead: train.compile's cost and gain for a quickstart stage (default backend inductor)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    import torch  # the parent's default thread count is the `old` setting's

    settings = {"old": {"threads": torch.get_num_threads(), "env": {}}, "new": {"threads": "policy", "env": {}}}
    for text in args.setting:
        settings[text] = parse_setting(text)
        settings[text]["threads"] = settings[text]["threads"] or settings["old"]["threads"]
    steps, batch = (2, 8) if args.quick else (args.steps, 64)
    if args.compile:
        study = compile_study(steps, batch, args.compile)
        if args.json:
            print(json.dumps(study))
        for workload, v in study["compile"].items():
            print(f"{workload}: eager {v['eager_img_s']} img/s, compiled ({study['backend']}) {v['compiled_img_s']} "
                  f"img/s; compile {v['compile_s']} s against {v['stage_saved_s']} s saved over a quickstart stage "
                  f"({v['stage_images']} images, {v['stage_eager_s']} s eager): "
                  + ("pays" if v["pays"] else "does not pay"), file=sys.stderr if args.json else sys.stdout)
        return 0
    out = run(settings, steps, batch, tuple(args.workload or WORKLOADS))
    if args.json:
        print(json.dumps(out))
        return 0
    for workload, by in out["images_per_s"].items():
        print(f"{workload}:")
        for name, v in by.items():
            print(f"  {name:<40} {v['threads']} thread(s)  quiet {v['quiet']:8.1f} img/s  "
                  f"loaded {v['loaded']:8.1f} img/s")
        print("  ratios: " + ", ".join(f"{k} {v}" for k, v in out["ratios"][workload].items()))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "bench_cpu"))
