"""The study's numbers, read from its run directories (experiments/studies/study.py writes them; report.py renders
them): every finished stage's accuracy, TAR and IJB TAR per seed (collect), means, standard deviations and the
standard error of a difference (stats, compare), the budget rule (budget), the table's best row (best_row), what is
missing (missing, planned_cases), the candidate causes of the P×K cost (pk_causes, with a paired check for the
re-estimated students) and the measured time (read_timing, study_seconds).

A difference is called beyond seed noise when it exceeds twice its standard error (sqrt(sd_a²/n_a + sd_b²/n_b)),
within noise otherwise.
"""

from __future__ import annotations

import math
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from distill.eval.far import far_key
from distill.run.compare import load_runs
from distill.utils.atomic import read_json
from distill.utils.layout import is_run_dir

POINT = re.compile(r"^(?P<grid>[^-]+)-(?P<case>.+)-seed=(?P<seed>\d+)$")
SWEEPS = {"curve": "budget_curve", "face_kd_table": "face_kd_table", "recursive": "recursive_kd",
          "long-x2": "recursion_long", "long-x3": "recursion_long", "pk": "pk_batches"}

# ------------------------------------------------------------------------------------------ numbers

def collect(sweep_dir: str) -> dict:
    """{case: {stage: {"acc" | "tar" | "ijb" | "seconds": {seed: value}}}} of the finished stages of a sweep; acc and
    TAR@FAR=1e-3 of the first verification set, TAR@FAR=1e-4 of the IJB set, in %."""
    table: dict = {}
    # the points that have started (another process may be creating one: a folder without experiment.yaml yet)
    points = [os.path.join(sweep_dir, d) for d in sorted(os.listdir(sweep_dir))
              if is_run_dir(os.path.join(sweep_dir, d))] if os.path.isdir(sweep_dir) else []
    if not points:
        return table
    for run in load_runs(points):
        m = POINT.match(run["experiment"])
        if not m:
            continue
        for stage in run["stages"]:
            if stage["status"] != "done" or not stage.get("metrics"):
                continue
            metric = next(iter(stage["metrics"].values()))
            cell = table.setdefault(m["case"], {}).setdefault(stage["stage"], {"acc": {}, "tar": {}, "ijb": {},
                                                                               "seconds": {}})
            seed = int(m["seed"])
            cell["acc"][seed] = 100 * metric["acc_mean"]
            tar = (metric.get("tar_at_far") or {}).get(far_key(1e-3)) or {}
            cell["tar"][seed] = None if tar.get("tar") is None else 100 * tar["tar"]
            ijb = ((stage.get("ijb") or {}).get("tar_at_far") or {}).get(far_key(1e-4))
            cell["ijb"][seed] = None if ijb is None else 100 * ijb
            cell["seconds"][seed] = stage.get("train_seconds")
    return table


def stats(values) -> tuple:
    values = [v for v in (values.values() if isinstance(values, dict) else values) if v is not None]
    if not values:
        return None, None, 0
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd, len(values)


def compare(a, b) -> tuple:
    """(mean a - mean b, its standard error, verdict)."""
    (ma, sa, na), (mb, sb, nb) = stats(a), stats(b)
    if ma is None or mb is None:
        return None, None, "not measured"
    se = math.sqrt(sa ** 2 / na + sb ** 2 / nb)
    if na < 2 or nb < 2:
        return ma - mb, se, "one seed only: no spread"
    return ma - mb, se, ("beyond seed noise" if abs(ma - mb) > 2 * se else "within seed noise")


def fmt(values) -> str:
    mean, sd, _ = stats(values)
    return "-" if mean is None else f"{mean:.2f} ± {sd:.2f}"


def diff_text(a, b) -> str:
    d, se, verdict = compare(a, b)
    return "not measured" if d is None else f"{d:+.2f} ± {se:.2f} ({verdict})"


def only_stage(table: dict, case: str) -> dict:
    """The one student stage of a single-stage arm (baseline or gen1)."""
    stages = {k: v for k, v in table.get(case, {}).items() if k != "teacher"}
    return next(iter(stages.values())) if stages else {"acc": {}, "tar": {}, "ijb": {}, "seconds": {}}


def budget(curve: dict) -> dict:
    """The per-stage budget: the smallest E of the curve that no longer budget on the grid beats beyond seed noise
    (more epochs stop helping); the largest when even the last step still helps."""
    points = sorted((int(c[len("scratch-e"):]), only_stage(curve, c)["acc"]) for c in curve
                    if re.fullmatch(r"scratch-e\d+", c))
    if not points:
        raise SystemExit("report: the budget curve has no finished point (runs/curve)")
    for i, (e, acc) in enumerate(points[:-1]):
        later = [(e2, compare(acc2, acc)) for e2, acc2 in points[i + 1:]]
        if all(not (verdict == "beyond seed noise" and d > 0) for _, (d, _se, verdict) in later):
            e2, (d, se, _) = later[0]
            return {"epochs": e, "why": f"no longer budget beats it beyond seed noise; {e} -> {e2} epochs: "
                                        f"{d:+.2f} ± {se:.2f}", "points": points}
    return {"epochs": points[-1][0], "why": f"still improving beyond seed noise at {points[-1][0]} epochs, the "
                                            f"largest budget on the grid", "points": points}


def paired(a: list, b: list) -> tuple:
    """(mean of a_i - b_i, its standard error, verdict, text) for two measurements of the same students."""
    d = [x - y for x, y in zip(a, b, strict=False)]  # pairs as listed; a longer side's extra entries are left out
    mean, sd, n = stats(d)
    if mean is None or n < 2:
        return mean, None, "one seed only: no spread", "not measured" if mean is None else f"{mean:+.2f} (one seed)"
    se = sd / n ** 0.5
    verdict = "beyond seed noise" if abs(mean) > 2 * se else "within seed noise"
    return mean, se, verdict, f"{mean:+.2f} ± {se:.2f} ({verdict})"


def recal_values(recal: dict) -> dict:
    """{"as trained" | "re-estimated on ...": [accuracy % of each pk4 student]} from recalibration.json's points."""
    names = list(next(iter(recal.values())))
    return {n: [100 * next(iter(r[n].values())) for r in recal.values()] for n in names}


def recal_difference(recal: dict) -> tuple | None:
    """paired() of the pk4 students' accuracy re-estimated on shuffled batches against as trained (None: none)."""
    if not recal:
        return None
    vals = recal_values(recal)
    names = list(vals)
    return paired(vals[names[1]], vals[names[0]])


def pk_causes(pk: dict, shuffled: dict, recal: dict) -> tuple:
    """(supported, against, not shown): the candidate causes of the P×K cost, each [(cause, its comparison)]. A cause
    predicts the sign of one comparison that isolates it: supported when that comparison goes its way beyond seed
    noise, against when it goes the other way beyond noise, not shown when it stays within noise."""

    def arm(name):
        return only_stage(pk, name)["acc"]

    checks = [  # (cause, a, b, the sign of a - b the cause predicts)
        ("how many images of one identity a batch of 64 holds (pk2 - pk4)", arm("pk2"), arm("pk4"), +1),
        ("BatchNorm's training statistics over a batch of few identities (pk4-b128 - pk4-acc2: the same updates, "
         "BatchNorm over 32 identities instead of 16)", arm("pk4-b128"), arm("pk4-acc2"), +1),
        ("too few identities per update for the margin head (pk4-acc2 - pk4: twice the identities per update, "
         "BatchNorm unchanged)", arm("pk4-acc2"), arm("pk4"), +1),
        ("the schedule of two accumulated micro-batches alone (shuffled-acc2 - shuffled)", arm("shuffled-acc2"),
         shuffled, -1),
        ("the schedule of batches of 128 alone (shuffled-b128 - shuffled)", arm("shuffled-b128"), shuffled, -1),
    ]
    found, against, unshown = [], [], []
    for cause, a, b, sign in checks:
        d, _se, verdict = compare(a, b)
        which = unshown if d is None or verdict != "beyond seed noise" else found if d * sign > 0 else against
        which.append((cause, diff_text(a, b)))
    diff = recal_difference(recal)
    if diff is not None:
        d, _se, verdict, text = diff
        which = unshown if d is None or verdict != "beyond seed noise" else found if d > 0 else against
        which.append(("the running statistics evaluation uses (the pk4 students re-estimated on shuffled batches "
                      "minus as trained, student by student)", text))
    return found, against, unshown


BEFORE = "-pre38"  # a face-KD row with the options its loss had before issue 38 (the authors' defaults came then)


def before_pairs(table: dict) -> list:
    """(row, its -pre38 twin) of the face-KD table: the authors' defaults against the previous ones, same teacher."""
    return [(c[: -len(BEFORE)], c) for c in table if c.endswith(BEFORE) and c[: -len(BEFORE)] in table]


def best_row(table: dict) -> str:
    """The distillation row of the face-KD table with the highest mean accuracy (a -pre38 row, kept to measure
    issue 38's change of defaults, is never the best row: the recursion runs a loss under its current defaults)."""
    rows = [(stats(table[c]["gen1"]["acc"])[0], c) for c in table if "gen1" in table[c] and not c.endswith(BEFORE)]
    if not rows:
        raise SystemExit("report: the face-KD table has no finished distillation row (runs/face_kd_table)")
    return max(rows)[1]


def missing(sweeps: dict, seeds, planned: dict | None = None) -> list:
    """What the study lacks: every (sweep, case, stage) without every seed (seeds: a list for every sweep, or
    {sweep: list}), and with `planned` ({sweep: [case]}) every planned case with no finished stage at all."""
    gaps = []
    every = seeds
    for sweep, table in sweeps.items():
        seeds = every.get(sweep, []) if isinstance(every, dict) else every
        for case in (planned or {}).get(sweep, []):
            if case not in table:
                gaps.append(f"{sweep}/{case}: no finished stage")
        for case, stages in sorted(table.items()):
            for stage, cell in sorted(stages.items()):
                lost = sorted(set(seeds) - set(cell["acc"]))
                if lost:
                    gaps.append(f"{sweep}/{case} {stage}: seed{'s' if len(lost) > 1 else ''} "
                                f"{', '.join(map(str, lost))}")
    return gaps


def planned_cases(best: str | None) -> dict:
    """{sweep: [case names]} the study files plan (with the best row's arms study.py adds)."""
    from distill.run.sweep import CASE, load_grid

    out = {}
    for sweep, name in SWEEPS.items():
        cases = [c["name"] for c in load_grid(os.path.join(HERE, f"{name}.yaml")).grid[CASE]]
        if best and sweep == "recursive":
            cases.append(f"{best}-chain")
        if best and sweep.startswith("long-"):
            cases.append(best)
        out[sweep] = list(dict.fromkeys(cases))
    return out


TIMING_STREAMS = ("prepare", "curve-1", "curve-2", "curve", "1", "2", "all", "extra")


def read_timing(runs: str) -> dict:
    """{stream: {phase: seconds}} of study.py's timing-<stream>.json files, "best_loss", and "wall": run_study.sh's
    measured wall-clock seconds from its start to the report (timing-wall.json), when it ran."""
    out = {}
    for stream in TIMING_STREAMS:
        data = read_json(os.path.join(runs, "study", f"timing-{stream}.json"))
        if data:
            out[stream] = data
    out["best_loss"] = next((d["best_loss"] for d in out.values() if isinstance(d, dict) and "best_loss" in d), None)
    out["wall"] = (read_json(os.path.join(runs, "study", "timing-wall.json")) or {}).get("seconds")
    return out


def study_seconds(timing: dict) -> dict:
    """{"streams": {stream: {phase: s}}, "total": {stream: s}, "phases": the sum of the phases as run_study.sh runs
    them (side-by-side parts: the longer), "wall": its measured wall time or None, "estimate": with the `extra`
    phases (run after the measured run, now in stream 2) the whole script's time, or None without them}."""
    streams = {k: {p: v for p, v in d.items() if isinstance(v, (int, float))} for k, d in timing.items()
               if isinstance(d, dict)}
    total = {k: sum(v.values()) for k, v in streams.items()}

    def side(*names):  # parts that run side by side take the longest one's time
        return max(total.get(n, 0) for n in names)

    phases = total.get("prepare", 0) + side("curve-1", "curve-2") + total.get("curve", 0) + side("1", "2") \
        + total.get("all", 0)
    wall = timing.get("wall")
    estimate = None if "extra" not in total else (wall or phases) + max(
        total.get("1", 0), total.get("2", 0) + total["extra"]) - side("1", "2")
    return {"streams": streams, "total": total, "phases": phases, "wall": wall, "estimate": estimate}
