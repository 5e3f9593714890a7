"""The `distill` command: the only place with argparse. One module per command family in this package.

Every module in COMMANDS exposes `add_commands(subparsers)`; each subcommand sets `func(args) -> int`
and calls library functions (distill.run.experiment, distill.deploy.export, ...), which never import this package.
Errors meant for people (DistillError) are printed without a traceback and exit with status 2;
Ctrl-C exits with 130. `--key=value` and `key=value` left over by argparse are experiment overrides.

Building the parser is light: at their top level the modules here import only the standard library and light
modules (distill.utils.errors, distill.eval.far: standard library only), the library (torch, ONNX, ...) inside
the handlers, so `distill --help` answers at once and `distill run` never loads ONNX code (tests/test_imports.py
checks both). A library constant shown in help text is read only when that help is printed (`help_values`);
`choices` held by a library module are checked in the handler.
"""

import argparse
import importlib
import os
import sys
import warnings

from distill.utils.errors import DistillError, UserNote

COMMANDS = [
    "distill.cli.export",
    "distill.cli.profile",
    "distill.cli.data",
    "distill.cli.eval",
    "distill.cli.ijb",
    "distill.cli.run",
    "distill.cli.compare",
    "distill.cli.sweep",
]


class _Later:
    """A library constant, imported when printed ("package.module:NAME"; a tuple prints as 'a, b')."""

    def __init__(self, ref: str):
        self.ref = ref

    def __str__(self) -> str:
        module, _, name = self.ref.partition(":")
        value = getattr(importlib.import_module(module), name)
        return ", ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def help_values(action: argparse.Action, **refs: str) -> argparse.Action:
    """Fill `%(key)s` in an option's help with a library constant when the help is printed, not when the parser
    is built (argparse expands help with the action's attributes; these import their module when printed):

        help_values(p.add_argument("--calib-images", help="... (default %(n)s)"),
                    n="distill.deploy.quantize:DEFAULT_CALIB_IMAGES")
    """
    for key, ref in refs.items():
        setattr(action, key, _Later(ref))
    return action


def thread_policy(args, workers: int = 0, say: bool = True):
    """The thread policy for a computing command (distill/utils/threads.py; `--threads` overrides it), said
    once on stderr unless the command says it itself (`say`). Returns the plan (its `workers`: the loader
    workers the command may run)."""
    from distill.utils.threads import apply_threads, plan_threads

    plan = apply_threads(plan_threads(workers, override=getattr(args, "threads", None) or None, key="--threads"))
    if say:
        print(f"distill {args.command}: {plan.describe()}", file=sys.stderr)
    return plan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Knowledge distillation for face recognition (VarGFaceNet students, frozen teachers).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        importlib.import_module(module).add_commands(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `--train.lr=0.05` (the form W&B sweep agents send) is an override, not an option; so is
    # `train.lr=0.05` placed after an option (argparse leaves those over, too)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and (e.startswith("--") or not e.startswith("-"))
                                              for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        with warnings.catch_warnings():
            shown = warnings.showwarning

            def note(message, category, *rest, **kwargs):  # a note or deprecated spelling: one line, no source dump
                if issubclass(category, UserNote):
                    print(f"distill {args.command}: note: {message}", file=sys.stderr)
                else:
                    shown(message, category, *rest, **kwargs)

            warnings.showwarning = note
            return int(args.func(args) or 0)
    except DistillError as err:
        print(f"distill {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk met outside the toolkit's own writers: one line, not a traceback
        from distill.utils.atomic import free_space, full_disk

        full = full_disk(err)
        if full is None:
            raise
        where = os.fspath(full.filename) if full.filename else "a file"
        room = free_space(where) if full.filename else ""
        print(f"distill {args.command}: error: could not write {where} ({full.strerror or full}"
              f"{': ' + room if room else ''}); free disk space there and rerun the same command", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distill {args.command}: interrupted", file=sys.stderr)
        return 130
