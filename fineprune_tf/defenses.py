"""Defenses against backdoors: pruning (§3.1), fine-tuning, fine-pruning (§3.3) and FMP.

Every defense works on a copy of the model it is given (the user's model is never modified),
uses only the defender's clean validation data, and returns a :class:`DefenseResult`.  When an
``evaluation`` set is passed (clean test data and its backdoored copy, which a real defender does
not have) the result carries clean accuracy, attack success rate and robust accuracy on it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from fineprune_tf import curves, metrics, models, stats, training
from fineprune_tf.layers import MaskedConv2D, MaskedLayerMixin, masked_layers

__all__ = [
    "DEFENSES", "DefenseResult", "FineTuneSettings", "GradualChannelPruning", "add_weight_noise",
    "clone", "fine_prune", "fine_tune", "fmp", "prune", "rank_channels",
]

DEFENSES = ("none", "pruning", "fine_tuning", "fine_pruning", "fmp")


@dataclasses.dataclass
class DefenseResult:
    """A defended model and what the defense measured.

    Attributes:
      defense: the defense's name (one of ``DEFENSES``).
      model: the defended copy of the input model.
      seconds: wall time of the defense (evaluation excluded).
      clean_acc, asr, robust_acc: on the ``evaluation`` set when given, else NaN.
      details: defense-specific data (curve, pruned channels, epochs, ...).
    """

    defense: str
    model: keras.Model
    seconds: float
    clean_acc: float = math.nan
    asr: float = math.nan
    robust_acc: float = math.nan
    details: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        return {"clean_acc": self.clean_acc, "asr": self.asr, "robust_acc": self.robust_acc,
                "seconds": self.seconds}


@dataclasses.dataclass
class FineTuneSettings:
    """Fine-tuning on the defender's clean data: small learning rate, early stopping on a
    held-out clean slice (``holdout_fraction`` of the validation data)."""

    learning_rate: float = 1e-3
    max_epochs: int = 30
    batch_size: int = 64
    patience: int = 5
    holdout_fraction: float = 0.2
    optimizer: str = "adam"
    noise_stddev: float = 0.0
    seed: int = 0
    verbose: int = 0


def clone(model: keras.Model) -> keras.Model:
    """A structurally identical copy with the same weights and masks."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _finish(result: DefenseResult, evaluation) -> DefenseResult:
    if evaluation is not None:
        clean, backdoor = evaluation
        measured = metrics.evaluate(result.model, clean, backdoor)
        result.clean_acc = measured["clean_acc"]
        result.asr = measured["asr"]
        result.robust_acc = measured["robust_acc"]
    return result


def _check_validation(validation) -> tuple[np.ndarray, np.ndarray]:
    x, y = validation
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"validation x has {len(x)} examples but y has {len(y)} labels")
    if len(x) < 2:
        raise ValueError("the defender's validation set needs at least 2 examples")
    return x, y


def _pruned_layer(model: keras.Model, layer_name: str | None) -> MaskedConv2D:
    name = layer_name or models.last_conv_layer(model)
    try:
        layer = model.get_layer(name)
    except ValueError as error:
        raise ValueError(f"model has no layer named {name!r}") from error
    if not isinstance(layer, MaskedConv2D):
        raise ValueError(f"layer {name!r} is a {type(layer).__name__}, not a MaskedConv2D")
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


_PER_CHANNEL = (keras.layers.BatchNormalization, keras.layers.ReLU, keras.layers.Activation)


def _activation_tensor(layer: MaskedLayerMixin):
    """The tensor a channel's "activation" is read from (§2.1: the neuron's ReLU output).

    A conv with a fused ReLU is its own answer. A linear conv followed by a chain of
    per-channel layers (BatchNormalization, ReLU, Activation — as in converted ResNet-style
    models) is read at the end of that chain, so the ranking sees what the next layer sees.
    """
    tensor, current = layer.output, layer
    while True:
        consumers = [node.operation for node in current._outbound_nodes]
        if len(consumers) != 1 or not isinstance(consumers[0], _PER_CHANNEL):
            return tensor
        current = consumers[0]
        if isinstance(current, keras.layers.Activation) and current.activation not in (
                keras.activations.relu, keras.activations.linear):
            return tensor
        tensor = current.output


def _chain_means(model: keras.Model, layer: MaskedLayerMixin, x: np.ndarray,
                 batch_size: int) -> np.ndarray:
    """Mean of :func:`_activation_tensor` per channel over ``x`` (unmasked), float64 ``[C]``."""
    saved = layer.mask
    layer.restore()
    try:
        probe = keras.Model(training.model_input(model), _activation_tensor(layer))
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


def prune(model: keras.Model, validation, *, layer_name: str | None = None,
          threshold: float = 4.0, backdoor_validation=None, evaluation=None,
          engine: str = "fast", batch_size: int = 256) -> DefenseResult:
    """The pruning defense (§3.1).

    Ranks the channels of the last conv layer (or ``layer_name``) by mean activation on the clean
    validation data, records clean accuracy (and ASR when ``backdoor_validation`` is given)
    after pruning every single channel in that order, and keeps the largest prefix whose clean
    accuracy is within ``threshold`` percentage points of the unpruned model's.

    Args:
      validation: the defender's clean ``(x, y)``.
      threshold: allowed accuracy drop in percentage points, in (0, 100).
      backdoor_validation: a backdoored copy of the validation data (for the curves only).
      evaluation: ``((x_test, y_test), backdoor_test)`` to report on.
      engine: ``"fast"`` (the incremental curve engine) or ``"naive"`` (one predict per step).
    """
    if not 0.0 < threshold < 100.0:
        raise ValueError(f"threshold must be in (0, 100) percentage points, got {threshold}")
    if engine not in ("fast", "naive"):
        raise ValueError(f"engine must be 'fast' or 'naive', got {engine!r}")
    x, y = _check_validation(validation)
    start = time.perf_counter()
    defended = clone(model)
    layer = _pruned_layer(defended, layer_name)
    order, means = rank_channels(defended, layer.name, x, batch_size)
    curve_fn = curves.pruning_curve if engine == "fast" else curves.naive_pruning_curve
    curve = curve_fn(defended, layer.name, order, (x, y), backdoor_validation,
                     batch_size=batch_size)
    count = stopping_point(curve.clean_acc, threshold)
    layer.prune(order[:count])
    seconds = time.perf_counter() - start
    details = {
        "layer": layer.name, "channels": layer.channels, "order": order.tolist(),
        "mean_activation": means.tolist(), "pruned": order[:count].tolist(),
        "pruned_count": count, "pruned_fraction": count / layer.channels,
        "threshold": threshold, "curve": curve.as_dict(),
    }
    logging.info("pruning: %d/%d channels of %s pruned in %.1f s", count, layer.channels,
                 layer.name, seconds)
    return _finish(DefenseResult("pruning", defended, seconds, details=details), evaluation)


def add_weight_noise(model: keras.Model, stddev: float, seed: int = 0) -> None:
    """Adds Gaussian noise to every trainable kernel and bias, in place (§4's stronger variant).

    ``stddev`` is relative: each variable gets noise of ``stddev * std(variable)``.
    """
    if stddev < 0:
        raise ValueError(f"noise stddev must be >= 0, got {stddev}")
    if stddev == 0:
        return
    rng = np.random.default_rng(seed)
    for variable in model.trainable_variables:
        value = keras.ops.convert_to_numpy(variable)
        scale = stddev * float(np.std(value)) if value.size > 1 else stddev
        variable.assign(value + rng.normal(0.0, scale, value.shape).astype(value.dtype))


def _split_holdout(x, y, fraction, seed):
    order = np.random.default_rng(seed + 104729).permutation(len(x))
    count = min(max(1, int(round(len(x) * fraction))), len(x) - 1)
    return (x[order[count:]], y[order[count:]]), (x[order[:count]], y[order[:count]])


def _fine_tune_in_place(model: keras.Model, x, y, settings: FineTuneSettings,
                        callbacks: Sequence[keras.callbacks.Callback] = ()) -> dict:
    add_weight_noise(model, settings.noise_stddev, settings.seed)
    (train_x, train_y), holdout = _split_holdout(x, y, settings.holdout_fraction, settings.seed)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings.patience,
                                         restore_best_weights=True)
    fitted = training.fit(model, train_x, train_y, epochs=settings.max_epochs,
                          batch_size=settings.batch_size,
                          learning_rate=settings.learning_rate, optimizer=settings.optimizer,
                          seed=settings.seed, validation=holdout,
                          callbacks=[stop, *callbacks], verbose=settings.verbose)
    return {"epochs": fitted["epochs"], "train_seconds": fitted["seconds"],
            "best_val_loss": float(min(fitted["history"].get("val_loss", [math.nan]))),
            "learning_rate": settings.learning_rate, "noise_stddev": settings.noise_stddev}


def fine_tune(model: keras.Model, validation, *, settings: FineTuneSettings | None = None,
              evaluation=None) -> DefenseResult:
    """Fine-tuning (§3.3): continue training on clean data with a small learning rate until
    the held-out clean loss stops improving. Existing masks are held (pruned channels stay 0)."""
    settings = settings or FineTuneSettings()
    x, y = _check_validation(validation)
    start = time.perf_counter()
    defended = clone(model)
    details = _fine_tune_in_place(defended, x, y, settings)
    return _finish(DefenseResult("fine_tuning", defended, time.perf_counter() - start,
                                 details=details), evaluation)


def fine_prune(model: keras.Model, validation, *, layer_name: str | None = None,
               threshold: float = 4.0, settings: FineTuneSettings | None = None,
               backdoor_validation=None, evaluation=None, engine: str = "fast",
               schedule: Any = None) -> DefenseResult:
    """Fine-pruning (§3.3): the pruning defense, then fine-tuning with pruned channels held at 0.

    With ``schedule`` (a ``tfmot.sparsity.keras.PruningSchedule`` or any callable
    ``step -> (should_prune, sparsity)``) the channels are instead pruned gradually during
    fine-tuning, in the pruning defense's order, by :class:`GradualChannelPruning`; the final
    count is the one the pruning defense chose.
    """
    settings = settings or FineTuneSettings()
    x, y = _check_validation(validation)
    start = time.perf_counter()
    pruned = prune(model, (x, y), layer_name=layer_name, threshold=threshold,
                   backdoor_validation=backdoor_validation, engine=engine)
    defended, details = pruned.model, {"pruning": pruned.details}
    if schedule is None:
        details["fine_tuning"] = _fine_tune_in_place(defended, x, y, settings)
    else:
        layer = defended.get_layer(pruned.details["layer"])
        layer.restore()
        callback = GradualChannelPruning(layer.name, pruned.details["pruned"], schedule,
                                         final_count=pruned.details["pruned_count"])
        details["fine_tuning"] = _fine_tune_in_place(defended, x, y, settings, [callback])
        callback.finish(defended)
        details["gradual"] = {"history": callback.history}
    return _finish(DefenseResult("fine_pruning", defended, time.perf_counter() - start,
                                 details=details), evaluation)


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

    def __init__(self, layer_name: str, order: Sequence[int], schedule: Callable,
                 final_count: int | None = None):
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
            self._layer(model).prune(self.order[self.pruned_count:count])
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


def fmp_sensitivity(model: keras.Model, x: np.ndarray, y: np.ndarray, *,
                    epsilon: float = 0.03, batch_size: int = 32,
                    max_stack: int = 2048, seed: int = 0) -> dict[str, np.ndarray]:
    """Adversarial feature-map sensitivity (FMP, Huang & Bu, ICLR 2024).

    For every channel c of every conv layer, one FGSM step (size ``epsilon``, in input units,
    from a small random start) on the clean batch maximises ``||F_c(x + d) - F_c(x)||^2``; the
    model's accuracy on ``x + d`` is the channel's score.  Backdoor feature maps are the ones a
    tiny perturbation aimed at them alone flips the output with, so LOW accuracy = suspicious.

    All channels of a layer are attacked at once: the batch is tiled once per channel and each
    copy's objective only involves its own channel, so one gradient gives every channel's step.

    Returns ``{layer name: float64 [C] accuracy after the channel's FGSM step}``.
    """
    x, y = np.asarray(x[:batch_size]), np.asarray(y[:batch_size])
    conv_layers = [layer for layer in masked_layers(model) if isinstance(layer, MaskedConv2D)]
    if not conv_layers:
        raise ValueError("FMP needs at least one MaskedConv2D layer")
    rng = np.random.default_rng(seed)
    scores = {}
    for layer in conv_layers:
        probe = keras.Model(training.model_input(model), [layer.output, model.outputs[0]])
        channels = layer.channels
        clean_features = probe(x, training=False)[0]
        per_chunk = max(1, max_stack // len(x))
        accuracy = np.zeros(channels)
        for first in range(0, channels, per_chunk):
            chunk = np.arange(first, min(channels, first + per_chunk))
            tiled = np.tile(x, (len(chunk), 1, 1, 1))
            start = rng.uniform(-epsilon / 4, epsilon / 4, tiled.shape).astype(x.dtype)
            selector = np.repeat(np.eye(channels, dtype=x.dtype)[chunk], len(x), axis=0)
            inputs = tf.convert_to_tensor(tiled + start)
            reference = tf.tile(clean_features, [len(chunk), 1, 1, 1])
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                features = probe(inputs, training=False)[0]
                deviation = tf.square(features - reference) * selector[:, None, None, :]
                objective = tf.reduce_sum(deviation)
            gradient = tape.gradient(objective, inputs)
            adversarial = tiled + epsilon * np.sign(gradient.numpy())
            predictions = np.argmax(probe(adversarial, training=False)[1].numpy(), axis=-1)
            correct = (predictions == np.tile(y, len(chunk))).reshape(len(chunk), len(x))
            accuracy[chunk] = correct.mean(axis=1)
        scores[layer.name] = accuracy
    return scores


def fmp(model: keras.Model, validation, *, prune_fraction: float = 0.1, epsilon: float = 0.03,
        probe_batch: int = 32, settings: FineTuneSettings | None = None,
        evaluation=None) -> DefenseResult:
    """Adversarial Feature Map Pruning (FMP): prune, in every conv layer, the
    ``prune_fraction`` of channels most sensitive to a feature-targeted FGSM step
    (:func:`fmp_sensitivity`), then fine-tune on clean data with the masks held."""
    if not 0.0 < prune_fraction < 1.0:
        raise ValueError(f"prune_fraction must be in (0, 1), got {prune_fraction}")
    settings = settings or FineTuneSettings()
    x, y = _check_validation(validation)
    start = time.perf_counter()
    defended = clone(model)
    probe_start = time.perf_counter()
    scores = fmp_sensitivity(defended, x, y, epsilon=epsilon, batch_size=probe_batch,
                             seed=settings.seed)
    probe_seconds = time.perf_counter() - probe_start
    pruned = {}
    for name, accuracy in scores.items():
        layer = defended.get_layer(name)
        count = int(math.floor(prune_fraction * layer.channels))
        candidates = [c for c in np.argsort(accuracy, kind="stable")
                      if c in set(layer.active_channels.tolist())][:count]
        if candidates:
            layer.prune(candidates)
        pruned[name] = [int(c) for c in candidates]
    tuned = _fine_tune_in_place(defended, x, y, settings)
    details = {"sensitivity": {k: v.tolist() for k, v in scores.items()}, "pruned": pruned,
               "probe_seconds": probe_seconds, "epsilon": epsilon,
               "prune_fraction": prune_fraction, "fine_tuning": tuned}
    return _finish(DefenseResult("fmp", defended, time.perf_counter() - start,
                                 details=details), evaluation)
