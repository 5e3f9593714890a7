"""docs/results.md and its plots from the study's run directories (experiments/studies/study.py writes them).

    python experiments/studies/report.py runs --out docs/results.md

The numbers come from study_numbers.py. Reads <runs>/curve, face_kd_table, recursive, long-x2, long-x3 and pk
(each a sweep's points, `<grid>-<case>-seed=<s>`), pk/recalibration.json and study/timing.json. Every number is
a mean ± sample standard deviation over seeds; a difference is called beyond seed noise when it exceeds twice its
standard error (sqrt(sd_a²/n_a + sd_b²/n_b)), within noise otherwise. A point that has not finished (a seed, a
stage or a whole arm the study files plan) stops the report with exit 2 rather than averaging what is there.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from study_numbers import (
    BEFORE,
    SWEEPS,
    before_pairs,
    best_row,
    budget,
    collect,
    compare,
    diff_text,
    fmt,
    missing,
    only_stage,
    pk_causes,
    planned_cases,
    read_json,
    read_timing,
    recal_difference,
    recal_values,
    stats,
    study_seconds,
)

EKD = {"scratch": 89.13, "fitnet": 87.76, "kd": 88.37, "rkd": 89.65, "shrinkteanet": 87.80,
       "margin_distillation": 85.71, "ekd": 90.48}  # EKD (CVPR 2022) Table 3, IJB-C TAR@FAR=1e-4 (%), IR-50 -> MFN
PAPER = [  # LFW / CFP-FP / AgeDB-30 (%), the VarGFaceNet authors' figures (ms1m-retinaface-t1, 112 px; README)
    ("ResNet-100 teacher", "99.75 / 98.53 / 98.17"), ("VarGFaceNet from scratch", "99.68 / 98.09 / 98.10"),
    ("generation 1", "99.78 / 98.40 / 98.07"), ("generation 2", "99.83 / 98.27 / 98.05")]


# ------------------------------------------------------------------------------------------ report

def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _teacher(sweeps: dict) -> dict:
    for table in sweeps.values():
        for stages in table.values():
            if "teacher" in stages:
                return stages["teacher"]
    return {"acc": {}, "tar": {}, "ijb": {}}


def curve_section(curve: dict, choice: dict, plot: str | None, n: int) -> list:
    lines = ["## 1. How long a stage trains: the budget curve", "",
             f"Scratch students (no teacher), each budget its own schedule (warmup, cosine decay), {n} seeds "
             "(experiments/studies/budget_curve.yaml).", "",
             _row("epochs", "accuracy (%)", "TAR@1e-3 (%)", "next budget minus this one (points)"),
             _row("---", "---", "---", "---")]
    points = choice["points"]
    for i, (e, acc) in enumerate(points):
        cell = only_stage(curve, f"scratch-e{e}")
        step = diff_text(points[i + 1][1], acc) if i + 1 < len(points) else "-"
        lines.append(_row(e, fmt(acc), fmt(cell["tar"]), step))
    lines += ["", f"**Budget: E = {choice['epochs']} epochs per stage** ({choice['why']}). Every stage of every arm "
              "below trains E epochs; one schedule of 2E or 3E epochs is the control of generation 2 or 3."]
    if plot:
        lines += ["", f"![budget curve]({plot})"]
    return lines + [""]


def recursion_arms(sweeps: dict, e: int, best: str) -> list:
    """[(label, loss, total epochs, cell)] of the recursion and its controls."""
    rec, x2, x3 = sweeps["recursive"], sweeps["long-x2"], sweeps["long-x3"]
    arms = [("scratch", "-", e, only_stage(sweeps["curve"], f"scratch-e{e}")),
            ("scratch", "-", 2 * e, only_stage(x2, "scratch")), ("scratch", "-", 3 * e, only_stage(x3, "scratch"))]
    for loss in dict.fromkeys(["equivalent_angular", best]):
        for g in (1, 2, 3):
            arms.append((f"generation {g} (from generation {g - 1})" if g > 1 else "generation 1", loss, g * e,
                         rec.get(f"{loss}-chain", {}).get(f"gen{g}", {"acc": {}, "tar": {}})))
        arms += [("one schedule", loss, 2 * e, only_stage(x2, loss)),
                 ("one schedule", loss, 3 * e, only_stage(x3, loss))]
    for g in (1, 2, 3):
        arms.append((f"born-again generation {g}" + (f" (teacher: generation {g - 1})" if g > 1 else ""),
                     "equivalent_angular", g * e,
                     rec.get("equivalent_angular-bornagain", {}).get(f"gen{g}", {"acc": {}, "tar": {}})))
    return arms


def recursion_section(sweeps: dict, e: int, best: str, plot: str | None) -> tuple:
    rec, x2, x3 = sweeps["recursive"], sweeps["long-x2"], sweeps["long-x3"]
    lines = ["## 2. Recursion against one long distillation, at convergence", "",
             f"Every generation trains E = {e} epochs from the previous student with a fresh optimizer and schedule "
             "against the same frozen IResNet-18 teacher; the controls train one schedule as long as two or three "
             "generations (experiments/studies/recursive_kd.yaml, recursion_long.yaml). The paper's loss "
             f"(equivalent_angular, alpha 7) and the face-KD table's best row ({best}).", "",
             _row("arm", "loss", "total epochs", "accuracy (%)", "TAR@1e-3 (%)"),
             _row("---", "---", "---", "---", "---")]
    teacher = _teacher(sweeps)
    lines.append(_row("teacher (IResNet-18, frozen)", "-", "-", fmt(teacher["acc"]), fmt(teacher["tar"])))
    for label, loss, total, cell in recursion_arms(sweeps, e, best):
        lines.append(_row(label, loss, total, fmt(cell["acc"]), fmt(cell["tar"])))
    if plot:
        lines += ["", f"![accuracy per generation with the controls]({plot})"]
    lines += ["", "What it says (accuracy points, difference ± standard error):", ""]
    verdicts = {}
    for loss in dict.fromkeys(["equivalent_angular", best]):
        chain = rec.get(f"{loss}-chain", {})
        for g, longer in ((2, x2), (3, x3)):
            d, se, verdict = compare(chain.get(f"gen{g}", {}).get("acc", {}), only_stage(longer, loss)["acc"])
            verdicts[(loss, g)] = (d, verdict)
            lines.append(f"- **{loss}, generation {g} against one schedule of {g}E epochs** (the same epochs, the same "
                         f"teacher): "
                         f"{diff_text(chain.get(f'gen{g}', {}).get('acc', {}), only_stage(longer, loss)['acc'])}.")
        steps = [f"gen{g} vs gen{g - 1} "
                 f"{diff_text(chain.get(f'gen{g}', {}).get('acc', {}), chain.get(f'gen{g - 1}', {}).get('acc', {}))}"
                 for g in (2, 3)]
        lines.append(f"- **{loss}, each generation against the one before** (it has also trained E epochs more): "
                     + "; ".join(steps) + ".")
        scratch = [f"{g}E {diff_text(chain.get(f'gen{g}', {}).get('acc', {}), arm[3]['acc'])}"
                   for g, arm in zip((1, 2, 3), recursion_arms(sweeps, e, best)[:3], strict=False)]
        lines.append(f"- **{loss}, generation k against scratch trained as long**: " + "; ".join(scratch) + ".")
    ba, fixed = rec.get("equivalent_angular-bornagain", {}), rec.get("equivalent_angular-chain", {})
    lines.append("- **Born-again chain against the fixed teacher** (equivalent_angular; generation 1 is the same "
                 "recipe in both): " + "; ".join(
                     f"gen{g} "
                     f"{diff_text(ba.get(f'gen{g}', {}).get('acc', {}), fixed.get(f'gen{g}', {}).get('acc', {}))}"
                     for g in (2, 3)) + ".")
    wins = [k for k, (d, v) in verdicts.items() if v == "beyond seed noise" and d is not None and d > 0]
    losses = [k for k, (d, v) in verdicts.items() if v == "beyond seed noise" and d is not None and d < 0]
    if wins and not losses:
        answer = ("Recursion beats one long distillation beyond seed noise in " + ", ".join(
            f"{loss} generation {g}" for loss, g in wins) + "; elsewhere the two are within seed noise.")
    elif losses and not wins:
        answer = ("One long distillation beats recursion beyond seed noise in " + ", ".join(
            f"{loss} generation {g}" for loss, g in losses) + "; elsewhere the two are within seed noise.")
    elif wins:
        answer = ("Not in general: recursion beats one long distillation beyond seed noise in " + ", ".join(
            f"{loss} generation {g}" for loss, g in wins) + ", and loses to it in " + ", ".join(
            f"{loss} generation {g}" for loss, g in losses) + "; elsewhere the two are within seed noise.")
    else:
        answer = ("**Recursion does not beat one long distillation here**: at equal epochs every generation is within "
                  "seed noise of one schedule as long, so what the later generations gain is the extra training, not "
                  "the restart.")
    lines += ["", f"**Answer:** {answer}", ""]
    return lines, answer


def table_order(table: dict) -> list:
    """The table's rows in the grid file's order (rows it does not plan after them)."""
    planned = planned_cases(None)["face_kd_table"]
    return [c for c in planned if c in table] + sorted(c for c in table if c not in planned)


def table_section(table: dict, plot: str | None, n: int) -> list:
    lines = [f"## 3. The face-KD table (EKD's Table 3 and more), {n} seeds", "",
             "One stage of E epochs per row, one frozen teacher (experiments/studies/face_kd_table.yaml). Accuracy and "
             "TAR@FAR=1e-3 on the verification pairs; TAR@FAR=1e-4 on the synthetic IJB-C set (templates of people "
             "disjoint from training). Differences are to `scratch` (P x K rows: to the scratch row with the same "
             "batches). EKD's published IJB-C TAR@FAR=1e-4 (IR-50 -> MobileFaceNet, MS1MV2) is another scale: read "
             "it beside ours, not as the same experiment.", "",
             _row("row", "accuracy (%)", "TAR@1e-3 (%)", "IJB-C TAR@1e-4 (%)", "accuracy - baseline",
                  "TAR@1e-4 - baseline", "EKD's paper (TAR@1e-4, %)"), _row(*["---"] * 7)]
    teacher = _teacher({"t": table})
    lines.append(_row("teacher", fmt(teacher["acc"]), fmt(teacher["tar"]), fmt(teacher["ijb"]), "", "", ""))
    for case in table_order(table):
        cell = only_stage(table, case)
        control = "scratch"  # P x K rows (ekd, ekd-k2) against scratch on the same batches
        if case.startswith("ekd"):
            control = {"ekd-k2": "scratch-pk2", "ekd-mix50": "scratch-pk4-mix50"}.get(case, "scratch-pk4")
        base = only_stage(table, control)
        same = case == control
        lines.append(_row(case, fmt(cell["acc"]), fmt(cell["tar"]), fmt(cell["ijb"]),
                          "-" if same else diff_text(cell["acc"], base["acc"])
                          + ("" if control == "scratch" else f" vs {control}"),
                          "-" if same else diff_text(cell["ijb"], base["ijb"]),
                          f"{EKD[case]:.2f}" if case in EKD else "-"))
    if plot:
        lines += ["", f"![the table with error bars]({plot})"]
    ranked = sorted(((stats(table[c]["gen1"]["acc"])[0], c) for c in table
                     if "gen1" in table[c] and not c.endswith(BEFORE)), reverse=True)
    if len(ranked) >= 2:
        lines += ["", f"Best row by accuracy: **{ranked[0][1]}** ({ranked[0][0]:.2f}), then {ranked[1][1]} "
                  f"({ranked[1][0]:.2f}): "
                  f"{diff_text(table[ranked[0][1]]['gen1']['acc'], table[ranked[1][1]]['gen1']['acc'])}."]
    pairs = before_pairs(table)
    if pairs:
        lines += ["", f"The authors' defaults against the previous ones (issue 38; docs/methods.md): each `{BEFORE}` "
                  "row is its loss with the options it had before, the same teacher, batches and seeds. Accuracy, "
                  "then IJB-C TAR@1e-4, defaults minus previous: "
                  + "; ".join(f"{row}: {diff_text(only_stage(table, row)['acc'], only_stage(table, old)['acc'])}, "
                              f"{diff_text(only_stage(table, row)['ijb'], only_stage(table, old)['ijb'])}"
                              for row, old in pairs) + "."]
    return lines + [""]


def pk_section(pk: dict, curve: dict, e: int, recal: dict, n: int) -> list:
    shuffled = only_stage(curve, f"scratch-e{e}")

    def arm(name):
        return only_stage(pk, name)["acc"]

    lines = ["## 4. Why P x K batches hurt", "",
             f"Scratch students, E = {e} epochs, {n} seeds (experiments/studies/pk_batches.yaml); K images of each of "
             "P identities per batch.", "",
             _row("arm", "K", "batch (update)", "identities in a BatchNorm batch", "identities per update",
                  "accuracy (%)", "minus shuffled 64"), _row(*["---"] * 7),
             _row("shuffled", "-", "64", "~60", "~60", fmt(shuffled["acc"]), "-")]
    rows = [("pk2", 2, "64", 32, 32), ("pk4", 4, "64", 16, 16), ("pk8", 8, "64", 8, 8),
            ("pk4-acc2", 4, "2 x 64", 16, 32), ("pk4-b128", 4, "128", 32, 32),
            ("pk4-mix50", "4 (half the batch)", "64", "8 + ~30", "8 + ~30"),
            ("shuffled-acc2", "-", "2 x 64", "~60", "~110"), ("shuffled-b128", "-", "128", "~110", "~110")]
    for name, k, b, bn, step in rows:
        lines.append(_row(name, k, b, bn, step, fmt(arm(name)), diff_text(arm(name), shuffled["acc"])))
    checks = [
        ("K at a fixed batch of 64 (pk2 - pk4)", arm("pk2"), arm("pk4")),
        ("twice the identities per update, BatchNorm unchanged (pk4-acc2 - pk4)", arm("pk4-acc2"), arm("pk4")),
        ("BatchNorm over 32 identities instead of 16, the same updates (pk4-b128 - pk4-acc2)", arm("pk4-b128"),
         arm("pk4-acc2")),
        ("K = 4 against shuffled at 2 x 64 (pk4-acc2 - shuffled-acc2)", arm("pk4-acc2"), arm("shuffled-acc2")),
        ("K = 4 against shuffled at 128 (pk4-b128 - shuffled-b128)", arm("pk4-b128"), arm("shuffled-b128")),
        ("K = 2 and P = 32 against K = 4 and P = 32 (pk2 - pk4-b128)", arm("pk2"), arm("pk4-b128")),
        ("half of each batch shuffled single images (data.grouped_fraction 0.5; pk4-mix50 - pk4)", arm("pk4-mix50"),
         arm("pk4")),
        ("the mix against K = 2 (pk4-mix50 - pk2)", arm("pk4-mix50"), arm("pk2")),
    ]
    lines += ["", "What each comparison moves, and what it does (accuracy points):", ""]
    lines += [f"- {what}: {diff_text(a, b)}." for what, a, b in checks]
    if recal:
        vals = recal_values(recal)
        lines.append("- BatchNorm statistics re-estimated after training (the pk4 students; a cumulative average over "
                     "25 batches, no gradient): " + "; ".join(f"{n} {fmt(v)}" for n, v in vals.items())
                     + "; re-estimated on shuffled minus as trained, student by student: "
                     + f"{recal_difference(recal)[3]}.")
    lines += ["", "**Diagnosis** (each candidate cause, and the comparison that isolates it): "
              + diagnosis(pk, shuffled["acc"], recal), ""]
    return lines


def diagnosis(pk: dict, shuffled: dict, recal: dict) -> str:
    found, against, unshown = pk_causes(pk, shuffled, recal)

    def says(items):
        return "; ".join(f"{cause}: {text}" for cause, text in items) or "none"

    return (f"supported beyond seed noise: {says(found)}. Against it beyond seed noise: {says(against)}. Not shown "
            f"(within seed noise): {says(unshown)}.")


def time_section(timing: dict) -> list:
    t = study_seconds(timing)
    streams, total, phases, wall = t["streams"], t["total"], t["phases"], t["wall"]
    if not streams and not wall:
        return ["## 5. What it cost", "",
                "Not measured in this run: no timing-<stream>.json in <runs>/study (a run of the study in parts, "
                "several processes at once on a machine busy with other work, leaves none that stands for "
                "`experiments/studies/run_study.sh`). Run that script alone to measure it.", ""]
    lines = ["## 5. What it cost", "",
             "Measured on this project's 2-core CPU, `experiments/studies/run_study.sh` (the teacher and IJB set, then "
             "the budget curve in two halves side by side, then streams 1 and 2 side by side, one torch thread each, "
             "then this report): " + (f"**{wall / 60:.1f} minutes of wall time** from its start to the report, "
                                      f"{phases / 60:.1f} minutes by the sum of its phases" if wall else
                                      f"**{phases / 60:.1f} minutes by the sum of its phases** (run_study.sh's own "
                                      f"clock did not run: the parts were started by hand)")
             + (f". The `extra` rows ran on their own after that measured run: work added to stream 2 since, which "
                f"run_study.sh now runs there; with them stream 2 takes "
                f"{(total.get('2', 0) + total['extra']) / 60:.1f} "
                f"minutes beside stream 1's {total.get('1', 0) / 60:.1f}, so the whole script takes about "
                f"{t['estimate'] / 60:.1f}"
                " minutes (estimated from the phases, not measured end to end)" if "extra" in streams else "")
             + ". Phases, in minutes (a rerun skips finished points, so a phase keeps the time of the run that "
             "trained it):", "", _row("stream", "phase", "minutes"), _row("---", "---", "---")]
    for stream, parts in streams.items():
        lines += [_row(stream, phase, f"{v / 60:.1f}") for phase, v in parts.items()]
    return lines + [""]


# ------------------------------------------------------------------------------------------ main

def _verdict(a, b, better: str, worse: str, same: str) -> str:
    d, se, verdict = compare(a, b)
    if d is None:
        return "not measured"
    says = same if verdict != "beyond seed noise" else better if d > 0 else worse
    return f"{says} ({d:+.2f} ± {se:.2f} points)"


def plain_words(sweeps: dict, e: int, best: str, answer: str, recal: dict) -> list:
    """The conclusions, each computed from the numbers it states."""
    table, pk, curve, rec = sweeps["face_kd_table"], sweeps["pk"], sweeps["curve"], sweeps["recursive"]
    scratch, ea = only_stage(table, "scratch")["acc"], only_stage(table, "equivalent_angular")["acc"]
    shuffled = only_stage(curve, f"scratch-e{e}")["acc"]
    ba, fixed = rec.get("equivalent_angular-bornagain", {}), rec.get("equivalent_angular-chain", {})
    return [
        f"- Budget: scratch accuracy stops rising beyond seed noise at E = {e} epochs; every stage trains that long.",
        "- Distillation: the paper's loss at generation 1 "
        + _verdict(ea, scratch, "beats scratch", "loses to scratch", "does not differ from scratch") + f"; the "
        f"table's best row, {best}, " + _verdict(only_stage(table, best)["acc"], ea, "beats the paper's loss",
                                                 "loses to the paper's loss",
                                                 "is within noise of the paper's loss") + ".",
        f"- Recursion: {answer}",
        "- Born-again chain (each generation taught by the previous student) against the fixed teacher, generation 3: "
        + _verdict(ba.get("gen3", {}).get("acc", {}), fixed.get("gen3", {}).get("acc", {}), "better", "worse",
                   "no difference beyond noise") + ".",
        "- P x K batches, scratch, against shuffled: K = 4 " + _verdict(
            only_stage(pk, "pk4")["acc"], shuffled, "helps", "hurts", "makes no difference beyond noise")
        + "; K = 2 " + _verdict(only_stage(pk, "pk2")["acc"], shuffled, "helps", "hurts",
                                "makes no difference beyond noise") + "; " + _causes_in_words(pk, shuffled, recal),
        "- The remedy, half of each batch shuffled single images (data.grouped_fraction 0.5, K = 4 groups kept for "
        "a loss that needs them): against K = 4 alone " + _verdict(only_stage(pk, "pk4-mix50")["acc"],
                                                          only_stage(pk, "pk4")["acc"], "it helps", "it hurts",
                                                          "no difference beyond noise")
        + "; against shuffled batches " + _verdict(only_stage(pk, "pk4-mix50")["acc"], shuffled, "it is better",
                                                   "it still costs", "no difference beyond noise") + ".",
    ] + _defaults_in_words(table)


def _defaults_in_words(table: dict) -> list:
    """One line on issue 38's change of defaults, from the table's -pre38 rows (none without them)."""
    pairs = before_pairs(table)
    if not pairs:
        return []
    return ["- The authors' defaults (issue 38) against each loss's previous options, accuracy: " + "; ".join(
        f"{row} " + _verdict(only_stage(table, row)["acc"], only_stage(table, old)["acc"], "better", "worse",
                             "no difference beyond noise") for row, old in pairs) + "."]


def _causes_in_words(pk: dict, shuffled: dict, recal: dict) -> str:
    found, against, _ = pk_causes(pk, shuffled, recal)

    def short(items):
        return ", ".join(cause.split(" (")[0] for cause, _ in items)

    return ((f"of the causes section 4 isolates, shown beyond seed noise: {short(found)}" if found else
             "none of the causes section 4 isolates is shown beyond seed noise")
            + (f"; against it beyond noise: {short(against)}" if against else "") + ".")


def render(sweeps: dict, recal: dict, timing: dict, seeds: list, plots: dict) -> str:
    """docs/results.md; seeds: those of every arm (the P×K diagnosis has more, read from its points)."""
    choice = budget(sweeps["curve"])
    e = choice["epochs"]
    best = timing.get("best_loss") or best_row(sweeps["face_kd_table"])
    rec_lines, answer = recursion_section(sweeps, e, best, plots.get("recursion"))
    pk_seeds = sorted({s for c in sweeps["pk"].values() for cell in c.values() for s in cell["acc"]})
    teacher = _teacher(sweeps)
    lines = ["# The study: recursion, the face-KD baselines and P x K batches, on synthetic faces", "",
             "Written by `python experiments/studies/report.py runs --out docs/results.md --readme README.md` from the "
             "study's runs (this page, its plots and the README's evidence summary); the whole study (every arm, every "
             "seed) is `experiments/studies/run_study.sh`, which ends with that command.", "",
             "Setting (experiments/studies/study.yaml): synthetic faces, 100 training identities x 16 images at 32x32; "
             "verification on 2,400 pairs of 150 unseen people (insightface's 10-fold protocol); a synthetic IJB-C "
             "set of other people. Student: VarGFaceNet (0.49M parameters; the quickstart's). Teacher: IResNet-18 "
             f"(11.4M parameters), trained once, frozen, loaded by every arm: {fmt(teacher['acc'])} % accuracy. Seeds "
             f"{', '.join(map(str, seeds))} (the P×K diagnosis: {', '.join(map(str, pk_seeds))}): every figure is a "
             "mean ± sample standard deviation over them; "
             "'beyond seed noise' means a difference larger than twice its standard error.", "",
             "**In plain words.**", ""] + plain_words(sweeps, e, best, answer, recal) + [""]
    lines += curve_section(sweeps["curve"], choice, plots.get("curve"), len(seeds))
    lines += rec_lines
    lines += table_section(sweeps["face_kd_table"], plots.get("table"), len(seeds))
    lines += pk_section(sweeps["pk"], sweeps["curve"], e, recal, len(pk_seeds))
    lines += time_section(timing)
    lines += ["## At another scale", "",
              "32x32 synthetic faces, a 0.49M-parameter student and minutes of training show whether the toolkit's "
              "mechanisms produce the effects and how large seed noise is here, not what happens on MS1M at 112x112. "
              "The VarGFaceNet paper's own figures (ms1m-retinaface-t1, 112 px, IResNet-100 teacher), for the "
              "direction only:", "", _row("paper (VarGFaceNet, arXiv 1910.04985)", "LFW / CFP-FP / AgeDB-30 (%)"),
              _row("---", "---")] + [_row(name, numbers) for name, numbers in PAPER]
    return "\n".join(lines) + "\n"


def summary(sweeps: dict, timing: dict, recal: dict) -> list:
    """The README's study summary (readme_summary.py): the same numbers and conclusions as render's."""
    import readme_summary

    choice = budget(sweeps["curve"])
    e = choice["epochs"]
    best = timing.get("best_loss") or best_row(sweeps["face_kd_table"])
    _, answer = recursion_section(sweeps, e, best, None)
    return readme_summary.summary(sweeps, choice, best, recursion_arms(sweeps, e, best),
                                  plain_words(sweeps, e, best, answer, recal), study_seconds(timing),
                                  table_order(sweeps["face_kd_table"]), _teacher(sweeps))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", help="the folder study.py wrote its sweeps into (runs)")
    p.add_argument("--out", default="docs/results.md", help="the report (default docs/results.md); PNGs beside it")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--readme", help="also rewrite the study summary between the markers of this file (README.md: "
                                    "its evidence section; readme_summary.py)")
    args = p.parse_args(argv)
    sweeps = {name: collect(os.path.join(args.runs, name)) for name in SWEEPS}
    timing = read_timing(args.runs)
    recal = read_json(os.path.join(args.runs, "pk", "recalibration.json")) or {}
    # every arm's seeds; the P×K diagnosis runs more (study.py --pk-seeds), every one of them in each of its arms
    seeds = sorted({s for name, t in sweeps.items() if name != "pk" for c in t.values() for cell in c.values()
                    for s in cell["acc"]})
    pk_seeds = sorted(set(seeds) | {s for c in sweeps["pk"].values() for cell in c.values() for s in cell["acc"]})
    if not sweeps["face_kd_table"] or not sweeps["curve"]:
        print(f"{args.runs}: no finished points of the study (run experiments/studies/run_study.sh)", file=sys.stderr)
        return 2
    gaps = missing(sweeps, {**{name: seeds for name in sweeps}, "pk": pk_seeds},
                   planned_cases(timing.get("best_loss") or best_row(sweeps["face_kd_table"])))
    pk4 = sorted(n for n in os.listdir(os.path.join(args.runs, "pk")) if "-pk4-seed=" in n) \
        if os.path.isdir(os.path.join(args.runs, "pk")) else []
    gaps += [f"pk/recalibration.json: {n}" for n in pk4 if n not in recal]
    if gaps:
        shown = "; ".join(gaps[:6]) + (f"; and {len(gaps) - 6} more" if len(gaps) > 6 else "")
        print(f"{args.runs}: the study is incomplete ({shown}); rerun experiments/studies/run_study.sh (finished "
              f"points are skipped) rather than report means over what is there", file=sys.stderr)
        return 2
    if args.readme:  # its markers are checked before anything is written
        import readme_summary
        try:
            readme_summary.check(args.readme)
        except (OSError, readme_summary.MarkerError) as e:
            print(f"report: {e}", file=sys.stderr)
            return 2
    base = os.path.splitext(args.out)[0]
    plots = {} if args.no_plot else {k: f"{base}_{k}.png" for k in ("curve", "recursion", "table")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if plots:
        import report_plots
        choice = budget(sweeps["curve"])
        best = timing.get("best_loss") or best_row(sweeps["face_kd_table"])
        report_plots.plot_curve(choice, plots["curve"])
        report_plots.plot_recursion(recursion_arms(sweeps, choice["epochs"], best), plots["recursion"])
        report_plots.plot_table(sweeps["face_kd_table"], table_order(sweeps["face_kd_table"]), plots["table"])
    names = {k: os.path.basename(v) for k, v in plots.items()}
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(render(sweeps, recal, timing, seeds, names))
    print(f"wrote {args.out}" + (f" and {', '.join(plots.values())}" if plots else ""))
    if args.readme:
        readme_summary.update_readme(args.readme, summary(sweeps, timing, recal))
        print(f"wrote the study summary in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
