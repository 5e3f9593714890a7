"""`distill run --dry-run` makes the checks `distill run` makes, on the same files: the whole .rec/.idx and .bin files
(not only the images its two steps would read), teacher.head against the real training set's identities (its
stand-in stages get a head of their own size), and every refusal of `run` in the probe table; its temporary folder
goes whatever fails."""

import io
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_probe import PROBE
from tiny_experiment import write_experiment

import teachers
from distill.cli import main

IDS, PER_ID, SIDE = 12, 2, 16


def _jpeg(rng) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A RecordIO training set of 12 identities, a verification .bin and a loaded 32-d teacher's backbone.pth."""
    from distill.data import write_insightface_rec, write_verification_bin

    root = tmp_path_factory.mktemp("dry_run_files")
    rng = np.random.default_rng(0)
    write_insightface_rec(root / "faces", ((c, _jpeg(rng)) for c in range(IDS) for _ in range(PER_ID)), IDS, SIDE)
    write_verification_bin(root / "val.bin", [_jpeg(rng) for _ in range(8)], [True, False, True, False])
    torch.manual_seed(0)
    teacher = teachers.build_teacher({"arch": "iresnet18", "input_size": SIDE, "embedding_size": 32})
    torch.save(teacher.model.state_dict(), root / "backbone.pth")
    return root


def _experiment(tmp_path, files, faces=None, **changes):
    """A loaded teacher (nothing trained for it), gen1 only, on the RecordIO set `faces` (default: the fixture's)."""
    data = {"train": str(faces or files / "faces"), "val": [str(files / "val.bin")], "synthetic": None}
    teacher = {"checkpoint": str(files / "backbone.pth"), "train": None, "cache": False}
    return write_experiment(tmp_path / "x.yaml", tmp_path / "unused", side=SIDE, tracking={"wandb": "disabled"},
                            baseline=False, generations=1, data=data, teacher=teacher, **changes)


@pytest.mark.parametrize("cut", ["empty", "17 bytes", "half", "3 bytes short"])
def test_a_truncated_train_rec_is_refused_by_the_dry_run_as_by_the_run(files, tmp_path, capsys, cut):
    faces = tmp_path / "faces"
    shutil.copytree(files / "faces", faces)
    data = (faces / "train.rec").read_bytes()
    keep = {"empty": 0, "17 bytes": 17, "half": len(data) // 2, "3 bytes short": len(data) - 3}[cut]
    (faces / "train.rec").write_bytes(data[:keep])
    exp = _experiment(tmp_path, files, faces)
    assert main(["run", str(exp), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    refused = capsys.readouterr().err.strip().splitlines()[-1]
    assert "train.rec" in refused
    assert main(["run", str(exp), "--out", str(tmp_path / "run"), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert refused in captured.err and "Traceback" not in captured.err
    assert "every stage trains" not in captured.out
    assert not (tmp_path / "run").exists()


def test_a_truncated_verification_bin_is_refused_by_the_dry_run(files, tmp_path, capsys):
    cut = tmp_path / "val.bin"
    cut.write_bytes((files / "val.bin").read_bytes()[:-40])
    exp = _experiment(tmp_path, files)
    assert main(["run", str(exp), f"data.val=[{cut}]", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "val.bin: truncated" in err and "Traceback" not in err


def test_the_dry_run_checks_teacher_head_against_the_real_training_set(files, tmp_path, capsys):
    torch.save(torch.randn(IDS, 32), tmp_path / "head.pt")  # the real set's 12 identities: right
    exp = _experiment(tmp_path, files, distill={"loss": "kd", "alpha": 1.0})
    assert main(["run", str(exp), f"teacher.head={tmp_path / 'head.pt'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: gen1 ok" in out and "every stage trains" in out
    torch.save(torch.randn(4, 32), tmp_path / "four.pt")  # the stand-in's count, not the training set's: wrong
    refusal = f"holds centres of 4 identities, data.train has {IDS}"
    assert main(["run", str(exp), f"teacher.head={tmp_path / 'four.pt'}", "--dry-run"]) == 2
    assert refusal in capsys.readouterr().err
    # doctor counts the same identities: it refuses the wrong file and accepts the right one
    assert main(["doctor", str(exp), f"teacher.head={tmp_path / 'four.pt'}", "--out", str(tmp_path / "run")]) == 1
    assert refusal in capsys.readouterr().out
    assert main(["doctor", str(exp), f"teacher.head={tmp_path / 'head.pt'}", "--out", str(tmp_path / "run")]) == 0
    assert f"class centres of {IDS} identities" in capsys.readouterr().out


RUN_REFUSALS = [(argv, says) for argv, says in PROBE if argv[0] == "run"]
RUN_IDS = [" ".join(argv[1:]).replace("{exp}", "X") for argv, _ in RUN_REFUSALS]


@pytest.mark.parametrize("argv, says", RUN_REFUSALS, ids=RUN_IDS)
def test_every_refusal_of_run_in_the_probe_is_a_refusal_of_the_dry_run(tmp_path, monkeypatch, capsys, argv, says):
    import distill.run.dry_run

    monkeypatch.chdir(tmp_path)
    # nothing gets as far as training: a row that did would fail here instead of training
    monkeypatch.setattr(distill.run.dry_run, "run_stage", lambda *a, **k: pytest.fail("the dry run trained"))
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", tracking={"wandb": "disabled"})
    (tmp_path / "dup.yaml").write_text("name: a\nname: b\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main([a.replace("{exp}", str(exp)).replace("{dir}", str(tmp_path)) for a in argv] + ["--dry-run"]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_a_failure_inside_the_steps_leaves_no_temporary_folder(files, tmp_path, monkeypatch):
    import tempfile

    import distill.run.dry_run

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again

    def out_of_memory(*args, **kwargs):
        raise MemoryError("stand-in for an allocation that failed")

    monkeypatch.setattr(distill.run.dry_run, "run_stage", out_of_memory)
    exp = _experiment(tmp_path, files)
    with pytest.raises(MemoryError):
        main(["run", str(exp), "--out", str(tmp_path / "run"), "--dry-run"])
    assert list(scratch.iterdir()) == []


def _fail_on_rank_one(*args, **kwargs):
    """Rank 1 runs out of memory in its stage; rank 0 waits in its own for the ranks' first exchange."""
    import time

    from distill.utils.dist import rank

    if rank() == 1:
        raise MemoryError("stand-in for an allocation that failed")
    time.sleep(60)


def test_a_rank_that_fails_inside_the_steps_leaves_no_temporary_folder(files, tmp_path, monkeypatch):
    """Whichever rank fails removes the shared folder, and a rank stopped with SIGTERM (torchrun's, here
    torch.multiprocessing's, when another rank fails) removes it too."""
    from forked_ranks import cli_ranks

    import distill.run.dry_run

    monkeypatch.setattr(distill.run.dry_run, "run_stage", _fail_on_rank_one)
    exp = _experiment(tmp_path, files)
    with pytest.raises(Exception, match="MemoryError"):
        cli_ranks(tmp_path, 2, ["run", str(exp), "--out", str(tmp_path / "run"), "--dry-run"])
    assert [p.name for p in (tmp_path / "scratch").iterdir()] == []


def test_a_folder_left_by_a_killed_dry_run_is_removed_by_the_next(files, tmp_path, monkeypatch, capsys):
    import subprocess
    import sys
    import tempfile

    from distill.run.dry_run import _machine

    scratch = tmp_path / "scratch"
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = scratch / "distill-dry-run-killed"
    left.mkdir(parents=True)
    (left / "owner").write_text(f"{_machine()} {int(gone.stdout)}")  # a process that has ended
    (left / "gen1").mkdir()
    alive = scratch / "distill-dry-run-running"
    alive.mkdir()
    (alive / "owner").write_text(f"{_machine()} {os.getpid()}")  # this one: still running
    elsewhere = scratch / "distill-dry-run-elsewhere"
    elsewhere.mkdir()
    (elsewhere / "owner").write_text(f"another-host/pid-1 {int(gone.stdout)}")  # not this machine's to judge
    exp = _experiment(tmp_path, files)
    assert main(["run", str(exp), "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    assert sorted(p.name for p in scratch.iterdir()) == ["distill-dry-run-elsewhere", "distill-dry-run-running"]
    assert f"removed {left}, left by a dry run (pid {int(gone.stdout)}) that was killed" in capsys.readouterr().out


def _terminated(*args, **kwargs):
    """SIGTERM arrives (a scheduler's, or torchrun's when another rank failed) while the dry run holds its folder."""
    import signal
    import time

    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)


def test_a_dry_run_stopped_by_sigterm_removes_its_folder_and_exits_143(files, tmp_path, monkeypatch):
    from forked_ranks import cli_ranks

    import distill.run.dry_run

    monkeypatch.setattr(distill.run.dry_run, "run_stage", _terminated)
    exp = _experiment(tmp_path, files)
    with pytest.raises(Exception, match="exit code 143"):  # (its own process: the test's would end otherwise)
        cli_ranks(tmp_path, 1, ["run", str(exp), "--out", str(tmp_path / "run"), "--dry-run"])
    assert [p.name for p in (tmp_path / "scratch").iterdir()] == []
