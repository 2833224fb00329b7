"""What every defense returns, and the helpers they share (copy, report, holdout accuracy)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import keras
import numpy as np

from fineprune_tf import metrics
from fineprune_tf.defenses.guard import ReportOnly

__all__ = ["DefenseResult", "NotApplicable", "clone", "finish", "holdout_accuracy", "der"]


class NotApplicable(ValueError):
    """The model lacks what a defense needs (e.g. FST's final Dense classifier); the protocol
    skips such a candidate and says why."""


@dataclasses.dataclass
class DefenseResult:
    """A defended model and what the defense measured.

    Attributes:
      defense: the defense's name (a key of ``fineprune_tf.defenses.REGISTRY``, or ``"none"``).
      model: the defended copy of the input model; pruning is held in its masks.
      seconds: wall time of the defense (evaluation excluded).
      clean_acc, asr, robust_acc: on the report-only evaluation data when given, else NaN.
      holdout_acc: clean accuracy on the defender's holdout (what choices may read), or NaN.
      forward_passes, backward_passes: example-passes the defense spent (one example through
        the network forward, resp. backward, counts 1).
      details: defense-specific data (curve, pruned channels, epochs, choices and why ...).
      outcome: the pruning defenses' :class:`~fineprune_tf.defenses.pruning.PruningOutcome`
        (ranking and curve), for reuse by a later defense on the same model; else None.
    """

    defense: str
    model: keras.Model
    seconds: float
    clean_acc: float = math.nan
    asr: float = math.nan
    robust_acc: float = math.nan
    holdout_acc: float = math.nan
    forward_passes: int = 0
    backward_passes: int = 0
    details: dict = dataclasses.field(default_factory=dict)
    outcome: Any = dataclasses.field(default=None, repr=False, compare=False)

    def summary(self) -> dict:
        """The numbers, JSON-ready: a measure that was not taken (NaN) is None, so a summary
        equals itself after a round trip through results.json."""
        values = {
            "clean_acc": self.clean_acc,
            "asr": self.asr,
            "robust_acc": self.robust_acc,
            "seconds": self.seconds,
            "holdout_acc": self.holdout_acc,
            "forward_passes": self.forward_passes,
            "backward_passes": self.backward_passes,
        }
        return {
            key: None if isinstance(value, float) and math.isnan(value) else value
            for key, value in values.items()
        }


def clone(model: keras.Model) -> keras.Model:
    """A structurally identical copy with the same weights and masks."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def holdout_accuracy(model: keras.Model, holdout: tuple[np.ndarray, np.ndarray]) -> float:
    """Clean accuracy on the defender's holdout ``(x [N, ...], y [N])``."""
    return metrics.accuracy(metrics.predict_labels(model, holdout[0]), holdout[1])


def finish(result: DefenseResult, report: Any) -> DefenseResult:
    """Fills clean accuracy, ASR and robust accuracy from report-only data (outside any
    selection); ``report`` is a :class:`ReportOnly`, a ``(clean, backdoor)`` pair or None."""
    if report is None:
        return result
    if not isinstance(report, ReportOnly):
        report = ReportOnly(*report)
    clean, backdoor = report.open()
    measured = metrics.evaluate(result.model, clean, backdoor)
    result.clean_acc = measured["clean_acc"]
    result.asr = measured["asr"]
    result.robust_acc = measured["robust_acc"]
    return result


def der(before: dict, after: dict) -> float:
    """Defense effectiveness rating, ``[max(0, dASR) - max(0, dACC) + 1] / 2`` in [0, 1].

    ``dASR = before.asr - after.asr`` and ``dACC = before.clean_acc - after.clean_acc`` (rates
    in [0, 1]); BackdoorBench's corrected definition (ACC *lost* counts against).
    """
    delta_asr = before["asr"] - after["asr"]
    delta_acc = before["clean_acc"] - after["clean_acc"]
    return (max(0.0, delta_asr) - max(0.0, delta_acc) + 1.0) / 2.0
