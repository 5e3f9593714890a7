"""The run plan (distill/run/plan.py: what `distill run` executes and `--dry-run` prints) and the run context's
logger (distill/run/context.py). Nothing here trains: the plan reads only the config and the run directory's path."""

import io
import sys

from tiny_experiment import write_experiment

from distill.config.schema import load_config
from distill.run import context
from distill.run.plan import (
    IJB,
    LOAD_TEACHER,
    STUDENT,
    TEACHER_CACHE,
    TRACKING,
    TRAIN_TEACHER,
    describe_plan,
    plan_run,
    plan_stages,
)


def _cfg(tmp_path, *overrides, **changes):
    return load_config(str(write_experiment(tmp_path / "x.yaml", tmp_path / "faces", **changes)), list(overrides))


def _shape(stages) -> list:
    return [(s.name, s.kind, s.teacher, s.cached) for s in stages]


def test_a_trained_teacher_its_cache_and_the_students_in_execution_order(tmp_path):
    cfg = _cfg(tmp_path, "baseline=true", "teacher.cache=true")
    stages = plan_run(cfg, str(tmp_path / "run"))
    assert _shape(stages) == [("teacher", TRAIN_TEACHER, None, False), ("teacher_cache", TEACHER_CACHE, None, False),
                              ("baseline", STUDENT, None, False), ("gen1", STUDENT, "teacher", True),
                              ("gen2", STUDENT, "teacher", True)]
    assert [s.spec for s in stages if s.kind == STUDENT] == plan_stages(cfg, str(tmp_path / "run"))
    teacher = stages[0].spec
    assert (teacher.name, teacher.arch, teacher.alpha) == ("teacher", "iresnet18", 0.0)
    assert teacher.train == cfg.teacher.train
    assert all(s.hooks == (TRACKING,) for s in stages if s.kind != TEACHER_CACHE) and stages[1].hooks == ()


def test_the_plan_follows_the_config(tmp_path):
    (tmp_path / "teacher.pt").write_bytes(b"")  # a loaded teacher: the plan names its file, loads nothing
    loaded = plan_run(_cfg(tmp_path, f"teacher.checkpoint={tmp_path / 'teacher.pt'}", "teacher.cache=false",
                           "baseline=false"), "run")
    assert _shape(loaded) == [("teacher", LOAD_TEACHER, None, False), ("gen1", STUDENT, "teacher", False),
                              ("gen2", STUDENT, "teacher", False)]
    chain = plan_run(_cfg(tmp_path, "recursive.teacher=previous", "generations=3", "baseline=false"), "run")
    assert [(s.name, s.teacher) for s in chain if s.kind == STUDENT] == [("gen1", "teacher"), ("gen2", "gen1"),
                                                                       ("gen3", "gen2")]
    alone = plan_run(_cfg(tmp_path, "baseline=false", teacher=None, generations=1), "run")
    assert _shape(alone) == [("gen1", STUDENT, None, False)]


def test_the_printed_plan_says_what_each_stage_does_and_its_hooks(tmp_path):
    cfg = _cfg(tmp_path, "teacher.cache=true", "baseline=true", "tracking.wandb=disabled")
    lines = describe_plan(cfg, plan_run(cfg, "runs/tiny"))
    assert lines[0].startswith("1. teacher: train iresnet18 (") and "as stage 0" in lines[0]
    assert lines[1] == "2. teacher_cache: the teacher's embeddings of every training image and its flip"
    assert lines[2] == "3. baseline: train vargfacenet from scratch, no distillation; then tracking (W&B disabled)"
    assert lines[4].startswith("5. gen2: train vargfacenet from runs/tiny/gen1/student.pt, distilling from the "
                               "teacher (cached) with ")
    stage = plan_run(cfg, "runs/tiny")[2]
    assert IJB not in stage.hooks  # no data.ijb: no IJB hook


def test_the_run_logger_prints_plain_lines_and_other_ranks_are_silent(tmp_path, capsys, monkeypatch):
    log = context.run_logger()
    log.info("gen1: finished earlier, skipped")
    log.info("\nsummary")
    assert capsys.readouterr().out == "gen1: finished earlier, skipped\n\nsummary\n"  # the current stdout, no prefix
    lines = []
    context.run_logger(lines.append).info("a line")
    assert lines == ["a line"]
    context.silent_logger().info("nothing")
    assert capsys.readouterr().out == ""
    cfg = _cfg(tmp_path, "device=cpu")
    ctx = context.run_context(cfg, str(tmp_path / "run"), progress=True)
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.progress) == (0, 1, True, True)
    assert ctx.run_dir == str(tmp_path / "run") and ctx.device.type == "cpu"
    monkeypatch.setattr("distill.utils.dist.rank", lambda: 1)
    other = context.run_context(cfg, str(tmp_path / "run"), progress=True, logger=context.run_logger(lines.append))
    other.log.info("from rank 1")
    assert not other.is_main and not other.progress and lines == ["a line"]
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a replaced stdout gets the lines of a logger made before
    log.info("late")
    assert sys.stdout.getvalue() == "late\n"


def test_distill_run_executes_the_plan_it_is_given(tiny_finished_run, tmp_path, monkeypatch):
    """A rerun of a finished run walks the plan: each finished stage is skipped in plan order; a stage the plan
    leaves out is neither run nor summarised."""
    import shutil

    from distill.run import experiment

    exp, finished, _ = tiny_finished_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    cfg = load_config(str(exp))
    lines = []
    summary = experiment.run_experiment(cfg, str(run), progress=False, logger=context.run_logger(lines.append))
    planned = [s.name for s in plan_run(cfg, str(run)) if s.kind != TEACHER_CACHE]
    assert [s["stage"] for s in summary["stages"]] == planned == ["teacher", "baseline", "gen1"]
    assert [ln.split(":")[0] for ln in lines if "finished earlier, skipped" in ln] == ["baseline", "gen1"]
    real = experiment.plan_run
    monkeypatch.setattr(experiment, "plan_run", lambda *a: [s for s in real(*a) if s.name != "baseline"])
    lines.clear()
    summary = experiment.run_experiment(cfg, str(run), progress=False, logger=context.run_logger(lines.append))
    assert [s["stage"] for s in summary["stages"]] == ["teacher", "gen1"]
    assert not any(ln.startswith("baseline") for ln in lines)
