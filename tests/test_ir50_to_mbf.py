"""experiments/ir50_to_mbf_ms1mv2.yaml (IResNet-50 -> MobileFaceNet, AdaDistill's protocol; EKD's as documented
overrides), its ir100 variant and the arcface_torch scratch baseline: the settings are the cited ones, and the
recipe's --dry-run passes on this CPU on stand-ins at the real sizes (85,742 identities, 112 px, LFW / CFP-FP /
AgeDB-30 .bin files, an IJB-C folder, an IResNet-50 backbone.pth)."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tame

from distill.cli import main
from distill.config.schema import load_config
from distill.run.disk import parameter_count

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
RECIPE = EXPERIMENTS / "ir50_to_mbf_ms1mv2.yaml"


def _ekd_overrides() -> list:
    """The EKD command in the recipe's header, as its overrides (the documented protocol must load)."""
    text = RECIPE.read_text()
    start = text.index("#   distill run experiments/ir50_to_mbf_ms1mv2.yaml distill.loss=ekd")
    lines = []
    for line in text[start:].splitlines():
        if not re.match(r"#\s+(distill run|train\.|distill\.|data\.|margin\.)", line):
            break
        lines.append(line.lstrip("#"))
    return [w for w in " ".join(lines).split() if "=" in w]


def test_the_protocols_are_the_cited_ones():
    cfg = load_config(str(RECIPE))
    assert (cfg.teacher.arch, cfg.student.arch, cfg.student.scale, cfg.student.embedding_size) == \
        ("iresnet50", "mbf", 1, 512)
    assert parameter_count("mbf", cfg.student.model_kwargs(112)) == 1_220_914  # 1,200,512 parameters + BN statistics
    assert (cfg.margin.margin, cfg.margin.s, cfg.margin.m, cfg.distill.loss) == ("arcface", 64.0, 0.45, "adadistill")
    t = cfg.train
    assert (t.epochs, t.batch_size, t.lr, t.lr_batch_size, t.weight_decay, t.clip_grad) == (26, 128, 0.1, 512, 5e-4, 5)
    assert (t.scheduler, t.decay_epochs, t.warmup_epochs, t.decay_norm_and_bias) == ("step", [7, 13, 19, 24], 0, True)
    assert [Path(p).name for p in cfg.data.val] == ["lfw.bin", "cfp_fp.bin", "agedb_30.bin"]
    assert cfg.data.ijb.target == "IJBC" and cfg.data.input_size == 112 and cfg.baseline and cfg.generations == 1
    ekd = load_config(str(RECIPE), _ekd_overrides())
    assert (ekd.distill.loss, ekd.margin.m, ekd.train.batch_size, ekd.data.images_per_id, ekd.data.grouped_fraction) \
        == ("ekd", 0.4, 64, 4, 0.5)
    assert (ekd.train.epochs, ekd.train.decay_epochs, ekd.train.decay_norm_and_bias, ekd.train.clip_grad) == \
        (52, [20, 36, 44], False, None)
    r100 = load_config(str(EXPERIMENTS / "ir100_to_mbf_ms1mv2.yaml"))
    assert r100.teacher.arch == "iresnet100" and r100.student.model == cfg.student.model and r100.train == cfg.train
    scratch = load_config(str(EXPERIMENTS / "mbf_scratch_ms1mv2.yaml"))  # arcface_torch's configs/ms1mv2_mbf.py
    assert scratch.teacher is None and scratch.generations == 0 and scratch.baseline
    assert (scratch.student.scale, scratch.margin.m, scratch.margin.straight_through) == (2, 0.5, True)
    s = scratch.train
    assert (s.epochs, s.batch_size, s.lr, s.lr_batch_size, s.weight_decay, s.scheduler, s.warmup_epochs) == \
        (40, 128, 0.1, 1024, 1e-4, "poly", 0)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """MS1MV2's layout at its size (85,742 identities; 4 images, 112 px), three verification .bin files, a synthetic
    IJB-C folder and an IResNet-50 backbone.pth (half precision: the strict load checks keys and shapes)."""
    from distill.data.images import encode_jpeg
    from distill.data.recordio_writer import write_insightface_rec
    from distill.data.synth_ijb import write_synthetic_ijb
    from distill.data.verification import write_verification_bin
    from distill.models.iresnet import IResNet

    tmp = tmp_path_factory.mktemp("ms1mv2")
    rng = np.random.default_rng(0)
    faces = [encode_jpeg(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(4)]
    data = tmp / "faces_emore"
    write_insightface_rec(data, [(0, faces[0]), (0, faces[1]), (85_741, faces[2]), (85_741, faces[3])], 85_742, 112)
    for name in ("lfw", "cfp_fp", "agedb_30"):
        write_verification_bin(data / f"{name}.bin", faces * 2, [True, False, True, False])
    write_synthetic_ijb(tmp / "IJBC", templates=4)  # read, not evaluated, by a dry run
    torch.manual_seed(0)
    torch.save(tame(IResNet(50)).half().state_dict(), tmp / "backbone.pth")
    return tmp


def test_its_dry_run_passes_on_cpu_at_the_real_sizes(stand_ins, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    data = stand_ins / "faces_emore"
    assert main(["run", str(RECIPE), "--dry-run", f"data.train={data}",
                 f"data.val=[{data / 'lfw.bin'},{data / 'cfp_fp.bin'},{data / 'agedb_30.bin'}]",
                 f"data.ijb.root={stand_ins / 'IJBC'}", f"teacher.checkpoint={stand_ins / 'backbone.pth'}",
                 "--out", str(stand_ins / "run")]) == 0
    out = capsys.readouterr().out
    assert "ok (4 images of 85,742 identities, read whole)" in out and "IJBC ok" in out
    assert "dry run: teacher ok (iresnet50, 512-d at 112px)" in out
    assert "baseline ok (2 steps, mbf at 112px)" in out and "gen1 ok (2 steps, mbf at 112px)" in out
    assert "with adadistill (alpha 1)" in out and not (stand_ins / "run").exists()
