"""What a model costs (behind `distill profile`): parameters in use, GMACs/GFLOPs (torch flop counter), CPU speed."""

from __future__ import annotations

import json
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distill.models.registry import create_model, resolve


def params_in_use(model: nn.Module, input_size: int) -> int:
    """Trainable parameters that receive a gradient from one forward/backward (batch 2, train mode).

    Counting `requires_grad` alone would also count modules that are built but never called."""
    was_training = model.training
    model.train()
    for p in model.parameters():
        p.grad = None
    model(torch.randn(2, 3, input_size, input_size, device=_device(model))).square().sum().backward()
    used = sum(p.numel() for p in model.parameters() if p.requires_grad and p.grad is not None)
    for p in model.parameters():
        p.grad = None
    model.train(was_training)
    return used


def count_flops(model: nn.Module, input_size: int) -> int:
    """FLOPs of one 1-image forward in eval mode; torch's counter counts a multiply-add as 2 FLOPs."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, input_size, input_size, device=_device(model)))
    return counter.get_total_flops()


def _device(model: nn.Module) -> torch.device:
    """Where the model's first parameter lives (the CPU for a model without any): the counts' input goes there."""
    return next(model.parameters(), torch.empty(0)).device


_COSTS: dict = {}  # (constructor, arch, kwargs) -> (parameters in use, GFLOPs): a pure function of the three
# From this many parameters (IResNet-50 and deeper) a model is counted on the meta device: shapes alone, no random
# initialisation and no arithmetic (an IResNet-100 at 112 px: 1 s instead of 3 s of CPU); a smaller one is counted
# faster on the CPU (the meta device's kernels are Python: a 16-px VarGFaceNet takes 0.3 s there, 0.04 s on the CPU)
META_FROM = 20_000_000


def model_cost(arch: str, kwargs: dict) -> tuple:
    """(parameters in use, GFLOPs) of one architecture, computed once per process and architecture (the stages of
    a run share their student's): on the meta device from META_FROM parameters (the same counts: both depend on
    shapes alone), else, or when the meta device cannot build or run the model (a value read from a tensor), on
    the CPU.

    Counting builds a fresh model and runs it on random input: it uses none of the caller's random state."""
    entry, _ = resolve(arch)
    key = (id(entry.fn), arch, json.dumps(kwargs, sort_keys=True, default=repr))
    if key not in _COSTS:
        size = kwargs.get("input_size", 112)
        try:
            with torch.device("meta"):
                model = create_model(arch, **kwargs)
            if sum(p.numel() for p in model.parameters()) >= META_FROM:
                _COSTS[key] = params_in_use(model, size), count_flops(model, size) / 1e9
        except (RuntimeError, NotImplementedError, ValueError, TypeError):  # as registry.create_model_to_load
            pass
        if key not in _COSTS:
            with torch.random.fork_rng(devices=[]):
                model = create_model(arch, **kwargs)
                _COSTS[key] = params_in_use(model, size), count_flops(model, size) / 1e9
    return _COSTS[key]


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
