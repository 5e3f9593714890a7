"""`distill run` end to end on a tiny synthetic experiment: recursion, resets, cache reuse, resume, summary."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tiny import tame
from tiny_experiment import tiny_experiment

from distill.cli import main
from distill.config.schema import load_config
from distill.run.context import run_logger, silent_logger
from distill.run.experiment import run_experiment
from distill.utils.checkpoint import safe_torch_load
from distill.utils.errors import ConfigError

# tiny_experiment's run on 16 x 16 images, with 6 steps a stage and checkpoints every 2 (the resume tests rely on both)
STEPS = {"max_steps": 6, "log_every": 2, "eval_every": 0, "checkpoint_every": 2}


def write_experiment(tmp_path, **changes) -> Path:
    changes = {"train": STEPS, "tracking": {"wandb": "disabled"}, **changes}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_experiment(tmp_path / "data", side=16, **changes)))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exp")
    path = write_experiment(tmp)
    logs = []
    summary = run_experiment(load_config(str(path)), str(tmp / "run"), progress=False, logger=run_logger(logs.append))
    return tmp, path, summary, logs


def test_summary_shape_and_values_match_each_stage(finished):
    tmp, _, summary, _ = finished
    on_disk = json.loads((tmp / "run" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["experiment"] == "tiny"
    assert [s["stage"] for s in on_disk["stages"]] == ["teacher", "baseline", "gen1", "gen2"]
    for s in on_disk["stages"]:
        assert set(s) == {"stage", "arch", "generation", "init_from", "params", "gflops", "train_seconds", "metrics",
                          "distill"}
        assert s["distill"] == {"teacher": "none", "baseline": "none"}.get(s["stage"], "equivalent_angular (alpha 7)")
        assert s["arch"] == ("iresnet18" if s["stage"] == "teacher" else "vargfacenet")
        stage_result = json.loads((tmp / "run" / s["stage"] / "result.json").read_text())
        m, r = s["metrics"]["synth_val"], stage_result["metrics"]["synth_val"]
        assert set(m) == {"acc_mean", "acc_std", "xnorm", "tar_at_far"}
        assert m["acc_mean"] == r["acc_mean"] and m["xnorm"] == r["xnorm"]
        assert 0 <= m["acc_mean"] <= 1 and s["params"] > 0 and s["gflops"] > 0
    assert [s["generation"] for s in on_disk["stages"]] == [0, 0, 1, 2]
    assert on_disk["stages"][3]["init_from"].endswith(os.path.join("gen1", "student.pt"))
    assert "| gen2 | vargfacenet | gen1/student.pt |" in (tmp / "run" / "summary.md").read_text()
    assert "| teacher | iresnet18 | - | 11." in (tmp / "run" / "summary.md").read_text()  # ~11.3M parameters
    backbone = torch.load(tmp / "run" / "teacher" / "backbone.pth", weights_only=True)
    assert "layer1.0.downsample.0.weight" in backbone  # arcface_torch layout


def test_generation_two_starts_from_generation_one_with_a_fresh_head(finished):
    tmp, path, _, _ = finished
    gen1 = safe_torch_load(tmp / "run" / "gen1" / "student.pt")["state_dict"]
    from distill.run.context import run_context
    from distill.run.experiment import open_data
    from distill.run.plan import plan_stages
    from distill.train.engine import run_stage
    cfg = load_config(str(path), ["train.max_steps=1"])
    spec = plan_stages(cfg, str(tmp / "run"))[2]
    assert spec.name == "gen2" and spec.head_from is None and spec.init_from.endswith("gen1/student.pt")
    # Build gen2's initial state exactly as the engine does: zero steps, weights must equal gen1's final ones.
    train_set, _ = open_data(cfg, run_context(cfg, str(tmp / "run"), logger=silent_logger()))
    probe = dict(vars(spec))
    probe["train"] = cfg.train.__class__(**{**vars(cfg.train), "max_steps": 1, "lr": 1e-12})
    from distill.train.engine import StageSpec
    run_stage(cfg, StageSpec(**probe), str(tmp / "probe"), train_set, {}, progress=False)
    start = safe_torch_load(tmp / "probe" / "student.pt")["state_dict"]
    weights = [k for k in gen1 if "running" not in k and "num_batches" not in k]
    assert all(torch.allclose(start[k], gen1[k], atol=1e-6) for k in weights)  # lr 1e-12: one no-op step
    gen1_head = safe_torch_load(tmp / "run" / "gen1" / "last.pt")["head_weight"]
    gen2_ck = safe_torch_load(tmp / "run" / "gen2" / "last.pt")
    probe_head = safe_torch_load(tmp / "probe" / "last.pt")["head_weight"]
    assert not torch.allclose(probe_head, gen1_head)  # the margin head starts fresh
    assert gen2_ck["optimizer"]["state"] and gen2_ck["step"] == 6  # its own optimizer state


def test_teacher_cache_built_once_and_reused(finished):
    tmp, path, _, logs = finished
    manifest = json.loads((tmp / "run" / "teacher_cache" / "manifest.json").read_text())
    assert manifest["rows_done"] == 72
    mtime = os.path.getmtime(tmp / "run" / "teacher_cache" / "embeddings.f16")
    logs2 = []
    run_experiment(load_config(str(path)), str(tmp / "run"), progress=False, logger=run_logger(logs2.append))
    assert os.path.getmtime(tmp / "run" / "teacher_cache" / "embeddings.f16") == mtime
    assert sum("finished earlier, skipped" in line for line in logs2) == 3  # baseline, gen1, gen2


class CrashAfter:
    """Delegates to a training set and raises after `n` items: a crash in the middle of a stage."""

    def __init__(self, dataset, n):
        self.dataset, self.n = dataset, n

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    def item(self, index, flip):
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt("simulated crash")
        return self.dataset.item(index, flip)


def test_interrupted_generation_resumes_to_the_same_weights(finished, tmp_path, monkeypatch):
    tmp, path, _, _ = finished
    run = tmp_path / "run"
    shutil.copytree(tmp / "run", run)
    shutil.rmtree(run / "gen2")
    (run / "summary.json").unlink()
    from distill.run import experiment as recursive
    open_data = recursive.open_data
    # 3 batches of 24 per epoch, checkpoints every 2 steps: crash inside step 5, after the step-4 checkpoint
    monkeypatch.setattr(recursive, "open_data", lambda cfg, ctx: (CrashAfter(open_data(cfg, ctx)[0], 24 * 4 + 5),
                                                                 open_data(cfg, ctx)[1]))
    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_config(str(path)), str(run), progress=False, logger=silent_logger())
    assert safe_torch_load(run / "gen2" / "last.pt")["step"] == 4 and not (run / "gen2" / "result.json").exists()
    monkeypatch.setattr(recursive, "open_data", open_data)
    logs = []
    run_experiment(load_config(str(path)), str(run), progress=False, logger=run_logger(logs.append))
    assert any("gen2: resuming from" in line and "step 4/6" in line for line in logs)
    resumed = safe_torch_load(run / "gen2" / "student.pt")["state_dict"]
    uninterrupted = safe_torch_load(tmp / "run" / "gen2" / "student.pt")["state_dict"]
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_a_differing_experiment_in_the_run_dir_is_refused(finished):
    tmp, path, _, _ = finished
    cfg = load_config(str(path), ["train.lr=0.5"])
    with pytest.raises(ConfigError, match=r"holds a different experiment \(train.lr: 0.1 -> 0.5\)"):
        run_experiment(cfg, str(tmp / "run"), progress=False, logger=silent_logger())


def test_dry_run_checks_without_writing(tmp_path, capsys):
    path = write_experiment(tmp_path)
    assert main(["run", str(path), "--dry-run", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "dry run passed" in out and "gen2 ok" in out
    assert not (tmp_path / "run").exists()


def test_missing_teacher_checkpoint_without_recipe_stops_before_training(tmp_path, capsys):
    path = write_experiment(tmp_path, teacher={"train": None, "checkpoint": str(tmp_path / "nope.pth")})
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "teacher.checkpoint" in err and "nope.pth" in err and "does not exist" in err
    assert not (tmp_path / "run" / "baseline").exists()


def test_paper_recipe_dry_run_on_synthetic_stand_ins(finished, tmp_path, capsys):
    """The paper's recipe as shipped (VarGFaceNet at 112, IResNet-100 teacher) passes --dry-run here (the MS1MV2
    variant differs only in data and teacher paths: test_config)."""
    from distill.models.iresnet import IResNet
    tmp, _, _, _ = finished
    torch.save(tame(IResNet(100)).state_dict(), tmp_path / "backbone.pth")
    repo = Path(__file__).resolve().parents[1]
    data = tmp / "data"
    args = ["run", str(repo / "experiments" / "vargfacenet_ms1m_retinaface.yaml"), "--dry-run",
            f"data.train={data}", f"data.val=[{data / 'synth_val.bin'}]",
            f"teacher.checkpoint={tmp_path / 'backbone.pth'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "teacher ok (iresnet100, 512-d at 112px)" in out and "gen2 ok" in out and "dry run passed" in out
    # a checkpoint of another depth is caught before anything trains (an IResNet-18's: a quarter of an IResNet-50's
    # bytes to write, and missing keys alike: every depth's blocks are named alike)
    torch.save(IResNet(18).state_dict(), tmp_path / "r18.pth")
    assert main(args[:-1] + [f"teacher.checkpoint={tmp_path / 'r18.pth'}"]) == 2
    assert "missing keys" in capsys.readouterr().err


def test_missing_training_data_stops_before_any_stage(tmp_path, capsys):
    path = write_experiment(tmp_path, data={"synthetic": None, "train": str(tmp_path / "faces_emore")})
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "data.train" in err and "faces_emore does not exist" in err
    assert not (tmp_path / "run" / "teacher").exists()
