"""docs/results.md (and a PNG) from the recursive-distillation study's run directories.

    python experiments/studies/results.py runs/recursive_kd --out docs/results.md

Reads every point of the sweep (distill.run.compare.load_runs: result.json / summary.json of each stage), groups
the points by case (`<grid>-<case>-seed=<s>`), and reports per case and stage the mean ± std over seeds of the
verification accuracy and TAR@FAR=1e-3 of the first verification set, against the equal-budget scratch
controls (`scratch-e<epochs>`). The conclusions are computed from the numbers: a difference is called beyond
seed noise when it exceeds twice its standard error (sqrt(sd_a²/n_a + sd_b²/n_b)), and within noise otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from distill.eval.far import VERIFICATION_FARS, far_key  # noqa: E402
from distill.run.compare import load_runs  # noqa: E402

POINT = re.compile(r"^(?P<grid>[^-]+)-(?P<case>.+)-seed=(?P<seed>\d+)$")
PAPER = [  # LFW / CFP-FP / AgeDB-30 (%), the VarGFaceNet authors' figures (ms1m-retinaface-t1, 112 px; README)
    ("ResNet-100 teacher", "99.75 / 98.53 / 98.17"),
    ("VarGFaceNet from scratch", "99.68 / 98.09 / 98.10"),
    ("generation 1", "99.78 / 98.40 / 98.07"),
    ("generation 2", "99.83 / 98.27 / 98.05"),
]


def _stats(values: list) -> tuple:
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd, len(values)


def collect(sweep_dir: str) -> tuple[dict, str, list]:
    """({(case, stage): {"acc": [..], "tar": [..], "seeds": [..]}}, verification set name, seeds)."""
    table, seeds, set_name = defaultdict(lambda: {"acc": [], "tar": [], "seeds": []}), set(), None
    for run in load_runs([sweep_dir]):
        m = POINT.match(run["experiment"])
        if not m:
            continue
        seeds.add(int(m["seed"]))
        for stage in run["stages"]:
            if stage["status"] != "done" or not stage["metrics"]:
                continue
            set_name = set_name or next(iter(stage["metrics"]))
            metric = stage["metrics"][set_name]
            tar = (metric.get("tar_at_far") or {}).get(far_key(VERIFICATION_FARS[0])) or {}
            cell = table[(m["case"], stage["stage"])]
            cell["acc"].append(100 * metric["acc_mean"])
            cell["tar"].append(None if tar.get("tar") is None else 100 * tar["tar"])
            cell["seeds"].append(int(m["seed"]))
    return dict(table), set_name or "val", sorted(seeds)


def missing(table: dict, seeds: list, grid: str | None = None) -> list:
    """What the study lacks: (case, stage) cells without every seed (an unfinished or failed point), and with
    `grid` (the study's grid file) every point it plans that has not finished. The report refuses to average
    what is there instead."""
    gaps = [f"{case} / {stage}: seed{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))}"
            for (case, stage), cell in sorted(table.items())
            if (lost := sorted(set(seeds) - set(cell["seeds"])))]
    if grid:
        from distill.run.sweep import expand, load_grid

        cases_seen = {case for case, _ in table}
        for point in expand(load_grid(grid)):
            m = POINT.match(point.name)
            if m and m["case"] not in cases_seen:
                gaps.append(f"{m['case']}: no finished stage (point {point.name})")
    return gaps


def _fmt(values: list) -> str:
    mean, sd, n = _stats(values)
    return "-" if mean is None else f"{mean:.2f} ± {sd:.2f}"


def _compare(a: list, b: list) -> tuple:
    """(difference of means a - b, its standard error, verdict)."""
    (ma, sa, na), (mb, sb, nb) = _stats(a), _stats(b)
    if ma is None or mb is None:
        return None, None, "not measured"
    se = math.sqrt(sa ** 2 / max(na, 1) + sb ** 2 / max(nb, 1))
    diff = ma - mb
    if na < 2 or nb < 2:
        return diff, se, "one seed only: no spread"
    return diff, se, ("beyond seed noise" if abs(diff) > 2 * se else "within seed noise")


def arms(table: dict) -> tuple[list, list, dict]:
    """(teachers, losses, epochs per scratch case), from the case names."""
    teachers, losses = [], []
    scratch = {}
    for case, _ in table:
        if re.fullmatch(r"scratch-e\d+", case):
            scratch[case] = int(case[len("scratch-e"):])
        elif case.startswith("scratch-"):
            continue  # another control (e.g. scratch-e2-pk4): its own rows
        elif "-" in case:
            teacher, loss = case.split("-", 1)
            teachers += [teacher] if teacher not in teachers else []
            losses += [loss] if loss not in losses else []
    return teachers, losses, scratch


def render(table: dict, set_name: str, seeds: list, command: str, plot: str | None) -> str:
    teachers, losses, scratch = arms(table)
    gens = sorted({int(s[3:]) for _, s in table if s.startswith("gen")})
    epochs = sorted(scratch.values())
    per_stage = epochs[0] if epochs else None
    lines = [
        "# Recursive distillation on synthetic faces: what the study measured",
        "",
        f"Regenerate: `{command}` (the whole study, ~55 min on 2 CPU cores) or, from existing runs, "
        "`python experiments/studies/results.py runs/recursive_kd --out docs/results.md`.",
        "",
        f"Setting (experiments/studies/recursive_kd.yaml): synthetic faces, 300 training identities x 16 images at "
        f"32x32; verification on `{set_name}` (2,400 pairs of 150 unseen people, insightface's 10-fold protocol). "
        f"Student: VarGFaceNet (0.49M parameters) trained {per_stage} epochs per stage; generation k starts from "
        f"generation k-1 and has had k x {per_stage} epochs in total. Seeds: {', '.join(map(str, seeds))} "
        f"(mean ± sample std over seeds; n = {len(seeds)}). Teachers are frozen and the same for every seed.",
        "",
        "## Accuracy (%) and TAR@FAR=1e-3 (%) per stage",
        "",
        "| arm | stage | total epochs | accuracy (%) | TAR@1e-3 (%) | seeds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for case, ep in sorted(scratch.items(), key=lambda kv: kv[1]):
        cell = table.get((case, "baseline"))
        if cell:
            lines.append(f"| scratch (no teacher) | baseline | {ep} | {_fmt(cell['acc'])} | {_fmt(cell['tar'])} | "
                         f"{len(cell['acc'])} |")
    variants = sorted({case for case, _ in table if case.startswith("scratch-") and case not in scratch})
    for case in variants:
        cell = table.get((case, "baseline"))
        m = re.fullmatch(r"scratch-e(\d+)-pk(\d+)", case)
        if cell and m:
            lines.append(f"| scratch, P x K batches ({m[2]} images per identity) | baseline | {m[1]} | {_fmt(cell['acc'])} | "
                         f"{_fmt(cell['tar'])} | {len(cell['acc'])} |")
    for teacher in teachers:
        first = next((table[(f"{teacher}-{loss}", "teacher")] for loss in losses
                      if (f"{teacher}-{loss}", "teacher") in table), None)
        if first:
            lines.append(f"| {teacher} teacher | teacher | - | {_fmt(first['acc'][:1])} | {_fmt(first['tar'][:1])} | - |")
        for loss in losses:
            for g in gens:
                cell = table.get((f"{teacher}-{loss}", f"gen{g}"))
                if cell:
                    lines.append(f"| {teacher} / {loss} | gen{g} | {g * per_stage} | {_fmt(cell['acc'])} | "
                                 f"{_fmt(cell['tar'])} | {len(cell['acc'])} |")
    if plot:
        lines += ["", f"![accuracy per generation]({os.path.basename(plot)})"]

    lines += ["", "## What it says", ""]
    control = {ep: table.get((case, "baseline"), {}).get("acc", []) for case, ep in scratch.items()}
    for teacher in teachers:
        beats, ties, loses = [], [], []
        for loss in losses:
            for g in gens:
                cell = table.get((f"{teacher}-{loss}", f"gen{g}"))
                if not cell or g * per_stage not in control:
                    continue
                diff, se, verdict = _compare(cell["acc"], control[g * per_stage])
                item = f"{loss} gen{g} {diff:+.2f} (±{se:.2f})"
                (beats if verdict == "beyond seed noise" and diff > 0 else
                 loses if verdict == "beyond seed noise" else ties).append(item)
        lines.append(f"- **{teacher} teacher against scratch at equal budget** (accuracy points, ± standard error): "
                     f"better beyond seed noise: {', '.join(beats) or 'none'}; within noise: {', '.join(ties) or 'none'}; "
                     f"worse beyond noise: {', '.join(loses) or 'none'}.")
    for teacher in teachers:
        steps = []
        for loss in losses:
            for g in gens[1:]:
                a, b = table.get((f"{teacher}-{loss}", f"gen{g}")), table.get((f"{teacher}-{loss}", f"gen{g - 1}"))
                if a and b:
                    diff, se, verdict = _compare(a["acc"], b["acc"])
                    steps.append(f"{loss} gen{g} vs gen{g - 1}: {diff:+.2f} (±{se:.2f}, {verdict})")
        lines.append(f"- **Does a later generation beat the one before ({teacher})?** " + "; ".join(steps) + ". "
                     "Each later generation has also trained longer: compare it with the matching scratch control "
                     "above before crediting the recursion.")
        trends = []
        for loss in losses:
            gaps = [(g, _stats(table[(f"{teacher}-{loss}", f"gen{g}")]["acc"])[0] - _stats(control[g * per_stage])[0])
                    for g in gens if (f"{teacher}-{loss}", f"gen{g}") in table and control.get(g * per_stage)]
            if len(gaps) >= 2:
                shape = ("grows" if all(b[1] > a[1] for a, b in zip(gaps, gaps[1:])) else
                         "shrinks" if all(b[1] < a[1] for a, b in zip(gaps, gaps[1:])) else "does not move one way")
                trends.append(f"{loss}: " + ", ".join(f"gen{g} {gap:+.2f}" for g, gap in gaps) + f" ({shape})")
        if trends:
            lines.append(f"- **Is recursion worth more than training longer ({teacher})?** The advantage of generation k "
                         f"over scratch trained as long (k x {per_stage} epochs): " + "; ".join(trends) + ". Where it "
                         "shrinks, each later generation gains less than the same extra epochs give a student trained "
                         "without a teacher: the benefit is the first distillation's, not the recursion's. These "
                         "gaps carry the scratch controls' seed noise (their standard errors: "
                         + ", ".join(f"{ep} epochs ±{_stats(v)[1] / math.sqrt(max(_stats(v)[2], 1)):.2f}"
                                     for ep, v in sorted(control.items()) if v) + ").")
    for case in variants:
        m = re.fullmatch(r"scratch-e(\d+)-pk(\d+)", case)
        if m and f"scratch-e{m[1]}" in scratch and (case, "baseline") in table:
            diff, se, verdict = _compare(table[(case, "baseline")]["acc"], table[(f"scratch-e{m[1]}", "baseline")]["acc"])
            lines.append(f"- **What P x K batches alone do** ({m[2]} images per identity, no teacher, {m[1]} epochs): "
                         f"{diff:+.2f} (±{se:.2f}) accuracy points against shuffled batches, {verdict}. ekd needs these "
                         f"batches, so its rows mix the two effects; against this control instead: "
                         + "; ".join(f"{teacher} ekd gen1 {d:+.2f} (±{e:.2f}, {v})" for teacher in teachers
                                     for d, e, v in [_compare(table.get((f"{teacher}-ekd", "gen1"), {}).get("acc", []),
                                                              table[(case, "baseline")]["acc"])] if d is not None)
                         + ".")
    for teacher in teachers:
        ranked = sorted(((_stats(table[(f"{teacher}-{loss}", "gen1")]["acc"])[0], loss) for loss in losses
                         if (f"{teacher}-{loss}", "gen1") in table), reverse=True)
        if len(ranked) >= 2:
            best, second = ranked[0][1], ranked[1][1]
            diff, se, verdict = _compare(table[(f"{teacher}-{best}", "gen1")]["acc"],
                                         table[(f"{teacher}-{second}", "gen1")]["acc"])
            lines.append(f"- **Which loss wins at generation 1 ({teacher})?** {best} ({ranked[0][0]:.2f}), then {second} "
                         f"({ranked[1][0]:.2f}): the gap {diff:+.2f} (±{se:.2f}) is {verdict}. Order: "
                         + ", ".join(f"{loss} {acc:.2f}" for acc, loss in ranked) + ".")
    lines += [
        "",
        "These are 32x32 synthetic faces, a 0.49M-parameter student and minutes of training: they show whether the "
        "toolkit's mechanisms produce the effects and how large seed noise is at this scale, not what happens on "
        "MS1M at 112x112. The paper's own figures, at a different scale (ms1m-retinaface-t1, 112 px, IResNet-100 "
        "teacher, LFW / CFP-FP / AgeDB-30 accuracy %), for comparison of direction only:",
        "",
        "| paper (VarGFaceNet, arXiv 1910.04985) | LFW / CFP-FP / AgeDB-30 (%) |",
        "| --- | --- |",
    ] + [f"| {name} | {numbers} |" for name, numbers in PAPER]
    return "\n".join(lines) + "\n"


def draw(table: dict, path: str) -> None:
    from matplotlib.figure import Figure

    teachers, losses, scratch = arms(table)
    gens = sorted({int(s[3:]) for _, s in table if s.startswith("gen")})
    per_stage = min(scratch.values()) if scratch else 1
    fig = Figure(figsize=(6 * max(len(teachers), 1), 4.5), dpi=100, layout="constrained")
    axes = fig.subplots(1, max(len(teachers), 1), squeeze=False)[0]
    for ax, teacher in zip(axes, teachers or [""]):
        xs = sorted(scratch.values())
        ys = [_stats(table.get((f"scratch-e{e}", "baseline"), {"acc": []})["acc"]) for e in xs]
        ax.errorbar(xs, [m for m, _, _ in ys], yerr=[s for _, s, _ in ys], color="black", linestyle="--", marker="s",
                    capsize=3, label="scratch (equal budget)")
        for loss in losses:
            pts = [(g * per_stage, _stats(table[(f"{teacher}-{loss}", f"gen{g}")]["acc"])) for g in gens
                   if (f"{teacher}-{loss}", f"gen{g}") in table]
            if pts:
                ax.errorbar([x for x, _ in pts], [s[0] for _, s in pts], yerr=[s[1] for _, s in pts], marker="o",
                            capsize=3, label=loss)
        ax.set(title=f"{teacher} teacher", xlabel="total epochs (generation k = k x E)", ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, format="png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", help="the study's sweep output (runs/recursive_kd)")
    p.add_argument("--out", default="docs/results.md", help="the report (default docs/results.md)")
    p.add_argument("--command", default="experiments/studies/run_recursive_kd.sh",
                   help="the command the report names as the one that rebuilds it")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--grid", help="the study's grid file: every point it plans must have finished")
    args = p.parse_args(argv)
    table, set_name, seeds = collect(args.sweep_dir)
    if not table:
        print(f"{args.sweep_dir}: no finished points of the study", file=sys.stderr)
        return 2
    gaps = missing(table, seeds, args.grid)
    if gaps:
        shown = "; ".join(gaps[:6]) + (f"; and {len(gaps) - 6} more" if len(gaps) > 6 else "")
        print(f"{args.sweep_dir}: the study is incomplete ({shown}); rerun the study's command (finished points are "
              f"skipped) rather than report means over what is there", file=sys.stderr)
        return 2
    plot = None if args.no_plot else os.path.splitext(args.out)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if plot:
        draw(table, plot)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(render(table, set_name, seeds, args.command, plot))
    print(f"wrote {args.out}" + (f" and {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
