"""The README's "Adding a distillation loss" example, run as it says: its code block becomes a new module of the
distill.losses package (a folder added to the package's path, as a new file in distill/losses/ would be found), and
a tiny stage trains with it through `distill.terms` and nothing else."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from conftest import REPO
from tiny import TinyFaces, tiny_config

import distill.losses
import teachers
from distill.losses.registry import DISTILL_LOSSES, create_distill_loss, requirements, unregister_loss
from distill.train.engine import StageSpec, run_stage
from distill.utils.checkpoint import safe_torch_load

NAME = "cosine_margin"


def _example() -> str:
    """The first python block of the README's "Adding a distillation loss" section."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Adding a distillation loss"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def new_loss(tmp_path, monkeypatch):
    folder = tmp_path / "more_losses"
    folder.mkdir()
    (folder / f"{NAME}.py").write_text(_example())
    assert NAME not in DISTILL_LOSSES
    monkeypatch.setattr(distill.losses, "__path__", [*distill.losses.__path__, str(folder)])
    yield NAME
    unregister_loss(NAME)
    sys.modules.pop(f"distill.losses.{NAME}", None)


def _stage(cfg, out):
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=cfg.distill.weight,
                     generation=1)
    torch.manual_seed(5)
    teacher = teachers.build_teacher(cfg.teacher.spec())
    run_stage(cfg, spec, str(out), TinyFaces(), {}, teacher=teacher, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return safe_torch_load(out / "student.pt")["state_dict"], [r for r in rows if "train/loss" in r]


def test_the_readme_example_is_one_file_that_trains(new_loss, tmp_path):
    assert requirements(new_loss).sizes == "projectable"  # discovered: the registry found the new module
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert create_distill_loss(new_loss)(s, t).item() == pytest.approx(0.9)  # 1 − cos 90° − 0.1
    assert create_distill_loss(new_loss, margin=0.0)(s, s).item() == pytest.approx(0.0)
    train = {"max_steps": 4, "checkpoint_every": 4}
    on = tiny_config(distill={"terms": [{"loss": new_loss, "alpha": 1}]}, train=train)
    off = tiny_config(distill={"terms": [{"loss": new_loss, "alpha": 0}]}, train=train)
    trained, logged = _stage(on, tmp_path / "on")
    plain, plain_logged = _stage(off, tmp_path / "off")
    assert logged and all(f"train/loss_kd/{new_loss}" in r for r in logged)
    assert not any(k.startswith("train/loss_kd") for r in plain_logged for k in r)
    assert any(not torch.equal(trained[k], plain[k]) for k in trained)  # the term moved the weights
