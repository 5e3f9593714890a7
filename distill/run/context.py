"""The run context: what every step of a run needs to know about where and how it runs, passed as one value
instead of separate `log=` parameters and rank checks.

    RunContext(layout, device, log, progress, rank, world_size)

`log` is a `logging.Logger`: on rank 0 it writes each message as one plain line (the message only, no level
or time) to the current standard output (`run_logger`), so what a user sees of a run reads as printed lines;
on the other ranks of a torchrun job it is `silent_logger()`, which logs nothing (one voice: rank 0 reports
for all). A caller that wants the lines elsewhere passes `run_logger(write)`: `write(line)` gets each one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from distill.utils.layout import RunLayout

LOGGER_NAME = "distill.run"


class _Lines(logging.Handler):
    """Each record as one line to `write` (formatted by the handler's formatter)."""

    def __init__(self, write):
        super().__init__(logging.INFO)
        self.write = write
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record))
        except Exception:  # logging's contract: a failing handler reports, never raises
            self.handleError(record)


def _print(line: str) -> None:
    print(line, flush=True)  # sys.stdout as it is now (a test's capture, a redirected stream)


def run_logger(write=None) -> logging.Logger:
    """A logger whose messages go, one plain line each, to `write(line)` (default: standard output). It is not
    registered with `logging.getLogger`, so handlers a program configures elsewhere see no second copy."""
    logger = logging.Logger(LOGGER_NAME, logging.INFO)
    logger.addHandler(_Lines(write or _print))
    return logger


def silent_logger() -> logging.Logger:
    """A logger that logs nothing (the non-zero ranks of a torchrun job)."""
    logger = logging.Logger(LOGGER_NAME + ".silent", logging.CRITICAL + 1)
    logger.addHandler(logging.NullHandler())
    logger.disabled = True
    return logger


@dataclass(frozen=True)
class RunContext:
    layout: RunLayout           # the run directory's files
    device: object              # torch.device the run trains and embeds on
    log: logging.Logger         # rank 0: plain lines to standard output; other ranks: silent
    progress: bool = False      # progress bars (rank 0, a terminal)
    rank: int = 0
    world_size: int = 1

    @property
    def run_dir(self) -> str:
        return self.layout.root

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def quiet(self) -> RunContext:
        """The same context with a silent logger and no progress bars (a dry run's inner steps)."""
        return replace(self, log=silent_logger(), progress=False)


def run_context(cfg, run_dir: str, progress: bool = False, logger: logging.Logger | None = None) -> RunContext:
    """The context of a run of `cfg` in `run_dir` in this process: its rank and world size (torchrun), the
    configured device, and `logger` (default `run_logger()`) on rank 0, a silent one on the other ranks."""
    from distill.utils.device import resolve_device
    from distill.utils.dist import rank, world_size

    r = rank()
    log = (logger or run_logger()) if r == 0 else silent_logger()
    return RunContext(RunLayout(run_dir), resolve_device(cfg.device), log, progress and r == 0, r, world_size())
