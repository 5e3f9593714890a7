"""`distill data ...`: pack, reindex, synth and inspect face datasets.

Each module in DATA_COMMANDS exposes `add_data_commands(subparsers)` for its own subcommands.
"""

import importlib

DATA_COMMANDS: list = [
    "distill.data.pack",
    "distill.data.synthetic",
    "distill.data.inspect",
]


def add_commands(sub) -> None:
    parser = sub.add_parser("data", help="pack, reindex, generate (synth) and inspect face datasets")
    data_sub = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    for module in DATA_COMMANDS:
        importlib.import_module(module).add_data_commands(data_sub)
