"""`vcm-synthesis` command line: one subcommand per front-end task.

Each module in `SUBCOMMANDS` defines `register(subparsers)`, which adds its parsers and sets
`handler=callable(args) -> int` as a default; a command imports only its own module, so that
`models` runs without torch. Errors a user can cause are printed as one
line, without a traceback, with the exit codes of `VCMSynthesisLib.errors`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from VCMSynthesisLib.errors import EXIT_USAGE, Cancelled, UserError

SUBCOMMANDS = {  # command -> the module that registers it
    "import-reference": "VCMSynthesisLib.checkpoints",
    "download-model": "VCMSynthesisLib.registry",
    "synthesize": "VCMSynthesisLib.worker",
    "models": "VCMSynthesisLib.worker",
    "batch": "VCMSynthesisLib.batch",
    "superres": "VCMSynthesisLib.superres",
    "edit": "VCMSynthesisLib.edit",
    "serve": "VCMSynthesisLib.serve",
}


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage mistakes in one line with exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; for a known `command` only its module is imported, else all of them."""
    parser = _ArgumentParser(prog="vcm-synthesis", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    modules = [SUBCOMMANDS[command]] if command in SUBCOMMANDS else SUBCOMMANDS.values()
    for module_name in dict.fromkeys(modules):
        importlib.import_module(module_name).register(subparsers)
    return parser


def run_reporting_errors(run: Callable[[], int | None]) -> int:
    """Runs a front end's work; user errors and cancels become one stderr line and an exit code."""
    try:
        return int(run() or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except Cancelled as cancelled:
        print("cancelled: nothing was written", file=sys.stderr)
        return cancelled.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    return run_reporting_errors(lambda: args.handler(args))
