"""`vcm-synthesis` command line: one subcommand per front-end task.

Each module in `SUBCOMMANDS` defines `register(subparsers)`, which adds its parsers and sets
`handler=callable(args) -> int` as a default; a command imports only its own module, so that
`models` runs without torch. Errors a user can cause are printed as one line, without a
traceback, with the exit codes of `VCMSynthesisLib.errors`. Anything else (a bug) is one line
too, naming a log file under `<user folder>/logs` that holds the traceback.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from VCMSynthesisLib.errors import EXIT_SIGINT, EXIT_USAGE, Cancelled, UserError

T = TypeVar("T")

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


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage mistakes in one line with exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; for a known `command` only its module is imported, else all of them."""
    parser = OneLineArgumentParser(prog="vcm-synthesis", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineArgumentParser)
    modules = [SUBCOMMANDS[command]] if command in SUBCOMMANDS else SUBCOMMANDS.values()
    for module_name in dict.fromkeys(modules):
        importlib.import_module(module_name).register(subparsers)
    return parser


def log_folder() -> Path:
    """Where tracebacks of unexpected errors go: `<user folder>/logs` (see `files.user_home`)."""
    from VCMSynthesisLib.files import user_home

    return user_home() / "logs"


def internal_error(error: BaseException) -> UserError:
    """An unexpected exception as a one-line `UserError`; its traceback goes to a log file.

    The log is `log_folder()/error-<time>-<pid>.log` (the system temp folder if that cannot be
    written); the message names it, so a user can attach it to a bug report.
    """
    summary = f"{type(error).__name__}: {str(error).strip()}".splitlines()[0][:300]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    text = f"{' '.join(sys.argv)}\n\n{text}"
    for folder in (log_folder(), Path(tempfile.gettempdir())):
        path = folder / f"vcm-synthesis-error-{stamp}-{os.getpid()}.log"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError:
            continue
        return UserError(f"internal error ({summary}); the traceback is in {path}; please report it")
    return UserError(f"internal error ({summary}); no log could be written; please report it")


def run_reporting_errors(run: Callable[[], int | None]) -> int:
    """Runs a front end's work: every failure becomes one stderr line and an exit code.

    User errors are printed as they are; a cancel (a signal, Ctrl-C) says nothing was
    written; any other exception is reported by `internal_error` (the traceback in a log).
    """
    try:
        return int(run() or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except Cancelled as cancelled:
        print("cancelled: nothing was written", file=sys.stderr)
        return cancelled.exit_code
    except KeyboardInterrupt:
        print("cancelled: nothing was written", file=sys.stderr)
        return EXIT_SIGINT
    except Exception as error:  # the top-level handler: no traceback on the user's terminal
        reported = internal_error(error)
        print(f"error: {reported}", file=sys.stderr)
        return reported.exit_code


def _interrupt_after(step: Callable[[], T]) -> T:
    """Runs `step` (importing torch and MONAI) with Ctrl-C recorded, then raised once it is done.

    A KeyboardInterrupt raised inside torch's native import code aborts the process with a C++
    error instead of unwinding; recorded, it becomes the usual one line and exit 130.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return step()  # not ours to change (a host application's handler, or SIGINT ignored)
    interrupted = []
    signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        return step()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if interrupted:
            raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def run() -> int:
        # The subcommand's imports (torch, MONAI for most) happen here: inside the handler too.
        parser = _interrupt_after(lambda: build_parser(argv[0] if argv else None))
        args = parser.parse_args(argv)
        return args.handler(args)

    return run_reporting_errors(run)
