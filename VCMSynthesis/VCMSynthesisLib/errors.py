"""Errors a user can cause, and the exit codes the worker CLI maps them to.

Raise `UserError` with a one-line message that says what was wrong and what to do;
the CLI prints it without a traceback and exits with `exit_code`.
"""

EXIT_OK = 0
EXIT_BAD_INPUT = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class UserError(Exception):
    """A mistake in an input (file, flag, checkpoint, model); the message is shown as is."""

    exit_code = EXIT_BAD_INPUT


class UsageError(UserError):
    """A command line that cannot be run as given (bad flag value, missing argument)."""

    exit_code = EXIT_USAGE


class Cancelled(Exception):
    """The run was stopped on request (Cancel, SIGINT, SIGTERM); nothing was written."""

    def __init__(self, exit_code: int = EXIT_SIGINT):
        super().__init__("cancelled")
        self.exit_code = exit_code
