"""The GPU check's parts that need processes of their own (benchmarks/gpu_check.py calls them):

  deterministic  `deterministic: true` trained twice, in two processes, compared bit for bit (the weights in
                 student.pt), with fitnet and attention_transfer terms whose student and teacher maps differ in
                 size (their resize and pooling need deterministic CUDA backward kernels)
  resume         the same stage SIGTERMed by its parent at a known step (it writes last.pt and stops), then
                 resumed in a fresh process: bit-identical to the uninterrupted run above
  ranks          two ranks (NCCL where two GPUs exist, else gloo on the one GPU; gloo on a CPU) with margin
                 sample_rate 0.5, clip_grad and a teacher cache built in per-rank slices: each rank writes a
                 checksum of its model's parameters, which must be equal (DDP replicas that drifted are not)

On a GPU the child processes are started from a forkserver (a fresh interpreter that imports torch and facedistill
once: forking the check's own process after CUDA is initialised is not allowed) and the ranks by torchrun
(`python -m torch.distributed.run --standalone`) running this file. On a CPU (the test suite) the children are
forked from the check's process, and two of them, given torchrun's environment, run the ranks' same function,
`rank_main`, in a fraction of torchrun's time (it starts three interpreters).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
from gpu_check_parts import check_config, check_teacher, run_check_stage, standin, student_sha256  # noqa: E402

from distill.data.standin import StandInFaces  # noqa: E402

PREEMPTED = 75  # a child's exit status when the stage stopped on SIGTERM (engine.Preempted)
_CONTEXT = None


def _context():
    """How the children start: forked from this process while it has not initialised CUDA (the CPU check: no
    imports to repeat), else from a forkserver, a fresh interpreter that imports torch and facedistill once for
    all of them (CUDA forbids forking a process that initialised it). The forkserver finds this folder through
    PYTHONPATH: Python 3.11's forkserver does not take the parent's sys.path."""
    global _CONTEXT
    if _CONTEXT is None:
        if not torch.cuda.is_initialized() and "fork" in multiprocessing.get_all_start_methods():
            _CONTEXT = multiprocessing.get_context("fork")
        else:
            paths = [HERE, ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
            # torch.cuda.is_available() through NVML: a CUDA driver call in the server would poison its forks
            os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
            _CONTEXT = multiprocessing.get_context("forkserver")
            _CONTEXT.set_forkserver_preload(["gpu_check_procs", "bench_kd", "distill.train.engine", "teachers.cache"])
    return _CONTEXT


def start_forkserver() -> None:
    """Start the children's forkserver now, where they will use one: its imports then overlap the check's
    in-process parts."""
    if _context().get_start_method() == "forkserver":
        from multiprocessing import forkserver
        forkserver.ensure_running()


def _child_setup(threads: int | None) -> None:
    os.dup2(2, 1)  # the check's stdout carries its one JSON line: a child speaks on stderr only
    if threads:
        torch.set_num_threads(threads)


def _error_of(out_dir: str) -> str | None:
    path = os.path.join(out_dir, "error.txt")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()[-600:]
    return None


def _write_error(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "error.txt"), "w", encoding="utf-8") as f:
        f.write(traceback.format_exc(limit=4))


# --------------------------------------------------------------------------------------- deterministic + resume

class _StopsForSigterm(StandInFaces):
    """Stand-in faces that, when the item after `stop_after` items is asked for (the loader runs in the training
    process: num_workers 0), say so through `ready` and wait until SIGTERM has arrived; the engine's own handler
    then stops the stage at the end of that step. So the parent's SIGTERM always lands at the same step."""

    def __init__(self, *a, stop_after: int | None = None, ready=None, **kw):
        super().__init__(*a, **kw)
        self.stop_after, self.ready, self.items = stop_after, ready, 0

    def item(self, index, flip):
        self.items += 1
        if self.stop_after is not None and self.items == self.stop_after + 1:
            arrived = []
            engine_handler = signal.getsignal(signal.SIGTERM)

            def on_sigterm(signum, frame):
                arrived.append(signum)
                if callable(engine_handler):
                    engine_handler(signum, frame)

            signal.signal(signal.SIGTERM, on_sigterm)
            self.ready.set()
            deadline = time.monotonic() + 120
            while not arrived and time.monotonic() < deadline:
                time.sleep(0.01)
        return super().item(index, flip)


def repeat_config(args, s: dict):
    """The deterministic stage: distilling with equivalent_angular, attention_transfer and fitnet from an online
    teacher whose input side (s["check_teacher_size"]) is smaller than the student's: at the chosen stages the
    student's maps are larger than the teacher's (attention_transfer pools the student's, fitnet resizes the
    student's regressed map), the resize kernels whose CUDA backward must be deterministic."""
    return check_config(args, s, deterministic=True,
                        train={"max_steps": s["repeat_steps"], "checkpoint_every": 10 ** 9},
                        distill={"terms": [{"loss": "equivalent_angular", "alpha": 7},
                                           {"loss": "attention_transfer", "alpha": 1, "stages": [-2]},
                                           {"loss": "fitnet", "alpha": 1, "stages": [-1]}]})


def repeat_child(args, s: dict, out_dir: str, stop_after: int | None = None, ready=None) -> None:
    """One deterministic stage in `out_dir` (resumed when it holds a last.pt); exits PREEMPTED when SIGTERMed."""
    from distill.train.engine import Preempted

    _child_setup(1 if args.device == "cpu" else None)
    try:
        cfg = repeat_config(args, s)
        plain = standin(s, steps=s["repeat_steps"])
        data = _StopsForSigterm(plain.num_classes, len(plain) // plain.num_classes, s["check_size"],
                                stop_after=stop_after, ready=ready)
        run_check_stage(cfg, "repeat", out_dir, data, teacher=check_teacher(s))
    except Preempted:
        sys.exit(PREEMPTED)
    except BaseException:
        _write_error(out_dir)
        raise


def _join(procs: list, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def deterministic_and_resume(args, s: dict, root: str) -> dict:
    """{"deterministic": ..., "resume": ...}: runs A and B uninterrupted, C SIGTERMed after `stop_step` steps
    and resumed; A == B bit for bit, and C == A."""
    ctx = _context()
    dirs = {k: os.path.join(root, k) for k in ("a", "b", "c")}
    batch, stop_step = s["check_batch"], max(1, s["repeat_steps"] // 2)
    ready = ctx.Event()
    first = [ctx.Process(target=repeat_child, args=(args, s, dirs["a"])),
             ctx.Process(target=repeat_child, args=(args, s, dirs["c"], stop_step * batch, ready))]
    for p in first:
        p.start()
    deadline = time.monotonic() + s["child_timeout"]
    signalled = False
    while not signalled and first[1].is_alive() and time.monotonic() < deadline:  # a child that failed: at once
        signalled = ready.wait(0.2)
    if signalled:
        os.kill(first[1].pid, signal.SIGTERM)
    _join(first, s["child_timeout"])
    stopped = _last_step(dirs["c"])
    second = [ctx.Process(target=repeat_child, args=(args, s, dirs["b"])),
              ctx.Process(target=repeat_child, args=(args, s, dirs["c"]))]
    for p in second:
        p.start()
    _join(second, s["child_timeout"])

    def outcome(name, proc):
        if proc.exitcode == 0 and os.path.exists(os.path.join(dirs[name], "student.pt")):
            return {"sha256": student_sha256(dirs[name])}
        return {"error": _error_of(dirs[name]) or f"exit {proc.exitcode}"}

    a, b, c = outcome("a", first[0]), outcome("b", second[0]), outcome("c", second[1])
    det = {"first": a, "second": b}
    det["ok"] = "sha256" in a and a.get("sha256") == b.get("sha256")
    resume = {"sigterm_delivered": signalled, "exit_on_sigterm": first[1].exitcode, "stopped_at_step": stopped,
              "resumed": c, "uninterrupted": a}
    # stopped after the step whose batch was being read when SIGTERM came (one later if the loop reads ahead)
    resume["ok"] = (signalled and first[1].exitcode == PREEMPTED and stopped is not None
                    and stop_step <= stopped < s["repeat_steps"]
                    and "sha256" in c and c.get("sha256") == a.get("sha256"))
    return {"deterministic": det, "resume": resume}


def _last_step(stage_dir: str) -> int | None:
    from distill.utils.checkpoint import safe_torch_load

    path = os.path.join(stage_dir, "last.pt")
    return int(safe_torch_load(path)["step"]) if os.path.exists(path) else None


# --------------------------------------------------------------------------------------- two ranks

def rank_config(args, s: dict):
    """The ranks' stage: PartialFC sampling half the classes, gradients clipped hard enough to bite, distilling
    from a teacher cache."""
    return check_config(args, s, margin={"sample_rate": 0.5},
                        train={"clip_grad": 0.5, "max_steps": s["rank_steps"], "checkpoint_every": 2})


def rank_main(args, s: dict, root: str) -> None:
    """One rank of the ranks part (under torchrun, or a forkserver child with torchrun's environment): join the
    group, build this rank's slice of the teacher cache, train, write rank<r>.json with the parameters' sha256."""
    import torch.distributed as dist
    from gpu_check_parts import replaced, tensors_sha256

    import distill.train.engine as engine
    from distill.utils.dist import init_distributed
    from teachers.cache import build_cache
    from teachers.signal import online_signal

    cfg = rank_config(args, s)
    device = torch.device(args.device)
    timeout = s["rank_timeout_minutes"]
    if device.type == "cuda" and torch.cuda.device_count() < 2:  # two ranks on one GPU: NCCL refuses that
        from datetime import timedelta
        dist.init_process_group("gloo", timeout=timedelta(minutes=timeout))
    else:
        init_distributed(args.device, timeout_minutes=timeout)
    rank = dist.get_rank()
    try:
        data = standin(s, steps=2 * s["rank_steps"])  # per rank: half the global batches of an epoch
        teacher = check_teacher(s)
        run_device = torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device
        cache = build_cache(online_signal(teacher, cfg.train, run_device), data, os.path.join(root, "cache"),
                            batch_size=s["check_batch"], progress=False)
        built = []

        def create_model(*a, **kw):
            built.append(engine_create(*a, **kw))
            return built[-1]

        engine_create = engine.create_model
        with replaced(engine, "create_model", create_model):
            result = run_check_stage(cfg, "ranks", os.path.join(root, "stage"), data, cache=cache)
        params = {n: p for n, p in built[-1].named_parameters()}
        report = {"rank": rank, "world": dist.get_world_size(), "backend": str(dist.get_backend()),
                  "device": str(next(built[-1].parameters()).device), "steps": result["steps"],
                  "cache_rows": len(cache), "params_sha256": tensors_sha256(params)}
    except BaseException:
        report = {"rank": rank, "error": traceback.format_exc(limit=4)[-600:]}
    with open(os.path.join(root, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def _rank_child(args, s: dict, root: str, rank: int, port: int) -> None:
    _child_setup(1 if args.device == "cpu" else None)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    rank_main(args, s, root)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_ranks(args, s: dict, root: str) -> dict:
    """Two ranks train one stage; their parameters must be bit-identical."""
    os.makedirs(root, exist_ok=True)
    launcher = None
    if torch.device(args.device).type == "cuda":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "ranks", json.dumps({"args": vars(args), "sizes": s, "root": root})]
        # its own session: on a timeout torchrun and both ranks are ended together (never a rank left on the GPU)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=s["child_timeout"])
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            err = f"timed out after {s['child_timeout']} s; {err}"
        launcher = {"exit": proc.returncode, "tail": err.strip()[-400:] if proc.returncode else None}
    else:
        ctx, port = _context(), _free_port()
        procs = [ctx.Process(target=_rank_child, args=(args, s, root, r, port)) for r in (0, 1)]
        for p in procs:
            p.start()
        _join(procs, s["child_timeout"])
        launcher = {"exit": [p.exitcode for p in procs]}
    ranks = []
    for r in (0, 1):
        path = os.path.join(root, f"rank{r}.json")
        if not os.path.exists(path):
            ranks.append({"rank": r, "error": f"{path} was not written (the rank did not get that far)"})
            continue
        with open(path, encoding="utf-8") as f:
            ranks.append(json.load(f))
    ok = all("params_sha256" in r for r in ranks) and ranks[0]["params_sha256"] == ranks[1]["params_sha256"] \
        and all(r["steps"] == s["rank_steps"] for r in ranks)
    return {"ok": bool(ok), "launcher": launcher,
            "backend": ranks[0].get("backend"), "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "ranks": ranks}


def _cli(argv) -> int:
    """`gpu_check_procs.py ranks JSON`: one rank of the ranks part, as torchrun starts it."""
    import argparse

    if len(argv) != 2 or argv[0] != "ranks":
        print("usage: gpu_check_procs.py ranks JSON (started by gpu_check.py under torchrun)", file=sys.stderr)
        return 2
    spec = json.loads(argv[1])
    rank_main(argparse.Namespace(**spec["args"]), spec["sizes"], spec["root"])
    return 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
