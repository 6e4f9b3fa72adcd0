"""Exceptions with messages meant for users (the CLI prints them without a traceback)."""


class ConfigError(ValueError):
    """An invalid configuration value; the message names the option and the reason."""


class CheckpointError(ValueError):
    """A checkpoint could not be read, recognised or written; the message names the file and why."""
