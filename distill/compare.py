"""Run directories side by side (behind `distill compare`), from their local files alone.

For each run directory (what `distill run` wrote; a `distill sweep` output directory stands for all its
points) every stage directory is read:
a finished stage from summary.json (or its result.json when the summary predates it), an unfinished
one from the last evaluation in its metrics.jsonl. Output: a markdown table (one row per run and
stage: accuracy ± std per verification set, TAR@FAR 1e-3 and 1e-4, parameters, GFLOPs, training
time), or one JSON object, and optionally a PNG: accuracy per stage for every verification set, and
the training loss curves. No W&B involved.
"""

from __future__ import annotations

import os

from distill.config import load_saved_config
from distill.errors import ConfigError
from distill.atomic import atomic_open, ensure_writable
from distill.layout import TEACHER, RunLayout, is_run_dir, read_json, stage_order
from distill.recursive import plan_stages
from distill.evaluate import FAR_TARGETS
from distill.summary import _stage_entry, cost_function, markdown_table, teacher_model
from distill.tracking import read_metrics


def _load_config(run_dir: str):
    run = RunLayout(run_dir)
    if not os.path.isdir(run_dir):
        raise ConfigError(f"{run_dir}: no such run directory (give what `distill run --out` or `distill sweep` wrote)")
    if not run.is_run_dir():
        raise ConfigError(f"{run_dir}: not a run directory of `distill run` (no {os.path.basename(run.experiment)} in it)")
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
                m["tar_at_far"][parts[2][len("tar_at_far_"):]] = {"tar": value}
    if spec is not None:
        result = {"stage": name, "arch": spec.arch, "model_kwargs": spec.model_kwargs}
    else:
        result = {"stage": name, "arch": teacher_model(cfg)[0] if cfg.teacher else None}  # from the config
    try:
        params, gflops = cost(result)
    except Exception:  # noqa: BLE001 - a cost we cannot compute is shown as '-', never a crash
        params, gflops = None, None
    steps = [r["step"] for r in rows if "step" in r]
    return {"stage": name, "arch": result.get("arch"), "generation": spec.generation if spec else 0, "init_from": spec.init_from if spec else None,
            "params": params, "gflops": gflops, "train_seconds": None, "metrics": metrics,
            "status": f"unfinished (step {max(steps)})" if steps else "not started"}


def load_run(run_dir: str) -> dict:
    """{"run_dir", "experiment", "stages": [summary.json-style entries with "status"], "curves"}."""
    cfg = _load_config(run_dir)
    run = RunLayout(run_dir)
    cost = cost_function(cfg)
    summarised = {}
    if os.path.exists(run.summary_json):
        summarised = {s["stage"]: s for s in read_json(run.summary_json).get("stages", [])}
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
            except Exception:  # noqa: BLE001
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
    rows = [{**s, "run": r["label"]} for r in runs for s in r["stages"]]
    after = (("status", lambda s: s["status"]),) if any(s["status"] != "done" for s in rows) else ()
    return markdown_table({"stages": rows}, fars=tuple(FAR_TARGETS), before=(("run", lambda s: s["run"]),),
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
                x, y, err = zip(*points)
                acc_ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{r['label']}: {name}")
        for stage in sorted(r["curves"], key=stage_order):
            curve = r["curves"][stage]
            if curve:
                steps, loss = zip(*curve)
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


# ----------------------------------------------------------------------------- export (`distill compare --export`)

EXPORTED = "exported"
UNFINISHED = "not exported (unfinished)"
EXPORT_SUMMARY = "export_summary.json"


def export_names(runs: list) -> list:
    """The folder under --export DIR of each run: its experiment name; the run directory's name when two runs
    share an experiment name (a sweep's points), numbered when even those collide."""
    names = [r["experiment"] for r in runs]
    out = []
    for r in runs:
        name = r["experiment"]
        if names.count(name) > 1:
            name = os.path.basename(os.path.normpath(r["run_dir"]))
        base, i = name, 1
        while name in out:
            i += 1
            name = f"{base}-{i}"
        out.append(name)
    return out


def _stage_source(run_dir: str, name: str, cfg) -> tuple:
    """(source, arch, model arguments, why_not): a stage's student.pt; a teacher loaded from a checkpoint (not
    trained here) exports from that checkpoint with the teacher's `arch` and arguments; an ONNX teacher is not
    exported again."""
    stage = RunLayout(run_dir).stage(name)
    if os.path.isfile(stage.student):
        return stage.student, None, None, None
    t = cfg.teacher
    if name == TEACHER and t is not None:
        if t.onnx is not None:
            return None, None, None, f"not exported (ONNX teacher: {t.onnx} is already an ONNX file)"
        if t.checkpoint and os.path.isfile(t.checkpoint):
            return t.checkpoint, t.arch, dict(t.model), None
    return None, None, None, f"not exported (no {os.path.basename(stage.student)} in {stage.dir})"


def _as_student(checkpoint: str, arch: str, kwargs: dict, path: str) -> str:
    """A teacher checkpoint (plain state dict) written as a student.pt at `path`, so export_model rebuilds it
    with every argument of the config (embedding_size too), not only its input size."""
    from distill.checkpoint import extract_state_dict, load_state_dict_strict, safe_torch_load
    from distill.models import save_student
    from distill.registry import create_model

    model = create_model(arch, **kwargs)
    load_state_dict_strict(model, extract_state_dict(safe_torch_load(checkpoint), checkpoint), source=checkpoint)
    save_student(path, model, arch, kwargs)
    return path


def _mean_acc(rows: dict, label: str):
    values = [r[label]["acc_mean"] for r in rows.values() if label in r and r[label].get("acc_mean") is not None]
    return sum(values) / len(values) if values else None


def plan_export(runs: list, out_dir: str, int8: bool = False, calibrate=None, calib_images: int | None = None) -> list:
    """Check everything `export_runs` needs before any work: the calibration set (--calibrate, else each run's
    data.train), --calib-images, the val sets (missing ones are skipped with a note), a writable `out_dir`.
    Returns one plan per run: {"run", "name", "dir", "cfg", "calibrate", "bins", "missing_bins"}."""
    from distill.quantize import check_calibration

    check_calibration(int8, calibrate, calib_images, what="files")
    plans = []
    for run, name in zip(runs, export_names(runs)):
        cfg = _load_config(run["run_dir"])
        calib = calibrate
        if int8 and calib is None:
            calib = cfg.data.train
            if not calib or not os.path.exists(calib):
                raise ConfigError(f"--int8: {run['run_dir']} was trained on data.train {calib or '(not set)'}, which "
                                  f"does not exist here, so it cannot calibrate the INT8 files; pass --calibrate DATA "
                                  f"(a training set: a RecordIO folder or .rec file, or an image-folder tree)")
        bins = [b for b in cfg.data.val if os.path.isfile(b)]
        plans.append({"run": run, "name": name, "dir": os.path.join(out_dir, name), "cfg": cfg, "calibrate": calib,
                      "bins": bins, "missing_bins": [b for b in cfg.data.val if b not in bins]})
    ensure_writable(out_dir, "the exported models")  # before any export's work
    for plan in plans:
        ensure_writable(plan["dir"], "the exported models")
    return plans


def export_run(plan: dict, int8: bool = False, calib_images: int | None = None, opset: int = 17,
               int8_margin: float | None = None, int8_calibration: str | None = None, log=None) -> dict:
    """Export every finished stage of one run into plan["dir"] (<stage>.onnx, with `int8` <stage>.int8.onnx
    too: distill.export.export_model, BatchNorm folded and parity-checked), evaluate torch and each file on the
    run's val sets (check_exports) and write export_summary.json there. Returns that summary."""
    from distill.atomic import atomic_write_json
    from distill.errors import DistillError
    from distill.evaluate import set_name_of
    from distill.export import export_model, judge_checks

    run, cfg = plan["run"], plan["cfg"]
    stages = []
    for entry in run["stages"]:
        name = entry["stage"]
        row = {"stage": name, "status": UNFINISHED, "files": {}, "torch": None}
        if entry["status"] == "done":
            source, arch, kwargs, why_not = _stage_source(run["run_dir"], name, cfg)
            if why_not:
                row["status"] = why_not
            else:
                if log:
                    log(f"exporting {plan['name']}/{name} ({source})")
                try:
                    source_name = os.path.basename(source)  # the file's metadata names it, not a temporary copy
                    if arch is not None:  # a plain state dict: as a student.pt, built with the config's arguments
                        source = _as_student(source, arch, kwargs, os.path.join(plan["dir"], f".{name}.pt"))
                    r = export_model(source, os.path.join(plan["dir"], f"{name}.onnx"), opset=opset, int8=int8,
                                     calibrate=plan["calibrate"] if int8 else None, calib_images=calib_images,
                                     check_bins=plan["bins"], int8_calibration=int8_calibration,
                                     source_name=source_name)
                    checks = r.get("check", {})
                    # raises when the FP32 file is not the model; a note for each set where INT8 loses much
                    judge_checks(checks, 0.5 if int8_margin is None else int8_margin)
                except DistillError as err:
                    row["status"] = f"failed: {err}"
                    stages.append(row)
                    continue
                finally:
                    if arch is not None and os.path.exists(source) and source.startswith(plan["dir"]):
                        os.remove(source)
                row["status"] = EXPORTED
                row["torch"] = {"acc_mean": _mean_acc(checks, "pytorch"),
                                "per_set": {s: c["pytorch"]["acc_mean"] for s, c in checks.items()}}
                for label, path in r["files"].items():
                    row["files"][label] = {
                        "path": os.path.relpath(path, plan["dir"]), "size_mb": os.path.getsize(path) / 1e6,
                        "acc_mean": _mean_acc(checks, label),
                        "per_set": {s: c[label]["acc_mean"] for s, c in checks.items()},
                        **({"calib_images": r["int8"]["calib_images"]} if label == "int8" else {})}
                q, t = row["files"].get("int8", {}).get("acc_mean"), row["torch"]["acc_mean"]
                row["int8_loss_points"] = None if q is None or t is None else 100.0 * (t - q)
        stages.append(row)
    summary = {"run": plan["name"], "run_dir": run["run_dir"], "experiment": run["experiment"],
               "int8": bool(int8), "calibrate": plan["calibrate"] if int8 else None,
               "val_sets": [set_name_of(b) for b in plan["bins"]], "missing_val": plan["missing_bins"],
               "stages": stages}
    atomic_write_json(os.path.join(plan["dir"], EXPORT_SUMMARY), summary)
    return summary


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def export_table(summaries: list) -> str:
    """Markdown: a row per run and stage: file, size (MB), mean accuracy (%) over the val sets of torch, the
    FP32 file and (with --int8) the INT8 file, and what INT8 loses against torch in points."""
    int8 = any(s["int8"] for s in summaries)
    head = ["run", "stage", "file", "size (MB)", "torch acc (%)", "fp32 acc (%)"]
    if int8:
        head += ["int8 file", "int8 size (MB)", "int8 acc (%)", "int8 loss (points)"]
    head.append("status")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for s in summaries:
        for st in s["stages"]:
            fp32, q = st["files"].get("fp32"), st["files"].get("int8")
            cells = [s["run"], st["stage"],
                     "-" if fp32 is None else os.path.join(s["run"], fp32["path"]),
                     "-" if fp32 is None else f"{fp32['size_mb']:.2f}",
                     _pct((st["torch"] or {}).get("acc_mean")), _pct((fp32 or {}).get("acc_mean"))]
            if int8:
                loss = st.get("int8_loss_points")
                cells += ["-" if q is None else os.path.join(s["run"], q["path"]),
                          "-" if q is None else f"{q['size_mb']:.2f}", _pct((q or {}).get("acc_mean")),
                          "-" if loss is None else f"{loss:.2f}"]
            cells.append(st["status"].replace("|", "/").splitlines()[0] if st["status"] else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
