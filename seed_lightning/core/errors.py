"""Errors a user can cause, each carrying one line: what is wrong and how to fix it."""


class SeedLightningError(Exception):
    """Base class: the message is a single actionable line, shown without a stack trace by the CLI."""


class ConfigError(SeedLightningError, ValueError):
    """A configuration value or path is wrong (raised at start, before any training)."""


class DataError(SeedLightningError, RuntimeError):
    """Input data (shards, annotation files, images) cannot be used."""
