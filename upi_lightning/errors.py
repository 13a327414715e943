"""Exceptions raised for bad user input.

Every error a user can cause (a wrong name, a missing file, an impossible setting) is raised as a
:class:`UPIError` whose message names the problem and the fix. Entry points print such errors as a
single line instead of a traceback.
"""

import re
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UPIError(ValueError):
    """A user-facing configuration or input error with a message that says how to fix it."""


def check_count(name: str, value: int, minimum: int = 1) -> int:
    """Return ``value`` if it is an integer ``>= minimum`` (not a bool), else raise :class:`UPIError` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UPIError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


class DatasetNotFoundError(UPIError, FileNotFoundError):
    """A dataset is neither on disk nor downloadable."""


class CheckpointMismatchError(UPIError):
    """A checkpoint or perturbation file does not fit the model or data it is loaded into."""


class ProcessLostError(UPIError):
    """A process of a multi-process run died or stopped answering, so the others stopped too."""


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(err: BaseException, limit: int = 200) -> str:
    """``"Type: first line of the message"`` of a library error, without terminal colour codes.

    For quoting torch's (often multi-line, coloured) errors inside a one-line :class:`UPIError`.
    """
    text = _ANSI_ESCAPE.sub("", str(err))
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first[:limit]}"


def user_error(err: BaseException) -> UPIError | None:
    """The :class:`UPIError` that caused ``err``, following its cause/context chain (``None`` if none).

    jsonargparse re-raises errors from a class's ``__init__`` (a data module that cannot find its files)
    as its own ``ValueError``; the user's problem is the original error.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, UPIError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def run_reporting_errors(main: Callable[[], T]) -> T:
    """Run ``main``; print a :class:`UPIError` (even one wrapped by jsonargparse) as one line, exit 2."""
    try:
        return main()
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
