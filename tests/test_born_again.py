"""recursive.teacher: previous (born-again networks, Furlanello et al., ICML 2018): generation k distils from
generation k-1's frozen student, through a cache of that student's embeddings, and resumes bit-identically."""

import json
import shutil

import pytest
import torch
from tiny_experiment import write_experiment

import distill.train.engine
from distill.config.schema import load_config
from distill.data import open_training_set
from distill.models.files import load_student
from distill.run.context import silent_logger
from distill.run.experiment import run_experiment
from distill.utils.checkpoint import safe_torch_load
from distill.utils.errors import ConfigError
from teachers.cache import TeacherCache


@pytest.fixture(scope="module")
def born_again(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("born_again")
    exp = write_experiment(tmp / "x.yaml", tmp / "faces", side=16, generations=2, baseline=False,
                           tracking={"wandb": "disabled"}, train={"eval_every": 0})
    cfg = load_config(str(exp), ["recursive.teacher=previous"])
    summary = run_experiment(cfg, str(tmp / "run"), progress=False, logger=silent_logger())
    return tmp, cfg, summary


def test_generation_two_learns_from_generation_one_through_its_embeddings(born_again):
    tmp, cfg, summary = born_again
    stages = {s["stage"]: s for s in summary["stages"]}
    assert "teacher_stage" not in stages["gen1"] and stages["gen2"]["teacher_stage"] == "gen1"
    assert "equivalent_angular (alpha 7) from gen1" in (tmp / "run" / "summary.md").read_text()
    # gen2's cache holds gen1's student's embeddings of every training image, original and flipped
    model, _ = load_student(str(tmp / "run" / "gen1" / "student.pt"))
    model.eval()
    data = open_training_set(cfg.data.train, flip=True, input_size=cfg.data.input_size)
    cache = TeacherCache(str(tmp / "run" / "gen1" / "as_teacher_cache"), len(data), cfg.student.embedding_size)
    with torch.no_grad():
        for flip in (False, True):
            x = torch.stack([data.get(i, flip) for i in range(len(data))])
            expected = model(x).float()
            got = torch.from_numpy(cache.emb[:, int(flip)].astype("float32"))
            torch.testing.assert_close(got, expected, rtol=5e-3, atol=5e-3)  # stored in float16
    # gen1 learnt from the experiment's teacher: its cache is the teacher's, not a student's
    assert (tmp / "run" / "teacher_cache" / "manifest.json").exists()


def test_an_interrupted_born_again_generation_resumes_bit_identically(born_again, tmp_path, monkeypatch):
    tmp, cfg, _ = born_again
    run = tmp_path / "run"
    shutil.copytree(tmp / "run", run, ignore=shutil.ignore_patterns("gen2", "as_teacher_cache", "summary.*"))
    real = distill.train.engine.save_state

    def stop_gen2(st):
        real(st)
        if st.spec.name == "gen2":
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(distill.train.engine, "save_state", stop_gen2)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(cfg, str(run), progress=False, logger=silent_logger())
    assert not (run / "gen2" / "result.json").exists() and (run / "gen2" / "last.pt").exists()
    run_experiment(cfg, str(run), progress=False, logger=silent_logger())
    a = safe_torch_load(tmp / "run" / "gen2" / "student.pt")["state_dict"]
    b = safe_torch_load(run / "gen2" / "student.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run / "gen2" / "result.json").read_text())["teacher_stage"] == "gen1"


def test_previous_needs_a_teacher_for_generation_one(tmp_path):
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16)
    with pytest.raises(ConfigError, match=r"recursive.teacher' is previous .* no teacher for generation 1"):
        load_config(str(exp), ["recursive.teacher=previous", "teacher=null"])
    with pytest.raises(ConfigError, match=r"key 'recursive.teacher' must be one of fixed, previous"):
        load_config(str(exp), ["recursive.teacher=chain"])
