"""The error types relax raises for mistakes a user can fix, and how the CLI shows them.

A `RelaxError` means "the input is wrong", not "relax is broken": a missing
folder, a corrupt checkpoint, a config key that does not exist, a benchmark
file with no rows. Its message names the file, flag or key and, after the
message, says how to fix it (`hint`). The `relax` command prints such errors
as one line, `relax <command>: <message> (<hint>)`, and exits with code 2;
`--debug` or `RELAX_DEBUG=1` shows the traceback instead. Any other exception
is a bug and keeps its traceback.

The subclasses are also `ValueError`s, so library callers that catch
`ValueError` keep working.
"""

import os


class RelaxError(Exception):
    """A mistake in the user's input. `hint`: how to fix it (shown in parentheses)."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self):
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(RelaxError, ValueError):
    """A preset, a key=value override or a command-line flag is wrong."""


class DataError(RelaxError, ValueError):
    """A data or benchmark file cannot be used (missing, empty, malformed, no such column)."""


class InputError(RelaxError, ValueError):
    """Arrays passed to a decoder are invalid (token ids outside the vocabulary, bad lengths)."""


def one_line(error: BaseException) -> str:
    """The message the CLI prints for a user error: one line, no traceback."""
    if isinstance(error, RelaxError):
        text = str(error)
    elif isinstance(error, OSError) and error.filename is not None:
        what = (error.strerror or type(error).__name__).lower()
        text = f"{error.filename}: {what}"
    elif isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def debug_enabled() -> bool:
    return os.environ.get("RELAX_DEBUG", "").lower() in ("1", "true", "yes", "on")
