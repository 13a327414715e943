"""Exceptions raised for bad user input.

Every error a user can cause (a wrong name, a missing file, an impossible setting) is raised as a
:class:`UPIError` whose message names the problem and the fix. Entry points print such errors as a
single line instead of a traceback.
"""


class UPIError(ValueError):
    """A user-facing configuration or input error with a message that says how to fix it."""


class DatasetNotFoundError(UPIError, FileNotFoundError):
    """A dataset is neither on disk nor downloadable."""


class CheckpointMismatchError(UPIError):
    """A checkpoint or perturbation file does not fit the model or data it is loaded into."""
