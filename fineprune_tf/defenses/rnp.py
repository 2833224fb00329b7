"""Reconstructive Neuron Pruning (RNP; Li et al., ICML 2023), following the authors' code
(bboylyg/RNP, ``main.py``).

1. **Unlearn** (neuron level): gradient *ascent* on the clean cross-entropy of a copy of the
   model -- SGD lr 0.01, momentum 0.9, weight decay 5e-4, gradient norm clipped to 20 -- until
   its clean training accuracy is ``<= clean_threshold`` (0.20) or ``unlearning_epochs`` (20)
   pass.  Clean features are destroyed first; the backdoor, which clean data does not exercise,
   survives.
2. **Recover** (filter level): on the unlearned model, learn a mask ``m_k`` in [0, 1] per neuron
   that multiplies its whole output (RNP's ``MaskBatchNorm2d``: weight and bias) by minimising
   ``alpha * CE`` on clean data -- SGD lr 0.2, momentum 0.9, ``recovering_epochs`` (20), clipped
   to [0, 1].  Neurons the recovery does not need (low ``m``) are the backdoor's.
3. **Prune** the *original* model's neurons with the lowest ``m_k`` (RNP's ``--pruning-by``
   number or threshold).

Neurons are the output channels of every masked convolution kind, depthwise included (the
authors' ``MaskBatchNorm2d`` replaces every BN).  Pruning is by dependency group, as ANP's
(:mod:`fineprune_tf.defenses.coupling`): a coupled channel scores the mean of its members'
masks and is pruned in every member.

Deviations: the authors sweep thresholds 0..0.9 against the test set (their README reports the
row that prunes 32 neurons); ours prunes by number, as many of the lowest-mask neurons as the
defender's clean holdout allows (:mod:`fineprune_tf.defenses.thresholds`).  Unlearning and
recovery run in inference mode (BN moving statistics) as in :mod:`fineprune_tf.defenses.anp`.
The authors use batch 128 on 500 CIFAR images; we use batch 64 on the 400-600 fit examples of
our tasks.
"""

from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf

from fineprune_tf.defenses.guard import DefenderData, selecting
from fineprune_tf.defenses.neurons import forward_with_multipliers, neuron_groups
from fineprune_tf.defenses.result import DefenseResult, clone, finish, holdout_accuracy
from fineprune_tf.defenses.thresholds import prune_by_scores

__all__ = ["rnp", "unlearn", "recover_masks"]


def _batches(count: int, batch_size: int, rng: np.random.Generator):
    order = rng.permutation(count)
    return [order[i : i + batch_size] for i in range(0, count, batch_size)]


def unlearn(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    learning_rate: float = 0.01,
    clean_threshold: float = 0.2,
    max_epochs: int = 20,
    batch_size: int = 64,
    clip_norm: float = 20.0,
    weight_decay: float = 5e-4,
    seed: int = 0,
) -> dict:
    """Gradient ascent on the clean loss of ``model`` (in place) until its clean training
    accuracy is ``<= clean_threshold``.  Returns ``{"epochs", "accuracy", "loss"}`` per epoch
    lists (accuracy and mean loss measured during each epoch, as the authors do)."""
    optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    variables = model.trainable_variables

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            probabilities = model(xb, training=False)
            loss = loss_fn(yb, probabilities)
        grads = tape.gradient(loss, variables)
        grads, _ = tf.clip_by_global_norm(grads, clip_norm)
        # Ascent on the loss; SGD's weight decay (torch adds wd * w to the gradient) kept as is.
        grads = [-g + weight_decay * v for g, v in zip(grads, variables, strict=True)]
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        correct = tf.reduce_sum(
            tf.cast(tf.equal(tf.argmax(probabilities, -1), tf.cast(yb, tf.int64)), tf.float32)
        )
        return loss, correct

    rng = np.random.default_rng(seed)
    history = {"accuracy": [], "loss": []}
    for _ in range(max_epochs):
        correct = total_loss = 0.0
        batches = _batches(len(x), batch_size, rng)
        for batch in batches:
            loss, hits = step(tf.convert_to_tensor(x[batch]), tf.convert_to_tensor(y[batch]))
            correct += float(hits)
            total_loss += float(loss)
        history["accuracy"].append(correct / len(x))
        history["loss"].append(total_loss / len(batches))
        if history["accuracy"][-1] <= clean_threshold:
            break
    history["epochs"] = len(history["accuracy"])
    return history


def recover_masks(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    learning_rate: float = 0.2,
    alpha: float = 0.2,
    epochs: int = 20,
    batch_size: int = 64,
    seed: int = 0,
    dense: bool = False,
) -> tuple[list, list[np.ndarray]]:
    """Learns RNP's filter masks on the (unlearned) ``model``; returns ``(groups, masks)``
    with one float32 ``[C_g]`` mask in [0, 1] per neuron group."""
    groups = neuron_groups(model, dense=dense)
    masks = [tf.Variable(tf.ones([g.channels])) for g in groups]
    optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = alpha * loss_fn(yb, forward_with_multipliers(model, groups, xb, masks, masks))
        grads = tape.gradient(loss, masks)
        optimizer.apply_gradients(zip(grads, masks, strict=True))
        for mask in masks:
            mask.assign(tf.clip_by_value(mask, 0.0, 1.0))
        return loss

    rng = np.random.default_rng(seed + 1)
    for _ in range(epochs):
        for batch in _batches(len(x), batch_size, rng):
            step(tf.convert_to_tensor(x[batch]), tf.convert_to_tensor(y[batch]))
    return groups, [m.numpy() for m in masks]


def rnp(
    model: keras.Model,
    validation,
    *,
    unlearning_lr: float = 0.01,
    clean_threshold: float = 0.2,
    unlearning_epochs: int = 20,
    recovering_lr: float = 0.2,
    recovering_epochs: int = 20,
    alpha: float = 0.2,
    batch_size: int = 64,
    threshold: float | None = None,
    tolerance: float = 2.0,
    seed: int = 0,
    evaluation=None,
) -> DefenseResult:
    """RNP: unlearn a copy on ``DefenderData.fit``, recover its filter masks, prune the
    original model's neurons with ``mask <= threshold`` (None: chosen on the clean holdout)."""
    defender = DefenderData.coerce(validation, seed=seed)
    start = time.perf_counter()
    defended = clone(model)
    with selecting():
        unlearned = clone(model)
        fit_x, fit_y = defender.fit
        history = unlearn(
            unlearned,
            fit_x,
            fit_y,
            learning_rate=unlearning_lr,
            clean_threshold=clean_threshold,
            max_epochs=unlearning_epochs,
            batch_size=batch_size,
            seed=seed,
        )
        _, masks = recover_masks(
            unlearned,
            fit_x,
            fit_y,
            learning_rate=recovering_lr,
            alpha=alpha,
            epochs=recovering_epochs,
            batch_size=batch_size,
            seed=seed,
        )
        groups = neuron_groups(defended)
        details = prune_by_scores(
            defended, groups, masks, defender.holdout, tolerance, fixed=threshold
        )
    details = {"unlearning": history, **details}
    passes = len(fit_x) * (history["epochs"] + recovering_epochs)
    result = DefenseResult(
        "rnp",
        defended,
        time.perf_counter() - start,
        holdout_acc=holdout_accuracy(defended, defender.holdout),
        forward_passes=passes + details["forward_passes"],
        backward_passes=passes,
        details=details,
    )
    return finish(result, evaluation)
