"""`distill run x.yaml --dry-run` under torchrun on CPU (gloo), with 2 and 3 ranks: every rank trains every stage of
the plan in one shared temporary folder, on stand-in data enough for a step at any world size; rank 0 speaks.

The ranks are forked from this process with torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and run the command's `main`, as `torchrun -m distill.cli` does: the same code, without five fresh
interpreters importing torch and timm (tests/test_distributed.py runs torchrun itself)."""

import contextlib
import multiprocessing
import os
import socket
import sys

import torch
import yaml
from tiny_experiment import tiny_experiment

import distill.run.dry_run  # noqa: F401  (imported once here, not in every forked rank)
import distill.run.experiment  # noqa: F401
from distill.cli import main


def _rank(rank, tmp, world, port):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TMPDIR=f"{tmp}/scratch")
    import tempfile
    tempfile.tempdir = None  # read TMPDIR again (the parent process may have read it)
    with open(f"{tmp}/rank{rank}.out", "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["run", f"{tmp}/tiny.yaml", "--out", f"{tmp}/run", "--dry-run", "dist.timeout_minutes=2"])
    with open(f"{tmp}/rank{rank}.code", "w") as f:
        f.write(str(code))
    sys.stdout.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dry_run_under_torchrun_with_two_and_three_ranks(tmp_path):
    # a trained teacher (every rank loads rank 0's file) and gen1, in P×K batches (groups of 2 at every rank)
    raw = tiny_experiment(tmp_path / "data", side=16, tracking={"wandb": "disabled"}, baseline=False, generations=1,
                          data={"images_per_id": 2})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "scratch").mkdir()  # where the dry run's temporary folder goes: checked empty afterwards
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    for world in (2, 3):
        torch.multiprocessing.start_processes(_rank, args=(str(tmp_path), world, _free_port()), nprocs=world,
                                              join=True, start_method=method)
        outs = [(tmp_path / f"rank{r}.out").read_text() for r in range(world)]
        codes = [(tmp_path / f"rank{r}.code").read_text() for r in range(world)]
        assert codes == ["0"] * world, f"{world} ranks:\n" + "\n".join(outs)
        for stage in ("teacher", "gen1"):
            assert outs[0].count(f"dry run: {stage} ok") == 1, outs[0]
        assert outs[0].count("dry run passed") == 1 and not any("dry run" in out for out in outs[1:])  # rank 0 speaks
        made = [name for name in os.listdir(tmp_path / "scratch") if name.startswith("distill-dry-run-")]
        assert not made, made  # the shared folder removed, by rank 0, at the end
    assert not (tmp_path / "run").exists()  # nothing kept
