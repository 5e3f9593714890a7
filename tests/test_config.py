"""Experiment config: base files, overrides in both forms, unknown keys with suggestions, wrong types."""

from pathlib import Path

import pytest
import yaml

from distill.cli import main
from distill.config.schema import dump_config, load_config, parse_overrides
from distill.utils.errors import ConfigError


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_base_file_is_extended(tmp_path):
    write(tmp_path / "base.yaml", {"name": "base", "data": {"train": "d", "input_size": 64},
                                   "train": {"lr": 0.1, "batch_size": 64}})
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "name": "child", "train": {"lr": 0.2}})
    cfg = load_config(child)
    assert cfg.name == "child" and cfg.train.lr == 0.2 and cfg.train.batch_size == 64 and cfg.data.input_size == 64
    assert cfg.distill.alpha == 7.0 and cfg.margin.s == 64.0 and cfg.margin.m == 0.5  # the paper's defaults


def test_overrides_in_both_forms(tmp_path):
    path = write(tmp_path / "x.yaml", {"data": {"train": "d"}})
    cfg = load_config(path, ["train.lr=0.05", "--distill.alpha=1", "--student.se=false", "data.val=[a.bin, b.bin]"])
    assert cfg.train.lr == 0.05 and cfg.distill.alpha == 1.0 and cfg.student.se is False
    assert cfg.data.val == ["a.bin", "b.bin"]
    assert parse_overrides(["a.b.c=x"]) == {"a": {"b": {"c": "x"}}}


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path / "typo.yaml", {"data": {"train": "d"}, "train": {"bach_size": 3}})
    with pytest.raises(ConfigError,
                       match=r"typo.yaml: unknown key 'train.bach_size'; did you mean 'train.batch_size'\?"):
        load_config(path)
    with pytest.raises(ConfigError,
                       match=r"command-line override: unknown key 'distill.alpah'; did you mean 'distill.alpha'"):
        load_config(write(tmp_path / "ok.yaml", {"data": {"train": "d"}}), ["distill.alpah=1"])


def test_wrong_type_names_key_file_and_value(tmp_path):
    path = write(tmp_path / "bad.yaml", {"data": {"train": "d"}, "train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'train.lr' must be float, got 'fast'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"key 'student.se' must be bool, got 'maybe'"):
        load_config(write(tmp_path / "ok.yaml", {"data": {"train": "d"}}), ["student.se=maybe"])
    with pytest.raises(ConfigError, match=r"key 'margin.margin' must be one of arcface, cosface"):
        load_config(write(tmp_path / "m.yaml", {"data": {"train": "d"}, "margin": {"margin": "sphereface"}}))


def test_errors_point_at_the_file_that_set_the_key(tmp_path):
    write(tmp_path / "base.yaml", {"data": {"train": "d"}, "train": {"epochs": "many"}})
    child = write(tmp_path / "child.yaml", {"base": "base.yaml"})
    with pytest.raises(ConfigError, match=r"base.yaml: key 'train.epochs'"):
        load_config(child)


def test_unknown_base_file_and_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"base file .*missing.yaml not found"):
        load_config(write(tmp_path / "x.yaml", {"base": "missing.yaml"}))
    with pytest.raises(ConfigError, match="experiment file not found"):
        load_config(str(tmp_path / "absent.yaml"))
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "broken.yaml"))
    with pytest.raises(ConfigError, match="data.train' is required"):
        load_config(write(tmp_path / "nodata.yaml", {"name": "x"}))


def test_yaml_is_never_executed(tmp_path):
    (tmp_path / "evil.yaml").write_text("name: !!python/object/apply:os.system ['touch PWNED']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "evil.yaml"))
    assert not (tmp_path / "PWNED").exists()


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path / "x.yaml", {"name": "n", "data": {"train": "d"}}), ["train.lr=0.3"])
    dump_config(cfg, str(tmp_path / "resolved.yaml"))
    assert load_config(str(tmp_path / "resolved.yaml")) == cfg


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    path = write(tmp_path / "typo.yaml", {"data": {"train": "d"}, "distil": {"alpha": 7}})
    assert main(["run", path]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'distil'; did you mean 'distill'?" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- user mistakes: one line, exit 2

def test_a_folder_or_non_utf8_file_as_experiment_or_base_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    assert main(["run", str(tmp_path / "folder")]) == 2
    write(tmp_path / "child.yaml", {"base": "folder", "data": {"train": "d"}})
    assert main(["run", str(tmp_path / "child.yaml")]) == 2
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert main(["run", str(tmp_path / "latin1.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("is a folder; give the experiment file (a .yaml file) itself") == 2
    assert "latin1.yaml: not UTF-8 text (byte 9); save the experiment file as UTF-8" in err and "Traceback" not in err


@pytest.mark.parametrize("override", ["train.epochs=.inf", "train.lr=.nan", "distill.alpha=-.inf", "margin.s=.inf"])
def test_non_finite_numbers_are_refused_at_load(tmp_path, override):
    path = write(tmp_path / "x.yaml", {"data": {"train": "d"}})
    with pytest.raises(ConfigError, match=rf"key '{override.split('=')[0]}' must be a finite number"):
        load_config(path, [override])


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", "..", "", "x..y"])
def test_an_experiment_name_is_a_folder_name(tmp_path, name):
    path = write(tmp_path / "x.yaml", {"name": name, "data": {"train": "d"}})
    with pytest.raises(ConfigError, match="key 'name' names the run directory"):
        load_config(path)


def test_profile_refuses_a_meaningless_input_size(capsys):
    for size in ("-5", "0"):
        assert main(["profile", "vargfacenet", "--input-size", size, "--no-timing"]) == 2
    err = capsys.readouterr().err
    assert err.count("give a square image side of at least 16 pixels") == 2 and "Traceback" not in err


def test_the_ms1mv2_recipe_is_the_paper_recipe_on_other_data():
    """The paper's recipe names the paper's data (ms1m-retinaface-t1, 93,431 identities); the MS1MV2
    file is a variant of it through base:, changing nothing but the name, the data and the teacher's weights."""
    from distill.config.schema import load_config, to_dict
    experiments = Path(__file__).resolve().parents[1] / "experiments"
    paper_file = experiments / "vargfacenet_ms1m_retinaface.yaml"
    paper, ms1mv2 = (to_dict(load_config(str(experiments / f))) for f in
                     ("vargfacenet_ms1m_retinaface.yaml", "vargfacenet_ms1mv2.yaml"))

    def flat(d, prefix=""):
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(f"{prefix}{k}", v)])}

    a, b = flat(paper), flat(ms1mv2)
    assert sorted(k for k in a if a[k] != b.get(k)) == ["data.train", "data.val", "name", "teacher.checkpoint"]
    assert "ms1m-retinaface-t1" in a["data.train"] and "faces_emore" in b["data.train"]
    assert "93,431 ids" in paper_file.read_text() and "85,742" in (experiments / "vargfacenet_ms1mv2.yaml").read_text()
    assert "base: vargfacenet_ms1m_retinaface.yaml" in (experiments / "vargfacenet_ms1mv2.yaml").read_text()
    assert a["train.decay_norm_and_bias"] is True and a["train.warmup_epochs"] == 1.0
