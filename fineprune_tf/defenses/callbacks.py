"""Keras callbacks of fine-tuning (:mod:`fineprune_tf.defenses.fine_tuning`): the ``converge``
stopping-and-checkpoint rule (:class:`ConvergenceSelection`) and gradual channel pruning during
fine-tuning (:class:`GradualChannelPruning`).  Both stay importable from ``fine_tuning``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from fineprune_tf.layers import MaskedLayerMixin

__all__ = ["ConvergenceSelection", "GradualChannelPruning"]


class ConvergenceSelection(keras.callbacks.Callback):
    """The ``converge`` rule as a callback: stop on a training-loss plateau, then restore the
    latest checkpoint within ``tolerance`` points of the best holdout accuracy.

    Reads ``logs["loss"]`` (clean training loss) and ``logs["val_accuracy"]`` (clean holdout).
    With ``start_accuracy`` (the holdout accuracy before training), a chosen checkpoint that is
    more than ``divergence_drop`` points below it means training diverged: the starting weights
    are restored (``chosen`` -1).  After training, ``history`` lists ``(epoch, loss, holdout
    accuracy)`` and ``chosen`` the restored epoch (0-based; -1 = the starting model).
    """

    def __init__(
        self,
        tolerance: float = 1.0,
        plateau_patience: int = 3,
        min_delta: float = 0.02,
        start_accuracy: float | None = None,
        divergence_drop: float = 5.0,
    ):
        super().__init__()
        self.start_accuracy = start_accuracy
        self.divergence_drop = float(divergence_drop)
        self.tolerance = float(tolerance)
        self.plateau_patience = int(plateau_patience)
        self.min_delta = float(min_delta)
        self.history: list[tuple[int, float, float]] = []
        self.weights: list[list[np.ndarray]] = []
        self.chosen: int | None = None
        self._best_loss = math.inf
        self._since_best = 0

    def on_train_begin(self, logs=None):
        if self.start_accuracy is not None:
            self._start_weights = self.model.get_weights()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        loss, accuracy = float(logs["loss"]), float(logs["val_accuracy"])
        self.history.append((epoch, loss, accuracy))
        self.weights.append(self.model.get_weights())
        if loss < self._best_loss * (1.0 - self.min_delta):
            self._best_loss, self._since_best = loss, 0
        else:
            self._since_best += 1
            if self._since_best >= self.plateau_patience:
                self.model.stop_training = True

    def on_train_end(self, logs=None):
        if not self.history:
            return
        accuracies = np.array([h[2] for h in self.history])
        floor = accuracies.max() - self.tolerance / 100.0 - 1e-9
        self.chosen = int(np.flatnonzero(accuracies >= floor)[-1])
        self.model.set_weights(self.weights[self.chosen])
        if (
            self.start_accuracy is not None
            and (self.start_accuracy - accuracies[self.chosen]) * 100.0
            > self.divergence_drop + 1e-9
        ):
            # Training diverged (lr too high): keep the starting model rather than a broken one.
            self.chosen = -1
            self.model.set_weights(self._start_weights)
        self.weights = []  # Free the checkpoints.


class GradualChannelPruning(keras.callbacks.Callback):
    """Prunes channels of one layer during training, following a pruning schedule.

    The schedule's sparsity at each training step is read as the fraction of the layer's
    channels to prune; channels are taken from ``order`` (e.g. increasing clean activation) and
    never given back.  ``final_count`` caps how many may be pruned; :meth:`finish` prunes up to
    it, so the result does not depend on how many steps early stopping allowed.

    Args:
      layer_name: a MaskedConv2D / MaskedDense layer of the trained model.
      order: channel indices in pruning order.
      schedule: ``tfmot.sparsity.keras.PruningSchedule`` or callable ``step -> (bool, float)``.
    """

    def __init__(
        self,
        layer_name: str,
        order: Sequence[int],
        schedule: Callable,
        final_count: int | None = None,
    ):
        super().__init__()
        self.layer_name = layer_name
        self.order = [int(c) for c in order]
        self.schedule = schedule
        self.final_count = len(self.order) if final_count is None else int(final_count)
        self.step = 0
        self.pruned_count = 0
        self.history: list[tuple[int, int]] = []

    def _layer(self, model) -> MaskedLayerMixin:
        layer = model.get_layer(self.layer_name)
        if not isinstance(layer, MaskedLayerMixin):
            raise ValueError(f"layer {self.layer_name!r} is not a masked layer")
        return layer

    def _prune_to(self, model, count: int) -> None:
        count = min(count, self.final_count, len(self.order))
        if count > self.pruned_count:
            self._layer(model).prune(self.order[self.pruned_count : count])
            self.pruned_count = count
            self.history.append((self.step, count))

    def on_train_batch_begin(self, batch, logs=None):
        should_prune, sparsity = self.schedule(tf.constant(self.step, tf.int64))
        if bool(should_prune):
            channels = self._layer(self.model).channels
            self._prune_to(self.model, int(math.floor(float(sparsity) * channels + 1e-9)))
        self.step += 1

    def finish(self, model: keras.Model) -> None:
        """Prunes whatever the schedule had not reached when training stopped."""
        self._prune_to(model, self.final_count)
