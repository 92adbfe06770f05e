"""User-facing errors: a mistake in a config or a dataset is reported as one line, before training."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the option and the fix."""


def root_cause(exc: BaseException) -> BaseException:
    """The original exception behind Hydra's InstantiationException wrappers."""
    while exc.__cause__ is not None and type(exc).__name__ == "InstantiationException":
        exc = exc.__cause__
    return exc
