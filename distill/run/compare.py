"""Run directories side by side (behind `distill compare`), from their local files alone.

For each run directory (what `distill run` wrote; a `distill sweep` output directory stands for all its
points) every stage directory is read:
a finished stage from summary.json (or its result.json when the summary predates it), an unfinished
one from the last evaluation in its metrics.jsonl. Output: a markdown table (one row per run and
stage: accuracy ± std per verification set, TAR@FAR 1e-3 and 1e-4 (distill.eval.far.VERIFICATION_FARS),
IJB TAR@FAR 1e-4 and 1e-5 when evaluated, parameters, GFLOPs, training time), or one JSON object, and
optionally a PNG: accuracy per stage for every verification set, and the training loss curves. No W&B
involved. IJB FAR keys in eval_ijbc.py's spelling ('0.0001', '1e-05') are read as far_key's ('1e-4', '1e-5').
"""

from __future__ import annotations

import os

from distill.config.schema import load_saved_config
from distill.eval.far import VERIFICATION_FARS, normalise_far_key, normalise_results
from distill.losses.terms import describe_terms, stage_terms
from distill.run.plan import plan_stages
from distill.run.summary import _stage_entry, cost_function, markdown_table, teacher_model
from distill.train.tracking import read_metrics
from distill.utils.atomic import atomic_open, ensure_writable
from distill.utils.errors import ConfigError
from distill.utils.layout import TEACHER, RunLayout, is_run_dir, read_json, stage_order


def load_run_config(run_dir: str):
    run = RunLayout(run_dir)
    if not os.path.isdir(run_dir):
        raise ConfigError(f"{run_dir}: no such run directory (give what `distill run --out` or `distill sweep` wrote)")
    if not run.is_run_dir():
        raise ConfigError(f"{run_dir}: not a run directory of `distill run` (no "
                          f"{os.path.basename(run.experiment)} in it)")
    return load_saved_config(run.experiment)


def _partial_entry(name: str, rows: list, spec, cost, cfg) -> dict:
    """A stage still training or interrupted: its last evaluation from metrics.jsonl, its cost from the config."""
    metrics = {}
    for row in rows:  # later evaluations overwrite earlier ones
        for key, value in row.items():
            parts = key.split("/")
            if len(parts) != 3 or parts[0] != "val":
                continue
            m = metrics.setdefault(parts[1], {"acc_mean": None, "acc_std": None, "xnorm": None, "tar_at_far": {}})
            if parts[2] == "acc":
                m["acc_mean"] = value
            elif parts[2] in ("acc_std", "xnorm"):
                m[parts[2]] = value
            elif parts[2].startswith("tar_at_far_"):
                m["tar_at_far"][normalise_far_key(parts[2][len("tar_at_far_"):])] = {"tar": value}
    if spec is not None:
        result = {"stage": name, "arch": spec.arch, "model_kwargs": spec.model_kwargs}
    else:
        result = {"stage": name, "arch": teacher_model(cfg)[0] if cfg.teacher else None}  # from the config
    try:
        params, gflops = cost(result)
    except Exception:  # noqa: BLE001 - a cost we cannot compute is shown as '-', never a crash
        params, gflops = None, None
    steps = [r["step"] for r in rows if "step" in r]
    return {"stage": name, "arch": result.get("arch"), "generation": spec.generation if spec else 0,
            "init_from": spec.init_from if spec else None,
            "params": params, "gflops": gflops, "train_seconds": None, "metrics": metrics,
            "distill": describe_terms(stage_terms(cfg.distill, spec.alpha)) if spec is not None else None,
            **({"teacher_stage": spec.record["teacher_stage"]} if spec is not None and spec.record.get("teacher_stage")
               else {}),
            "status": f"unfinished (step {max(steps)})" if steps else "not started"}


def load_run(run_dir: str) -> dict:
    """{"run_dir", "experiment", "stages": [summary.json-style entries with "status"], "curves"}."""
    cfg = load_run_config(run_dir)
    run = RunLayout(run_dir)
    cost = cost_function(cfg)
    summarised = {}
    if os.path.exists(run.summary_json):
        # FAR keys in eval_ijbc.py's spelling ('0.0001') are read as far_key's ('1e-4')
        summarised = {s["stage"]: s for s in normalise_results(read_json(run.summary_json).get("stages", []))}
    specs = {s.name: s for s in plan_stages(cfg, run_dir)}
    planned = set(specs) | ({TEACHER} if cfg.teacher is not None else set())  # not started yet: shown as such
    stages, curves = [], {}
    for name in sorted(set(run.stage_names()) | set(summarised) | planned, key=stage_order):
        stage = run.stage(name)
        rows = read_metrics(stage.dir)
        curves[name] = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
        if name in summarised and (stage.is_done() or not os.path.isdir(stage.dir)):
            entry = {**summarised[name], "status": "done"}  # (a stage being redone is read from its log)
        elif stage.is_done():
            result = stage.read_result()
            try:
                entry = {**_stage_entry(result, cost), "status": "done"}
            except Exception:  # noqa: BLE001 - a cost we cannot compute is shown as '-', never a crash
                entry = {**_stage_entry(result, lambda _r: (None, None)), "status": "done"}
        else:
            entry = _partial_entry(name, rows, specs.get(name), cost, cfg)
        stages.append(entry)
    return {"run_dir": run_dir, "experiment": cfg.name, "stages": stages, "curves": curves}


def expand_run_dirs(paths: list) -> list:
    """Run directories; a sweep's --out directory (no experiment.yaml, run directories inside) gives its points."""
    out = []
    for path in paths:
        inner = []
        if os.path.isdir(path) and not is_run_dir(path):
            inner = sorted(os.path.join(path, d) for d in os.listdir(path) if is_run_dir(os.path.join(path, d)))
        out += inner or [path]
    return out


def load_runs(run_dirs: list) -> list:
    runs = [load_run(d) for d in expand_run_dirs(run_dirs)]
    names = [r["experiment"] for r in runs]
    for r in runs:  # label rows by experiment name, by directory when two runs share a name
        r["label"] = r["experiment"] if names.count(r["experiment"]) == 1 else r["run_dir"]
    return runs


def comparison_table(runs: list) -> str:
    """One markdown table: a row per run and stage."""
    rows = [{**s, "run": r["label"], "run_dir": r["run_dir"]} for r in runs for s in r["stages"]]
    after = (("status", lambda s: s["status"]),) if any(s["status"] != "done" for s in rows) else ()
    return markdown_table({"stages": rows}, fars=VERIFICATION_FARS, before=(("run", lambda s: s["run"]),),
                          after=after)


def comparison_json(runs: list) -> dict:
    return {"runs": [{"run": r["label"], "run_dir": r["run_dir"], "experiment": r["experiment"],
                      "stages": r["stages"]} for r in runs]}


def plot_comparison(runs: list, path: str) -> None:
    """PNG: accuracy (± std) per stage for every run and verification set; train/loss against step per stage."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, works headless (Agg)

    order = sorted({s["stage"] for r in runs for s in r["stages"]}, key=stage_order)
    fig = Figure(figsize=(13, 5), dpi=100, layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    for r in runs:
        sets = list(dict.fromkeys(k for s in r["stages"] for k in s["metrics"]))
        for name in sets:
            points = [(order.index(s["stage"]), 100 * m["acc_mean"], 100 * (m["acc_std"] or 0))
                      for s in r["stages"] for m in [s["metrics"].get(name) or {}] if m.get("acc_mean") is not None]
            if points:
                x, y, err = zip(*points, strict=False)
                acc_ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{r['label']}: {name}")
        for stage in sorted(r["curves"], key=stage_order):
            curve = r["curves"][stage]
            if curve:
                steps, loss = zip(*curve, strict=False)
                loss_ax.plot(steps, loss, label=f"{r['label']}/{stage}")
    acc_ax.set_xticks(range(len(order)), order)
    acc_ax.set(title="verification accuracy per stage", xlabel="stage", ylabel="accuracy (%)")
    loss_ax.set(title="training loss", xlabel="step", ylabel="train/loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    ensure_writable(os.path.dirname(os.path.abspath(path)), "the plot")
    with atomic_open(path, "wb", what="the plot") as f:
        fig.savefig(f, format="png")


def unfinished_runs(runs: list) -> list:
    """Run directories in which no stage has finished (their rows come from logs or are not started)."""
    return [r["run_dir"] for r in runs if not any(s["status"] == "done" for s in r["stages"])]
