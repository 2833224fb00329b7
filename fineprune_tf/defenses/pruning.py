"""The pruning defense (§3.1): rank one layer's channels by mean clean activation, prune in that
order while the clean accuracy stays within a threshold."""

from __future__ import annotations

import time

import keras
import numpy as np
from absl import logging

from fineprune_tf import curves, models, stats, training
from fineprune_tf import graph as fp_graph
from fineprune_tf.defenses.guard import DefenderData, selecting
from fineprune_tf.defenses.result import DefenseResult, clone, finish
from fineprune_tf.layers import MASKED_CONVOLUTIONS, MaskedLayerMixin

__all__ = ["prune", "rank_channels", "stopping_point", "pruned_layer"]


def pruned_layer(model: keras.Model, layer_name: str | None) -> MaskedLayerMixin:
    """The layer the pruning defense acts on (default: the last conv layer)."""
    name = layer_name or models.last_conv_layer(model)
    try:
        layer = model.get_layer(name)
    except ValueError as error:
        raise ValueError(f"model has no layer named {name!r}") from error
    if not isinstance(layer, MASKED_CONVOLUTIONS):  # any masked conv kind (issue 12)
        raise ValueError(f"layer {name!r} is a {type(layer).__name__}, not a MaskedConv2D "
                         "(nor another masked convolution)")
    return layer


def rank_channels(model: keras.Model, layer_name: str, x: np.ndarray,
                  batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Active channels of ``layer_name`` in increasing order of mean clean activation (§3.1).

    Returns ``(order, means)``: int64 ``[K]`` channel indices (already pruned channels left out)
    and the float64 ``[C]`` mean activation of every channel.
    """
    layer = model.get_layer(layer_name)
    if layer.activation is keras.activations.relu:
        means = stats.collect(model, x, layer_names=[layer_name], batch_size=batch_size)[
            layer_name].mean
    else:
        means = _chain_means(model, layer, x, batch_size)
    order = np.argsort(means, kind="stable")
    active = set(layer.active_channels.tolist())
    return np.asarray([c for c in order if c in active], dtype=np.int64), means


def _chain_means(model: keras.Model, layer: MaskedLayerMixin, x: np.ndarray,
                 batch_size: int) -> np.ndarray:
    """Mean of :func:`fineprune_tf.graph.activation_tensor` per channel over ``x``
    (unmasked), float64 ``[C]``."""
    saved = layer.mask
    layer.restore()
    try:
        probe = keras.Model(training.model_input(model),
                            fp_graph.activation_tensor(model, layer))
        total, count = np.zeros(layer.channels), 0
        for start in range(0, len(x), batch_size):
            values = keras.ops.convert_to_numpy(probe(x[start:start + batch_size],
                                                      training=False))
            flat = values.reshape(-1, values.shape[-1]).astype(np.float64)
            total += flat.sum(axis=0)
            count += flat.shape[0]
    finally:
        layer.set_mask(saved)
    return total / max(count, 1)


def stopping_point(clean_acc: np.ndarray, threshold: float) -> int:
    """Number of channels to prune: the step before clean accuracy first drops by more than
    ``threshold`` percentage points below the unpruned accuracy (``clean_acc[0]``)."""
    drop = (clean_acc[0] - np.asarray(clean_acc)) * 100.0
    over = np.flatnonzero(drop > threshold + 1e-9)
    return int(over[0] - 1) if over.size else len(clean_acc) - 1


def _refuse_meaningless(clean_acc: np.ndarray, y: np.ndarray, count: int,
                        layer: MaskedLayerMixin, threshold: float) -> None:
    """Raises ValueError when pruning cannot mean anything: clean accuracy is at chance before
    pruning (the majority-class rate of the defender's labels + 2 sd), or the stopping rule
    would prune every channel of the layer (the clean data never needs it)."""
    chance = np.bincount(np.asarray(y).astype(np.int64)).max() / len(y)
    margin = 2.0 * np.sqrt(chance * (1.0 - chance) / len(y))
    if clean_acc[0] <= chance + margin:
        raise ValueError(
            f"clean accuracy before pruning is {clean_acc[0]:.3f}, at chance (majority class "
            f"{chance:.3f} + 2 sd on {len(y)} examples): the model is not trained for this data, "
            "or the data is not the model's task; pruning would be meaningless")
    if count >= len(layer.active_channels):
        raise ValueError(
            f"the stopping rule would prune all {layer.channels} channels of {layer.name!r}: "
            f"clean accuracy never dropped more than {threshold} points, so the layer does not "
            "matter for the clean data (bypassed, or the model is not trained); choose another "
            "layer or check the model")


def prune(model: keras.Model, validation, *, layer_name: str | None = None,
          threshold: float = 4.0, backdoor_validation=None, evaluation=None,
          engine: str = "fast", batch_size: int = 256) -> DefenseResult:
    """The pruning defense (§3.1).

    Ranks the channels of the last conv layer (or ``layer_name``) by mean activation on the clean
    validation data, records clean accuracy (and ASR when ``backdoor_validation`` is given, for
    the curve only) after pruning every single channel in that order, and keeps the largest
    prefix whose clean accuracy is within ``threshold`` percentage points of the unpruned
    model's.  As in the paper, the ranking and the stopping point both use all the defender's
    clean data (``DefenderData.x``).

    Args:
      validation: the defender's clean ``(x, y)`` or a :class:`DefenderData`.
      threshold: allowed accuracy drop in percentage points, in (0, 100).
      backdoor_validation: a backdoored copy of the validation data (reported in the curve only).
      evaluation: report-only ``((x_test, y_test), backdoor_test)`` or a ``ReportOnly``.
      engine: ``"fast"`` (the incremental curve engine) or ``"naive"`` (one predict per step).
    """
    if not 0.0 < threshold < 100.0:
        raise ValueError(f"threshold must be in (0, 100) percentage points, got {threshold}")
    if engine not in ("fast", "naive"):
        raise ValueError(f"engine must be 'fast' or 'naive', got {engine!r}")
    defender = DefenderData.coerce(validation)
    x, y = defender.x, defender.y
    start = time.perf_counter()
    defended = clone(model)
    with selecting():
        layer = pruned_layer(defended, layer_name)
        order, means = rank_channels(defended, layer.name, x, batch_size)
        curve_fn = curves.pruning_curve if engine == "fast" else curves.naive_pruning_curve
        curve = curve_fn(defended, layer.name, order, (x, y), backdoor_validation,
                         batch_size=batch_size)
        count = stopping_point(curve.clean_acc, threshold)
        _refuse_meaningless(curve.clean_acc, y, count, layer, threshold)
        layer.prune(order[:count])
    seconds = time.perf_counter() - start
    details = {
        "layer": layer.name, "channels": layer.channels, "order": order.tolist(),
        "mean_activation": means.tolist(), "pruned": order[:count].tolist(),
        "pruned_count": count, "pruned_fraction": count / layer.channels,
        "threshold": threshold, "curve": curve.as_dict(),
        "why": f"pruned {count} least-active channels of {layer.name}: the clean validation "
               f"accuracy stays within {threshold} points",
    }
    logging.info("pruning: %d/%d channels of %s pruned in %.1f s", count, layer.channels,
                 layer.name, seconds)
    # The curve engine runs one forward pass over the data, then only the layers after the
    # pruned one per step; counted as one full pass plus one pass per step (an upper bound).
    passes = len(x) * (2 + len(order))
    result = DefenseResult("pruning", defended, seconds, forward_passes=passes, details=details)
    return finish(result, evaluation)
