"""What the benchmark scripts share on their command lines, so they fail like `distill` commands: argparse types
for counts and sizes (a bad value is argparse's one-line error with exit 2, naming the option) and `run`, which
prints a toolkit error (a missing or damaged file, a bad setting) as one line and exits 2, never a traceback."""

from __future__ import annotations

import argparse
import sys


def count(minimum: int = 1):
    """An argparse type: an integer of at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def counts(minimum: int = 0):
    """An argparse type: comma-separated integers of at least `minimum` ('1,2,4')."""
    one = count(minimum)

    def parse(text: str) -> list:
        return [one(part.strip()) for part in text.split(",") if part.strip()]
    parse.__name__ = f"comma-separated integers >= {minimum}"
    return parse


def run(main, name: str) -> int:
    """main()'s exit status; a DistillError or an OS error (missing file, no permission) is one line on stderr
    and status 2, as the `distill` command reports them."""
    from distill.utils.errors import DistillError

    try:
        result = main()
    except (DistillError, OSError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0
