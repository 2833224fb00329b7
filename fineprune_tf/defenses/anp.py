"""Adversarial Neuron Pruning (ANP; Wu & Wang, NeurIPS 2021), following the authors' code
(csdongxian/ANP_backdoor: ``optimize_mask_cifar.py``, ``models/anp_batchnorm.py``,
``prune_neuron_cifar.py``).

Each neuron k (an output channel; the BN channel when a BN follows the conv, see
:mod:`fineprune_tf.defenses.neurons`) gets a mask ``m_k`` in [0, 1] and, in the perturbed pass,
multiplicative noise on its weight part and its bias part: the scale variable becomes
``scale * (m_k + delta_k)`` and the shift ``shift * (1 + xi_k)``, with ``delta, xi`` in
``[-eps, eps]`` (ANP's ``NoisyBatchNorm2d``: ``weight * (neuron_mask + neuron_noise)``,
``bias * (1 + neuron_noise_bias)``).  Per batch of clean data:

1. ``delta, xi ~ U(-eps, eps)``; ``steps`` times: one signed-gradient step of size
   ``eps / steps`` that *raises* the loss (``noise_opt`` is SGD on ``-loss`` with ``sign_grad``);
2. ``loss = alpha * CE(clean pass with m) + (1 - alpha) * CE(perturbed pass)``; an SGD-momentum
   step on ``m`` and a clip to [0, 1].

Then the neurons with the lowest ``m_k`` are pruned (ANP's ``--pruning-by number``, over the
whole network, as many as the clean holdout allows; see
:func:`fineprune_tf.defenses.thresholds.choose_threshold`).

Neurons are the output channels of every masked convolution kind, depthwise included (the
authors' ``NoisyBatchNorm2d`` replaces every BN, so a torch MobileNetV2's depthwise channels
get masks too).  Pruning is by dependency group (:mod:`fineprune_tf.defenses.coupling`): a
coupled channel (a residual stream's channel in every conv added into it; an expansion conv's
channel and the depthwise channel it feeds) scores the mean of its members' masks and is
pruned in every member, so shrink removes it; the authors prune each BN channel alone.

Hyper-parameters (authors' defaults / ours):

* ``eps = 0.4``, ``steps = 1``, ``alpha = 0.2``, mask lr 0.2 with momentum 0.9: the same.
* iterations: 2000 batches of 128 on 500 CIFAR images; ours ``iterations=100`` batches of 128
  (the defender's fit split is 400-600 examples: ~20-30 passes over it) to bound the cost on
  2 CPU cores.
* The authors optimise in ``model.train()`` mode (BN uses batch statistics); we run inference
  mode (BN uses its moving statistics), because the mask is then applied to the network the
  defender will deploy, and our BN-free task networks are unaffected.
* How many to prune: the authors report threshold 0.2 and sweep thresholds (or numbers)
  against the *test* set; ours is chosen from the defender's clean holdout: the most neurons,
  in increasing mask order, whose pruning keeps the holdout accuracy within the tolerance.  A
  fixed threshold grid failed on our BN-free networks: the masks of many neurons fall together
  and threshold 0.05 already cost more than 2 points (speech, seed 0: nothing pruned).
* Pruning sets the BN weight to 0 in the authors' code (the channel outputs ``beta``); we zero
  the masked layer's output (a following BN then outputs its constant shift; see
  ``fineprune_tf.conversion``).  Either way the channel no longer depends on the input.
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

__all__ = ["anp", "anp_mask_values", "anp_losses"]


def anp_losses(model, groups, x, y, masks, noise, noise_bias, alpha: float):
    """``(natural loss, robust loss, combined loss)`` of ANP for one batch.

    ``masks``, ``noise``, ``noise_bias``: lists of ``[C_g]`` tensors per group.  The natural
    pass scales each neuron by ``m``; the robust pass by ``m + delta`` (weight part) and
    ``1 + xi`` (bias part).
    """
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    natural = loss_fn(y, forward_with_multipliers(model, groups, x, masks, [None] * len(groups)))
    perturbed = forward_with_multipliers(
        model,
        groups,
        x,
        [m + d for m, d in zip(masks, noise, strict=True)],
        [1.0 + b for b in noise_bias],
    )
    robust = loss_fn(y, perturbed)
    return natural, robust, alpha * natural + (1.0 - alpha) * robust


def anp_mask_values(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps: float = 0.4,
    steps: int = 1,
    alpha: float = 0.2,
    learning_rate: float = 0.2,
    iterations: int = 100,
    batch_size: int = 128,
    seed: int = 0,
    dense: bool = False,
) -> tuple[list, list[np.ndarray]]:
    """Optimises ANP's neuron masks on clean ``(x [N, ...], y [N])``.

    Returns ``(groups, masks)``: the neuron groups of ``model`` and one float32 ``[C_g]`` mask
    per group, in [0, 1] (low = the neuron is needed only against perturbation: suspicious).
    """
    groups = neuron_groups(model, dense=dense)
    masks = [tf.Variable(tf.ones([g.channels]), name=f"mask_{i}") for i, g in enumerate(groups)]
    noise = [tf.Variable(tf.zeros([g.channels])) for g in groups]
    noise_bias = [tf.Variable(tf.zeros([g.channels])) for g in groups]
    optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9)
    rng = tf.random.Generator.from_seed(seed)

    @tf.function
    def step(xb, yb):
        if eps > 0:
            for variable in (*noise, *noise_bias):
                variable.assign(rng.uniform(variable.shape, -eps, eps))
            for _ in range(steps):
                with tf.GradientTape() as tape:
                    _, robust, _ = anp_losses(
                        model, groups, xb, yb, masks, noise, noise_bias, alpha
                    )
                grads = tape.gradient(robust, [*noise, *noise_bias])
                for variable, grad in zip([*noise, *noise_bias], grads, strict=True):
                    variable.assign_add((eps / steps) * tf.sign(grad))
        with tf.GradientTape() as tape:
            if eps > 0:
                natural, _, loss = anp_losses(
                    model, groups, xb, yb, masks, noise, noise_bias, alpha
                )
            else:
                loss = natural = anp_losses(model, groups, xb, yb, masks, noise, noise_bias, 1.0)[0]
        grads = tape.gradient(loss, masks)
        optimizer.apply_gradients(zip(grads, masks, strict=True))
        for mask in masks:
            mask.assign(tf.clip_by_value(mask, 0.0, 1.0))
        return natural

    order_rng = np.random.default_rng(seed)
    for _ in range(iterations):
        # Sampling with replacement, as ANP's RandomSampler(replacement=True).
        batch = order_rng.integers(0, len(x), size=min(batch_size, len(x)))
        step(tf.convert_to_tensor(x[batch]), tf.convert_to_tensor(y[batch]))
    return groups, [m.numpy() for m in masks]


def anp(
    model: keras.Model,
    validation,
    *,
    eps: float = 0.4,
    steps: int = 1,
    alpha: float = 0.2,
    learning_rate: float = 0.2,
    iterations: int = 100,
    batch_size: int = 128,
    threshold: float | None = None,
    tolerance: float = 2.0,
    seed: int = 0,
    evaluation=None,
) -> DefenseResult:
    """ANP: learn neuron masks under adversarial neuron perturbation on ``DefenderData.fit``,
    then prune the neurons whose mask is ``<= threshold``.

    Args:
      threshold: fixed pruning threshold; None (default) lets the clean holdout choose how many
        of the lowest-mask neurons to prune, within ``tolerance`` points of the undefended
        model's holdout accuracy (:func:`~fineprune_tf.defenses.thresholds.choose_threshold`).
    """
    defender = DefenderData.coerce(validation, seed=seed)
    start = time.perf_counter()
    defended = clone(model)
    with selecting():
        groups, masks = anp_mask_values(
            defended,
            *defender.fit,
            eps=eps,
            steps=steps,
            alpha=alpha,
            learning_rate=learning_rate,
            iterations=iterations,
            batch_size=batch_size,
            seed=seed,
        )
        details = prune_by_scores(
            defended, groups, masks, defender.holdout, tolerance, fixed=threshold
        )
    samples = iterations * min(batch_size, len(defender.fit[0]))
    details.update(eps=eps, steps=steps, alpha=alpha, iterations=iterations)
    result = DefenseResult(
        "anp",
        defended,
        time.perf_counter() - start,
        holdout_acc=holdout_accuracy(defended, defender.holdout),
        forward_passes=samples * (2 + 2 * steps) + details["forward_passes"],
        backward_passes=samples * (1 + steps),
        details=details,
    )
    return finish(result, evaluation)
