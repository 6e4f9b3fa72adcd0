"""Exceptions with messages meant for users (the CLI prints them without a traceback)."""


class ConfigError(ValueError):
    """An invalid configuration value; the message names the option and the reason."""


class CheckpointError(ValueError):
    """A checkpoint could not be read, recognised or written; the message names the file and why."""


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message gives the ``pip install`` line."""

    def __init__(self, feature: str, extra: str, cause: BaseException | None = None) -> None:
        detail = f" ({cause})" if cause is not None else ""
        super().__init__(f"{feature} needs the {extra} extra: pip install 'detrkit[{extra}]'{detail}")
