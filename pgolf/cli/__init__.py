"""The ``pgolf`` command line.

Each module of this package adds its sub-commands through ``register(subparsers)``; every
sub-command's handler takes the parsed namespace and returns an exit code. A ``UserError``
anywhere below becomes one line ``error: ...`` on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pgolf.errors import UserError

COMMAND_MODULES = ("run", "data", "train", "eval", "inspect", "quant", "audit", "submit", "research", "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgolf",
        description="Parameter Golf workbench: train, quantise, compress, evaluate and submit small LMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"pgolf.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"pgolf.cli.{name}":
                continue  # a command family that this checkout does not have
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
