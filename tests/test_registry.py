"""The model registry: every registered architecture builds, runs at two input sizes, saves and loads strictly;
names and keyword arguments are checked with suggestions; the config checks every name before any work."""

import inspect

import pytest
import torch
import yaml
from tiny import tame

from distill.config.schema import load_config
from distill.models import cost
from distill.models.files import load_student, save_student
from distill.models.registry import (
    canonical_name,
    check_model_kwargs,
    create_model,
    list_models,
    model_defaults,
    register_model,
)
from distill.utils.errors import ConfigDeprecationWarning, ConfigError, UnknownNameError

# every registered name (aliases resolve to these), plus one member of the timm/ family
WALK = [n for n in list_models() if not n.endswith("<name>")] + ["timm/resnet10t"]
SMALL = {"vargfacenet": dict(multiplier=0.25, last_channels=32, units=[1, 1, 1]),
         "vargfacenet_depthwise": dict(multiplier=0.25, last_channels=32, units=[1, 1, 1]),
         "mbf": dict(scale=1, blocks=[1, 1, 1, 1]), "mbf_large": dict(scale=1, blocks=[2, 1, 1, 1])}


def test_registry_lists_students_iresnets_aliases_and_the_timm_family():
    names = list_models(aliases=True)
    for name in ["vargfacenet", "vargfacenet_depthwise", "timm/<name>"] \
            + [f"iresnet{d}" for d in (18, 34, 50, 100, 200)] \
            + [f"r{d}" for d in (18, 34, 50, 100, 200)]:
        assert name in names
    assert canonical_name("r100") == "iresnet100"
    assert list_models().index("iresnet18") < list_models().index("iresnet100")
    for name in WALK:  # the shared contract: every model takes embedding_size and input_size
        assert {"embedding_size", "input_size"} <= set(model_defaults(name)) | {"input_size"}


@pytest.mark.parametrize("name", WALK)
def test_every_registered_model_builds_runs_at_two_sizes_saves_and_loads_strictly(name, tmp_path):
    torch.manual_seed(0)
    for size in (32, 48):
        # tame: an untrained deep IResNet with arcface_torch's init overflows to inf (r100, r200)
        model = tame(create_model(name, embedding_size=24, input_size=size, **SMALL.get(name, {}))).eval()
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, 24) and torch.isfinite(out).all(), (name, size)
        assert model.config["embedding_size"] == 24 and model.config["input_size"] == size
    path = tmp_path / "model.pt"
    save_student(path, model, name)  # kwargs from model.config: enough to rebuild it
    loaded, payload = load_student(path)
    assert payload["arch"] == name and type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), out)


def test_model_cost_counts_on_the_meta_device_as_the_cpu_counts(monkeypatch):
    """A model of cost.META_FROM parameters or more (IResNet-50 and deeper; here every one) is counted on the meta
    device with the CPU's counts; a model the meta device cannot run (a value read from a tensor) is counted on the
    CPU; neither draws a random number."""
    import distill.models.registry

    monkeypatch.setattr(cost, "_COSTS", {})
    seen, count_flops = [], cost.count_flops

    def spy(model, size):
        seen.append(cost._device(model).type)
        return count_flops(model, size)

    monkeypatch.setattr(cost, "count_flops", spy)
    monkeypatch.setattr(cost, "META_FROM", 0)  # every model goes to the meta device first (an IResNet-18: cheap)
    kwargs = {"embedding_size": 24, "input_size": 16}
    state = torch.random.get_rng_state()
    counted = cost.model_cost("iresnet18", kwargs)
    assert seen == ["meta"] and torch.equal(torch.random.get_rng_state(), state)
    on_cpu = create_model("iresnet18", **kwargs)
    assert counted == (cost.params_in_use(on_cpu, 16), count_flops(on_cpu, 16) / 1e9)

    monkeypatch.setattr(distill.models.registry, "_MODELS", dict(distill.models.registry._MODELS))

    class ReadsAValue(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x.flatten(1)) * float(x.abs().max() > 0)  # .item(): none on the meta device

    @register_model(builds=torch.nn.Linear)
    def test_only_reads_a_value(embedding_size: int = 8, input_size: int = 4):
        return ReadsAValue(3 * input_size * input_size, embedding_size)

    seen.clear()
    assert cost.model_cost("test_only_reads_a_value", {"input_size": 4}) == (8 * 48 + 8, 2 * 48 * 8 / 1e9)
    assert seen == ["cpu"]


def test_aliases_build_the_same_architecture():
    a, b = create_model("r18", input_size=32), create_model("iresnet18", input_size=32)
    assert a.state_dict().keys() == b.state_dict().keys() and a.depth == b.depth == 18


def test_unknown_names_and_arguments_suggest_the_right_one():
    with pytest.raises(UnknownNameError, match=r"unknown model 'vargfacenett'; did you mean 'vargfacenet'\?"):
        create_model("vargfacenett")
    with pytest.raises(UnknownNameError, match=r"unknown timm model 'resnet1'; did you mean 'resnet18'\?"):
        create_model("timm/resnet1")
    with pytest.raises(ConfigError, match=r"unknown key 'student.multipler': vargfacenet has no argument 'multipler'; "
                                          r"did you mean 'student.multiplier'\?"):
        check_model_kwargs("vargfacenet", {"multipler": 1.0}, section="student.")
    with pytest.raises(ConfigError, match=r"key 'se' must be bool, got 'yes'"):
        create_model("vargfacenet", se="yes")
    with pytest.raises(ConfigError, match="iresnet18 has no argument 'num_features'"):
        create_model("iresnet18", num_features=512)  # arcface_torch's name: here embedding_size, like every model


def test_a_new_student_is_one_decorated_function(monkeypatch):
    import distill.models.registry

    # registered for this test only
    monkeypatch.setattr(distill.models.registry, "_MODELS", dict(distill.models.registry._MODELS))
    calls = []

    @register_model(builds=torch.nn.Linear)
    def test_only_linear_face(embedding_size: int = 8, input_size: int = 4, **kwargs):
        calls.append(kwargs)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * input_size * input_size, embedding_size))
        model.config = dict(embedding_size=embedding_size, input_size=input_size)
        return model

    assert "test_only_linear_face" in list_models()
    assert create_model("test_only_linear_face", bias=False)(torch.randn(1, 3, 4, 4)).shape == (1, 8)
    assert calls == [{"bias": False}]  # Linear's own arguments pass the check (builds=)
    with pytest.raises(ValueError, match="registered twice"):
        register_model(test_only_linear_face)
    with pytest.raises(TypeError, match="embedding_size and input_size"):
        register_model(lambda width=1: None)


def test_iresnet_defaults_come_from_the_constructor_signature():
    assert model_defaults("r100") == {"embedding_size": 512, "input_size": 112, "dropout": 0.0}
    assert model_defaults("vargfacenet_depthwise")["group_size"] == 1
    assert model_defaults("vargfacenet")["group_size"] == 8
    sig = inspect.signature(create_model("vargfacenet", input_size=32).__class__.__init__)
    # timm's contract arguments are accepted but are no experiment default (experiment.yaml lists only the model's)
    assert set(model_defaults("vargfacenet")) == set(sig.parameters) - {"self", "num_classes", "in_chans"}


# ---------------------------------------------------------------------------------- config, before any work

def _write(tmp_path, data, name="x.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


BASE = {"data": {"train": "does/not/exist"}, "teacher": {"arch": "iresnet18", "input_size": 32, "embedding_size": 512}}


@pytest.mark.parametrize("override, error", [
    ("distill.loss=equivalent_angulr", r"key 'distill.loss' must be one of .*did you mean 'equivalent_angular'"),
    ("margin.margin=arcfce", r"key 'margin.margin' must be one of .*did you mean 'arcface'"),
    ("student.arch=vargfacenett", r"key 'student.arch': unknown model 'vargfacenett'; did you mean 'vargfacenet'"),
    ("teacher.arch=iresnet101", r"key 'teacher.arch': unknown model 'iresnet101'; did you mean 'iresnet100'"),
    ("teacher.arch=timm/resnet1", r"unknown timm model 'resnet1'; did you mean 'resnet18'"),
    ("train.optimizer=sgdd", r"key 'train.optimizer': unknown optimizer 'sgdd'; did you mean 'sgd'"),
    ("train.scheduler=cosin", r"key 'train.scheduler' must be one of poly, cosine, step, got 'cosin'"),
    ("student.multipler=0.5", r"unknown key 'student.multipler'.*did you mean 'student.multiplier'"),
    ("teacher.embeding_size=64", r"unknown key 'teacher.embeding_size'.*did you mean 'teacher.embedding_size'"),
    ("student.initt=x.pt", r"unknown key 'student.initt'.*did you mean 'student.init'"),
])
def test_every_name_is_checked_when_the_config_loads(tmp_path, override, error, monkeypatch):
    """A typo fails at load time, before a file is touched (data.train does not even exist)."""
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, BASE)
    with pytest.raises((ConfigError, UnknownNameError), match=error):
        load_config(path, [override])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.yaml"]  # nothing written


def test_typo_fails_in_the_first_second_of_distill_run(tmp_path, capsys, monkeypatch):
    from distill.cli import main

    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, BASE)
    assert main(["run", path, "distill.loss=cosin", "--dry-run"]) == 2
    assert main(["run", path, "distill.loss=cosin"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'cosine'" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_model_arguments_are_filled_from_the_constructor_and_round_trip(tmp_path):
    cfg = load_config(_write(tmp_path, {**BASE, "student": {"arch": "vargfacenet", "multiplier": 0.5}}))
    assert cfg.student.multiplier == 0.5 and cfg.student.group_size == 8 and cfg.student.units == [3, 7, 4]
    assert cfg.student.model_kwargs(32)["input_size"] == 32 and cfg.teacher.model["dropout"] == 0.0
    with pytest.raises(ConfigError, match="student's input size is data.input_size"):
        load_config(_write(tmp_path, {**BASE, "student": {"input_size": 64}}, "s.yaml"))
    with pytest.raises(ConfigError, match="exactly one of arch"):
        load_config(_write(tmp_path, {**BASE, "teacher": {"checkpoint": "x.pth"}}, "t.yaml"))
    with pytest.raises(ConfigError, match="an ONNX teacher is its file"):
        load_config(_write(tmp_path, {**BASE, "teacher": {"onnx": "x.onnx", "embedding_size": 512}}, "o.yaml"))
    assert load_config(_write(tmp_path, {**BASE, "teacher": {"onnx": "x.onnx"}}, "o2.yaml")).teacher.spec() == \
        {"onnx": "x.onnx", "providers": None}


@pytest.mark.parametrize("legacy, arch, kwargs, note", [
    ({"kind": "iresnet", "depth": 50, "embedding_size": 256}, "iresnet50", {"embedding_size": 256},
     "write arch: iresnet50"),
    ({"kind": "timm", "name": "resnet18"}, "timm/resnet18", {}, "write arch: timm/resnet18"),
    ({"kind": "facedistill", "input_size": 32,
      "student": {"arch": "vargfacenet", "multiplier": 0.5, "embedding_size": 64}},
     "vargfacenet", {"multiplier": 0.5, "embedding_size": 64, "input_size": 32}, "write arch: vargfacenet with its"),
    ({"depth": 100}, "iresnet100", {}, "'kind: iresnet' is deprecated; write arch: iresnet100"),
])
def test_legacy_teacher_keys_still_load_with_a_one_line_note(tmp_path, legacy, arch, kwargs, note):
    path = _write(tmp_path, {**BASE, "teacher": legacy})
    with pytest.warns(ConfigDeprecationWarning, match=note) as caught:
        cfg = load_config(path)
    assert len(caught) == 1 and "\n" not in str(caught[0].message) and path in str(caught[0].message)
    assert cfg.teacher.arch == arch and all(cfg.teacher.model[k] == v for k, v in kwargs.items())


def test_legacy_onnx_teacher_becomes_an_onnx_file(tmp_path):
    with pytest.warns(ConfigDeprecationWarning, match="write onnx: w600k_r50.onnx"):
        cfg = load_config(_write(tmp_path, {**BASE, "teacher": {"kind": "onnx", "checkpoint": "w600k_r50.onnx"}}))
    assert cfg.teacher.onnx == "w600k_r50.onnx" and cfg.teacher.arch is None and cfg.teacher.checkpoint is None


def test_shipped_experiments_use_the_current_form(recwarn):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for path in sorted((repo / "experiments").glob("*.yaml")):
        text = yaml.safe_load(path.read_text())
        teacher = text.get("teacher") or {}
        assert not {"kind", "depth", "name", "student"} & set(teacher), path
        load_config(str(path))
    assert not [w for w in recwarn if issubclass(w.category, ConfigDeprecationWarning)]


def test_the_command_prints_a_deprecated_spelling_as_one_note_line(tmp_path, capsys, monkeypatch):
    from distill.cli import main

    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, {**BASE, "teacher": {"kind": "iresnet", "depth": 18}})
    assert main(["run", path, "distill.loss=cosin"]) == 2  # stops at the typo, after the note
    err = capsys.readouterr().err.splitlines()
    notes = [line for line in err if "deprecated" in line]
    assert notes == [f"distill run: note: {path}: teacher: 'kind: iresnet' is deprecated; write arch: iresnet18"]
