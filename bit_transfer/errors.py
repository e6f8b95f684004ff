"""Errors a user can fix: the CLI prints their message as one line and exits with code 2."""


class UsageError(Exception):
    """Base class: bad recipe, missing data or weights, a file that is not what it claims.

    The message must say what is wrong and how to fix it, in one line.
    """

    exit_code = 2


class RecipeError(UsageError):
    """A recipe key, value or file is invalid."""


class DataError(UsageError):
    """A dataset is missing, unreadable or inconsistent."""


class WeightsError(UsageError):
    """A weights file is missing, corrupt or does not fit the model."""


class RunError(UsageError):
    """A run stopped for a reason the user must act on (diverged, a rank died); exit code 1."""

    exit_code = 1
