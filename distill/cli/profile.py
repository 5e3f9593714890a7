"""`distill profile NAME`: parameters in use, GMACs/GFLOPs and CPU speed of a model (library: distill.models.cost)."""

from __future__ import annotations

import json

from distill.cli import thread_policy
from distill.utils.errors import ConfigError


def _profile(args) -> int:

    from distill.models.cost import profile_model
    from distill.models.files import model_input_size
    from distill.models.registry import create_model, list_models

    if args.list or not args.name:
        print("\n".join(list_models(aliases=True)))
        return 0
    thread_policy(args)
    if args.input_size is not None and args.input_size < 16:
        raise ConfigError(f"--input-size {args.input_size}: give a square image side of at least 16 pixels (e.g. 112)")
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
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for timing (default: the thread policy: the cores this process may use)")
    p.set_defaults(func=_profile)
