"""The experiment summary: one row per stage (teacher, baseline, gen<k>) in summary.json and summary.md.

FARs are keyed as distill.eval.far.far_key writes them ('1e-3'; IJB '1e-4'); a result keyed in eval_ijbc.py's
spelling (IJB keys '0.0001', '1e-05') is read through distill.eval.far.normalise_results first."""

from __future__ import annotations

import os

from distill.eval.far import SUMMARY_IJB_FARS, VERIFICATION_FARS, far_key, normalise_results
from distill.models.cost import model_cost
from distill.utils.atomic import atomic_write_json, atomic_write_text
from distill.utils.layout import TEACHER, RunLayout

METRIC_KEYS = ("acc_mean", "acc_std", "xnorm", "tar_at_far")


def _stage_entry(result: dict, cost) -> dict:
    result = normalise_results(result)  # FAR keys in eval_ijbc.py's spelling ('0.0001') as far_key's
    params, gflops = cost(result)
    return {
        "stage": result["stage"], "arch": result.get("arch"), "generation": result.get("generation", 0),
        "init_from": result.get("init_from"), "params": params, "gflops": gflops,
        "train_seconds": result.get("train_seconds", 0.0), "distill": result.get("distill"),
        "metrics": {name: {k: m.get(k) for k in METRIC_KEYS} for name, m in (result.get("metrics") or {}).items()},
        **({"ijb": {k: result["ijb"][k] for k in ("target", "tar_at_far", "auc")}} if result.get("ijb") else {}),
        **({"teacher_stage": result["teacher_stage"]} if result.get("teacher_stage") else {}),  # born-again
    }


def _tar(m: dict, far: float) -> str:
    t = (m.get("tar_at_far") or {}).get(far_key(far)) or {}
    return "n/a" if t.get("tar") is None else f"{100 * t['tar']:.2f}"


def _acc(m: dict) -> str:
    if m.get("acc_mean") is None:
        return "-"
    return f"{100 * m['acc_mean']:.2f} ± {100 * (m.get('acc_std') or 0):.2f}"


def init_label(init_from: str | None, run_dir: str | None) -> str:
    """The "init from" cell: the checkpoint's path relative to the run directory when it lies inside it
    ('gen1/student.pt'), else its file name ('backbone.pth' of a loaded teacher); '-' for none."""
    if not init_from:
        return "-"
    if run_dir:
        path, root = os.path.abspath(init_from), os.path.abspath(run_dir)
        if os.path.commonpath([path, root]) == root:
            return os.path.relpath(path, root)
    return os.path.basename(init_from)


def markdown_table(summary: dict, fars: tuple = VERIFICATION_FARS[:1], before: tuple = (), after: tuple = (),
                   run_dir: str | None = None) -> str:
    """Stages as rows; per verification set: accuracy ± std (%), TAR@FAR (%) for each of `fars` (floats);
    per IJB target: TAR (%) at SUMMARY_IJB_FARS; then the stage's distillation terms (result.json's `distill`:
    'none' for a stage that does not distil, '-' for the teacher and for results that record no `distill`).

    `before` / `after`: extra columns as (header, function(stage entry) -> str), placed before the stage
    column and after the last one (`distill compare` adds the run and the stage's status). `run_dir`: the run
    the stages belong to, for the "init from" column (`init_label`); a stage entry's own "run_dir" wins (rows of
    several runs)."""
    sets = []
    for s in summary["stages"]:
        sets += [k for k in s["metrics"] if k not in sets]
    head = [h for h, _ in before] + ["stage", "arch", "init from", "params (M)", "GFLOPs", "train (s)"]
    for name in sets:
        head += [f"{name} acc (%)"] + [f"{name} TAR@{far_key(far)} (%)" for far in fars]
    targets = list(dict.fromkeys(s["ijb"]["target"] for s in summary["stages"] if s.get("ijb")))
    for target in targets:  # IJB-B/C template verification, when data.ijb evaluated the stages
        head += [f"{target} TAR@{far_key(far)} (%)" for far in SUMMARY_IJB_FARS]
    head += ["distillation"] + [h for h, _ in after]
    rows = [head, ["---"] * len(head)]
    for s in normalise_results(summary["stages"]):
        init = init_label(s.get("init_from"), s.get("run_dir", run_dir))
        row = [fn(s) for _, fn in before]
        row += [s["stage"], s.get("arch") or "-", init, "-" if s["params"] is None else f"{s['params'] / 1e6:.2f}",
                "-" if s["gflops"] is None else f"{s['gflops']:.3f}",
                "-" if s.get("train_seconds") is None else f"{s['train_seconds']:.0f}"]
        for name in sets:
            m = s["metrics"].get(name)
            if m is None:
                row += ["-"] * (1 + len(fars))
            else:
                row += [_acc(m)] + [_tar(m, far) for far in fars]
        for target in targets:
            ijb = s.get("ijb") if (s.get("ijb") or {}).get("target") == target else None
            row += [f"{100 * ijb['tar_at_far'][far_key(far)]:.2f}" if ijb else "-" for far in SUMMARY_IJB_FARS]
        taught = f" from {s['teacher_stage']}" if s.get("teacher_stage") else ""  # recursive.teacher: previous
        row += ["-" if s["stage"] == TEACHER else (s.get("distill") or "-") + taught] + [fn(s) for _, fn in after]
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def teacher_model(cfg) -> tuple:
    """(architecture label, registry name or None, its arguments) of the experiment's teacher; an ONNX
    teacher is labelled by its file and has no torch model to count."""
    t = cfg.teacher
    if t.arch is None:
        return os.path.basename(t.onnx), None, None
    return t.arch, t.arch, dict(t.model)


def cost_function(cfg):
    """`cost(result) -> (params, GFLOPs)` of a stage's model: what its result.json recorded, else computed
    (model_cost counts each architecture once per process); (None, None) when unknown."""

    def cost(result):
        if result.get("gflops") is not None:
            return result.get("params"), result["gflops"]
        if result["stage"] == TEACHER and "model_kwargs" not in result:  # loaded, not trained here
            if cfg.teacher is None or teacher_model(cfg)[1] is None:
                return None, None
            _, arch, kwargs = teacher_model(cfg)
        else:
            arch, kwargs = result["arch"], result["model_kwargs"]
        return model_cost(arch, kwargs)  # counted once per process and architecture

    return cost


def write_summary(cfg, run_dir: str, results: list) -> dict:
    """summary.json and summary.md of the stages' results; returns the summary."""
    cost = cost_function(cfg)
    summary = {"experiment": cfg.name, "stages": [_stage_entry(r, cost) for r in results]}
    run = RunLayout(run_dir)
    atomic_write_json(run.summary_json, summary)
    atomic_write_text(run.summary_md, f"# {cfg.name}\n\n{markdown_table(summary, run_dir=run_dir)}\n")
    return summary


def summary_text(cfg, run_dir: str, summary: dict) -> str:
    """What a run prints at its end: the experiment, its run directory and the summary table."""
    return f"\n{cfg.name} ({run_dir})\n{markdown_table(summary, run_dir=run_dir)}"
