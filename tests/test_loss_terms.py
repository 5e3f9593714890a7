"""Loss terms composed in the experiment (distill.terms, distill/losses/terms.py): the objective's sum on a
hand-computed case, per-term logs, a two-term stage with FitNet's adapter that resumes bit-identically, the
short form unchanged, and every mistake in a term refused when the config loads, naming its key."""

import json

import pytest
import torch
from tiny import tiny_config, whole_and_resumed
from tiny_experiment import write_experiment

import teachers
from distill.config.schema import dump_config, load_config, load_saved_config
from distill.losses.distillation import DistillationObjective, create_distill_loss
from distill.losses.terms import LossTerm, config_terms, describe_terms, stage_terms
from distill.train.engine import StageSpec
from distill.utils.errors import ConfigError

TWO = [{"loss": "equivalent_angular", "alpha": 7}, {"loss": "fitnet", "alpha": 1, "stages": [-2]}]


class ConstantHead(torch.nn.Module):
    def forward(self, emb, labels):  # classification loss 1, whatever the embeddings
        return emb.sum() * 0 + 1.0, {}


def test_the_objective_sums_alpha_times_each_term_and_logs_each_by_name():
    terms = [LossTerm("equivalent_angular", "equivalent_angular", 7.0), LossTerm("cos", "cosine", 2.5),
             LossTerm("off", "l2", 0.0)]
    objective = DistillationObjective(ConstantHead(), terms=terms)
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    total, logs = objective(s, torch.zeros(4, dtype=torch.long), t)
    ea, cos = create_distill_loss("equivalent_angular")(s, t), create_distill_loss("cosine")(s, t)
    torch.testing.assert_close(total, 1 + 7 * ea + 2.5 * cos)
    torch.testing.assert_close(logs["loss_kd/equivalent_angular"], ea)
    torch.testing.assert_close(logs["loss_kd/cos"], cos)
    assert "loss_kd/off" not in logs and "loss_kd" not in logs  # a term at alpha 0 is not computed
    # `loss` + `alpha` is one term named by its loss, logged like any term; without a teacher nothing is computed
    short = DistillationObjective(ConstantHead(), loss="cosine", alpha=2.5)
    total, logs = short(s, torch.zeros(4, dtype=torch.long), t)
    assert set(logs) == {"loss", "loss_cls", "loss_kd/cosine"} and torch.equal(logs["loss_kd/cosine"], cos.detach())
    assert set(objective(s, torch.zeros(4, dtype=torch.long))[1]) == {"loss", "loss_cls"}


def test_terms_load_from_yaml_and_replace_the_short_form_of_a_base_file(tmp_path):
    base = write_experiment(tmp_path / "base.yaml", tmp_path / "faces", distill={"loss": "cosine", "alpha": 3.0},
                            teacher={"cache": False})
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ndistill:\n  terms:\n    - {loss: equivalent_angular, alpha: 7}\n"
                     "    - {loss: fitnet, alpha: 1, stages: [-2]}\n")
    cfg = load_config(str(child))
    assert cfg.distill.loss is None and cfg.distill.alpha is None and cfg.distill.weight == 8.0
    assert config_terms(cfg.distill) == [LossTerm("equivalent_angular", "equivalent_angular", 7.0),
                                         LossTerm("fitnet", "fitnet", 1.0, {"stages": [-2]})]
    assert describe_terms(config_terms(cfg.distill)) == "equivalent_angular (alpha 7) + fitnet (alpha 1, stages [-2])"
    assert [t.alpha for t in stage_terms(cfg.distill, 0.0)] == [0.0, 0.0]  # the baseline: built, not computed
    dump_config(cfg, tmp_path / "saved.yaml")  # the run directory's copy reloads as the same experiment
    assert config_terms(load_saved_config(str(tmp_path / "saved.yaml")).distill) == config_terms(cfg.distill)
    # the short form is one term; an override gives terms too
    assert config_terms(load_config(str(base)).distill) == [LossTerm("cosine", "cosine", 3.0)]
    over = load_config(str(base), ["distill.terms=[{loss: cosine, alpha: 2, name: cos}]"])
    assert config_terms(over.distill) == [LossTerm("cos", "cosine", 2.0)]


@pytest.mark.parametrize("overrides, message", [
    (["distill.terms=[{loss: equivalent_angular, alpha: 7}]", "distill.alpha=2"],
     r"key 'distill.terms' and distill.alpha are both set.*or set distill.terms: null"),
    (["distill.terms=[{loss: fitnet, alpha: 1, stage: [2]}]"],
     r"key 'distill.terms\[0\].stage': distillation loss 'fitnet' does not take stage.*did you mean 'stages'"),
    (["distill.terms=[{loss: fitnet, alpha: 1, stages: two}]"],
     r"key 'distill.terms\[0\].stages': distillation loss 'fitnet' takes a list such as \[-2\] for stages "
     r"\(default \[-2\]\), got 'two'"),
    (["distill.terms=[{loss: attention_transfer, alpha: 1, p: -1.0}]"],
     r"key 'distill.terms\[0\]': distillation loss 'attention_transfer' refuses these options: .*p must be a positive"),
    (["distill.terms=[{loss: ekd, alpha: 1, hard_negatives: 2.5}]", "data.images_per_id=4"],
     r"key 'distill.terms\[0\].hard_negatives'.*takes an integer"),
    (["distill.terms=[{loss: fitnett, alpha: 1}]"],
     r"key 'distill.terms\[0\].loss' must be one of .*did you mean 'fitnet'"),
    (["distill.terms=[{loss: cosine}]"], r"key 'distill.terms\[0\].alpha' must be a finite number >= 0"),
    (["distill.terms=[{loss: cosine, alpha: -1}]"], r"key 'distill.terms\[0\].alpha' must be a finite number >= 0"),
    (["distill.terms=[]"], r"key 'distill.terms' must be a non-empty list"),
    (["distill.terms=[cosine]"], r"key 'distill.terms\[0\]' must be a mapping"),
    (["distill.terms=[{loss: cosine, alpha: 1}, {loss: cosine, alpha: 2}]"],
     r"key 'distill.terms\[1\].name' 'cosine' is already the name of distill.terms\[0\].*name: cosine_2"),
    (["distill.terms=[{loss: adadistill, alpha: 1}, {loss: adadistill, alpha: 1, name: again}]"],
     r"distill.terms\[0\] and distill.terms\[1\] both replace the classification loss"),
    (["distill.terms=[{loss: equivalent_angular, alpha: 7}, {loss: fitnet, alpha: 1}]", "teacher.cache=true"],
     r"distill.terms\[1\] \(fitnet\) needs the teacher's feature maps.*teacher.cache: false"),
    (["distill.terms=[{loss: attention_transfer, alpha: 1, stages: [2, 6]}]"],
     r"distill.terms\[0\] \(attention_transfer\): stage 6 of the student \(vargfacenet\): it has 4 feature stages"),
    (["distill.loss=fitnet"], None),  # the short form with a cached teacher: refused too (below)
])
def test_every_mistake_in_a_term_is_refused_when_the_config_loads(tmp_path, overrides, message):
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", teacher={"cache": False})
    if message is None:
        with pytest.raises(ConfigError, match=r"distill.loss fitnet needs the teacher's feature maps"):
            load_config(str(exp), overrides + ["teacher.cache=true"])
        return
    with pytest.raises(ConfigError, match=message) as err:
        load_config(str(exp), overrides)
    assert "command-line override" in str(err.value) or str(exp) in str(err.value)  # where it was set


def test_a_stage_index_the_teacher_lacks_names_the_teacher(tmp_path):
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", teacher={"cache": False})
    # VarGFaceNet has 4 feature stages, an IResNet 5: stage 4 is the teacher's last, beyond the student's
    with pytest.raises(ConfigError, match=r"stage 4 of the student \(vargfacenet\): it has 4"):
        load_config(str(exp), ["distill.terms=[{loss: attention_transfer, alpha: 1, stages: [4]}]"])
    with pytest.raises(ConfigError, match=r"stage -5 of the student"):
        load_config(str(exp), ["distill.terms=[{loss: attention_transfer, alpha: 1, stages: [-5]}]"])
    cfg = load_config(str(exp), ["distill.terms=[{loss: attention_transfer, alpha: 1, stages: [-4, 3]}]"])
    assert config_terms(cfg.distill)[0].options == {"stages": [-4, 3]}


def test_a_two_term_stage_with_fitnet_trains_logs_each_term_and_resumes_bit_identically(tmp_path, monkeypatch):
    cfg = tiny_config(distill={"terms": TWO}, teacher={"cache": False}, train={"max_steps": 6, "checkpoint_every": 2})
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=cfg.distill.weight,
                     generation=1)
    torch.manual_seed(5)
    teacher = teachers.build_teacher(cfg.teacher.spec())
    whole, stopped, resumed = whole_and_resumed(cfg, spec, teacher, tmp_path, monkeypatch)
    assert stopped["step"] < whole["step"] == resumed["step"] == 6
    assert torch.equal(whole["head_weight"], resumed["head_weight"])
    for part in ("model", "objective"):
        assert whole[part].keys() == resumed[part].keys()
        assert all(torch.equal(whole[part][k], resumed[part][k]) for k in whole[part]), part
    assert [k for k in whole["objective"] if k.startswith("distill_loss_1.regressors")]  # FitNet's adapter: term 2
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train/loss" in r]
    assert logged and all("train/loss_kd/equivalent_angular" in r and "train/loss_kd/fitnet" in r for r in logged)
    assert all("train/loss_kd" not in r for r in logged)
    result = json.loads((tmp_path / "whole" / "result.json").read_text())
    assert result["distill"] == "equivalent_angular (alpha 7) + fitnet (alpha 1, stages [-2])"
    student = torch.load(tmp_path / "whole" / "student.pt", weights_only=True)["state_dict"]
    assert not [k for k in student if "regressor" in k]


def test_bench_kd_measures_an_online_teacher_with_a_feature_term(tmp_path):
    import importlib.util
    import types

    from conftest import REPO

    from distill.data.standin import StandInFaces
    spec = importlib.util.spec_from_file_location("bench_kd", REPO / "benchmarks" / "bench_kd.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = types.SimpleNamespace(device="cpu", input_size=16, batch_size=8, steps=2)
    cfg = bench._config(args)
    rates = bench.kd_rates(cfg, StandInFaces(classes=8, per_class=4, size=16), str(tmp_path),
                           bench.untrained_teacher("iresnet18", 16), warmup=0, feature_losses=("fitnet",))
    assert rates["fitnet_img_s"] > 0
    assert rates["fitnet_vs_cached_time_ratio"] == pytest.approx(rates["cached_img_s"] / rates["fitnet_img_s"])
    rows = [json.loads(line) for line in (tmp_path / "fitnet" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss_kd/fitnet" in r for r in rows)  # the feature term did run in that stage
