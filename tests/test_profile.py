"""`distill profile` and model names: counts, JSON keys, unknown names, loading model files."""

import json

import pytest
import torch

from distill.cli import main
from distill.models.files import load_model, save_student
from distill.models.iresnet import IResNet
from distill.models.registry import create_model
from distill.utils.errors import ConfigError


def test_profile_json_student(capsys):
    assert main(["profile", "vargfacenet", "--input-size", "32", "--json", "--seconds", "0.2", "--threads", "1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"params", "gflops", "gmacs", "latency_ms", "images_per_s"} <= set(r)
    model = create_model("vargfacenet", input_size=32)
    assert r["params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert r["gflops"] == pytest.approx(2 * r["gmacs"]) and 0.01 < r["gflops"] < 0.2
    assert r["latency_ms"] > 0 and r["images_per_s"] > 0


def test_profile_teacher_table(capsys):
    assert main(["profile", "r18", "--input-size", "32", "--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "GFLOPs" in out and "GMACs" in out and "parameters (in use)" in out


def test_unknown_name_lists_registered_names(capsys):
    assert main(["profile", "vargfacenett", "--no-timing"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'vargfacenett'" in err and "vargfacenet" in err and "r100" in err
    assert "Traceback" not in err


def test_load_model_from_files(tmp_path):
    student = create_model("vargfacenet", input_size=32, embedding_size=64)
    save_student(tmp_path / "student.pt", student, "vargfacenet")
    model, size = load_model(str(tmp_path / "student.pt"))
    assert size == 32 and model(torch.randn(1, 3, 32, 32)).shape == (1, 64)

    torch.save(IResNet(18, input_size=48).state_dict(), tmp_path / "backbone.pth")
    model, size = load_model(str(tmp_path / "backbone.pth"), arch="r18")
    assert size == 48 and not model.training
    with pytest.raises(ConfigError, match="--arch"):
        load_model(str(tmp_path / "backbone.pth"))
    with pytest.raises(ConfigError, match="not found"):
        load_model(str(tmp_path / "missing.pt"))
