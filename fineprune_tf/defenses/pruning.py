"""The pruning defense (§3.1): rank one layer's channels by mean clean activation, prune in that
order while the clean accuracy stays within a threshold.

When the layer's channels are coupled to other layers' (a dependency group,
:func:`fineprune_tf.graph.channel_groups`: a conv added into a residual stream, an expansion
conv feeding a depthwise conv), channel ``c`` is pruned with its whole coupled channel, in every
member, so shrink removes it: the ranking is the members' mean activation (Torch-Pruning's
``group_reduction="mean"``, see :mod:`fineprune_tf.defenses.coupling`) and the curve prunes the
whole coupled channel at each step (one forward pass per step: the fast engine prunes one
layer).  On the paper's networks every group is one layer and nothing changes."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import keras
import numpy as np
from absl import logging

from fineprune_tf import curves, models, step_cache, training
from fineprune_tf import graph as fp_graph
from fineprune_tf.curves.inputs import backdoor_data
from fineprune_tf.curves.result import PruningCurve, make_curve
from fineprune_tf.defenses.coupling import unit_scores
from fineprune_tf.defenses.guard import DefenderData, selecting
from fineprune_tf.defenses.result import DefenseResult, clone, finish
from fineprune_tf.layers import MASKED_CONVOLUTIONS, MaskedLayerMixin

__all__ = [
    "ENGINES",
    "PruningOutcome",
    "PruningSettings",
    "prune",
    "pruning_outcome",
    "rank_channels",
    "stopping_point",
    "pruned_layer",
    "coupled_group",
    "prune_coupled",
]

ENGINES = ("fast", "naive")


@dataclasses.dataclass(frozen=True)
class PruningSettings:
    """The pruning defense (§3.1); the one home of its defaults.

    Attributes:
      threshold: clean-accuracy drop pruning may cost, in percentage points, in (0, 100);
        the paper's 4 points.
      layer: the layer to prune (default: the last conv layer).
      engine: pruning-curve engine, "fast" (incremental) or "naive" (one predict per step).
      batch_size: inputs per forward pass when ranking channels and walking the curve.
    """

    threshold: float = 4.0
    layer: str | None = None
    engine: str = "fast"
    batch_size: int = 256

    def validate(self) -> None:
        if not 0.0 < self.threshold < 100.0:
            raise ValueError(
                f"threshold must be in (0, 100) percentage points, got {self.threshold}"
            )
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def replaced(self, **overrides: Any) -> PruningSettings:
        """A copy with the overrides that are not None (keyword arguments of :func:`prune`)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclasses.dataclass(frozen=True)
class PruningOutcome:
    """What the pruning defense computed, to be reused rather than recomputed.

    Attributes:
      layer: the pruned layer; channels: its number of channels ``C``.
      order: int64 ``[K]`` active channels in increasing mean clean activation.
      means: float64 ``[C]`` mean clean activation per channel.
      curve: the curve's JSON summary (:meth:`PruningCurve.as_dict`): clean accuracy (and ASR
        when backdoor data was given, for the report only) after each step of ``order``.
      count: channels to prune under ``threshold`` (points).
    """

    layer: str
    channels: int
    order: np.ndarray
    means: np.ndarray
    curve: dict
    count: int
    threshold: float

    def at_threshold(self, threshold: float) -> PruningOutcome:
        """The same curve, stopped at another threshold (no recomputation)."""
        if threshold == self.threshold:
            return self
        return dataclasses.replace(
            self,
            threshold=threshold,
            count=stopping_point(np.asarray(self.curve["clean_acc"], float), threshold),
        )

    def as_record(self) -> dict:
        """JSON-ready (what the experiment's analysis stage stores)."""
        return {
            "layer": self.layer,
            "channels": self.channels,
            "order": self.order.tolist(),
            "clean_mean": self.means.tolist(),
            "curve": self.curve,
            "count": self.count,
            "threshold": self.threshold,
        }

    @classmethod
    def from_record(cls, record: dict) -> PruningOutcome:
        """The inverse of :meth:`as_record` (floats round-trip exactly through JSON)."""
        return cls(
            layer=record["layer"],
            channels=int(record["channels"]),
            order=np.asarray(record["order"], np.int64),
            means=np.asarray(record["clean_mean"], np.float64),
            curve=record["curve"],
            count=int(record["count"]),
            threshold=float(record["threshold"]),
        )


def pruned_layer(model: keras.Model, layer_name: str | None) -> MaskedLayerMixin:
    """The layer the pruning defense acts on (default: the last conv layer)."""
    name = layer_name or models.last_conv_layer(model)
    try:
        layer = model.get_layer(name)
    except ValueError as error:
        raise ValueError(f"model has no layer named {name!r}") from error
    if not isinstance(layer, MASKED_CONVOLUTIONS):  # any masked conv kind (issue 12)
        raise ValueError(
            f"layer {name!r} is a {type(layer).__name__}, not a MaskedConv2D "
            "(nor another masked convolution)"
        )
    return layer


def rank_channels(
    model: keras.Model, layer_name: str, x: np.ndarray, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Active channels of ``layer_name`` in increasing order of mean clean activation (§3.1).

    Returns ``(order, means)``: int64 ``[K]`` channel indices (already pruned channels left out)
    and the float64 ``[C]`` mean activation of every channel (of a coupled channel: the mean
    over the members of :func:`coupled_group`).
    """
    layer = model.get_layer(layer_name)
    group = coupled_group(model, layer_name)
    if group is None:
        means = _layer_means(model, layer, x, batch_size)
    else:
        member_means = {
            name: _layer_means(model, model.get_layer(name), x, batch_size)
            for name in group.members
        }
        row_means = unit_scores([group], member_means, "mean")[0]
        means = np.empty(layer.channels)
        means[group.members[layer_name][:, 0]] = row_means
    order = np.argsort(means, kind="stable")
    active = set(layer.active_channels.tolist())
    return np.asarray([c for c in order if c in active], dtype=np.int64), means


def coupled_group(model: keras.Model, layer_name: str) -> fp_graph.ChannelGroup | None:
    """The dependency group whose channels ``layer_name``'s are coupled to, when it has other
    members and each of the layer's channels is one coupled channel (None otherwise: the layer
    is pruned on its own)."""
    for group in fp_graph.channel_groups(model):
        rows = group.members.get(layer_name)
        if rows is not None:
            return group if len(group.members) > 1 and rows.shape[1] == 1 else None
    return None


def prune_coupled(model: keras.Model, layer_name: str, channels) -> None:
    """Prunes ``channels`` of ``layer_name`` together with their coupled channels in every
    member of :func:`coupled_group` (just the layer's when it has none)."""
    channels = np.asarray(channels, np.int64).reshape(-1)
    group = coupled_group(model, layer_name)
    if group is None:
        model.get_layer(layer_name).prune(channels)
    else:
        group.prune(model, _rows_of(model, layer_name, group)[channels])


def _rows_of(model: keras.Model, layer_name: str, group: fp_graph.ChannelGroup) -> np.ndarray:
    """int64 ``[C]``: the group row of each of the layer's channels."""
    rows = np.empty(model.get_layer(layer_name).channels, np.int64)
    rows[group.members[layer_name][:, 0]] = np.arange(group.size)
    return rows


def _coupled_curve(
    model: keras.Model, layer: MaskedLayerMixin, order: np.ndarray, clean, backdoor, batch_size
) -> PruningCurve:
    """The pruning curve when ``layer`` is coupled: step ``k`` prunes ``order[k-1]`` with its
    coupled channels (:func:`prune_coupled`); one ``predict`` per step (the reference loop of
    :func:`fineprune_tf.curves.naive_pruning_curve`, over every member's mask)."""
    x, y = clean
    bd = backdoor_data(backdoor)
    group = coupled_group(model, layer.name)
    rows = _rows_of(model, layer.name, group)
    saved = {name: model.get_layer(name).mask for name in group.members}
    steps = len(order) + 1
    pred_clean = np.empty((steps, len(x)), np.int64)
    pred_bd = np.empty((steps, len(bd.x)), np.int64) if bd is not None else None

    def predict(inputs):
        return np.argmax(model.predict(inputs, batch_size=batch_size, verbose=0), axis=-1)

    try:
        for k in range(steps):
            if k:
                group.prune(model, rows[order[k - 1 : k]])
            pred_clean[k] = predict(x)
            if bd is not None:
                pred_bd[k] = predict(bd.x)
    finally:
        for name, mask in saved.items():
            model.get_layer(name).set_mask(mask)
    info = {"engine": "coupled", "members": list(group.members)}
    return make_curve(layer, saved[layer.name], order, y, pred_clean, bd, pred_bd, True, info)


def _layer_means(
    model: keras.Model, layer: MaskedLayerMixin, x: np.ndarray, batch_size: int
) -> np.ndarray:
    """Mean clean activation of each of ``layer``'s channels, float64 ``[C]``."""
    if layer.activation is keras.activations.relu:
        # Through the step cache: one traced statistics pass per model structure in a run.
        return step_cache.collect_stats(model, x, layer_names=[layer.name], batch_size=batch_size)[
            layer.name
        ].mean
    return _chain_means(model, layer, x, batch_size)


def _chain_means(
    model: keras.Model, layer: MaskedLayerMixin, x: np.ndarray, batch_size: int
) -> np.ndarray:
    """Mean of :func:`fineprune_tf.graph.activation_tensor` per channel over ``x``
    (unmasked), float64 ``[C]``."""
    saved = layer.mask
    layer.restore()
    try:
        probe = keras.Model(training.model_input(model), fp_graph.activation_tensor(model, layer))
        total, count = np.zeros(layer.channels), 0
        for start in range(0, len(x), batch_size):
            values = keras.ops.convert_to_numpy(
                probe(x[start : start + batch_size], training=False)
            )
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


def _refuse_meaningless(
    clean_acc: np.ndarray, y: np.ndarray, count: int, layer: MaskedLayerMixin, threshold: float
) -> None:
    """Raises ValueError when pruning cannot mean anything: clean accuracy is at chance before
    pruning (the majority-class rate of the defender's labels + 2 sd), or the stopping rule
    would prune every channel of the layer (the clean data never needs it)."""
    chance = np.bincount(np.asarray(y).astype(np.int64)).max() / len(y)
    margin = 2.0 * np.sqrt(chance * (1.0 - chance) / len(y))
    if clean_acc[0] <= chance + margin:
        raise ValueError(
            f"clean accuracy before pruning is {clean_acc[0]:.3f}, at chance (majority class "
            f"{chance:.3f} + 2 sd on {len(y)} examples): the model is not trained for this data, "
            "or the data is not the model's task; pruning would be meaningless"
        )
    if count >= len(layer.active_channels):
        raise ValueError(
            f"the stopping rule would prune all {layer.channels} channels of {layer.name!r}: "
            f"clean accuracy never dropped more than {threshold} points, so the layer does not "
            "matter for the clean data (bypassed, or the model is not trained); choose another "
            "layer or check the model"
        )


def pruning_outcome(
    model: keras.Model,
    validation,
    settings: PruningSettings | None = None,
    backdoor_validation=None,
) -> PruningOutcome:
    """Ranks the layer's channels and walks the pruning curve once (the expensive part of
    :func:`prune`); the model is left unchanged.  Whether pruning at ``count`` means anything
    is checked when it is applied (:func:`prune`).

    Args:
      validation: the defender's clean ``(x, y)`` or a :class:`DefenderData` (all of its
        examples rank and stop, as in the paper).
      backdoor_validation: a backdoored copy of the validation data, reported in the curve only.
    """
    settings = settings or PruningSettings()
    settings.validate()
    defender = DefenderData.coerce(validation)
    x, y = defender.x, defender.y
    with selecting():
        layer = pruned_layer(model, settings.layer)
        order, means = rank_channels(model, layer.name, x, settings.batch_size)
        curve_fn = curves.pruning_curve if settings.engine == "fast" else curves.naive_pruning_curve
        if coupled_group(model, layer.name) is not None:
            curve = _coupled_curve(
                model, layer, order, (x, y), backdoor_validation, settings.batch_size
            )
        else:
            curve = curve_fn(
                model,
                layer.name,
                order,
                (x, y),
                backdoor_validation,
                batch_size=settings.batch_size,
            )
        count = stopping_point(curve.clean_acc, settings.threshold)
    return PruningOutcome(
        layer=layer.name,
        channels=layer.channels,
        order=order,
        means=means,
        curve=curve.as_dict(),
        count=count,
        threshold=settings.threshold,
    )


def prune(
    model: keras.Model,
    validation,
    *,
    settings: PruningSettings | None = None,
    layer_name: str | None = None,
    threshold: float | None = None,
    backdoor_validation=None,
    evaluation=None,
    engine: str | None = None,
    batch_size: int | None = None,
    outcome: PruningOutcome | None = None,
) -> DefenseResult:
    """The pruning defense (§3.1).

    Ranks the channels of the last conv layer (or ``layer_name``) by mean activation on the clean
    validation data, records clean accuracy (and ASR when ``backdoor_validation`` is given, for
    the curve only) after pruning every single channel in that order, and keeps the largest
    prefix whose clean accuracy is within ``threshold`` percentage points of the unpruned
    model's.  As in the paper, the ranking and the stopping point both use all the defender's
    clean data (``DefenderData.x``).

    Args:
      validation: the defender's clean ``(x, y)`` or a :class:`DefenderData`.
      settings: :class:`PruningSettings`; the keyword arguments ``layer_name``, ``threshold``,
        ``engine`` and ``batch_size`` override its fields when not None.
      backdoor_validation: a backdoored copy of the validation data (reported in the curve only).
      evaluation: report-only ``((x_test, y_test), backdoor_test)`` or a ``ReportOnly``.
      outcome: a :class:`PruningOutcome` already computed for this model and layer (e.g. by the
        experiment's analysis stage, or ``result.outcome`` of an earlier ``prune``): reused,
        stopped at ``threshold``, instead of walking the curve again.

    Returns:
      A :class:`DefenseResult`; ``result.outcome`` is the :class:`PruningOutcome`.

    Raises:
      ValueError: bad settings; the model is at chance on the clean data, or the stopping rule
        would prune every channel (:func:`_refuse_meaningless`).
    """
    settings = (settings or PruningSettings()).replaced(
        layer=layer_name, threshold=threshold, engine=engine, batch_size=batch_size
    )
    settings.validate()
    defender = DefenderData.coerce(validation)
    start = time.perf_counter()
    defended = clone(model)
    if outcome is None:
        outcome = pruning_outcome(defended, defender, settings, backdoor_validation)
    else:
        outcome = _reusable(outcome, defended, settings).at_threshold(settings.threshold)
    layer = defended.get_layer(outcome.layer)
    count = outcome.count
    with selecting():
        _refuse_meaningless(
            np.asarray(outcome.curve["clean_acc"], np.float64),
            defender.y,
            count,
            layer,
            settings.threshold,
        )
    prune_coupled(defended, layer.name, outcome.order[:count])
    group = coupled_group(defended, layer.name)
    seconds = time.perf_counter() - start
    details = {
        "layer": layer.name,
        "channels": layer.channels,
        "order": outcome.order.tolist(),
        "mean_activation": outcome.means.tolist(),
        "pruned": outcome.order[:count].tolist(),
        "pruned_count": count,
        "pruned_fraction": count / layer.channels,
        # Layers whose coupled channels were pruned with these (a dependency group).
        "coupled_layers": [] if group is None else [n for n in group.members if n != layer.name],
        "threshold": settings.threshold,
        "curve": outcome.curve,
        "why": f"pruned {count} least-active channels of {layer.name}: the clean validation "
        f"accuracy stays within {settings.threshold} points",
    }
    logging.info(
        "pruning: %d/%d channels of %s pruned in %.1f s", count, layer.channels, layer.name, seconds
    )
    # The curve engine runs one forward pass over the data, then only the layers after the
    # pruned one per step; counted as one full pass plus one pass per step (an upper bound).
    passes = len(defender.x) * (2 + len(outcome.order))
    result = DefenseResult(
        "pruning", defended, seconds, forward_passes=passes, details=details, outcome=outcome
    )
    return finish(result, evaluation)


def _reusable(
    outcome: PruningOutcome, model: keras.Model, settings: PruningSettings
) -> PruningOutcome:
    """``outcome`` if it was computed for this model's layer; ValueError otherwise."""
    layer = pruned_layer(model, settings.layer or outcome.layer)
    if layer.name != outcome.layer or layer.channels != outcome.channels:
        raise ValueError(
            f"the given pruning outcome is of layer {outcome.layer!r} "
            f"({outcome.channels} channels), not of {layer.name!r} "
            f"({layer.channels} channels)"
        )
    return outcome
