"""A torchrun job's ranks, forked from the test process: each gets torchrun's environment (WORLD_SIZE, RANK,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and runs `distill.cli.main(argv)`, as
`torchrun --nproc_per_node=N -m distill.cli ...` does: the same code, without N+1 fresh interpreters importing torch
and timm (seconds each on this CPU). tests/test_teacher_cache.py runs torchrun itself."""

import contextlib
import multiprocessing
import os
import socket
import sys

import torch

from distill.cli import main


def _rank(rank, tmp, world, port, argv):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TMPDIR=f"{tmp}/scratch", OMP_NUM_THREADS="1")
    import tempfile
    tempfile.tempdir = None  # read TMPDIR again (the parent process may have read it)
    torch.set_num_threads(1)
    with open(f"{tmp}/rank{rank}.out", "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(argv))
    with open(f"{tmp}/rank{rank}.code", "w") as f:
        f.write(str(code))
    sys.stdout.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_ranks(tmp, world: int, argv: list) -> tuple[list, list]:
    """([exit code of each rank], [what each rank printed]) of `distill <argv>` run by `world` forked ranks; their
    temporary folders go to tmp/scratch."""
    os.makedirs(f"{tmp}/scratch", exist_ok=True)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    torch.multiprocessing.start_processes(_rank, args=(str(tmp), world, _free_port(), argv), nprocs=world,
                                          join=True, start_method=method)
    codes = [int((tmp / f"rank{r}.code").read_text()) for r in range(world)]
    return codes, [(tmp / f"rank{r}.out").read_text() for r in range(world)]
