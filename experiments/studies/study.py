"""The whole study in one command: teacher, budget curve, face-KD table, recursion and its controls, P×K diagnosis,
then docs/results.md (experiments/studies/report.py). What run_study.sh runs:

    python experiments/studies/study.py     (one process, one part after another; a rerun skips what is done)
    experiments/studies/run_study.sh        (the same in two processes side by side: the measured time)

1. the teacher (IResNet-18 on study.yaml's data), trained once; every arm loads it by checkpoint, shares its cache
   and metrics (teacher.shared_cache), and takes its margin head as class centres (teacher.head);
2. a synthetic IJB-C set (`distill data synth-ijb`: people disjoint from training) for TAR@FAR=1e-4;
3. the budget curve (budget_curve.yaml): scratch students trained 2 .. 24 epochs; the budget E is where more
   epochs stop helping beyond seed noise (study_numbers.budget);
4. the face-KD table (face_kd_table.yaml), every row one stage of E epochs, verification and IJB;
5. the recursion (recursive_kd.yaml: generations 1-3 with the paper's loss, the born-again chain) and the same
   chain with the table's best loss, each stage E epochs;
6. the controls at 2E and 3E in one schedule (recursion_long.yaml): one distilled generation and scratch;
7. the P×K diagnosis (pk_batches.yaml; 5 seeds, --pk-seeds), and the BatchNorm re-estimation of its P×K students
   (recalibration.json);
8. the report. Seconds per phase go to <runs>/study/timing-<stream>.json and into the report.

Every student of the study trains with one torch thread (train.threads: 1, so a number does not depend on how busy
the machine was: the thread policy would pick 1 or 2 threads by load, and the two give different numbers), and so
does the teacher (teacher.train.threads: 1; until issue 38 it took the policy's choice, so its accuracy moved with
the load of the machine it was trained on) and in
channels-last memory format (train.channels_last: true: measured on this 2-core CPU, 2 epochs of the study's
student in 5.4 s instead of 7.8 s; the IResNet teacher under bf16 gains nothing, so its recipe is left as it is).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import report  # experiments/studies/report.py
import study_numbers as numbers  # experiments/studies/study_numbers.py

from distill.config.schema import load_config
from distill.run.context import run_logger
from distill.run.experiment import run_experiment
from distill.run.sweep import CASE, load_grid, run_sweep
from distill.utils.atomic import atomic_write_json

STUDENT_SETTINGS = ["train.threads=1", "train.channels_last=true"]  # every student of the study (module docstring)
TEACHER_SETTINGS = ["teacher.train.threads=1"]  # the teacher too: its numbers must not depend on the load either
# The budget curve in two halves of about equal epochs (26 and 28 an epoch-seed), one per process in run_study.sh
CURVE_HALVES = {"curve-1": ["scratch-e24", "scratch-e2"], "curve-2": ["scratch-e16", "scratch-e8", "scratch-e4"]}
# Stages that two study files train with the same settings and seed: (stage, (sweep, case), (sweep, case)). Whichever
# runs second links the first's finished stage in (same_stage) instead of training it again; E and {best} are the
# budget and the table's best row. The settings are compared before: a pair that differs in anything but its name,
# generations, data.ijb and how the work is done (declared NOTHING: distill/config/keys.py) is trained again.
SAME_STAGES = [
    ("baseline", ("face_kd_table", "scratch"), ("curve", "scratch-e{E}")),
    ("gen1", ("face_kd_table", "equivalent_angular"), ("recursive", "equivalent_angular-chain")),
    ("gen1", ("recursive", "equivalent_angular-bornagain"), ("recursive", "equivalent_angular-chain")),
    ("gen1", ("recursive", "{best}-chain"), ("face_kd_table", "{best}")),
    ("baseline", ("face_kd_table", "scratch-pk4"), ("pk", "pk4")),
    ("baseline", ("face_kd_table", "scratch-pk2"), ("pk", "pk2")),
    ("baseline", ("face_kd_table", "scratch-pk4-mix50"), ("pk", "pk4-mix50")),
]
FILES = {name: os.path.join(HERE, f"{name}.yaml") for name in
         ("study", "budget_curve", "face_kd_table", "recursive_kd", "recursion_long", "pk_batches")}


class Study:
    def __init__(self, runs: str, base: str | None, seeds: list, more: list, ijb_templates: int, stream: str = "all",
                 log=print, pk_seeds: list | None = None):
        self.runs, self.base, self.seeds, self.log = runs, base, seeds, log
        self.pk_seeds = list(pk_seeds or seeds)  # the P×K diagnosis: more seeds (its arms differ by a few points)
        self.more = STUDENT_SETTINGS + list(more)  # the caller's overrides last: they win
        self.ijb_templates = ijb_templates
        self.teacher_dir = os.path.join(runs, "study", "teacher")
        self.timing_path = os.path.join(runs, "study", f"timing-{stream}.json")
        self.timing = numbers.read_json(self.timing_path) or {}
        self.ijb = os.path.join(runs, "study", "synth_ijb")

    def phase(self, name: str, work):
        t0 = time.perf_counter()
        out = work()
        seconds = time.perf_counter() - t0
        if seconds > self.timing.get(name, 0):  # a rerun that skips finished points keeps the first measured time
            self.timing[name] = round(seconds, 1)
            atomic_write_json(self.timing_path, self.timing)
        self.log(f"study: {name} took {seconds:.0f} s")
        return out

    def teacher_overrides(self) -> list:
        stage = os.path.join(self.teacher_dir, "teacher")
        return [f"teacher.checkpoint={os.path.join(stage, 'backbone.pth')}",
                f"teacher.head={os.path.join(stage, 'last.pt')}",
                f"teacher.shared_cache={os.path.join(self.runs, 'study', 'shared_cache')}"]

    def grid(self, name: str, overrides: list, extra_cases=(), teacher: bool = True):
        overrides = (self.teacher_overrides() if teacher else []) + overrides + self.more
        grid = load_grid(FILES[name], base=self.base, overrides=overrides)
        grid.grid["seed"] = list(self.pk_seeds if name == "pk_batches" else self.seeds)
        grid.grid[CASE] = list(grid.grid[CASE]) + list(extra_cases)
        return grid

    def sweep(self, name: str, out: str, overrides: list, extra_cases=(), teacher: bool = True,
              only: bool = False, cases=None) -> None:
        """One study file's points (teacher: whether they load the study's teacher; scratch-only files do not;
        only: the extra cases alone, not the file's own; cases: only the file's cases of these names)."""
        grid = self.grid(name, overrides, extra_cases, teacher)
        if only:
            grid.grid[CASE] = list(extra_cases)
        if cases is not None:
            grid.grid[CASE] = [c for c in grid.grid[CASE] if c["name"] in cases]
        result = run_sweep(grid, out=os.path.join(self.runs, out), progress=False, logger=run_logger(self.log),
                           before=self.same_stage)
        if result["failed"]:
            raise SystemExit(f"study: {name}: {len(result['failed'])} point(s) failed ({', '.join(result['failed'])}); "
                             f"see the log above, fix, and rerun (finished points are skipped)")

    def same_stage(self, point, cfg, run_dir: str) -> None:
        """Before a point runs: link in each stage of it that another point of the study has finished with the same
        settings and seed (SAME_STAGES), so it is trained once."""
        from distill.config.keys import flat_dict
        from distill.config.schema import to_dict
        from distill.run.compare import load_run_config
        from distill.utils.layout import RunLayout

        here = (os.path.basename(os.path.dirname(run_dir)), point.values[CASE]["name"])
        names = {"E": self.epochs, "best": self.timing.get("best_loss")}
        for stage, *pair in SAME_STAGES:
            pair = [(sweep, case.format(**names)) for sweep, case in pair]
            if here not in pair or RunLayout(run_dir).stage(stage).is_done():
                continue
            sweep, case = pair[1 - pair.index(here)]
            source = os.path.join(self.runs, sweep, f"{sweep}-{case}-seed={point.values['seed']}")
            if not RunLayout(source).stage(stage).is_done():
                continue
            mine, theirs = (flat_dict(to_dict(c)) for c in (cfg, load_run_config(source)))
            differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k) and k != "name"
                            and not cfg.is_harmless(k) and not k.startswith("recursive."))
            if differ:
                self.log(f"study: {os.path.basename(run_dir)}: {stage} not taken from {source}: it differs in "
                         f"{', '.join(differ[:4])}")
                continue
            import shutil
            shutil.copytree(RunLayout(source).stage(stage).dir, RunLayout(run_dir).stage(stage).dir,
                            copy_function=_link_or_copy)
            self.log(f"study: {os.path.basename(run_dir)}: {stage} is {source}'s (same settings and seed): linked")

    @property
    def epochs(self):
        """The budget E, once the curve has finished (None before)."""
        if getattr(self, "_epochs", None) is None:
            self._epochs = (self.budget() or {}).get("epochs")
        return self._epochs

    def train_teacher(self) -> None:
        base = self.base or FILES["study"]
        cfg = load_config(base, ["generations=0", "baseline=false", *TEACHER_SETTINGS, *self.more])
        run_experiment(cfg, self.teacher_dir, progress=False, logger=run_logger(self.log))

    def synth_ijb(self) -> None:
        from distill.data.synth_ijb import read_manifest, write_synthetic_ijb
        if read_manifest(self.ijb) is None:
            write_synthetic_ijb(self.ijb, templates=self.ijb_templates, seed=0, target="IJBC")

    def prepare(self) -> None:
        """What every later part needs first: the teacher and the IJB set."""
        self.phase("teacher", self.train_teacher)
        self.phase("synthetic IJB-C", self.synth_ijb)

    def curve(self, half: str | None = None) -> None:
        """The budget curve, or one half of it (CURVE_HALVES: run_study.sh runs the two side by side)."""
        self.phase(f"budget curve{f' ({half})' if half else ''}", lambda: self.sweep(
            "budget_curve", "curve", [], teacher=False, cases=CURVE_HALVES[half] if half else None))

    def unfinished(self, sweep: str, name: str) -> list:
        """'<case> seed <s>' of every point of study file `name` (in runs/<sweep>) without a finished stage."""
        done = numbers.collect(os.path.join(self.runs, sweep))
        return [f"{c['name']} seed {s}" for c in load_grid(FILES[name]).grid[CASE] for s in self.seeds
                if not any(s in cell["acc"] for cell in done.get(c["name"], {}).values())]

    def budget(self) -> dict | None:
        """numbers.budget of the finished curve: {"epochs": E, "why": ...}; None while the curve is unfinished."""
        return None if self.unfinished("curve", "budget_curve") else numbers.budget(
            numbers.collect(os.path.join(self.runs, "curve")))

    def at(self, m: int) -> list:
        """train.epochs = m x the budget E read from the finished curve (refused while the curve is unfinished)."""
        choice = self.budget()
        if choice is None:
            raise SystemExit(f"study: the budget curve is not finished "
                             f"({', '.join(self.unfinished('curve', 'budget_curve')[:4])} missing): run --stream "
                             f"curve (or curve-1 and curve-2) first")
        return [f"train.epochs={m * choice['epochs']}"]

    def best_case(self, wait: bool = False) -> tuple:
        """(the face-KD table's best row, its case settings) once the table has finished; `wait`: the other stream
        runs the table, so wait for it (up to 4 hours)."""
        start = time.time()
        while self.unfinished("face_kd_table", "face_kd_table"):
            if not wait or time.time() - start > 4 * 3600:
                raise SystemExit("study: the face-KD table is not finished (stream 1 runs it): "
                                 f"{', '.join(self.unfinished('face_kd_table', 'face_kd_table')[:4])} missing")
            time.sleep(20)
        best = numbers.best_row(numbers.collect(os.path.join(self.runs, "face_kd_table")))
        table = load_grid(FILES["face_kd_table"])
        case = {k: v for k, v in next(c for c in table.grid[CASE] if c["name"] == best).items() if k != "name"}
        self.timing["best_loss"] = best
        atomic_write_json(self.timing_path, self.timing)
        return best, case

    def best_long(self, m: int, best: str, case: dict) -> None:
        """The table's best row distilled for mE epochs in one schedule (its recursion's control)."""
        self.phase(f"best loss: one schedule of {m}E", lambda: self.sweep(
            "recursion_long", f"long-x{m}", self.at(m), [{**case, "name": best, "generations": 1}], only=True))

    def table_and_best(self) -> None:
        """Stream 1: the face-KD table (with IJB-C), then the recursion with the table's best loss and its control of
        3E in one schedule."""
        choice = self.budget() or {}
        self.log(f"study: the per-stage budget is {choice.get('epochs')} epochs ({choice.get('why')})")
        self.phase("face-KD table", lambda: self.sweep("face_kd_table", "face_kd_table",
                                                       self.at(1) + [f"data.ijb.root={self.ijb}"]))
        best, case = self.best_case()
        self.log(f"study: the table's best loss is {best}; the recursion runs it beside the paper's")
        if best == "equivalent_angular":
            return  # the paper's loss is the best row: stream 2 runs its generations and controls
        self.phase("best loss: generations", lambda: self.sweep(
            "recursive_kd", "recursive", self.at(1), [{**case, "name": f"{best}-chain", "generations": 3}], only=True))
        self.best_long(3, best, case)  # its 2E control is stream 2's last part (the two streams' work evens out)

    def recursion_and_pk(self) -> None:
        """Stream 2: the paper's loss through the generations and its controls, the P×K diagnosis, then (once
        stream 1 has finished the table) the best loss's control of 2E in one schedule."""
        self.phase("generations", lambda: self.sweep("recursive_kd", "recursive", self.at(1)))
        for m in (2, 3):
            self.phase(f"one schedule of {m}E", lambda m=m: self.sweep("recursion_long", f"long-x{m}", self.at(m)))
        self.phase("P×K diagnosis", lambda: self.sweep("pk_batches", "pk", self.at(1), teacher=False))
        self.phase("BatchNorm re-estimation", lambda: recalibrate_all(os.path.join(self.runs, "pk")))
        best, case = self.phase("waiting for the face-KD table", lambda: self.best_case(wait=True))
        if best != "equivalent_angular":
            self.best_long(2, best, case)

    def report(self) -> int:
        return report.main([self.runs, "--out", self.out_doc, *(["--no-plot"] if self.no_plot else []),
                            *(["--readme", self.readme] if self.readme else [])])


STREAMS = {"prepare": ["prepare"], "curve": ["curve"], "curve-1": ["curve"], "curve-2": ["curve"],
           "1": ["table_and_best"], "2": ["recursion_and_pk"], "report": ["report"],
           "all": ["prepare", "curve", "table_and_best", "recursion_and_pk", "report"]}


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link of a finished stage's file (never rewritten in place: atomic writes replace it), else a copy."""
    import shutil
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def recalibrate(student: str, data, val: dict, batches: int, seed: int, k: int) -> dict:
    """A P×K-trained student's accuracy as trained, and after its BatchNorm running statistics are estimated
    again (cumulative average, no gradient) over `batches` shuffled batches and over as many P×K batches: if the
    shuffled estimate recovers the accuracy, P×K batches hurt through the statistics evaluation uses."""
    import torch

    from distill.eval.verification import evaluate_sets
    from distill.models.files import load_student, model_input_size
    from distill.train.epoch_plan import plan_epoch, plan_identity_epoch

    model, _ = load_student(student)
    size = model_input_size(model)
    out = {"as trained": evaluate_sets(model.eval(), val, size, progress=False)}
    plans = {"shuffled": plan_epoch(len(data), 64, seed, 0, True)[:batches],
             "P×K": plan_identity_epoch(data.labels(), 64, k, seed, 0, True)[:batches]}
    for name, plan in plans.items():
        model, _ = load_student(student)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
            m.train()
        with torch.no_grad():
            for batch in plan:
                model(torch.stack([data.item(i, f)[0] for i, f in batch]))
        out[f"re-estimated on {name} batches"] = evaluate_sets(model.eval(), val, size, progress=False)
    return {name: {s: m["acc_mean"] for s, m in metrics.items()} for name, metrics in out.items()}


def recalibrate_all(pk_dir: str, batches: int = 25) -> None:
    """recalibration.json beside the P×K points: every pk4 point's student, re-estimated (recalibrate)."""
    from distill.data import load_verification_bin, open_training_set
    from distill.eval.verification import set_name_of
    from distill.run.compare import load_run_config

    path = os.path.join(pk_dir, "recalibration.json")
    done = numbers.read_json(path) or {}
    for point in sorted(os.listdir(pk_dir)):
        student = os.path.join(pk_dir, point, "baseline", "student.pt")
        if "-pk4-seed=" not in point or point in done or not os.path.exists(student):
            continue
        cfg = load_run_config(os.path.join(pk_dir, point))
        data = open_training_set(cfg.data.train, flip=True, input_size=cfg.data.input_size)
        val = {set_name_of(p): load_verification_bin(p) for p in cfg.data.val}
        done[point] = recalibrate(student, data, val, batches, cfg.seed, cfg.data.images_per_id)
        atomic_write_json(path, done)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs", help="where every sweep writes its points (default runs)")
    p.add_argument("--out", default="docs/results.md", help="the report (default docs/results.md; plots beside it)")
    p.add_argument("--base", help="another experiment file for every arm instead of study.yaml (the tests' tiny one)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--pk-seeds", default="0,1,2,3,4",
                   help="the P×K diagnosis's seeds (default 0,1,2,3,4: its arms differ by a few points, which three "
                        "seeds did not separate; they include --seeds)")
    p.add_argument("--ijb-templates", type=int, default=600, help="synthetic IJB-C templates, two per person (600)")
    p.add_argument("--no-plot", action="store_true", help="write no PNGs")
    p.add_argument("--readme", help="also rewrite the study summary in this file (run_study.sh: README.md)")
    p.add_argument("--stream", choices=sorted(STREAMS), default="all",
                   help="a part of the study (run_study.sh runs prepare, then streams 1 and 2 side by side, then "
                        "report); default all, one after the other")
    p.add_argument("overrides", nargs="*", help="key=value for every run (e.g. train.max_steps=2 in a smoke test)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    pk_seeds = [int(s) for s in args.pk_seeds.split(",") if s.strip()]
    if not set(seeds) <= set(pk_seeds):
        p.error(f"--pk-seeds {args.pk_seeds} must include every seed of --seeds {args.seeds}")
    study = Study(args.runs, args.base, seeds, args.overrides, args.ijb_templates, args.stream, pk_seeds=pk_seeds)
    study.out_doc, study.no_plot, study.readme = args.out, args.no_plot, args.readme
    code = 0
    for part in STREAMS[args.stream]:
        if part == "report":
            code = study.report()
        elif part == "curve":
            study.curve(args.stream if args.stream in CURVE_HALVES else None)
        else:
            getattr(study, part)()
    return code


if __name__ == "__main__":
    sys.exit(main())
