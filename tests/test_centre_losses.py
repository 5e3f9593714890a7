"""The teacher's class centres (distill/losses/centres.py): the files teacher.head accepts and refuses, KD on margin
logits, MarginDistillation's per-sample margins and ProxylessKD's inherited head on hand-computed cases, stages
that resume bit-identically, two gloo ranks holding halves of the centres equal to one process, and the config
errors before any work."""

import math
import os

import pytest
import torch
from forked_ranks import gloo_ranks
from tiny import tiny_config, whole_and_resumed
from tiny_experiment import write_experiment

from distill.config.schema import load_config
from distill.losses.distillation import DistillationObjective, create_distill_loss
from distill.losses.heads import create_head
from distill.losses.registry import check_loss_options
from distill.train.engine import StageSpec
from distill.utils.errors import ConfigError, UnsafeFileError
from teachers.head_file import load_centres

# ------------------------------------------------------------------------------------------- the files

def test_teacher_head_files_in_every_accepted_layout(tmp_path):
    w = torch.randn(6, 4)
    torch.save(w, tmp_path / "tensor.pt")
    torch.save({"weight": w}, tmp_path / "state.pt")
    torch.save({"head_weight": w, "step": 3}, tmp_path / "last.pt")
    for rank, rows in enumerate((w[:3], w[3:])):  # arcface_torch's partial FC: contiguous class blocks per rank
        torch.save({"state_dict_softmax_fc": {"weight": rows}, "epoch": 1}, tmp_path / f"checkpoint_gpu_{rank}.pt")
    for name in ("tensor.pt", "state.pt", "last.pt", "checkpoint_gpu_*.pt"):
        assert torch.equal(load_centres(str(tmp_path / name), 6, 4), w), name
    with pytest.raises(ConfigError, match=r"holds centres of 6 identities, data.train has 7"):
        load_centres(str(tmp_path / "tensor.pt"), 7)
    with pytest.raises(ConfigError, match=r"holds 4-d centres, the teacher's embeddings are 8-d"):
        load_centres(str(tmp_path / "tensor.pt"), 6, 8)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"other.pt: holds no class centres \(keys something\)"):
        load_centres(str(tmp_path / "other.pt"), 6)
    torch.save(torch.randn(6), tmp_path / "vector.pt")
    with pytest.raises(ConfigError, match=r"must be a \(classes, embedding\) matrix, got \(6,\)"):
        load_centres(str(tmp_path / "vector.pt"), 6)
    with pytest.raises(ConfigError, match="does not exist"):
        load_centres(str(tmp_path / "missing_*.pt"), 6)
    torch.save({"weight": w, "hook": os.system}, tmp_path / "code.pt")  # a pickled global: code, refused
    with pytest.raises(UnsafeFileError, match="code.pt: refused to load"):
        load_centres(str(tmp_path / "code.pt"), 6)


# ------------------------------------------------------------------------------------------- the losses

def _head(weight, s=16.0, m=0.3):
    head = create_head("arcface", weight.shape[1], weight.shape[0], s=s, m=m).double()
    head.load_full_weight(weight)
    return head


def test_kd_by_hand():
    centres = torch.eye(2, dtype=torch.float64)
    kd = create_distill_loss("kd", temperature=1.0, scale=2.0)
    kd.set_centres(centres, _head(centres))
    s, t = torch.tensor([[3.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, 5.0]], dtype=torch.float64)
    # z_s = (2, 0), z_t = (0, 2): log p_t − log p_s = (−2, 2), KL = 2 (e² − 1) / (e² + 1) = 2 tanh(1)
    assert kd(s, t).item() == pytest.approx(2 * math.tanh(1))
    hot = create_distill_loss("kd", temperature=2.0, scale=4.0)  # same z / τ, times τ²
    hot.set_centres(centres, _head(centres))
    assert hot(s, t).item() == pytest.approx(4 * 2 * math.tanh(1))
    same = kd(t, t)
    assert same.item() == pytest.approx(0.0, abs=1e-12)
    student = s.clone().requires_grad_()
    teacher = t.clone().requires_grad_()
    kd(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="needs the teacher's class centres"):
        create_distill_loss("kd")(s, t)


def test_margin_distillation_margins_and_loss_by_hand():
    centres = torch.eye(3, dtype=torch.float64)
    head = _head(torch.randn(3, 3, dtype=torch.float64))
    md = create_distill_loss("margin_distillation")
    md.set_centres(centres, head)
    assert torch.equal(head.weight.detach(), centres)  # the student's centres start as the teacher's
    labels = torch.tensor([0, 1, 2])
    # teacher cosines to the sample's centre: 1, 0.5, 0 -> m = 0.2 + 0.3 · c / 1 = 0.5, 0.35, 0.2
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, math.sqrt(0.75)], [1.0, 0.0, 0.0]], dtype=torch.float64)
    margins = md.margins(head, labels, teacher)
    torch.testing.assert_close(margins, torch.tensor([0.5, 0.35, 0.2], dtype=torch.float64))
    student = torch.randn(3, 3, dtype=torch.float64)
    objective = DistillationObjective(head, loss="margin_distillation", alpha=1.0)
    objective.distill_loss = md
    total, logs = objective(student, labels, teacher)
    # the batch's loss is the mean of each sample's ArcFace loss at its own margin
    each = [_head(centres, m=float(m))(student[i:i + 1], labels[i:i + 1])[0] for i, m in enumerate(margins)]
    assert total.item() == pytest.approx(sum(e.item() for e in each) / 3)
    assert "loss_kd/margin_distillation" not in logs and logs["md_margin"].item() == pytest.approx(0.35)


def test_margin_distillation_freezes_the_teachers_centres_unless_train_centres():
    centres = torch.randn(3, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0])
    student, teacher = torch.randn(4, 3, dtype=torch.float64, requires_grad=True), centres[labels]
    for train_centres in (False, True):  # false: the authors' fixed_param_names; true: trained with the student
        head = _head(torch.randn(3, 3, dtype=torch.float64))
        objective = DistillationObjective(head, loss="margin_distillation", alpha=1.0, train_centres=train_centres)
        objective.distill_loss.set_centres(centres, head)
        assert torch.equal(head.weight.detach(), centres) and head.weight.requires_grad is train_centres
        objective(student, labels, teacher)[0].backward()
        assert (head.weight.grad is not None) is train_centres
    with pytest.raises(ValueError, match="margin_max must be one of device, global, got 'batch'"):
        create_distill_loss("margin_distillation", margin_max="batch")
    with pytest.raises(ConfigError, match=r"key 'distill.loss': distillation loss 'margin_distillation' refuses these "
                                          r"options: .*margin_max must be one of device, global, got 'batch'"):
        check_loss_options("margin_distillation", {"margin_max": "batch"}, "distill.loss")  # as the config load does
    with pytest.raises(ConfigError, match=r"key 'distill.loss.train_centres': distillation loss 'margin_distillation' "
                                          r"takes true or false for train_centres \(default False\), got 'no'"):
        check_loss_options("margin_distillation", {"train_centres": "no"}, "distill.loss")


def test_proxyless_kd_trains_against_the_teachers_frozen_head():
    centres = torch.randn(4, 3, dtype=torch.float64)
    head = _head(torch.randn(4, 3, dtype=torch.float64))
    objective = DistillationObjective(head, loss="proxyless_kd", alpha=1.0)
    objective.distill_loss.set_centres(centres, head)
    assert torch.equal(head.weight.detach(), centres) and not head.weight.requires_grad
    student = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    total, _ = objective(student, torch.tensor([0, 1, 2, 3, 0]), torch.randn(5, 3, dtype=torch.float64))
    total.backward()
    assert head.weight.grad is None and student.grad.abs().sum() > 0
    torch.testing.assert_close(total, _head(centres)(student, torch.tensor([0, 1, 2, 3, 0]))[0])


# ------------------------------------------------------------------------------------------- stages

@pytest.mark.parametrize("loss", ["kd", "margin_distillation", "proxyless_kd"])
def test_a_stage_with_the_teachers_centres_resumes_bit_identically(tmp_path, monkeypatch, loss):
    from tiny import tame

    import teachers
    torch.manual_seed(3)
    centres = torch.randn(8, 32)  # TinyFaces: 8 identities; the teacher's 32-d space
    torch.save({"weight": centres}, tmp_path / "head.pt")
    cfg = tiny_config(distill={"loss": loss, "alpha": 1.0}, teacher={"cache": False, "head": str(tmp_path / "head.pt")},
                      train={"max_steps": 6, "checkpoint_every": 2})
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=1.0, generation=1,
                     centres=str(tmp_path / "head.pt"))
    teacher = tame(teachers.build_teacher(cfg.teacher.spec()))
    whole, stopped, resumed = whole_and_resumed(cfg, spec, teacher, tmp_path, monkeypatch)
    assert stopped["step"] < whole["step"] == resumed["step"] == 6
    assert torch.equal(whole["head_weight"], resumed["head_weight"])
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    assert "centres" not in str(list(whole["objective"]))  # reloaded from teacher.head every stage, not saved
    if loss == "proxyless_kd":
        assert torch.equal(whole["head_weight"], centres)  # the inherited classifier never moved
    elif loss == "margin_distillation":
        assert torch.equal(whole["head_weight"], centres)  # the teacher's centres, frozen (train_centres: false)


# ------------------------------------------------------------------------------------------- two gloo ranks

E, C, B = 4, 5, 6           # 5 classes: shards of 3 and 2; 6 samples, 3 per rank
ROWS = [(0, 3), (3, 6)]


MD = {"margin_distillation": {"margin_max": "global"}, "md_device": {"margin_max": "device"}}


def _objective(data, name):
    head = _head(data["head"])
    objective = DistillationObjective(head, loss="kd" if name == "kd" else "margin_distillation", alpha=1.0,
                                      **MD.get(name, {}))
    objective.distill_loss.set_centres(data["centres"], head)
    return objective


def _rank_work(rank, data):
    out = {}
    lo, hi = ROWS[rank]
    for name in ("kd", *MD):
        objective = _objective(data, name)
        student = data["student"][lo:hi].clone().requires_grad_()
        total, _ = objective(student, data["labels"][lo:hi], data["teacher"][lo:hi])
        total.backward()
        margins = None
        if name != "kd":
            margins = objective.distill_loss.margins(objective.head, data["labels"][lo:hi], data["teacher"][lo:hi])
        out[name] = (total.detach(), student.grad, margins)
    return out


def test_two_gloo_ranks_holding_halves_of_the_centres_equal_one_process(tmp_path):
    """kd and margin_distillation with margin_max global: the one-process loss and gradients; margin_max device:
    each rank's margins are its own batch's, as one process computes them on that batch alone."""
    torch.manual_seed(0)
    centres, labels = torch.randn(C, E, dtype=torch.float64), torch.tensor([0, 4, 2, 3, 1, 4])
    data = dict(head=torch.randn(C, E, dtype=torch.float64), centres=centres, labels=labels,
                student=torch.randn(B, E, dtype=torch.float64),
                teacher=centres[labels] + 0.5 * torch.randn(B, E, dtype=torch.float64))  # c_i > 0 on each rank
    ranks = gloo_ranks(tmp_path, data, _rank_work)
    own = _objective(data, "md_device").distill_loss  # one process: the device maximum of each half alone
    each = torch.cat([own.margins(_objective(data, "md_device").head, labels[lo:hi], data["teacher"][lo:hi])
                      for lo, hi in ROWS])
    whole = _objective(data, "margin_distillation")
    assert not torch.allclose(each, whole.distill_loss.margins(whole.head, labels, data["teacher"]))  # they differ
    for name in ("kd", *MD):
        objective = _objective(data, name)
        student = data["student"].clone().requires_grad_()
        if name == "md_device":
            total, _ = objective.head(student, labels, margins=each)
        else:
            total, _ = objective(student, labels, data["teacher"])
        total.backward()
        for r, (lo, hi) in zip(ranks, ROWS, strict=True):
            torch.testing.assert_close(r[name][0], total.detach(), msg=name)
            # kd's loss (not the head's) is the global batch's too: each rank's rows get 2 × ∂loss/∂e, as the head's
            torch.testing.assert_close(r[name][1], 2 * student.grad[lo:hi], msg=name)
        if name == "md_device":
            for r in ranks:
                torch.testing.assert_close(r[name][2], each)  # every rank holds every rank's own-batch margins


# ------------------------------------------------------------------------------------------- config errors

def test_centres_missing_or_of_another_count_are_refused_before_any_work(tmp_path):
    from distill.run.context import silent_logger
    from distill.run.experiment import run_experiment
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16)
    backbone = tmp_path / "backbone.pth"
    torch.save({}, backbone)
    with pytest.raises(ConfigError, match=r"distill.loss kd needs the teacher's class centres.*set teacher.head"):
        load_config(str(exp), ["distill.loss=kd", f"teacher.checkpoint={backbone}", "teacher.train=null"])
    onnx = tmp_path / "t.onnx"
    onnx.write_bytes(b"stand-in")
    with pytest.raises(ConfigError, match=r"loaded ONNX teacher does not carry: set teacher.head"):
        load_config(str(exp), ["distill.loss=margin_distillation", "teacher.arch=null", "teacher.train=null",
                               f"teacher.onnx={onnx}"])
    # a teacher trained by the run gives its own head; a teacher.head of another identity count is refused first
    assert load_config(str(exp), ["distill.loss=kd"]).teacher.head is None
    torch.save(torch.randn(5, 32), tmp_path / "head.pt")
    cfg = load_config(str(exp), ["distill.loss=kd", f"teacher.head={tmp_path / 'head.pt'}"])
    with pytest.raises(ConfigError, match=r"holds centres of 5 identities, data.train has 12"):
        run_experiment(cfg, str(tmp_path / "run"), progress=False, logger=silent_logger())
    assert not (tmp_path / "run" / "teacher").exists()  # nothing trained


def test_a_run_distils_kd_from_the_head_of_the_teacher_it_trained(tmp_path):
    from distill.run.context import silent_logger
    from distill.run.experiment import run_experiment
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16, generations=1, baseline=False,
                           tracking={"wandb": "disabled"})
    cfg = load_config(str(exp), ["distill.terms=[{loss: equivalent_angular, alpha: 7}, {loss: kd, alpha: 1}]"])
    summary = run_experiment(cfg, str(tmp_path / "run"), progress=False, logger=silent_logger())
    gen1 = next(s for s in summary["stages"] if s["stage"] == "gen1")
    assert gen1["distill"] == "equivalent_angular (alpha 7) + kd (alpha 1)"
    rows = (tmp_path / "run" / "gen1" / "metrics.jsonl").read_text()
    assert '"train/loss_kd/kd"' in rows


def test_doctor_reads_teacher_head(tmp_path, capsys):
    from distill.cli import main
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16)
    torch.save({"weight": torch.randn(12, 16)}, tmp_path / "small.pt")  # 16-d: not this 32-d teacher's
    assert main(["doctor", str(exp), "--out", str(tmp_path / "run"), "distill.loss=kd",
                 f"teacher.head={tmp_path / 'small.pt'}"]) == 1
    out = capsys.readouterr().out
    assert "teacher.head" in out and "holds 16-d centres, the teacher's embeddings are 32-d" in out
    assert main(["doctor", str(exp), "--out", str(tmp_path / "run"), "distill.loss=kd"]) == 0
    assert "the class centres of the teacher trained here" in capsys.readouterr().out
