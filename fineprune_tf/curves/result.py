"""The result of a pruning curve, and how the engine evaluates one (its plan's costs)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fineprune_tf import metrics
from fineprune_tf.layers import MaskedLayerMixin

__all__ = ["CurvePlanInfo", "PruningCurve", "make_curve"]


@dataclasses.dataclass(frozen=True)
class PruningCurve:
    """Clean accuracy and attack success after each pruned channel.

    Arrays are indexed by step ``k = 0..K``: ``k`` channels of ``order`` pruned, ``k = 0`` the
    model as given (its current mask, so channels already pruned stay pruned).

    Attributes:
      layer_name: the pruned layer.
      channels: its number of channels ``C``.
      already_pruned: channels already pruned in the starting mask.
      pruned: int64 ``[K+1]``, channel removed at step ``k`` (``-1`` at ``k = 0``).
      clean_acc: float64 ``[K+1]``, accuracy on the clean data, in ``[0, 1]``.
      asr: float64 ``[K+1]``, attack success rate (NaN without backdoor data); targeted: the
        fraction of backdoored inputs classified as the attacker's label (inputs whose true label
        is the attacker's are left out, as :func:`fineprune_tf.metrics.attack_success_rate`);
        untargeted: ``1 - robust_acc / clean_acc``.
      robust_acc: float64 ``[K+1]``, accuracy of the backdoored inputs w.r.t. their true labels
        (NaN without backdoor data).
      predictions_clean: int64 ``[K+1, N]`` arg-max labels on the clean data.
      predictions_backdoor: int64 ``[K+1, M]`` on the backdoored data, or None.
      targeted: whether the backdoor is targeted (None without backdoor data).
      info: engine details: mode, frontier layers, chunk size, evaluated and total
        (step, sample) rows, wall seconds in all and per phase.
    """

    layer_name: str
    channels: int
    already_pruned: int
    pruned: np.ndarray
    clean_acc: np.ndarray
    asr: np.ndarray
    robust_acc: np.ndarray
    predictions_clean: np.ndarray
    predictions_backdoor: np.ndarray | None
    targeted: bool | None
    info: dict = dataclasses.field(default_factory=dict, compare=False)

    @property
    def steps(self) -> int:
        """``K``, the number of pruning steps after the starting model."""
        return len(self.pruned) - 1

    def as_dict(self) -> dict:
        """JSON-ready summary (no per-sample predictions); NaN becomes None."""

        def floats(values: np.ndarray) -> list:
            return [None if math.isnan(v) else float(v) for v in values]

        return {
            "layer": self.layer_name,
            "channels": self.channels,
            "already_pruned": self.already_pruned,
            "pruned": self.pruned.tolist(),
            "clean_acc": floats(self.clean_acc),
            "asr": floats(self.asr),
            "robust_acc": floats(self.robust_acc),
            "targeted": self.targeted,
        }


@dataclasses.dataclass(frozen=True)
class CurvePlanInfo:
    """How :func:`pruning_curve` evaluates a layer's curve, with per-sample costs in FLOPs.

    FLOPs count multiply-adds of convolutions and dense layers as 2 (element-wise work,
    pooling and the masked activations are left out: they are memory-bound and small).

    Attributes:
      mode: ``"incremental"`` (linear frontier layers updated per channel) or
        ``"batched-masks"`` (whole suffix re-run per step on stacked masked copies).
      frontier: names of the frontier layers updated incrementally.
      materialized: names of the layers whose per-channel outputs are rebuilt per step.
      forward_flops: one full forward pass, per sample.
      prefix_flops: the layers before the pruned one plus the pruned layer (and constant parts
        of the frontier), per sample; run once.
      frontier_flops: the frontier layers' per-channel updates summed over all ``C`` channels,
        per sample (= one pass of the frontier's mask-dependent part).
      rest_flops: what every evaluated (step, sample) pair costs.
    """

    mode: str
    frontier: tuple[str, ...]
    materialized: tuple[str, ...]
    forward_flops: float
    prefix_flops: float
    frontier_flops: float
    rest_flops: float

    def bound_flops(self, samples: int, evaluated_rows: int) -> float:
        """Arithmetic work of a curve: one prefix pass over ``samples``, the frontier updates
        (one frontier pass in all), and ``rest_flops`` per evaluated (step, sample) pair."""
        return samples * (self.prefix_flops + self.frontier_flops) + evaluated_rows * (
            self.rest_flops
        )


@dataclasses.dataclass
class Backdoor:
    """Validated backdoor data (see :func:`fineprune_tf.curves.inputs.backdoor_data`)."""

    x: np.ndarray
    y_true: np.ndarray
    y_attacker: np.ndarray | None
    targeted: bool


def make_curve(
    layer: MaskedLayerMixin,
    mask0: np.ndarray,
    order: np.ndarray,
    y: np.ndarray,
    pred_clean: np.ndarray,
    backdoor: Backdoor | None,
    pred_backdoor: np.ndarray | None,
    keep_backdoor: bool,
    info: dict,
) -> PruningCurve:
    steps = len(order) + 1
    clean_acc = (pred_clean == y[None, :]).mean(axis=1).astype(np.float64)
    asr = np.full(steps, np.nan)
    robust = np.full(steps, np.nan)
    if backdoor is not None:
        for k in range(steps):
            robust[k] = metrics.robust_accuracy(pred_backdoor[k], backdoor.y_true)
            asr[k] = metrics.attack_success_rate(
                pred_backdoor[k],
                backdoor.y_attacker,
                targeted=backdoor.targeted,
                y_true=backdoor.y_true,
                clean_acc=clean_acc[k],
            )
    return PruningCurve(
        layer_name=layer.name,
        channels=layer.channels,
        already_pruned=int(np.sum(mask0 == 0)),
        pruned=np.concatenate([[-1], order]).astype(np.int64),
        clean_acc=clean_acc,
        asr=asr,
        robust_acc=robust,
        predictions_clean=pred_clean.astype(np.int64),
        predictions_backdoor=(
            pred_backdoor.astype(np.int64) if backdoor is not None and keep_backdoor else None
        ),
        targeted=None if backdoor is None else backdoor.targeted,
        info=info,
    )
