"""Processes forked from the test process, its imports done (cli_in_fork: one `distill` command as a new process
would run it); and a torchrun job's ranks, forked so: each gets torchrun's environment (WORLD_SIZE, RANK,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and runs `distill.cli.main(argv)`, as
`torchrun --nproc_per_node=N -m distill.cli ...` does (or any function, as torchrun runs a script): the same code,
without N+1 fresh interpreters importing torch and timm (seconds each on this CPU). torchrun itself adds only its
launcher and these variables, which are all the toolkit reads (distill/utils/dist.py)."""

import contextlib
import multiprocessing
import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from distill.cli import main


def _environment(rank, tmp, world, port) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TMPDIR=f"{tmp}/scratch", OMP_NUM_THREADS="1")
    import tempfile
    tempfile.tempdir = None  # read TMPDIR again (the parent process may have read it)
    torch.set_num_threads(1)


def _rank(rank, tmp, world, port, argv):
    _environment(rank, tmp, world, port)
    with open(f"{tmp}/rank{rank}.out", "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(argv))
    with open(f"{tmp}/rank{rank}.code", "w") as f:
        f.write(str(code))
    sys.stdout.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(rank, tmp, world, port, fn, args):
    _environment(rank, tmp, world, port)
    fn(*args)


def _start(tmp, world: int, target, args: tuple) -> None:
    os.makedirs(f"{tmp}/scratch", exist_ok=True)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    torch.multiprocessing.start_processes(target, args=(str(tmp), world, _free_port(), *args), nprocs=world,
                                          join=True, start_method=method)


def call_ranks(tmp, world: int, fn, *args) -> None:
    """`fn(*args)` in each of `world` forked ranks with torchrun's environment (fn joins the group itself:
    distill.utils.dist.init_distributed); a rank that raises fails the call."""
    _start(tmp, world, _call, (fn, args))


def _gloo_rank(rank, tmp, world, port, body):
    torch.set_num_threads(1)
    data = torch.load(f"{tmp}/data.pt")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.save(body(rank, data), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def gloo_ranks(tmp, data: dict, body, world: int = 2) -> list:
    """[body(rank, data) of each rank]: `world` forked ranks joined in one gloo group (one torch thread each), each
    given the tensors of `data` and returning what it computed (saved and read back through `tmp`)."""
    torch.save(data, f"{tmp}/data.pt")
    _start(tmp, world, _gloo_rank, (body,))
    return [torch.load(f"{tmp}/rank{r}.pt") for r in range(world)]


def cli_ranks(tmp, world: int, argv: list) -> tuple[list, list]:
    """([exit code of each rank], [what each rank printed]) of `distill <argv>` run by `world` forked ranks; their
    temporary folders go to tmp/scratch."""
    _start(tmp, world, _rank, (argv,))
    codes = [int((tmp / f"rank{r}.code").read_text()) for r in range(world)]
    return codes, [(tmp / f"rank{r}.out").read_text() for r in range(world)]


def _cli_child(log: str, cwd: str, argv: list) -> None:
    os.chdir(cwd)
    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(argv))
        sys.stdout.flush()
    os._exit(code)


def cli_in_fork(argv: list, cwd, log) -> tuple[int, str]:
    """(exit code, what it printed) of `distill <argv>` run in `cwd` by a forked copy of this process: a fresh
    `python -m distill.cli` without its seconds of imports, and this process's state (working folder, torch's
    threads) left as it was."""
    process = multiprocessing.get_context("fork").Process(target=_cli_child, args=(str(log), str(cwd), argv))
    process.start()
    process.join()
    return process.exitcode, open(log).read()
