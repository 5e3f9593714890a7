"""`distill profile NAME`: parameters in use, GMACs/GFLOPs (torch.utils.flop_counter) and CPU speed."""

from __future__ import annotations

import json
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distill.models import model_input_size
from distill.registry import create_model, list_models


def params_in_use(model: nn.Module, input_size: int) -> int:
    """Trainable parameters that receive a gradient from one forward/backward (batch 2, train mode).

    Counting `requires_grad` alone would also count modules that are built but never called."""
    was_training = model.training
    model.train()
    for p in model.parameters():
        p.grad = None
    model(torch.randn(2, 3, input_size, input_size)).square().sum().backward()
    used = sum(p.numel() for p in model.parameters() if p.requires_grad and p.grad is not None)
    for p in model.parameters():
        p.grad = None
    model.train(was_training)
    return used


def count_flops(model: nn.Module, input_size: int) -> int:
    """FLOPs of one 1-image forward in eval mode; torch's counter counts a multiply-add as 2 FLOPs."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, input_size, input_size))
    return counter.get_total_flops()


def _time(fn, min_runs: int, budget_s: float) -> float:
    """Median seconds of `fn` over at least `min_runs` runs (or until `budget_s` is spent)."""
    fn()  # warm-up: allocator, oneDNN kernel selection
    times, start = [], time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_model(model: nn.Module, input_size: int, timing: bool = True, budget_s: float = 3.0) -> dict:
    flops = count_flops(model, input_size)
    result = {"params": params_in_use(model, input_size), "gflops": flops / 1e9, "gmacs": flops / 2e9,
              "input_size": input_size, "latency_ms": None, "images_per_s": None,
              "threads": torch.get_num_threads()}
    if timing:
        model.eval()
        x1, x32 = torch.randn(1, 3, input_size, input_size), torch.randn(32, 3, input_size, input_size)
        with torch.inference_mode():
            result["latency_ms"] = 1e3 * _time(lambda: model(x1), 5, budget_s)
            result["images_per_s"] = 32 / _time(lambda: model(x32), 2, budget_s)
    return result


def _run(args) -> int:
    if args.list or not args.name:
        print("\n".join(list_models(aliases=True)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    model = create_model(args.name, **({"input_size": args.input_size} if args.input_size else {}))
    size = args.input_size or model_input_size(model) or 112
    r = profile_model(model, size, timing=not args.no_timing, budget_s=args.seconds)
    if args.json:
        print(json.dumps({"name": args.name, **r}))
        return 0
    print(f"{args.name} at {size}x{size}")
    print(f"  parameters (in use) {r['params'] / 1e6:10.3f} M")
    print(f"  GMACs               {r['gmacs']:10.3f}   (multiply-adds)")
    print(f"  GFLOPs              {r['gflops']:10.3f}   (a multiply-add counts as 2)")
    if r["latency_ms"] is not None:
        print(f"  CPU latency, batch 1   {r['latency_ms']:9.2f} ms   ({r['threads']} threads)")
        print(f"  CPU throughput, batch 32 {r['images_per_s']:7.1f} images/s")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("profile", help="parameters, GFLOPs and CPU speed of a student or teacher")
    p.add_argument("name", nargs="?", help="model name: vargfacenet, vargfacenet_depthwise, r18..r200 (iresnet18..), "
                   "timm/<name>; --list shows every registered name")
    p.add_argument("--list", action="store_true", help="list the registered model names (and aliases)")
    p.add_argument("--input-size", type=int, default=None, help="square input side (default: the model's, 112)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-timing", action="store_true", help="count only; skip the CPU latency/throughput runs")
    p.add_argument("--seconds", type=float, default=3.0, help="time budget of each timing run (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for timing (default: torch's choice)")
    p.set_defaults(func=_run)
