"""The probe: bad invocations across the commands, each one clear line (exit 2, the text it names, no
traceback) with nothing written; and the benchmark scripts failing the same way. The cases that need more than
one invocation, or a check of what was (not) trained, are tests/test_bad_inputs.py."""

import pytest
from tiny_experiment import write_experiment

from distill.cli import main

# The probe: one-line refusals across the commands (the earlier rounds' and this one's). "{exp}" is a tiny
# experiment, "{dir}" the test's folder; each: exit 2, the text given, no traceback, nothing written but the
# files the test made.
PROBE = [
    (["run", "{dir}/missing.yaml"], "experiment file not found"),
    (["run", "{exp}", "train.lr"], "expected key.sub=value"),
    (["run", "{exp}", "train.lrr=1"], "did you mean 'train.lr'"),
    (["run", "{exp}", "margin.margin=arcfce"], "did you mean 'arcface'"),
    (["run", "{exp}", "distill.loss=equivalent_angulr"], "did you mean 'equivalent_angular'"),
    (["run", "{exp}", "student.arch=vargfacnet"], "did you mean 'vargfacenet'"),
    (["run", "{exp}", "teacher.arch=iresnet7"], "unknown model 'iresnet7'"),
    (["run", "{exp}", "train.optimizer=sgdd"], "did you mean 'sgd'"),
    (["run", "{exp}", "train.scheduler=cosin"], "did you mean 'cosine'"),
    (["run", "{exp}", "device=tpu"], "key 'device' must be auto, cpu, cuda or cuda:N"),
    (["run", "{exp}", "name=../evil"], "must not be empty or contain '/' or '..'"),
    (["run", "{exp}", "generations=-1"], "key 'generations' must be >= 0"),
    (["run", "{exp}", "data.input_size=0"], "key 'data.input_size' must be positive"),
    (["run", "{exp}", "student.embedding_size=0"], "key 'student.embedding_size' must be positive"),
    (["run", "{exp}", "train.amp=fp8"], "key 'train.amp' must be one of"),
    (["run", "{exp}", "train.lr=.nan"], "key 'train.lr' must be a finite number"),
    (["run", "{exp}", "data.images_per_id=1"], "must be 2 or more"),
    (["run", "{exp}", "data.images_per_id=5"], "must divide train.batch_size (24)"),
    (["run", "{exp}", "tracking.wandb=maybe"], "key 'tracking.wandb' must be one of"),
    (["run", "{exp}", "distill.project=cubic"], "key 'distill.project' must be one of none, linear"),
    (["run", "{exp}", "train.batch_size=abc"], "key 'train.batch_size' must be int, got 'abc'"),
    (["run", "{exp}", "student.multiplier=abc"], "key 'student.multiplier' must be float"),
    (["run", "{exp}", "data.prefetch_factor=0"], "key 'data.prefetch_factor' must be at least 1"),
    (["run", "{exp}", "data.train="], "key 'data.train' is required"),
    (["run", "{exp}", "margin.s=-1"], "scale s must be a positive number"),
    (["run", "{exp}", "margin.sample_rate=0"], "sample_rate must be in (0, 1]"),
    (["run", "{exp}", "teacher.checkpoint={dir}/missing.pth", "teacher.train=null"], "missing.pth does not exist"),
    (["run", "{dir}/dup.yaml"], "key 'name' is given twice in one mapping (first on line 1)"),
    (["run", "{dir}/list.yaml"], "must be a mapping of keys, got list"),
    (["run", "{dir}/bad.yaml"], "not valid YAML (line 2, column 1"),
    (["doctor", "{dir}/missing.yaml"], "experiment file not found"),
    (["sweep", "{dir}/missing.yaml"], "grid file not found"),
    (["eval", "{dir}/missing.pt", "--bin", "{dir}/x.bin"], "model file not found"),
    (["eval", "vargfacenet", "--bin", "{dir}/missing.bin"], "cannot read verification set"),
    (["ijb", "vargfacenet", "--root", "{dir}/nowhere"], "IJB folder not found"),
    (["profile", "nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["export", "{dir}/missing.pt", "{dir}/out.onnx"], "model file not found"),
    (["compare", "{dir}/nowhere"], "no such run directory"),
    (["data", "inspect", "{dir}/nowhere"], "not a dataset"),
    (["data", "reindex", "{dir}/nowhere"], "RecordIO file not found"),
    (["data", "pack", "{dir}", "{dir}/x.yaml"], "is a file; `distill data pack` writes a folder"),
    (["export", "vargfacenet", "{dir}/d.onnx"], "is a folder; give the .onnx file to write"),
]


@pytest.mark.parametrize("argv, says", PROBE, ids=[" ".join(a).replace("{exp}", "X") for a, _ in PROBE])
def test_the_probe_every_bad_invocation_is_one_clear_line(tmp_path, monkeypatch, capsys, argv, says):
    monkeypatch.chdir(tmp_path)
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", tracking={"wandb": "disabled"})
    (tmp_path / "dup.yaml").write_text("name: a\nname: b\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    (tmp_path / "d.onnx").mkdir()  # a folder where a file is meant
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main([a.replace("{exp}", str(exp)).replace("{dir}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


BENCH_MISTAKES = [
    ("bench_kd", ["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    ("bench_kd", ["--input-size", "8"], "argument --input-size: must be at least 16"),
    ("bench_data", ["--workers", "-1"], "argument --workers: must be at least 0, got -1"),
    ("bench_infer", ["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    ("bench_infer", ["--student", "missing.pt"], "missing.pt"),
    ("bench_eval", ["--pairs", "x"], "argument --pairs: expected a whole number, got 'x'"),
    ("bench_ijb", ["--workers", "-2"], "argument --workers: must be at least 0, got -2"),
    ("bench_cpu", ["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    ("gpu_check", ["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    ("bench_digest", ["--mb", "0"], "argument --mb: must be at least 1, got 0"),
]


@pytest.mark.parametrize("script, argv, says", BENCH_MISTAKES, ids=[f"{s} {' '.join(a)}" for s, a, _ in BENCH_MISTAKES])
def test_the_benchmark_scripts_fail_like_commands(script, argv, says, capsys, tmp_path, monkeypatch):
    import importlib.util

    from conftest import REPO
    monkeypatch.chdir(tmp_path)  # nothing they might write lands in the repository
    spec = importlib.util.spec_from_file_location(script, REPO / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        runner = getattr(module, "run_command", None) or module.run  # (bench_cpu has a run() of its own)
        code = runner(lambda: module.main(argv), script)
    except SystemExit as stop:  # argparse's refusal: one usage line and the error, exit 2
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
