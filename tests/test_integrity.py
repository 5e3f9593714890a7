"""Every file a run reads back is the file it wrote: the teacher cache's block digests (a damaged block is embedded
again with a note, or refused where the file cannot be written), the digests of student.pt / best.pt / backbone.pth
in their stage's result.json (a replaced file is refused by the next generation, the teacher, eval and export),
and the teacher's class centres' digest in last.pt (a change on resume is noted)."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch

import teachers
import teachers.cache
import teachers.cache_digest
from distill.cli import main
from distill.config.schema import load_config
from distill.models.files import save_student
from distill.models.registry import create_model
from distill.run.experiment import run_experiment
from distill.utils.checkpoint import safe_torch_load
from distill.utils.digest import file_sha256
from distill.utils.errors import CheckpointError, DataFormatError

ROW_BYTES = 2 * 32 * 2  # a row of the tiny teacher's cache: two views of a 32-d float16 embedding
BLOCK_ROWS = 8          # the blocks of these tests (BLOCK_BYTES patched): 72 rows in 9 blocks


class Lines(logging.Handler):
    """A run's log lines, kept."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def text(self) -> str:
        return "\n".join(self.lines)


def _logger(name: str) -> tuple:
    lines = Lines()
    logger = logging.Logger(f"test_integrity.{name}")
    logger.addHandler(lines)
    return logger, lines


@pytest.fixture(scope="module")
def finished(tiny_finished_run):
    """(experiment file, finished run, data): the session's tiny run (teacher, baseline, gen1), read only."""
    return tiny_finished_run


def _copy(finished, dest):
    """A copy of the finished run whose teacher cache records its digests in blocks of BLOCK_ROWS rows (as a
    large cache is in blocks of 64 MiB), so that a damaged block is one of several."""
    shutil.copytree(finished[1], dest)
    path = dest / "teacher_cache" / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["digest"] == teachers.cache_digest.new_record(str(path.parent / "embeddings.f16"), ROW_BYTES, 72)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(teachers.cache_digest, "BLOCK_BYTES", BLOCK_ROWS * ROW_BYTES)
        manifest["digest"] = teachers.cache_digest.new_record(str(path.parent / "embeddings.f16"), ROW_BYTES, 72)
    path.write_text(json.dumps(manifest))
    return dest


def _rerun(finished, run, *overrides):
    logger, lines = _logger(str(run))
    run_experiment(load_config(str(finished[0]), list(overrides)), str(run), progress=False, logger=logger)
    return lines.text()


def _state(path):
    return safe_torch_load(path)["state_dict"]


@pytest.fixture(scope="module")
def one_more(finished, tmp_path_factory):
    """The finished run, undamaged, rerun with a second generation: (gen2's weights, the cache's bytes)."""
    run = _copy(finished, tmp_path_factory.mktemp("reference") / "run")
    _rerun(finished, run, "generations=2")
    return _state(run / "gen2" / "student.pt"), (run / "teacher_cache" / "embeddings.f16").read_bytes()


# ------------------------------------------------------------------------------------------- the teacher cache

def test_a_finished_cache_and_stage_record_their_digests(finished):
    run = finished[1]
    digest = json.loads((run / "teacher_cache" / "manifest.json").read_text())["digest"]
    assert digest == {"algorithm": "sha256", "block_rows": (64 << 20) // ROW_BYTES,
                      "blocks": [file_sha256(str(run / "teacher_cache" / "embeddings.f16"))]}
    for stage in ("teacher", "gen1"):
        record = json.loads((run / stage / "result.json").read_text())["sha256"]
        assert record["student.pt"] == file_sha256(str(run / stage / "student.pt"))
        assert record["best.pt"] == file_sha256(str(run / stage / "best.pt"))
        assert record["last.pt"] == file_sha256(str(run / stage / "last.pt"))
    record = json.loads((run / "teacher" / "result.json").read_text())["sha256"]
    assert record["backbone.pth"] == file_sha256(str(run / "teacher" / "backbone.pth"))


@pytest.mark.parametrize("garbage", ["finite", "nan"])
def test_a_cache_damaged_in_place_is_embedded_again_and_the_next_generation_learns_from_the_right_rows(
        finished, one_more, tmp_path, garbage):
    """Finite garbage trained a new generation silently, NaN made it diverge blaming the optimizer: now the rows are
    embedded again, bit for bit (NaN: checked on the cache alone; a second generation is trained after finite
    garbage)."""
    run = _copy(finished, tmp_path / "run")
    rows = run / "teacher_cache" / "embeddings.f16"
    original = rows.read_bytes()
    emb = np.memmap(rows, dtype=np.float16, mode="r+", shape=(72, 2, 32))
    emb[18:21] = np.float16("nan") if garbage == "nan" else np.float16(3.0)  # rows 18..20: block 2, same size
    emb.flush()
    del emb
    assert rows.read_bytes() != original and len(rows.read_bytes()) == len(original)
    log = _rerun(finished, run, *(["generations=2"] if garbage == "finite" else []))
    assert f"{rows}: block 2 (rows 16..23) no longer match the digests recorded" in log
    assert "block 2 (rows 16..23) are again the bytes the cache was finished with" in log
    assert rows.read_bytes() == original  # embedded again in the first build's batches: the same bytes
    if garbage == "finite":
        gen2, cache = one_more
        assert cache == original
        got = _state(run / "gen2" / "student.pt")
        assert all(torch.equal(got[k], gen2[k]) for k in gen2)  # as if the cache had never been damaged


def test_a_damaged_cache_that_cannot_be_written_is_refused_naming_the_file_and_block(finished, tmp_path,
                                                                                    monkeypatch):
    run = _copy(finished, tmp_path / "run")
    rows = run / "teacher_cache" / "embeddings.f16"
    with open(rows, "r+b") as f:
        f.seek(60 * ROW_BYTES)  # row 60: block 7
        f.write(b"\x01" * 16)

    def read_only(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(teachers.cache, "_open_for_repair", read_only)
    with pytest.raises(DataFormatError, match=rf"{rows}: block 7 \(rows 56..63\) of the teacher cache no longer match "
                                              rf".*cannot be rewritten here \(Permission denied\); restore it"):
        _rerun(finished, run, "generations=2")
    assert not (run / "gen2").exists()


def test_a_cache_finished_without_digests_records_them_on_its_first_open(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    path = run / "teacher_cache" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["digest"]
    path.write_text(json.dumps(manifest))
    rows = (path.parent / "embeddings.f16").read_bytes()
    log = _rerun(finished, run)
    assert f"{run / 'teacher_cache'} was finished by an earlier facedistill without block digests: its rows are " \
           f"used as they are, and their digests are recorded now" in log
    record = json.loads(path.read_text())["digest"]  # 64 MiB blocks (not patched here): one block of 72 rows
    assert record["block_rows"] == (64 << 20) // ROW_BYTES and record["blocks"] == [file_sha256(str(path.parent /
                                                                                                    "embeddings.f16"))]
    assert (path.parent / "embeddings.f16").read_bytes() == rows  # not rebuilt


# ------------------------------------------------------------------------------------------- stage files

def _other_student(path):
    """A valid student.pt of the same architecture, other weights: what a replaced file could be."""
    cfg = safe_torch_load(path)
    torch.manual_seed(123)
    save_student(path, create_model(cfg["arch"], **cfg["kwargs"]), cfg["arch"], cfg["kwargs"])


def test_a_replaced_generation_student_is_refused_by_the_next_generation_eval_and_export(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    student = run / "gen1" / "student.pt"
    recorded = json.loads((run / "gen1" / "result.json").read_text())["sha256"]["student.pt"]
    _other_student(student)
    now = file_sha256(str(student))
    refusal = rf"{student}: not the file stage gen1 wrote \(its result.json records sha256 {recorded}, the file " \
              rf"has sha256 {now}\).*--restart-stage gen1"
    with pytest.raises(CheckpointError, match=refusal):
        _rerun(finished, run, "generations=2")
    assert not (run / "gen2").exists()  # refused before the stage began
    with pytest.raises(CheckpointError, match=refusal):  # as the born-again chain loads it as gen2's teacher
        teachers.build_teacher({"arch": "vargfacenet", "checkpoint": str(student),
                                **safe_torch_load(student)["kwargs"]})
    val = finished[2] / "synth_val.bin"
    assert main(["eval", str(student), "--bin", str(val)]) == 2
    assert main(["export", str(student), str(tmp_path / "s.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count(f"sha256 {recorded}, the file has sha256 {now}") == 2 and not (tmp_path / "s.onnx").exists()


def test_a_replaced_teacher_student_or_backbone_is_refused(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    backbone = run / "teacher" / "backbone.pth"
    torch.save({k: v + 1 for k, v in safe_torch_load(backbone).items()}, backbone)
    with pytest.raises(CheckpointError, match=rf"{backbone}: not the file stage teacher wrote .*--restart-stage "
                                              rf"teacher"):
        _rerun(finished, run, "generations=2")
    shutil.copy(finished[1] / "teacher" / "backbone.pth", backbone)
    _other_student(run / "teacher" / "student.pt")
    with pytest.raises(CheckpointError, match=r"teacher/student.pt: not the file stage teacher wrote .*--restart-stage "
                                              r"teacher"):
        _rerun(finished, run, "generations=2")
    assert not (run / "gen2").exists()


def test_a_replaced_last_pt_is_refused_as_the_next_generations_head_or_centres(finished, tmp_path):
    import dataclasses

    from distill.data import open_training_set
    from distill.run.plan import plan_stages
    from distill.train.engine import run_stage

    run = _copy(finished, tmp_path / "run")
    last = run / "gen1" / "last.pt"
    state = safe_torch_load(last)
    torch.save({**state, "head_weight": torch.zeros_like(state["head_weight"])}, last)
    cfg = load_config(str(finished[0]), ["generations=2"])
    gen2 = plan_stages(cfg, str(run))[-1]
    data = open_training_set(cfg.data.train, flip=True, input_size=cfg.data.input_size)
    for reads in ({"head_from": str(last)}, {"centres": str(last)}):  # init_head_from_previous; a born-again term
        with pytest.raises(CheckpointError, match=rf"{last}: not the file stage gen1 wrote .*--restart-stage gen1"):
            run_stage(cfg, dataclasses.replace(gen2, **reads), str(run / "gen2"), data, {}, progress=False)
    assert not (run / "gen2").exists()


# ------------------------------------------------------------------------------------------- teacher.head

def test_a_teacher_head_changed_between_a_stop_and_the_resume_is_noted(tmp_path, monkeypatch):
    from tiny import TinyFaces, stop_at_first_checkpoint, tame, tiny_config

    from distill.train.engine import StageSpec, run_stage

    head = tmp_path / "head.pt"
    torch.manual_seed(3)
    torch.save({"weight": torch.randn(8, 32)}, head)  # TinyFaces: 8 identities; the teacher's 32-d space
    cfg = tiny_config(distill={"loss": "margin_distillation", "alpha": 1.0},
                      teacher={"cache": False, "head": str(head)}, train={"max_steps": 4, "checkpoint_every": 2})
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=1.0, generation=1,
                     centres=str(head))
    teacher = tame(teachers.build_teacher(cfg.teacher.spec()))
    stop_at_first_checkpoint(cfg, spec, tmp_path / "stage", monkeypatch, teacher=teacher)
    first = file_sha256(str(head))
    assert safe_torch_load(tmp_path / "stage" / "last.pt")["centres_sha256"] == first
    torch.save({"weight": torch.randn(8, 32)}, head)
    logger, lines = _logger("head")
    run_stage(cfg, spec, str(tmp_path / "stage"), TinyFaces(), {}, teacher=teacher, progress=False, logger=logger)
    assert f"gen1: note: the teacher's class centres {head} changed since the stage started (sha256 {first[:16]}" \
           in lines.text()
    assert "steps 3..4 train against the new file" in lines.text()
    assert safe_torch_load(tmp_path / "stage" / "last.pt")["centres_sha256"] == file_sha256(str(head))
