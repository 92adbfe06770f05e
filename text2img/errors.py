"""User-facing errors: a mistake in a config or a dataset is reported as one line, before training."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the option and the fix."""


class DataError(ValueError):
    """Data that cannot be used as it is: a sample refused with `data.source.strict`, an image that no longer
    decodes, shards that cannot be read or hold no usable sample. The message names the file and the fix.

    Unlike most ConfigErrors it can surface while training runs (evaluation splits are read in the data module's
    setup, training samples in its loaders, possibly in DataLoader worker processes); it is reported as one line
    then too.
    """


def root_cause(exc: BaseException) -> BaseException:
    """The original exception behind Hydra's InstantiationException wrappers."""
    while exc.__cause__ is not None and type(exc).__name__ == "InstantiationException":
        exc = exc.__cause__
    return exc


def message_of(exc: BaseException) -> str:
    """An error's own message, also when a DataLoader worker raised it: torch re-raises it in the main process as the
    same type with a message of several lines, "Caught DataError in DataLoader worker process 0." and the worker's
    traceback, whose last line is "text2img.errors.DataError: <message>"."""
    message = str(exc)
    lines = message.strip().splitlines()
    if len(lines) > 1 and "in DataLoader worker process" in lines[0]:
        name = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        if lines[-1].startswith(name):
            return lines[-1].removeprefix(name)
    return message
