"""Every finished stage of run directories exported to ONNX (and INT8) and evaluated (behind
`distill compare --export DIR`): one folder per run under DIR, <stage>.onnx files, an export_summary.json each,
and a table of sizes and accuracies (torch, FP32 file, INT8 file)."""

from __future__ import annotations

import json
import os

from distill.run.compare import load_run_config
from distill.utils.atomic import ensure_writable
from distill.utils.errors import ConfigError
from distill.utils.layout import TEACHER, RunLayout
from teachers.prepare import CHECKPOINT, ONNX, teacher_source

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
    exported again (teachers/prepare.py decides which teacher it is)."""
    stage = RunLayout(run_dir).stage(name)
    if os.path.isfile(stage.student):
        return stage.student, None, None, None
    if name == TEACHER and cfg.teacher is not None:
        try:
            source = teacher_source(cfg)
        except ConfigError as err:
            return None, None, None, f"not exported ({err})"
        if source.kind == ONNX:
            return None, None, None, f"not exported (ONNX teacher: {source.file} is already an ONNX file)"
        if source.kind == CHECKPOINT:
            return source.file, cfg.teacher.arch, dict(cfg.teacher.model), None
    return None, None, None, f"not exported (no {os.path.basename(stage.student)} in {stage.dir})"


def _as_student(checkpoint: str, arch: str, kwargs: dict, path: str) -> str:
    """A teacher checkpoint (plain state dict) written as a student.pt at `path`, so export_model rebuilds it
    with every argument of the config (embedding_size too), not only its input size."""
    from distill.models.files import save_student
    from distill.models.registry import create_model
    from distill.utils.checkpoint import extract_state_dict, load_state_dict_strict, safe_torch_load

    model = create_model(arch, **kwargs)
    load_state_dict_strict(model, extract_state_dict(safe_torch_load(checkpoint), checkpoint), source=checkpoint)
    save_student(path, model, arch, kwargs)
    return path


def _export_owner(folder: str):
    """The run directory whose export a folder holds (its export_summary.json), or None."""
    try:
        with open(os.path.join(folder, EXPORT_SUMMARY), encoding="utf-8") as f:
            return json.load(f).get("run_dir")
    except (OSError, ValueError, AttributeError):
        return None


def _free_name(out_dir: str, name: str, run_dir: str, taken: set) -> str:
    """`name`, or `name-2`, `name-3`, ... when out_dir/name holds the export of another run (an earlier
    `compare --export` of a run with the same experiment name): never overwritten, written beside it, one note."""
    base, i = name, 1
    while name in taken or (_export_owner(os.path.join(out_dir, name)) not in (None, os.fspath(run_dir))):
        i += 1
        name = f"{base}-{i}"
    if name != base and base not in taken:
        import warnings

        from distill.utils.errors import UserNote
        warnings.warn(f"{os.path.join(out_dir, base)} holds the export of "
                      f"{_export_owner(os.path.join(out_dir, base))}; "
                      f"{run_dir} is exported beside it, to {os.path.join(out_dir, name)}", UserNote, stacklevel=3)
    return name


def _mean_acc(rows: dict, label: str):
    values = [r[label]["acc_mean"] for r in rows.values() if label in r and r[label].get("acc_mean") is not None]
    return sum(values) / len(values) if values else None


def plan_export(runs: list, out_dir: str, int8: bool = False, calibrate=None, calib_images: int | None = None) -> list:
    """Check everything `export_runs` needs before any work: the calibration set (--calibrate, else each run's
    data.train), --calib-images, the val sets (read whole; missing ones are skipped with a note), a writable `out_dir`.
    Returns one plan per run: {"run", "name", "dir", "cfg", "calibrate", "bins", "missing_bins"}."""
    from distill.deploy.quantize import check_calibration

    check_calibration(int8, calibrate, calib_images, what="files")
    plans, taken = [], set()
    for run, name in zip(runs, export_names(runs), strict=True):
        name = _free_name(out_dir, name, run["run_dir"], taken)
        taken.add(name)
        cfg = load_run_config(run["run_dir"])
        calib = calibrate
        if int8 and calib is None:
            calib = cfg.data.train
            if not calib or not os.path.exists(calib):
                raise ConfigError(f"--int8: {run['run_dir']} was trained on data.train {calib or '(not set)'}, which "
                                  f"does not exist here, so it cannot calibrate the INT8 files; pass --calibrate DATA "
                                  f"(a training set: a RecordIO folder or .rec file, or an image-folder tree)")
        bins = [b for b in cfg.data.val if os.path.isfile(b)]
        for path in bins:  # a damaged set is found now, not after the first stage's files are written
            _check_bin(path, run["run_dir"])
        plans.append({"run": run, "name": name, "dir": os.path.join(out_dir, name), "cfg": cfg, "calibrate": calib,
                      "bins": bins, "missing_bins": [b for b in cfg.data.val if b not in bins]})
    ensure_writable(out_dir, "the exported models")  # before any export's work
    for plan in plans:
        ensure_writable(plan["dir"], "the exported models")
    return plans


def _check_bin(path: str, run_dir: str) -> None:
    """A val set of a run, read whole (its structure: read_verification_pickle, nothing decoded) before any export."""
    from distill.data.verification import read_verification_pickle
    from distill.utils.errors import DataFormatError

    try:
        read_verification_pickle(path)
    except DataFormatError as err:
        raise DataFormatError(f"{run_dir}: data.val {err}; nothing was exported (or move the file away: a missing "
                              f"set is skipped with a note)") from None


def export_run(plan: dict, int8: bool = False, calib_images: int | None = None, opset: int = 17,
               int8_margin: float | None = None, int8_calibration: str | None = None, log=None) -> dict:
    """Export every finished stage of one run into plan["dir"] (<stage>.onnx, with `int8` <stage>.int8.onnx
    too: distill.deploy.export.export_model, BatchNorm folded and parity-checked), evaluate torch and each file on the
    run's val sets (check_exports) and write export_summary.json there. Returns that summary."""
    from distill.deploy.export import export_model, judge_checks
    from distill.eval.verification import set_name_of
    from distill.utils.atomic import atomic_write_json
    from distill.utils.errors import DistillError

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
    FP32 file and (with --int8) the INT8 file, and INT8 − torch in points (negative: INT8 loses; the README's
    sign; export_summary.json's int8_loss_points is torch − INT8)."""
    int8 = any(s["int8"] for s in summaries)
    head = ["run", "stage", "file", "size (MB)", "torch acc (%)", "fp32 acc (%)"]
    if int8:
        head += ["int8 file", "int8 size (MB)", "int8 acc (%)", "int8 − torch (points)"]
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
                          "-" if loss is None else f"{-loss:+.2f}"]  # the README's sign: negative = INT8 loses
            cells.append(st["status"].replace("|", "/").splitlines()[0] if st["status"] else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
