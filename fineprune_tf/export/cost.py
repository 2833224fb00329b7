"""What shrinking saved: parameters and multiply-adds before and after (counted by
:mod:`fineprune_tf.graph.cost`, the library's one cost counter)."""

from __future__ import annotations

import dataclasses

import keras

from fineprune_tf.graph import cost

__all__ = ["ShrinkReport", "count_params_and_flops", "shrink_report"]


def count_params_and_flops(model: keras.Model) -> tuple[int, int]:
    """``(params, multiply_adds)`` of ``model``: :func:`fineprune_tf.graph.cost.count`.

    The second number is in **multiply-adds** (see :mod:`fineprune_tf.graph.cost` for the
    per-layer formulas; FLOPs are twice that): the name is kept for compatibility.
    ``params`` leaves out the pruning masks.  Pruned channels of a masked layer still count:
    shrink first to measure savings.

    Raises:
      ConversionError: subclassed model, or a conv / dense layer whose spatial size is unknown.
    """
    counted = cost.count(model)
    return counted.params, counted.multiply_adds


@dataclasses.dataclass(frozen=True)
class ShrinkReport:
    """Cost of a model before and after :func:`shrink` (see :func:`count_params_and_flops`)."""

    params_before: int
    params_after: int
    flops_before: int
    flops_after: int

    @property
    def param_reduction(self) -> float:
        """Fraction of parameters removed, in [0, 1]."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def flop_reduction(self) -> float:
        """Fraction of multiply-adds removed, in [0, 1]."""
        return 1.0 - self.flops_after / self.flops_before if self.flops_before else 0.0

    def __str__(self) -> str:
        return (
            f"params {self.params_before:,} -> {self.params_after:,} "
            f"(-{100 * self.param_reduction:.1f}%), multiply-adds "
            f"{self.flops_before:,} -> {self.flops_after:,} "
            f"(-{100 * self.flop_reduction:.1f}%)"
        )


def shrink_report(original: keras.Model, shrunk: keras.Model) -> ShrinkReport:
    """Parameter and FLOP counts of ``original`` and ``shrunk`` (e.g. ``shrink(original)``)."""
    p0, f0 = count_params_and_flops(original)
    p1, f1 = count_params_and_flops(shrunk)
    return ShrinkReport(p0, p1, f0, f1)
