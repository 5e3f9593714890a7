"""The README's evidence section, written from the study's numbers (`report.py runs --readme README.md`), so the
README follows docs/results.md instead of repeating its digits by hand.

Only the lines between BEGIN and END are rewritten; the text around them is the README's own. A README without
both markers (in that order) is refused with a message naming the file and the marker, and nothing is written.
"""

from __future__ import annotations

import os

from study_numbers import BEFORE, diff_text, fmt, only_stage, stats

BEGIN = ("<!-- study summary: written by experiments/studies/report.py --readme; edits between these lines are "
         "overwritten -->")
END = "<!-- end of the study summary -->"


class MarkerError(ValueError):
    pass


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def summary(sweeps: dict, choice: dict, best: str, arms: list, words: list, seconds: dict, table_rows: list,
            teacher: dict) -> list:
    """The block's lines. arms: report.recursion_arms (label, loss, total epochs, cell); words: report.plain_words;
    seconds: report.study_seconds; table_rows: the face-KD table's rows in the grid's order; teacher: its cell
    (report._teacher)."""
    e = choice["epochs"]
    lines = [f"The frozen teacher: {fmt(teacher['acc'])} % accuracy on the verification pairs, "
             f"{fmt(teacher['ijb'])} % TAR@FAR=1e-4 on the synthetic IJB-C set.", "",
             "**In plain words** (every figure: mean ± std over seeds; \"beyond seed noise\": a difference larger "
             "than twice its standard error):", ""] + words + [""]
    lines += ["- **Budget from a measured curve**: scratch accuracy for one schedule of "
              + " / ".join(str(x) for x, _ in choice["points"]) + " epochs: "
              + ", ".join(fmt(acc) for _, acc in choice["points"]) + f"; every stage of every arm trains E = {e} "
              f"epochs ({choice['why']})."]
    cell = {(label.split(" (")[0], loss, total): c for label, loss, total, c in arms}
    losses = list(dict.fromkeys(["equivalent_angular", best]))
    head = ["total epochs", "scratch"]
    for loss in losses:
        head += [f"{loss}: generations", f"{loss}: one schedule as long"]
    head.append("equivalent_angular: born-again chain")
    lines += ["- **Recursion against one long distillation** (accuracy %; generation k trains E epochs from "
              "generation k-1 with a fresh optimizer and schedule, the same frozen teacher):", "",
              "  " + _row(*head), "  " + _row(*["---"] * len(head))]
    for g in (1, 2, 3):
        row = [f"{g * e} ({g}E)", fmt(cell[("scratch", "-", g * e)]["acc"])]
        for loss in losses:
            gen = cell[(f"generation {g}", loss, g * e)]["acc"]
            row += [fmt(gen), "(= generation 1)" if g == 1 else fmt(cell[("one schedule", loss, g * e)]["acc"])]
        row.append(fmt(cell[(f"born-again generation {g}", "equivalent_angular", g * e)]["acc"]))
        lines.append("  " + _row(*row))
    table = sweeps["face_kd_table"]
    scratch = only_stage(table, "scratch")
    ranked = sorted((r for r in table_rows if not r.startswith(("scratch", "ekd")) and not r.endswith(BEFORE)),
                    key=lambda r: -(stats(only_stage(table, r)["acc"])[0] or 0))
    lines += ["", "- **The face-KD table** (one stage of E epochs per row, shuffled batches; accuracy %, synthetic "
              f"IJB-C TAR@FAR=1e-4 %, accuracy minus scratch): scratch {fmt(scratch['acc'])}, "
              f"{fmt(scratch['ijb'])}; " + "; ".join(
                  f"{r} {fmt(only_stage(table, r)['acc'])}, {fmt(only_stage(table, r)['ijb'])}, "
                  f"{diff_text(only_stage(table, r)['acc'], scratch['acc'])}" for r in ranked) + "."]
    pk = sweeps["pk"]
    shuffled = only_stage(sweeps["curve"], f"scratch-e{e}")["acc"]
    lines += ["- **P×K batches** (scratch, E epochs, against shuffled " + fmt(shuffled) + "): " + "; ".join(
        f"{name} {fmt(only_stage(pk, name)['acc'])}" for name in
        ("pk2", "pk4", "pk8", "pk4-acc2", "pk4-b128", "pk4-mix50")) + ". BatchNorm over 32 identities instead of 16 "
        "with the same updates (pk4-b128 - pk4-acc2): " + diff_text(only_stage(pk, "pk4-b128")["acc"],
                                                                     only_stage(pk, "pk4-acc2")["acc"]) + "."]
    wall, estimate = seconds["wall"], seconds["estimate"]
    lines.append("- **What it cost** on this project's 2-core CPU (`experiments/studies/run_study.sh`): " + (
        f"{wall / 60:.1f} minutes of wall time, measured" if wall else "the wall time was not measured (parts "
                                                                        "started by hand)")
        + (f"; with the phases added after that run (docs/results.md, section 5) about {estimate / 60:.1f} minutes, "
           "estimated from the phases" if estimate else "") + ".")
    return lines


def check(path: str) -> tuple:
    """(text before the block, text from END on) of `path`; MarkerError when a marker is missing, OSError when the
    file cannot be read."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        which = "BEGIN" if begin < 0 else "END (after BEGIN)"
        raise MarkerError(f"{path}: the study summary's {which} marker is missing; put the two lines\n  {BEGIN}\n  "
                          f"{END}\nwhere the summary goes (readme_summary.py), then rerun")
    return text[:begin], text[end:]


def update_readme(path: str, lines: list) -> None:
    """Replace the block between BEGIN and END in `path` with `lines` (atomic: a temporary file, then a rename)."""
    before, after = check(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(before + BEGIN + "\n" + "\n".join(lines) + "\n" + after)
    os.replace(tmp, path)
