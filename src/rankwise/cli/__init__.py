"""The ``rankwise`` command line: one module per subcommand (:data:`SUBCOMMANDS`).

Each module parses its options into the dataclass of its pipeline (``rankwise.experiment`` or
``rankwise.compress``), calls it and prints; it exposes ``add_parser(subparsers)``, which adds its
subparser and sets a ``func`` default taking the parsed arguments and returning an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .._version import __version__

SUBCOMMANDS = [
    "rankwise.cli.finetune",
    "rankwise.cli.compare",
    "rankwise.cli.bench",
    "rankwise.cli.inspect",
    "rankwise.cli.compress",
]


# bitsandbytes, imported through peft, logs on CPUs with AVX512-BF16 that it could not fetch an optional
# 4-bit kernel from the Hugging Face hub ("pip install kernels"): rankwise never uses the hub, and the
# built-in kernel computes the same thing. Shown with --verbose.
HUB_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"


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
    """Run the command line; bad input prints a one-line error and returns 2, a diverged run returns 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not {"-v", "--verbose"} & set(argv):
        logging.getLogger(HUB_KERNEL_LOGGER).setLevel(logging.ERROR)
    from ..integrations import TrainingDiverged  # imports transformers (and through it bitsandbytes)

    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    args.argv = argv  # --nproc re-launches the same command line under torchrun
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"rankwise: error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"rankwise: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
