"""The ``rankwise`` command line: one subcommand per module listed in :data:`SUBCOMMANDS`.

Each module exposes ``add_parser(subparsers)``, which adds its subparser and sets a ``func``
default taking the parsed arguments and returning an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ._version import __version__

SUBCOMMANDS = [
    "rankwise.experiment.finetune",
    "rankwise.experiment.compare",
    "rankwise.experiment.bench",
    "rankwise.inspect_cli",
    "rankwise.compress.cli",
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="rankwise", description="Low-rank adaptation and compression, exact and fast.")
    parser.add_argument("--version", action="version", version=f"rankwise {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; bad input prints a one-line error and returns 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"rankwise: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
