"""Seeded training shared by attacks and defenses."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from fineprune_tf import models

__all__ = ["fit", "model_input"]


def compile_for_training(model: keras.Model, learning_rate: float, optimizer: str = "adam",
                         decay_steps: int | None = None) -> None:
    """Compiles ``model`` for sparse-label classification with a fresh optimizer (a cosine
    learning-rate decay over ``decay_steps`` steps when given)."""
    model.compile(optimizer=models.make_optimizer(optimizer, learning_rate, decay_steps),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def _dataset(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool,
             seed: int) -> tf.data.Dataset:
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def fit(model: keras.Model, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int,
        learning_rate: float, optimizer: str = "adam", schedule: str = "constant",
        seed: int = 0,
        validation: tuple[np.ndarray, np.ndarray] | None = None,
        callbacks: Sequence[keras.callbacks.Callback] = (), verbose: int = 0) -> dict:
    """Trains ``model`` on ``(x, y)`` (x ``[N, H, W, C]`` float32, y ``[N]`` int labels).

    ``schedule="cosine"`` decays the learning rate to 0 over the ``epochs`` (early stopping
    may end sooner).

    Returns ``{"history": keras history dict, "seconds": wall time, "epochs": epochs run}``.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)} labels")
    if len(x) == 0:
        raise ValueError("cannot train on an empty data set")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    keras.utils.set_random_seed(seed)
    decay_steps = epochs * math.ceil(len(x) / batch_size) if schedule == "cosine" else None
    compile_for_training(model, learning_rate, optimizer, decay_steps)
    validation_data = None
    if validation is not None:
        validation_data = _dataset(*validation, batch_size=256, shuffle=False, seed=seed)
    start = time.perf_counter()
    history = model.fit(_dataset(x, y, batch_size, True, seed), epochs=epochs,
                        validation_data=validation_data, callbacks=list(callbacks), shuffle=False,
                        verbose=verbose)
    return {"history": history.history, "seconds": time.perf_counter() - start,
            "epochs": len(history.history.get("loss", []))}



def model_input(model: keras.Model):
    """The model's input tensor, for building sub-models (one built on the one-element input
    list would warn about the input structure on every call)."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs
