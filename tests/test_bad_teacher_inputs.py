"""Teacher inputs that used to train silently wrong or fail far from their cause, each refused in one line before
any work, and the timm teacher as the README documents it: teacher.head files of integer, non-finite, all-zero or
misshapen centres; the legacy-teacher upgrader firing on a current timm spec; an override of teacher.arch losing
the file's teacher keys; train.threads past the machine; an export at a size the model's fc cannot take."""

import os

import pytest
import torch
from tiny import TINY_STUDENT
from tiny_experiment import write_experiment

from distill.cli import main
from distill.compat import upgrade_legacy_teacher
from distill.config.schema import load_config
from distill.utils.errors import ConfigError
from teachers.head_file import load_centres

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMM_TEACHER = {"arch": "timm/resnet10t", "embedding_size": 32, "input_size": 16, "pretrained": False}

# ------------------------------------------------------------------------------------------- teacher.head


@pytest.mark.parametrize("centres, says", [
    (torch.randint(-1, 2, (12, 32)), r"holds int64 centres, not floats"),
    (torch.randn(12, 32).to(torch.int32), r"holds int32 centres, not floats"),
    (torch.zeros(12, 32), r"holds 12 all-zero centres of 12 \(first: row 0\); a centre needs a direction"),
    (torch.cat([torch.randn(5, 32), torch.zeros(1, 32), torch.randn(6, 32)]), r"holds 1 all-zero centres of 12 "
                                                                             r"\(first: row 5\)"),
    (torch.full((12, 32), float("inf")), r"holds non-finite centres"),
    (torch.randn(11, 32), r"holds centres of 11 identities, data.train has 12"),
    (torch.randn(12, 16), r"holds 16-d centres, the teacher's embeddings are 32-d"),
], ids=["int64", "int32", "all zero", "one zero row", "inf", "rows", "columns"])
def test_a_teacher_head_that_would_train_wrong_is_refused_naming_the_file(tmp_path, centres, says):
    path = tmp_path / "head.pt"
    torch.save({"weight": centres}, path)
    with pytest.raises(ConfigError, match=says) as caught:
        load_centres(str(path), 12, 32)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    torch.save(torch.randn(12, 32).half(), path)  # float16 centres are floats: read, as float32
    assert load_centres(str(path), 12, 32).dtype == torch.float32


def test_distill_run_refuses_an_integer_teacher_head_before_training(tmp_path, capsys):
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16, tracking={"wandb": "disabled"})
    head = tmp_path / "head.pt"
    torch.save((torch.randn(12, 32) * 3).long(), head)  # a float head cast to integers: centres mostly 0, ±1..±9
    out = tmp_path / "run"
    assert main(["run", str(exp), "--out", str(out), "--no-progress", "distill.loss=kd", f"teacher.head={head}"]) == 2
    err = capsys.readouterr().err
    assert f"teacher.head: {head} holds int64 centres, not floats" in err and "Traceback" not in err
    assert not (out / "teacher").exists()  # nothing trained


# ------------------------------------------------------------------------------------------- the timm teacher

def test_the_legacy_upgrader_leaves_a_current_timm_spec_alone_and_still_upgrades_the_old_form():
    # what a trained timm teacher's stage hands teachers.build_teacher: model_kwargs is timm/<name>'s argument
    current = {"arch": "timm/resnet10t", "checkpoint": "teacher/backbone.pth", **TIMM_TEACHER, "model_kwargs": None}
    assert upgrade_legacy_teacher(current) == (current, None)
    spec, note = upgrade_legacy_teacher({"kind": "timm", "name": "resnet10t", "embedding_size": 32})
    assert spec == {"arch": "timm/resnet10t", "embedding_size": 32}
    assert note == "teacher: 'kind: timm' is deprecated; write arch: timm/resnet10t"
    spec, note = upgrade_legacy_teacher({"depth": 50, "model_kwargs": {}})  # no kind: the old default, iresnet
    assert spec == {"arch": "iresnet50"} and "write arch: iresnet50" in note


def test_an_override_of_teacher_arch_keeps_the_teacher_keys_the_new_model_takes(tmp_path):
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16,
                           teacher={"dropout": 0.1, "train": {"max_steps": 3}})
    teacher = load_config(str(exp), ["teacher.arch=timm/resnet10t"]).teacher
    assert teacher.arch == "timm/resnet10t" and teacher.train.max_steps == 3
    assert (teacher.embedding_size, teacher.input_size) == (32, 16)  # the file's, not timm/resnet10t's 512 and 112
    assert "dropout" not in teacher.model  # an IResNet argument the timm model does not take
    vgf = load_config(str(exp), ["teacher.arch=vargfacenet"]).teacher.model
    assert (vgf["embedding_size"], vgf["input_size"], vgf["dropout"]) == (32, 16, 0.1)  # all three taken


def test_the_readmes_timm_teacher_trains_and_teaches(tmp_path, capsys):
    """README, quickstart step 2: `teacher.arch: timm/<name>` works; here as the override the README's recipe
    takes, on the tiny experiment: the teacher trained (stage 0), reloaded as the frozen teacher, one student."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        assert "backbone (`teacher.arch: timm/<name>`) works too" in f.read()
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16, tracking={"wandb": "disabled"},
                           generations=1, baseline=False, student=dict(TINY_STUDENT))
    out = tmp_path / "run"
    assert main(["run", str(exp), "--out", str(out), "--no-progress", "teacher.arch=timm/resnet10t",
                 "teacher.pretrained=false", "teacher.train.max_steps=1", "train.max_steps=1",
                 "train.eval_every=0"]) == 0
    captured = capsys.readouterr()
    assert "deprecated" not in captured.err and "Traceback" not in captured.err
    assert "| teacher | timm/resnet10t |" in captured.out
    assert (out / "gen1" / "student.pt").exists()


# ------------------------------------------------------------------------------------------- threads

@pytest.mark.parametrize("key", ["train.threads", "teacher.train.threads"])
def test_a_thread_count_past_the_machine_is_refused_at_config_load(tmp_path, capsys, key):
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16)
    bound = (os.cpu_count() or 1) * 4
    with pytest.raises(ConfigError, match=rf"key '{key}' must be at most {bound:,} \(this machine's "
                                          rf"{os.cpu_count() or 1} cores × 4"):
        load_config(str(exp), [f"{key}=100000"])
    assert load_config(str(exp), [f"{key}={bound}"]) is not None
    assert main(["run", str(exp), "--out", str(tmp_path / "run"), "--dry-run", f"{key}=100000"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "at most" in err and "Traceback" not in err


def test_a_thread_count_past_the_machine_is_refused_from_a_flag_or_the_environment():
    from distill.utils.threads import max_threads, plan_threads
    with pytest.raises(ConfigError, match=rf"--threads 100000: at most {max_threads():,} "):
        plan_threads(0, override=100000, key="--threads", environ={})
    with pytest.raises(ConfigError, match=r"OMP_NUM_THREADS 100000: at most"):
        plan_threads(0, environ={"OMP_NUM_THREADS": "100000"})


# ------------------------------------------------------------------------------------------- export

def test_export_at_a_size_the_student_was_not_built_for_is_one_line(tmp_path, capsys):
    from distill.models.files import save_student
    from distill.registry import create_model

    kwargs = {k: v for k, v in TINY_STUDENT.items() if k != "arch"}
    model = create_model("vargfacenet", input_size=16, **kwargs)
    save_student(tmp_path / "student16.pt", model, "vargfacenet")
    onnx = tmp_path / "o.onnx"
    assert main(["export", str(tmp_path / "student16.pt"), str(onnx), "--input-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "mat1 and mat2" not in err and "Traceback" not in err
    [line] = [line for line in err.splitlines() if "error" in line]
    assert line.startswith("distill export: error: ") and "built for 16x16 input" in line
    assert "--input-size 32" in line and "drop --input-size" in line
    assert not onnx.exists() and not os.path.exists(f"{onnx}.tmp")
