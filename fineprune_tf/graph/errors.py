"""The error of everything that reads or rewrites a model's graph."""

from __future__ import annotations

__all__ = ["ConversionError"]


class ConversionError(ValueError):
    """A model (or one of its layers) cannot be converted / analysed / shrunk / exported.

    Re-exported as :class:`fineprune_tf.conversion.ConversionError` (same class)."""
