"""Errors a user can cause, each carrying one line: what is wrong and how to fix it; and the one place that turns
them into what a command prints and its exit status."""

import sys
from collections.abc import Callable


class SeedLightningError(Exception):
    """Base class: the message is a single actionable line, shown without a stack trace by the CLI."""

    exit_code = 2
    """The exit status of a command that stops with this error."""


class ConfigError(SeedLightningError, ValueError):
    """A configuration value or path is wrong (raised at start, before any training)."""


class DataError(SeedLightningError, RuntimeError):
    """Input data (shards, annotation files, images) cannot be used."""


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message (its class name when it has none), to quote in a one-line error."""
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__


def run_command(prog: str, command: Callable[[], object]) -> int:
    """Run `command` as the program `prog`: exit status 0 when it returns; a SeedLightningError is printed as one
    line, `PROG: error: MESSAGE`, on stderr, and its `exit_code` is the status."""
    try:
        command()
    except SeedLightningError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.exit_code
    return 0
