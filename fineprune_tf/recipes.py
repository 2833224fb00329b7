"""How the tasks' networks are trained from scratch: the ``cpu`` preset's recipes
(:func:`default_training`), the optimizers (:func:`make_optimizer`) and compiling
(:func:`compile_model`).  Re-exported by :mod:`fineprune_tf.models`."""

from __future__ import annotations

import math

import keras

__all__ = ["SCHEDULES", "compile_model", "default_training", "make_optimizer"]


# Chosen by training on fineprune_tf.data's default data poisoned by poison.default_attack (the
# baseline attack), 2 CPU cores: each run reaches its plateau of clean accuracy and ASR.  The
# cosine decay matters for speech: with a constant rate its all-to-all ASR oscillates 0.6-0.9.
_TRAINING: dict[str, dict] = {
    "face": dict(epochs=25, batch_size=32, learning_rate=1e-3, optimizer="adam", schedule="cosine"),
    "speech": dict(
        epochs=20, batch_size=64, learning_rate=2e-3, optimizer="adam", schedule="cosine"
    ),
    "traffic": dict(
        epochs=4, batch_size=64, learning_rate=1e-3, optimizer="adam", schedule="cosine"
    ),
    "mnist": dict(epochs=5, batch_size=64, learning_rate=1e-3, optimizer="adam", schedule="cosine"),
}
SCHEDULES = ("constant", "cosine")


def default_training(task: str) -> dict:
    """Recommended from-scratch (possibly poisoned) training of the ``cpu`` preset on the task's
    default data.

    Returns ``dict(epochs, batch_size, learning_rate, optimizer, schedule)``: ``optimizer`` a
    name for :func:`make_optimizer`; ``schedule`` ``"cosine"`` (decay ``learning_rate`` to 0
    over ``epochs * ceil(N / batch_size)`` steps, :func:`make_optimizer`'s ``decay_steps``) or
    ``"constant"``.  A fresh dict: callers may modify it.
    """
    if task not in _TRAINING:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(_TRAINING)}")
    return dict(_TRAINING[task])


def make_optimizer(
    name: str, learning_rate: float, decay_steps: int | None = None
) -> keras.optimizers.Optimizer:
    """``"adam"``, ``"sgd"`` (momentum 0.9) or ``"rmsprop"``; with ``decay_steps`` the rate
    follows a cosine decay from ``learning_rate`` to 0 over that many steps."""
    factories = {
        "adam": keras.optimizers.Adam,
        "sgd": lambda rate: keras.optimizers.SGD(rate, momentum=0.9),
        "rmsprop": keras.optimizers.RMSprop,
    }
    if name not in factories:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(factories)}")
    rate = learning_rate
    if decay_steps is not None:
        if decay_steps < 1:
            raise ValueError(f"decay_steps must be >= 1, got {decay_steps}")
        rate = keras.optimizers.schedules.CosineDecay(learning_rate, int(decay_steps))
    return factories[name](rate)


def compile_model(
    model: keras.Model, task: str, train_size: int | None = None, **overrides
) -> keras.Model:
    """Compiles ``model`` for training on integer labels ``[N]`` (sparse categorical
    cross-entropy, accuracy metric) with :func:`default_training`'s optimizer for ``task``.

    ``overrides`` replace entries of the default config (``epochs``, ``batch_size``,
    ``learning_rate``, ``optimizer``, ``schedule``); a cosine schedule needs ``train_size``
    (examples per epoch) to know its length.  Returns ``model``.
    """
    config = default_training(task)
    unknown = set(overrides) - set(config)
    if unknown:
        raise TypeError(f"unknown training settings {sorted(unknown)}; expected {sorted(config)}")
    config.update(overrides)
    if config["schedule"] not in SCHEDULES:
        raise ValueError(
            f"unknown schedule {config['schedule']!r}; expected one of {', '.join(SCHEDULES)}"
        )
    decay_steps = None
    if config["schedule"] == "cosine":
        if train_size is None:
            raise ValueError("a cosine schedule needs train_size (examples per epoch)")
        decay_steps = config["epochs"] * math.ceil(train_size / config["batch_size"])
    model.compile(
        optimizer=make_optimizer(config["optimizer"], config["learning_rate"], decay_steps),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model
