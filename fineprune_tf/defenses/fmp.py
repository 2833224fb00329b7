"""Adversarial Feature Map Pruning (FMP; Huang & Bu, ICLR 2024), following the official code
(retsuh-bqw/FMP, ``defense/fgsm-feature.py``).

What the official code does, and what we do:

* **Samples.** One batch of the defender's clean data (32 images; 1024 for CIFAR-10 in
  ``pgd-feature.py``).  We use ``probe_samples`` (default 64) of ``DefenderData.fit``.
* **Random start.** ``x + alpha * sign(U(-alpha, alpha))`` clipped to [0, 1].  Same, with
  ``alpha`` and the clip scaled to the data's range (``DefenderData.value_range``): our
  tasks are not in [0, 1] (speech MFCCs span about -5..6).
* **Feature-targeted FGSM, one step** (``range(1)`` in ``fgsm-feature.py``): for channel c of
  every conv layer, ``x_adv = x_start + eps * sign(grad ||F_c(x_start) - F_c(x)||^2)``.  Same
  objective (the official code uses MSE; we use the sum of squares, which has the same sign
  of gradient).  The config YAML that holds ``eps``/``alpha`` is not in the repository; we use
  ``eps = 8/255`` and ``alpha = 4/255`` of the data's range (8/255 is the usual L-inf budget
  for [0, 1] images).
* **Score.** The official code scores a channel by the model's *accuracy* on ``x_adv``, over
  32 samples: a coarse, tie-prone score (on speech every conv1/conv2 channel tied at 0.96875 and
  channels were then pruned by index).  We score by the **mean cross-entropy increase**
  ``L(x_adv_c) - L(x_start)`` over ``probe_samples``: continuous, so distinct channels get
  distinct scores.  The ranking is a strict total order by construction: score (descending),
  then the feature deviation the step achieved (descending), then channel index; a channel with
  zero gradient (dead on these samples) scores exactly 0 and ranks after every channel with a
  positive score (a step can also lower the loss: negative scores rank last).
* **How many.** ``dynamiccluster`` prunes ``argsort(acc)[:C // 64]`` per layer, i.e. 0 channels
  in layers narrower than 64.  We prune ``ceil(prune_fraction * K)`` (default 1/64, so at least
  one per group); the protocol may choose a larger fraction from the clean holdout.
* **Which layers.** Every masked convolution kind is scored, depthwise included (the official
  code walks ``nn.Conv2d`` modules, which in torch include depthwise ones).  Pruning is by
  dependency group (:mod:`fineprune_tf.defenses.coupling`): a group's ``K`` coupled channels
  (a residual stream's channel in every conv added into it; an expansion conv's channel with
  the depthwise channel it feeds) are ranked by their members' mean score, and a chosen one
  is pruned in every member, so shrink removes it.  The official code prunes each layer on its
  own.  On the task networks every group is one layer: the official per-layer rule.
* **Pruning.** The official code zeroes the conv (and BN) weights of pruned maps, which
  fine-tuning can regrow; we hold them at 0 in the masks.
* **Fine-tuning.** Official: SGD lr 0.01, momentum 0.9, cosine to 1e-4, ``args.epochs``.  We use
  the project's fine-tuning (``fine_tuning.FineTuneSettings``, its ``converge`` rule) so every
  pruning defense is compared with the same fine-tuning.
"""

from __future__ import annotations

import dataclasses
import math
import time

import keras
import numpy as np
import tensorflow as tf

from fineprune_tf import training
from fineprune_tf.defenses.coupling import active_rows, pruning_units, unit_channels, unit_scores
from fineprune_tf.defenses.fine_tuning import FineTuneSettings, fine_tune_in_place
from fineprune_tf.defenses.guard import DefenderData, selecting
from fineprune_tf.defenses.result import DefenseResult, clone, finish, holdout_accuracy
from fineprune_tf.layers import MASKED_CONVOLUTIONS, masked_layers

__all__ = [
    "fmp",
    "fmp_sensitivity",
    "fmp_ranking",
    "fmp_prune_sets",
    "EPSILON",
    "ALPHA",
    "PRUNE_FRACTION",
    "FmpSettings",
    "stack_for_budget",
]

EPSILON = 8.0 / 255.0
ALPHA = 4.0 / 255.0
#: Share of each conv layer's channels pruned (the official code's default, 1/64).
PRUNE_FRACTION = 1.0 / 64


@dataclasses.dataclass(frozen=True)
class FmpSettings:
    """FMP's hyper-parameters (defaults: the module's constants, as published).

    Attributes:
      prune_fraction: share of each conv layer's channels pruned, in (0, 1).
      epsilon: FGSM step as a fraction of the data's range.
      alpha: random-start size as a fraction of the data's range.
      probe_samples: clean examples each channel is scored on.
      memory_budget_mb: MiB the probe's stacked inputs may take (see ``stack_for_budget``).
    """

    prune_fraction: float = PRUNE_FRACTION
    epsilon: float = EPSILON
    alpha: float = ALPHA
    probe_samples: int = 64
    memory_budget_mb: float = 512.0

    def validate(self) -> None:
        if not 0.0 < self.prune_fraction < 1.0:
            raise ValueError(f"fmp prune_fraction must be in (0, 1), got {self.prune_fraction}")
        if not self.memory_budget_mb > 0:
            raise ValueError(f"fmp memory_budget_mb must be > 0, got {self.memory_budget_mb}")
        if self.epsilon <= 0 or self.alpha < 0 or self.probe_samples < 1:
            raise ValueError(
                f"fmp needs epsilon > 0, alpha >= 0 and probe_samples >= 1, got "
                f"{self.epsilon}, {self.alpha}, {self.probe_samples}"
            )


def fmp_sensitivity(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epsilon: float = EPSILON,
    alpha: float = ALPHA,
    value_range: tuple[float, float] | None = None,
    probe_samples: int = 64,
    max_stack: int = 4096,
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """Per channel of every masked convolution (each kind, depthwise included): the loss
    increase one feature-targeted FGSM step causes.

    Args:
      x, y: clean inputs ``[N, ...]`` and labels ``[N]``; the first ``probe_samples`` are used.
      epsilon, alpha: step and random-start sizes as fractions of the data's range.
      value_range: ``(min, max)`` of the data (default: of ``x``); perturbed inputs are clipped
        to it.
      max_stack: inputs per gradient call (channels are attacked in parallel by tiling).

    Returns:
      ``{layer: {"score": float64 [C] mean cross-entropy increase, "deviation": float64 [C]
      mean squared feature change of the channel, "accuracy": float64 [C]}}``.
    """
    x, y = np.asarray(x[:probe_samples]), np.asarray(y[:probe_samples])
    low, high = value_range or (float(x.min()), float(x.max()))
    span = max(high - low, 1e-12)
    conv_layers = [
        layer for layer in masked_layers(model) if isinstance(layer, MASKED_CONVOLUTIONS)
    ]
    if not conv_layers:
        raise ValueError("FMP needs at least one masked convolution: convert the model first")
    rng = np.random.default_rng(seed)
    start_x = np.clip(x + alpha * span * np.sign(rng.uniform(-1, 1, x.shape)), low, high)
    start_x = start_x.astype(x.dtype)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=None)
    base_loss = float(np.mean(loss_fn(y, model(start_x, training=False))))
    scores = {}
    for layer in conv_layers:
        probe = keras.Model(training.model_input(model), [layer.output, model.outputs[0]])
        # The FGSM gradient needs the layers up to this one only (a prefix of the network).
        features_of = keras.Model(training.model_input(model), layer.output)
        clean_features = features_of(x, training=False)
        rank = len(clean_features.shape)  # the feature map's, not the input's (packed inputs)
        per_chunk = max(1, max_stack // len(x))
        out = {k: np.zeros(layer.channels) for k in ("score", "deviation", "accuracy")}
        for first in range(0, layer.channels, per_chunk):
            chunk = np.arange(first, min(layer.channels, first + per_chunk))
            tiled = tf.convert_to_tensor(np.tile(start_x, (len(chunk),) + (1,) * (x.ndim - 1)))
            selector = np.repeat(np.eye(layer.channels, dtype=x.dtype)[chunk], len(x), axis=0)
            selector = selector.reshape((len(tiled),) + (1,) * (rank - 2) + (-1,))
            reference = tf.tile(clean_features, [len(chunk)] + [1] * (rank - 1))
            with tf.GradientTape() as tape:
                tape.watch(tiled)
                features = features_of(tiled, training=False)
                objective = tf.reduce_sum(tf.square(features - reference) * selector)
            gradient = tape.gradient(objective, tiled)
            adversarial = tf.clip_by_value(tiled + epsilon * span * tf.sign(gradient), low, high)
            features, probabilities = probe(adversarial, training=False)
            deviation = tf.reduce_sum(
                tf.square(features - reference) * selector, axis=list(range(1, rank))
            )
            labels = np.tile(y, len(chunk))
            losses = loss_fn(labels, probabilities).numpy().reshape(len(chunk), len(x))
            correct = np.argmax(probabilities.numpy(), -1) == labels
            out["score"][chunk] = losses.mean(axis=1) - base_loss
            out["deviation"][chunk] = deviation.numpy().reshape(len(chunk), len(x)).mean(axis=1)
            out["accuracy"][chunk] = correct.reshape(len(chunk), len(x)).mean(axis=1)
        scores[layer.name] = out
    return scores


def fmp_ranking(score: np.ndarray, deviation: np.ndarray) -> np.ndarray:
    """Channels from most to least suspicious: score descending, then deviation descending,
    then index (a strict total order)."""
    index = np.arange(len(score))
    return np.lexsort((index, -np.asarray(deviation), -np.asarray(score))).astype(np.int64)


def fmp_prune_sets(
    model: keras.Model, scores: dict[str, dict[str, np.ndarray]], prune_fraction: float
) -> dict[str, list[int]]:
    """``{layer: channels}`` FMP prunes: in every dependency group
    (:mod:`fineprune_tf.defenses.coupling`), the ``ceil(prune_fraction * K)`` coupled channels
    still active that rank first by :func:`fmp_ranking` of the members' mean score and mean
    deviation (Torch-Pruning's ``group_reduction="mean"``), pruned in every member.  A group
    of one layer is the official per-layer rule.
    """
    units = pruning_units(model, list(scores))
    mean_score = unit_scores(units, {k: v["score"] for k, v in scores.items()}, "mean")
    mean_deviation = unit_scores(units, {k: v["deviation"] for k, v in scores.items()}, "mean")
    rows = []
    for unit, score, deviation in zip(units, mean_score, mean_deviation, strict=True):
        count = int(math.ceil(prune_fraction * unit.size - 1e-9))
        active = active_rows(model, unit)
        ranked = fmp_ranking(score, deviation)
        rows.append([int(r) for r in ranked if active[r]][:count])
    return unit_channels(units, rows)


def stack_for_budget(model: keras.Model, memory_budget_mb: float) -> int:
    """Inputs per gradient call of :func:`fmp_sensitivity` that fit in ``memory_budget_mb``
    MiB: each stacked input holds every layer's float32 activation twice (kept by the tape,
    and its gradient).  At least 1.

    Why a bound: the default of 4096 stacked inputs took the face model's FMP to 4.2 GiB
    resident (results: BENCHMARKS.md section (f)).
    """
    elements = 0
    for layer in model.layers:
        for tensor in keras.tree.flatten(layer.output):
            shape = tuple(tensor.shape[1:])
            if None not in shape:
                elements += int(np.prod(shape, dtype=np.int64))
    per_input = 2 * 4 * max(elements, 1)
    return max(1, int(memory_budget_mb * (1 << 20)) // per_input)


def fmp(
    model: keras.Model,
    validation,
    *,
    prune_fraction: float = PRUNE_FRACTION,
    epsilon: float = EPSILON,
    alpha: float = ALPHA,
    probe_samples: int = 64,
    settings: FineTuneSettings | None = None,
    evaluation=None,
    probe_batch: int | None = None,
    memory_budget_mb: float | None = None,
) -> DefenseResult:
    """FMP: prune, in every conv layer, the ``ceil(prune_fraction * C)`` channels whose
    feature-targeted FGSM step raises the clean loss most (:func:`fmp_sensitivity`), then
    fine-tune on clean data with the masks held.  ``probe_batch`` is the old name of
    ``probe_samples``; ``memory_budget_mb`` bounds the probe's stacked inputs
    (:func:`stack_for_budget`; default ``FmpSettings.memory_budget_mb``)."""
    if not 0.0 < prune_fraction < 1.0:
        raise ValueError(f"prune_fraction must be in (0, 1), got {prune_fraction}")
    settings = settings or FineTuneSettings()
    defender = DefenderData.coerce(
        validation, holdout_fraction=settings.holdout_fraction, seed=settings.seed
    )
    probe_samples = probe_batch or probe_samples
    start = time.perf_counter()
    defended = clone(model)
    with selecting():
        fit_x, fit_y = defender.fit
        budget = FmpSettings.memory_budget_mb if memory_budget_mb is None else memory_budget_mb
        scores = fmp_sensitivity(
            defended,
            fit_x,
            fit_y,
            epsilon=epsilon,
            alpha=alpha,
            value_range=defender.value_range,
            probe_samples=probe_samples,
            max_stack=stack_for_budget(defended, budget),
            seed=settings.seed,
        )
        probe_seconds = time.perf_counter() - start
        pruned = fmp_prune_sets(defended, scores, prune_fraction)
        for name, channels in pruned.items():
            if channels:
                defended.get_layer(name).prune(channels)
    tuned = fine_tune_in_place(defended, defender, settings)
    channels = sum(len(s["score"]) for s in scores.values())
    samples = min(probe_samples, len(fit_x))
    details = {
        "sensitivity": {k: {m: v.tolist() for m, v in s.items()} for k, s in scores.items()},
        "pruned": pruned,
        "probe_seconds": probe_seconds,
        "epsilon": epsilon,
        "alpha": alpha,
        "prune_fraction": prune_fraction,
        "fine_tuning": tuned,
        "why": f"pruned ceil({prune_fraction:.4f} * K) coupled channels per dependency group "
        "(a conv layer, or the layers tied to it) with the largest clean-loss increase under a "
        "feature-targeted FGSM step",
    }
    result = DefenseResult(
        "fmp",
        defended,
        time.perf_counter() - start,
        holdout_acc=holdout_accuracy(defended, defender.holdout),
        forward_passes=samples * (2 * channels + 1) + tuned["forward_passes"],
        backward_passes=samples * channels + tuned["backward_passes"],
        details=details,
    )
    return finish(result, evaluation)
