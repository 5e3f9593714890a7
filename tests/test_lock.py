"""One writer per run directory: a second process stops at once naming the first; a killed holder never blocks."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distill.cli import main
from distill.run.lock import RunDirectoryLocked, run_directory_lock

REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from distill.run.lock import run_directory_lock
with run_directory_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A real second process holding the lock of tmp_path/run."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_second_writer_stops_at_once_naming_the_first(tmp_path, holder):
    with pytest.raises(RunDirectoryLocked, match=rf"another distill run \(pid {holder.pid}, host "
                                                 rf"{socket.gethostname()}\) is using {tmp_path / 'run'}"):
        with run_directory_lock(str(tmp_path / "run")):
            pass


def test_distill_run_and_cache_build_refuse_a_locked_directory(tmp_path, holder, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = tmp_path / "x.yaml"
    exp.write_text(yaml.safe_dump({"name": "x", "data": {"train": "data/none", "val": []},
                                   "teacher": {"arch": "iresnet18", "input_size": 32, "embedding_size": 32,
                                               "train": {"max_steps": 1}},
                                   "student": {"embedding_size": 32}}))
    t0 = time.monotonic()
    assert main(["run", str(exp), "--out", str(tmp_path / "run")]) == 2
    assert main(["cache", "build", str(exp), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count(f"another distill run (pid {holder.pid}") == 2 and "Traceback" not in err
    assert time.monotonic() - t0 < 10  # at once, before opening any data
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing else written


def test_a_killed_holder_never_blocks_the_rerun(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run" / ".lock").exists()  # the file stays; the OS dropped the lock with the process
    with run_directory_lock(str(tmp_path / "run")):
        assert f'"pid": {os.getpid()}' in (tmp_path / "run" / ".lock").read_text()
    with run_directory_lock(str(tmp_path / "run")):  # released on exit: taken again at once
        pass
