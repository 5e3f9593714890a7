"""Distillation on intermediate feature maps (distill/losses/features.py, distill/train/feature_taps.py):
attention transfer on a hand-computed case, the maps a stage takes through feature_info hooks, a run that
trains and resumes bit-identically with an online teacher, and the config errors before any work."""

import math

import pytest
import torch
from tiny import TinyFaces, stop_at_first_checkpoint, tiny_config
from tiny_experiment import write_experiment

import teachers
from distill.config.schema import load_config
from distill.losses.distillation import DistillationObjective
from distill.losses.features import AttentionTransfer, attention_map
from distill.losses.registry import check_loss_options, requirements
from distill.models.registry import create_model
from distill.train.engine import StageSpec, run_stage
from distill.train.feature_taps import FeatureTaps
from distill.utils.checkpoint import safe_torch_load
from distill.utils.errors import ConfigError


def test_attention_map_and_loss_by_hand():
    # one image, 2 channels, a 1x2 map: |f|^2 averaged over channels = [(1+9)/2, (4+0)/2] = [5, 2]
    s = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    a = attention_map(s)
    assert torch.allclose(a, torch.tensor([[5.0, 2.0]]) / math.sqrt(29))
    # the teacher's attention (3 channels, other values) [1, 0] after normalising: |a_s - a_t|^2 summed over the
    # two positions, and by default (the authors' at_loss) averaged over them
    t = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]], [[1.0, 0.0]]]])
    summed = (5 / math.sqrt(29) - 1) ** 2 + (2 / math.sqrt(29)) ** 2
    assert AttentionTransfer(stages=(0,))([s], [t]).item() == pytest.approx(summed / 2, rel=1e-6)
    assert AttentionTransfer(stages=(0,), reduction="sum")([s], [t]).item() == pytest.approx(summed, rel=1e-6)
    # a batch of two: "mean" is over batch × positions, "sum" over positions then mean over the batch
    s2, t2 = torch.cat([s, s]), torch.cat([t, torch.ones(1, 3, 1, 2)])  # the second teacher: uniform, [1, 1]/√2
    uniform = (5 / math.sqrt(29) - 1 / math.sqrt(2)) ** 2 + (2 / math.sqrt(29) - 1 / math.sqrt(2)) ** 2
    assert AttentionTransfer(reduction="sum")([s2], [t2]).item() == pytest.approx((summed + uniform) / 2, rel=1e-6)
    assert AttentionTransfer()([s2], [t2]).item() == pytest.approx((summed + uniform) / 4, rel=1e-6)
    # two stages add; a teacher map of another size is pooled to the student's: [5, 2] vs mean of 2x2 -> 1x2
    big = torch.tensor([[[[2.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]]]])  # |f|^2 = [[4,0,0,0],[4,0,0,0]] -> [2, 0]
    assert AttentionTransfer()([s, s], [t, big]).item() == pytest.approx(summed, rel=1e-6)
    assert requirements("attention_transfer").feature_maps
    with pytest.raises(ValueError, match="reduction must be one of mean, sum, got 'max'"):
        AttentionTransfer(reduction="max")
    with pytest.raises(ConfigError, match=r"key 'distill.terms\[1\]': distillation loss 'attention_transfer' refuses "
                                          r"these options: .*reduction must be one of mean, sum, got 'max'"):
        check_loss_options("attention_transfer", {"reduction": "max"}, "distill.terms[1]")  # as the config load does


def test_the_objective_adds_alpha_times_the_feature_loss():
    class ConstantHead(torch.nn.Module):  # classification loss 1
        def forward(self, emb, labels):
            return emb.sum() * 0 + 1.0, {}

    objective = DistillationObjective(ConstantHead(), loss="attention_transfer", alpha=3.0)
    s, t = torch.rand(2, 4, 3, 3), torch.rand(2, 8, 3, 3)
    total, logs = objective(torch.rand(2, 5), torch.zeros(2, dtype=torch.long), torch.rand(2, 7), maps=([s], [t]))
    expected = AttentionTransfer()([s], [t])
    assert logs["loss_kd/attention_transfer"].item() == pytest.approx(expected.item())
    assert total.item() == pytest.approx(1 + 3 * expected.item())
    with pytest.raises(ConfigError, match="feature maps"):
        objective(torch.rand(2, 5), torch.zeros(2, dtype=torch.long), torch.rand(2, 7))


def test_taps_take_the_maps_forward_intermediates_gives_and_come_off():
    student = create_model("vargfacenet", input_size=32, embedding_size=16, multiplier=0.25, last_channels=32,
                           units=[1, 1, 1]).eval()
    teacher = teachers.build_teacher({"arch": "iresnet18", "input_size": 32, "embedding_size": 16})
    x = torch.randn(2, 3, 32, 32)
    taps = FeatureTaps(student, teacher, (-2, -1))
    with torch.no_grad():
        student(x), teacher(x)
        s_maps, t_maps = taps.read()
        want = student.forward_intermediates(x, [-2, -1], intermediates_only=True)
        assert [m.shape for m in s_maps] == [m.shape for m in want]
        assert torch.equal(t_maps[1], teacher.model.forward_intermediates(x, [-1], intermediates_only=True)[0])
    taps.read()  # (forward_intermediates runs the hooked modules too)
    taps.remove()
    student(x)
    assert taps.maps["student"] == {}  # no hook left
    with pytest.raises(ConfigError, match=r"stage 7 of the student \(VarGFaceNet\): it has 4 feature stages"):
        FeatureTaps(student, teacher, (7,))


def _spec(cfg):
    return StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=5.0, generation=1)


def test_a_stage_with_attention_transfer_trains_and_resumes_bit_identically(tmp_path, monkeypatch):
    cfg = tiny_config(distill={"loss": "attention_transfer"}, teacher={"cache": False},
                      train={"max_steps": 6, "checkpoint_every": 2})
    torch.manual_seed(5)
    teacher = teachers.build_teacher(cfg.teacher.spec())
    whole = run_stage(cfg, _spec(cfg), str(tmp_path / "whole"), TinyFaces(), {}, teacher=teacher, progress=False)
    assert whole["steps"] == 6 and not teacher.model._forward_hooks and not any(
        m._forward_hooks for m in teacher.model.modules())  # the hooks came off with the stage
    lines = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    assert all('"train/loss_kd/attention_transfer"' in line for line in lines if '"train/loss"' in line)
    stop_at_first_checkpoint(cfg, _spec(cfg), tmp_path / "resumed", monkeypatch, teacher=teacher)
    run_stage(cfg, _spec(cfg), str(tmp_path / "resumed"), TinyFaces(), {}, teacher=teacher, progress=False)
    a = safe_torch_load(tmp_path / "whole" / "student.pt")["state_dict"]
    b = safe_torch_load(tmp_path / "resumed" / "student.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_feature_loss_with_a_cache_or_an_onnx_teacher_is_refused_when_the_config_loads(tmp_path):
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces")
    with pytest.raises(ConfigError, match=r"distill.loss attention_transfer.*teacher.cache: false"):
        load_config(str(exp), ["distill.loss=attention_transfer"])
    onnx = tmp_path / "t.onnx"
    onnx.write_bytes(b"stand-in")
    with pytest.raises(ConfigError, match="ONNX file does not give"):
        load_config(str(exp), ["distill.loss=attention_transfer", "teacher.arch=null", "teacher.train=null",
                               f"teacher.onnx={onnx}", "teacher.cache=false"])
    cfg = load_config(str(exp), ["distill.loss=attention_transfer", "teacher.cache=false"])
    assert cfg.distill.loss == "attention_transfer"


def test_fitnet_by_hand_and_its_regressor_trains_resumes_and_stays_out_of_student_pt(tmp_path, monkeypatch):
    from distill.losses.features import FitNet
    fit = FitNet(stages=(0,))
    fit.build([1], [2])
    with torch.no_grad():  # regressor: channel 0 = 2x, channel 1 = -x; BN in eval mode with its initial stats
        fit.regressors[0][0].weight.copy_(torch.tensor([[[[2.0]]], [[[-1.0]]]]))
    fit.eval()
    s = torch.tensor([[[[1.0, 3.0]]]])  # (1, 1, 1, 2)
    t = torch.tensor([[[[2.0, 5.0]], [[0.0, -3.0]]]])  # regressed: [[2, 6], [-1, -3]] / sqrt(1 + 1e-5)
    k = 1 / math.sqrt(1 + 1e-5)
    expected = ((2 * k - 2) ** 2 + (6 * k - 5) ** 2 + (-k - 0) ** 2 + (-3 * k + 3) ** 2) / 4
    assert fit([s], [t]).item() == pytest.approx(expected, rel=1e-5)
    # a stage: the regressor is trained with the student, kept in last.pt, never in student.pt; resume is exact
    cfg = tiny_config(distill={"loss": "fitnet"}, teacher={"cache": False},
                      train={"max_steps": 6, "checkpoint_every": 2})
    torch.manual_seed(5)
    teacher = teachers.build_teacher(cfg.teacher.spec())
    run_stage(cfg, _spec(cfg), str(tmp_path / "whole"), TinyFaces(), {}, teacher=teacher, progress=False)
    last = safe_torch_load(tmp_path / "whole" / "last.pt")
    student = safe_torch_load(tmp_path / "whole" / "student.pt")["state_dict"]
    assert not [k for k in student if "regressor" in k]
    assert "distill_loss.regressors.0.0.weight" in last["objective"]  # the regressor is objective state in last.pt
    assert last["objective"]["distill_loss.regressors.0.1.running_var"].ne(1).any()  # and it ran in training
    stop_at_first_checkpoint(cfg, _spec(cfg), tmp_path / "resumed", monkeypatch, teacher=teacher)
    run_stage(cfg, _spec(cfg), str(tmp_path / "resumed"), TinyFaces(), {}, teacher=teacher, progress=False)
    b = safe_torch_load(tmp_path / "resumed" / "student.pt")["state_dict"]
    assert all(torch.equal(student[k], b[k]) for k in student)


def test_a_timm_backbone_teacher_gives_its_feature_maps_to_the_hooks():
    student = create_model("vargfacenet", input_size=32, embedding_size=16, multiplier=0.25, last_channels=32,
                           units=[1, 1, 1]).eval()
    teacher = teachers.build_teacher({"arch": "timm/resnet18", "input_size": 32, "embedding_size": 16})
    info = teacher.model.feature_info
    assert [f["module"] for f in info][-1] == "backbone.layer4" and info[-1]["num_chs"] == 512
    x = torch.randn(2, 3, 32, 32)
    with FeatureTaps(student, teacher, (-1,)) as taps, torch.no_grad():
        student(x), teacher(x)
        _, (t_map,) = taps.read()
    assert t_map.shape == (2, 512, 1, 1)  # resnet18's last stage at 32 px (reduction 32)
