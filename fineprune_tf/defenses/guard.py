"""The defender's data and the report-only data, kept apart by type.

Every choice a defense makes (a threshold, a checkpoint, a pruning count, which defense) must
come from the defender's clean data alone; the test set and triggered data only report.  Two
types make that structural rather than a convention:

* :class:`DefenderData` holds the defender's clean ``(x, y)`` and its deterministic split into
  ``fit`` (what a defense learns from) and ``holdout`` (what it chooses with).  It refuses to be
  built from a :class:`ReportOnly`.
* :class:`ReportOnly` wraps evaluation data (clean test set and its triggered copy).  Its
  content is read only through :meth:`ReportOnly.open`, which raises
  :class:`SelectionLeakError` while any selection is running (inside :func:`selecting`).
  Every defense and the protocol run their choices inside ``selecting()``, and report after it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from fineprune_tf import model_io

__all__ = ["DefenderData", "ReportOnly", "SelectionLeakError", "selecting", "is_selecting"]


class SelectionLeakError(RuntimeError):
    """Report-only data (test or triggered) was read while a choice was being made."""


_state = threading.local()


def is_selecting() -> bool:
    """Whether a selection (a defense's or the protocol's choice) is running in this thread."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def selecting() -> Iterator[None]:
    """Marks a block as making choices: :meth:`ReportOnly.open` raises inside it."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


class ReportOnly:
    """Data that may be reported on but never used to choose (test set, triggered inputs).

    Args:
      clean: ``(x, y)`` clean evaluation data.
      backdoor: a backdoor set (``x``, ``y_true``, ``y_attacker``, ``targeted``) or None.
    """

    def __init__(self, clean: tuple[Any, Any], backdoor: Any = None):
        self._clean = clean
        self._backdoor = backdoor

    def open(self) -> tuple[tuple[Any, Any], Any]:
        """``(clean, backdoor)``; raises :class:`SelectionLeakError` during a selection."""
        if is_selecting():
            raise SelectionLeakError(
                "report-only data (test set or triggered inputs) was read while a defense was "
                "choosing; choices must use DefenderData only"
            )
        return self._clean, self._backdoor

    def __array__(self, *args, **kwargs):
        raise SelectionLeakError("ReportOnly data cannot be converted to an array; use open()")

    def __iter__(self):
        raise SelectionLeakError("ReportOnly data cannot be unpacked; use open()")


def _is_inputs(x: Any) -> bool:
    """Whether ``x`` is a dict of input arrays (a model with several inputs)."""
    return isinstance(x, Mapping)


class DefenderData:
    """The defender's clean data, split once into ``fit`` and ``holdout``.

    Args:
      x: float32 ``[N, H, W, C]`` clean inputs (a dict ``{input name: [N, ...]}`` for a model
        with several inputs); y: int ``[N]`` labels.
      holdout_fraction: share of the examples kept aside for choices (checkpoints,
        thresholds), in (0, 1).
      seed: seeds the split.

    Attributes:
      x, y: all the clean data; fit: ``(x, y)`` used to learn; holdout: ``(x, y)`` used to
      choose; value_range: ``(min, max)`` of ``x`` (scales input-space perturbations).
    """

    def __init__(self, x: Any, y: Any, *, holdout_fraction: float = 0.2, seed: int = 0):
        for value, name in ((x, "x"), (y, "y")):
            if isinstance(value, ReportOnly):
                raise SelectionLeakError(
                    f"DefenderData {name} is report-only data; the defender's data must be clean "
                    "validation data"
                )
        y = np.asarray(y)
        # A dict of arrays by input name (a model with several inputs) stays a dict.
        x = {key: np.asarray(value) for key, value in x.items()} if _is_inputs(x) else np.asarray(x)
        count = model_io.num_examples(x)
        if count != len(y):
            raise ValueError(f"validation x has {count} examples but y has {len(y)} labels")
        if count < 2:
            raise ValueError("the defender's validation set needs at least 2 examples")
        if not 0.0 < holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        self.x, self.y = x, y.astype(np.int64)
        self.seed = int(seed)
        self.holdout_fraction = float(holdout_fraction)
        order = np.random.default_rng(self.seed + 104729).permutation(count)
        held = min(max(1, int(round(count * holdout_fraction))), count - 1)
        self.fit = (model_io.take(x, order[held:]), self.y[order[held:]])
        self.holdout = (model_io.take(x, order[:held]), self.y[order[:held]])
        leaves = list(x.values()) if isinstance(x, dict) else [x]
        self.value_range = (
            min(float(np.min(leaf)) for leaf in leaves),
            max(float(np.max(leaf)) for leaf in leaves),
        )

    @classmethod
    def coerce(cls, data: Any, *, holdout_fraction: float = 0.2, seed: int = 0) -> DefenderData:
        """``data`` itself when it is a DefenderData, else one built from an ``(x, y)`` pair."""
        if isinstance(data, DefenderData):
            return data
        if isinstance(data, ReportOnly):
            raise SelectionLeakError("a defense was given report-only data as its clean data")
        try:
            x, y = data
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"expected DefenderData or an (x, y) pair, got {type(data).__name__}"
            ) from error
        return cls(x, y, holdout_fraction=holdout_fraction, seed=seed)

    def __len__(self) -> int:
        return len(self.y)
