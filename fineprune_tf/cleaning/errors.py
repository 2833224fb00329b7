"""The cleaning run's refusals, and any error as the one line the command line prints."""

from __future__ import annotations

from fineprune_tf import io

__all__ = ["CleaningError", "one_line_error"]


class CleaningError(ValueError):
    """The model, the data or the options cannot be used (the message says why)."""


def one_line_error(error: BaseException) -> str:
    """The error as one line for the command line."""
    if isinstance(error, io.UnsafeModelError):
        return error.one_line()
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 600 else text[:597] + "..."
