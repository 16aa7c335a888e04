"""Errors a user can cause, each carrying one line: what is wrong and how to fix it."""


class SeedLightningError(Exception):
    """Base class: the message is a single actionable line, shown without a stack trace by the CLI."""


class ConfigError(SeedLightningError, ValueError):
    """A configuration value or path is wrong (raised at start, before any training)."""


class DataError(SeedLightningError, RuntimeError):
    """Input data (shards, annotation files, images) cannot be used."""


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message (its class name when it has none), to quote in a one-line error."""
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__
