"""Backdoor attacks: BadNets-style poisoning (baseline) and the pruning-aware attack (§3.2).

Any trigger and policy train through :func:`baseline` (the field's attacks by name are in
:mod:`fineprune_tf.attack_zoo`); :func:`retuning_attack` (from :mod:`fineprune_tf.retuning`)
tests whether a purified model stays clean when re-tuned on a few poisoned inputs.

The attacker controls training (§2.2): she sees the task's training split only, never the
defender's validation split, so her own monitoring uses a held-out slice of the training data.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from fineprune_tf import metrics, models, poison, stats, training
from fineprune_tf.layers import MaskedConv2D
from fineprune_tf.retuning import retuning_attack

__all__ = [
    "AttackResult",
    "AttackSettings",
    "baseline",
    "pruning_aware",
    "ATTACKS",
    "attacker_holdout",
    "retuning_attack",
]

ATTACKS = ("baseline", "pruning_aware")


@dataclasses.dataclass
class AttackSettings:
    """Training hyper-parameters of an attack; ``None`` fields take the task's defaults.

    Attributes:
      preset: network size, "cpu" or "paper".
      epochs: training epochs (default: the task's).
      batch_size: training batch size (default: the task's).
      learning_rate: learning rate (default: the task's).
      optimizer: optimizer name (default: the task's).
      schedule: learning-rate schedule (default: the task's).
      seed: seeds the attacker's holdout split and training.
      holdout_fraction: share of the attacker's training data she holds out to monitor.
      prune_fraction: pruning-aware attack: share of last-conv channels pruned in step 2.
      retrain_epochs: pruning-aware attack: epochs of step 3 (default: half of ``epochs``).
      clean_drop_goal: pruning-aware attack: clean accuracy step 3 may lose (a rate).
      asr_goal: pruning-aware attack: attack success step 3 aims at (default: the baseline's).
      max_reinstated: pruning-aware attack: cap on channels step 3 re-instates.
      verbose: Keras fit verbosity.
    """

    preset: str = "cpu"
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    optimizer: str | None = None
    schedule: str | None = None
    seed: int = 0
    holdout_fraction: float = 0.1
    prune_fraction: float = 0.75
    retrain_epochs: int | None = None
    clean_drop_goal: float = 0.02
    asr_goal: float | None = None
    max_reinstated: int = 3
    verbose: int = 0

    def validate(self) -> None:
        if self.preset not in models.PRESETS:
            raise ValueError(f"preset must be one of {models.PRESETS}, got {self.preset!r}")
        if not 0.0 < self.prune_fraction < 1.0:
            raise ValueError(f"prune_fraction must be in (0, 1), got {self.prune_fraction}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        for name in ("epochs", "batch_size", "retrain_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_reinstated < 0:
            raise ValueError(f"max_reinstated must be >= 0, got {self.max_reinstated}")

    def resolved(self, task: str) -> AttackSettings:
        defaults = models.default_training(task)
        values = dataclasses.asdict(self)
        for key in ("epochs", "batch_size", "learning_rate", "optimizer", "schedule"):
            if values[key] is None:
                values[key] = defaults[key]
        if values["retrain_epochs"] is None:
            # Step 3 starts from a trained network: half the epochs reach the goals, and the
            # re-instatement loop may repeat it several times.
            values["retrain_epochs"] = max(1, values["epochs"] // 2)
        return AttackSettings(**values)


@dataclasses.dataclass
class AttackResult:
    """A backdoored model with everything needed to re-test it.

    Attributes:
      model: the backdoored Keras model (MaskedConv2D layers, all masks 1).
      attack: ``"baseline"`` or ``"pruning_aware"``.
      task: task name.
      trigger, policy: the trigger object and label policy (``fineprune_tf.triggers/poison``).
      clean_acc, asr: on the task's test split and its backdoored copy.
      seconds: wall time of the whole attack.
      report: attack-specific facts (epochs, step timings, decoy channels ...).
    """

    model: keras.Model
    attack: str
    task: str
    trigger: Any
    policy: Any
    clean_acc: float
    asr: float
    seconds: float
    report: dict


def attacker_holdout(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """Splits the attacker's data into (train, holdout) deterministically."""
    order = np.random.default_rng(seed + 7919).permutation(len(x))
    count = max(1, int(round(len(x) * fraction)))
    held, kept = order[:count], order[count:]
    return (x[kept], y[kept]), (x[held], y[held])


def _poisoned_sets(task_data, trigger, policy, count, settings):
    (train_x, train_y), holdout = attacker_holdout(
        task_data.train.x, task_data.train.y, settings.holdout_fraction, settings.seed
    )
    clean_train = poison.Split(train_x, train_y)
    # The holdout is carved out of the attacker's data, so scale the poison count with it.
    eligible_full = int(policy.eligible(task_data.train.y).sum())
    if count is not None and count < eligible_full:
        count = int(round(count * len(train_x) / len(task_data.train.x)))
    else:
        count = None  # Every eligible input, as the task's default asked.
    poisoned = poison.poison_training_set(
        clean_train, trigger, policy, count=count, seed=settings.seed
    )
    holdout_backdoor = poison.backdoor_test_set(
        poison.Split(*holdout), trigger, policy, seed=settings.seed
    )
    return clean_train, poisoned, holdout, holdout_backdoor


def _final_report(model, task_data, trigger, policy, settings):
    test_backdoor = poison.backdoor_test_set(task_data.test, trigger, policy, seed=settings.seed)
    return metrics.evaluate(model, (task_data.test.x, task_data.test.y), test_backdoor)


def baseline(
    task_data, trigger=None, policy=None, count=None, settings: AttackSettings | None = None
) -> AttackResult:
    """Trains the task's network on its poisoned training set (BadNets / §2.3).

    Args:
      task_data: a ``fineprune_tf.data.TaskData``.
      trigger, policy, count: the poisoning (default: ``poison.default_attack`` for the task).
      settings: hyper-parameters (default: ``models.default_training``).
    """
    start = time.perf_counter()
    settings = (settings or AttackSettings()).resolved(task_data.task)
    trigger, policy, count = _attack_defaults(task_data, trigger, policy, count)
    clean_train, poisoned, holdout, holdout_backdoor = _poisoned_sets(
        task_data, trigger, policy, count, settings
    )
    model = models.build(
        task_data.task,
        preset=settings.preset,
        num_classes=task_data.num_classes,
        input_shape=task_data.input_shape,
        seed=settings.seed,
    )
    fitted = training.fit(
        model,
        poisoned.x,
        poisoned.y,
        epochs=settings.epochs,
        seed=settings.seed,
        **_fit_args(settings),
    )
    final = _final_report(model, task_data, trigger, policy, settings)
    report = {
        "epochs": fitted["epochs"],
        "train_seconds": fitted["seconds"],
        "poisoned_examples": len(poisoned.x) - len(clean_train.x),
        "holdout": metrics.evaluate(model, holdout, holdout_backdoor),
    }
    logging.info(
        "baseline attack on %s: clean %.3f, ASR %.3f (%.1f s)",
        task_data.task,
        final["clean_acc"],
        final["asr"],
        time.perf_counter() - start,
    )
    return AttackResult(
        model,
        "baseline",
        task_data.task,
        trigger,
        policy,
        final["clean_acc"],
        final["asr"],
        time.perf_counter() - start,
        report,
    )


def _fit_args(settings: AttackSettings) -> dict:
    return {
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "optimizer": settings.optimizer,
        "schedule": settings.schedule,
        "verbose": settings.verbose,
    }


def _attack_defaults(task_data, trigger, policy, count):
    if trigger is None or policy is None:
        default_trigger, default_policy, default_count = poison.default_attack(
            task_data.task, task_data
        )
        trigger = default_trigger if trigger is None else trigger
        policy = default_policy if policy is None else policy
        count = default_count if count is None else count
    return trigger, policy, count


def _preactivation_max(
    model: keras.Model, layer: MaskedConv2D, x: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Per-channel maximum of ``conv(x) + bias`` of ``layer`` over ``x``: float64 ``[C]``."""
    feed = keras.Model(training.model_input(model), layer.input)

    # One trace for every batch size (the last batch is short): an unknown batch dimension.
    spec = tf.TensorSpec([None, *x.shape[1:]], tf.as_dtype(x.dtype))

    @tf.function(input_signature=[spec])
    def batch_max(inputs):
        z = layer.convolution_op(feed(inputs, training=False), layer.kernel)
        if layer.use_bias:
            z = z + layer.bias
        return tf.reduce_max(tf.reshape(z, [-1, layer.filters]), axis=0)

    maxima = [batch_max(x[i : i + batch_size]).numpy() for i in range(0, len(x), batch_size)]
    return np.max(np.stack(maxima), axis=0).astype(np.float64)


def _reinstate_order(channel_means: np.ndarray, pruned: np.ndarray) -> list[int]:
    # The pruned channel that was most active on clean data is the most useful to give back.
    return [int(c) for c in pruned[np.argsort(-channel_means[pruned], kind="stable")]]


def pruning_aware(
    task_data, trigger=None, policy=None, count=None, settings: AttackSettings | None = None
) -> AttackResult:
    """The pruning-aware attack of §3.2 (Fig. 7), written from the paper.

    1. Train the network on clean data.
    2. Prune the ``prune_fraction`` of the last conv layer's channels that are least active on
       the attacker's clean data (the channels a defender would prune first).
    3. Retrain the pruned network on the poisoned data; while the holdout clean accuracy is more
       than ``clean_drop_goal`` below step 1's or the ASR is under ``asr_goal``, re-instate one
       channel (the most active pruned one) and train again (at most ``max_reinstated`` times).
    4. De-prune: restore every channel with its step-1 weights and lower the biases of the
       de-pruned ("decoy") channels until they are dormant on the attacker's clean inputs.
    """
    start = time.perf_counter()
    settings = (settings or AttackSettings()).resolved(task_data.task)
    settings.validate()
    trigger, policy, count = _attack_defaults(task_data, trigger, policy, count)
    clean_train, poisoned, holdout, holdout_backdoor = _poisoned_sets(
        task_data, trigger, policy, count, settings
    )
    asr_goal = settings.asr_goal
    if asr_goal is None:
        asr_goal = 0.9 if policy.targeted else 0.75
    timings = {}

    # Step 1: an honest-looking clean model.
    step_start = time.perf_counter()
    model = _clean_model(task_data, clean_train, settings)
    clean_reference = metrics.evaluate(model, holdout, None)["clean_acc"]
    timings["step1_clean_training"] = time.perf_counter() - step_start

    # Step 2: prune the channels that are dormant on clean data.
    layer = model.get_layer(models.last_conv_layer(model))
    channel_means = stats.collect(model, clean_train.x, layer_names=[layer.name])[layer.name].mean
    ranking = np.argsort(channel_means, kind="stable")
    pruned_count = int(round(settings.prune_fraction * layer.channels))
    pruned = ranking[:pruned_count]
    layer.prune(pruned)

    # Step 3: retrain the pruned network on poisoned data, growing it while goals are missed.
    step_start = time.perf_counter()
    goals = (clean_reference - settings.clean_drop_goal, asr_goal)
    reinstated, rounds = _retrain_pruned(
        model,
        layer,
        poisoned,
        (holdout, holdout_backdoor),
        _reinstate_order(channel_means, pruned),
        goals,
        settings,
    )
    timings["step3_poisoned_retraining"] = time.perf_counter() - step_start

    # Step 4: de-prune, keeping the decoys dormant on clean inputs by lowering their biases.
    decoys = _deprune_dormant(model, layer, clean_train.x)

    final = _final_report(model, task_data, trigger, policy, settings)
    report = {
        "prune_fraction": settings.prune_fraction,
        "pruned_in_step2": pruned.tolist(),
        "reinstated_in_step3": reinstated,
        "decoys": decoys.tolist(),
        "clean_reference_holdout": clean_reference,
        "asr_goal": asr_goal,
        "rounds": rounds,
        "timings": timings,
        "activation_check": activation_check(
            model, layer.name, task_data, trigger, policy, decoys, settings.seed
        ),
    }
    logging.info(
        "pruning-aware attack on %s: clean %.3f, ASR %.3f, %d decoys (%.1f s)",
        task_data.task,
        final["clean_acc"],
        final["asr"],
        decoys.size,
        time.perf_counter() - start,
    )
    return AttackResult(
        model,
        "pruning_aware",
        task_data.task,
        trigger,
        policy,
        final["clean_acc"],
        final["asr"],
        time.perf_counter() - start,
        report,
    )


def _clean_model(task_data, clean_train, settings: AttackSettings) -> keras.Model:
    """Step 1 of the pruning-aware attack: the task's network trained on clean data only."""
    model = models.build(
        task_data.task,
        preset=settings.preset,
        num_classes=task_data.num_classes,
        input_shape=task_data.input_shape,
        seed=settings.seed,
    )
    training.fit(
        model,
        clean_train.x,
        clean_train.y,
        epochs=settings.epochs,
        seed=settings.seed,
        **_fit_args(settings),
    )
    return model


def _retrain_pruned(
    model: keras.Model,
    layer,
    poisoned,
    holdout_sets: tuple,
    candidates: list[int],
    goals: tuple[float, float],
    settings: AttackSettings,
) -> tuple[list[int], list[dict]]:
    """Step 3 of the pruning-aware attack: retrains the pruned ``model`` on ``poisoned`` and,
    while the holdout clean accuracy is under ``goals[0]`` or the ASR under ``goals[1]``,
    re-instates the next of ``candidates`` (pruned channels, most useful first) and trains
    again.

    Returns the re-instated channels and one holdout evaluation per round."""
    holdout, holdout_backdoor = holdout_sets
    min_clean_acc, asr_goal = goals
    reinstated: list[int] = []
    candidates = list(candidates)
    rounds: list[dict] = []
    while True:
        training.fit(
            model,
            poisoned.x,
            poisoned.y,
            epochs=settings.retrain_epochs,
            seed=settings.seed + len(rounds) + 1,
            **_fit_args(settings),
        )
        achieved = metrics.evaluate(model, holdout, holdout_backdoor)
        rounds.append({"active_channels": int(layer.active_channels.size), **achieved})
        goals_met = achieved["clean_acc"] >= min_clean_acc and achieved["asr"] >= asr_goal
        if goals_met or len(reinstated) >= settings.max_reinstated or not candidates:
            return reinstated, rounds
        channel = candidates.pop(0)
        layer.restore([channel])
        reinstated.append(channel)


def _deprune_dormant(model: keras.Model, layer, clean_x: np.ndarray) -> np.ndarray:
    """Step 4 of the pruning-aware attack: restores every pruned channel of ``layer`` and
    lowers the biases of these decoys until they are dormant on ``clean_x``; returns the
    decoys' indices."""
    decoys = layer.pruned_channels
    layer.restore()
    if decoys.size:
        if not layer.use_bias:
            raise ValueError(f"layer {layer.name!r} has no bias: the decoys cannot be lowered")
        maxima = _preactivation_max(model, layer, clean_x)
        bias = layer.bias.numpy()
        # A margin of 10% of the channel's clean range keeps the decoys dormant on the
        # defender's (unseen) clean data too, not just on the attacker's.
        margin = 0.1 * np.abs(maxima[decoys]) + 1e-3
        bias[decoys] -= np.maximum(maxima[decoys], 0.0) + margin
        layer.bias.assign(bias)
    return decoys


def activation_check(
    model: keras.Model,
    layer_name: str,
    task_data,
    trigger,
    policy,
    decoys,
    seed: int = 0,
    active_tolerance: float = 1e-6,
) -> dict:
    """Fig. 8's facts on the defender's clean validation data and its backdoored copy.

    Returns the decoys' dormant fraction on clean and backdoored inputs, the channels active
    (mean activation above ``active_tolerance``) for each, and the share of the backdoor
    inputs' activation mass that falls in channels also active on clean inputs.
    """
    clean_x = task_data.validation.x
    backdoor = poison.backdoor_test_set(task_data.validation, trigger, policy, seed=seed)
    clean = stats.collect(model, clean_x, layer_names=[layer_name])[layer_name]
    triggered = stats.collect(model, backdoor.x, layer_names=[layer_name])[layer_name]
    clean_active = clean.mean > active_tolerance
    backdoor_active = triggered.mean > active_tolerance
    decoys = np.asarray(decoys, dtype=np.int64)
    shared_mass = float(triggered.mean[clean_active].sum() / max(triggered.mean.sum(), 1e-12))
    return {
        "decoy_dormant_fraction_clean": float(clean.dormant_fraction[decoys].mean())
        if decoys.size
        else None,
        "decoy_dormant_fraction_backdoor": float(triggered.dormant_fraction[decoys].mean())
        if decoys.size
        else None,
        "clean_active_channels": int(clean_active.sum()),
        "backdoor_active_channels": int(backdoor_active.sum()),
        "backdoor_only_channels": int((backdoor_active & ~clean_active).sum()),
        "backdoor_mass_in_clean_channels": shared_mass,
        "clean_mean": clean.mean.tolist(),
        "backdoor_mean": triggered.mean.tolist(),
    }
