"""Seeded training shared by attacks and defenses."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from fineprune_tf import step_cache

__all__ = ["fit", "model_fit_orders", "model_input"]


def compile_for_training(
    model: keras.Model,
    learning_rate: float,
    optimizer: str = "adam",
    decay_steps: int | None = None,
) -> None:
    """Compiles ``model`` for sparse-label classification with a fresh optimizer (a cosine
    learning-rate decay over ``decay_steps`` steps when given)."""
    step_cache.CompileSpec(optimizer, learning_rate, decay_steps).compile(model)


def _dataset(
    x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int
) -> tf.data.Dataset:
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def fit(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    optimizer: str = "adam",
    schedule: str = "constant",
    seed: int = 0,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 0,
) -> dict:
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
    # Seeded before the datasets are made: their shuffle seeds pair the global seed with ours.
    keras.utils.set_random_seed(seed)
    decay_steps = epochs * math.ceil(len(x) / batch_size) if schedule == "cosine" else None
    strategy = tf.distribute.get_strategy()
    if _in_multi_worker_mode(strategy):
        compile_for_training(model, learning_rate, optimizer, decay_steps)
        # Keras 3's model.fit cannot run under MultiWorkerMirroredStrategy
        # (keras-team/keras#20585), so multi-worker runs use TensorFlow's own loop.
        return _fit_multi_worker(
            model,
            strategy,
            x,
            y,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            validation=validation,
            callbacks=callbacks,
            verbose=verbose,
        )
    validation_data = None
    if validation is not None:
        validation_data = _dataset(*validation, batch_size=256, shuffle=False, seed=seed)
    start = time.perf_counter()
    # Seeds again, compiles and fits; inside step_cache.reuse_compiled_steps() the compiled
    # step of an earlier fit of the same structure and batch shapes is reused (same numbers).
    history, _ = step_cache.fit(
        model,
        step_cache.CompileSpec(optimizer, learning_rate, decay_steps),
        seed,
        _dataset(x, y, batch_size, True, seed),
        shapes=(len(x), batch_size, None if validation is None else len(validation[1])),
        epochs=epochs,
        validation_data=validation_data,
        callbacks=list(callbacks),
        shuffle=False,
        verbose=verbose,
    )
    return {
        "history": history.history,
        "seconds": time.perf_counter() - start,
        "epochs": len(history.history.get("loss", [])),
    }


def model_fit_orders(count: int, seed: int, epochs: int) -> list[np.ndarray]:
    """The order in which ``model.fit`` visits the examples of ``_dataset(x, y, batch_size,
    shuffle=True, seed)`` in each epoch: int64 ``[epochs][count]`` indices into ``x``.

    Call right after ``keras.utils.set_random_seed(seed)``, as :func:`fit` does.  Keras 3's
    epoch iterator (TensorFlow backend) makes a new iterator over the dataset when ``fit``
    starts and again when each epoch ends, so the seeded reshuffle is drawn twice per epoch
    and epoch ``e`` sees draw ``2e`` (measured with Keras 3.15; ``tests/test_training.py``
    checks it).  The multi-worker loop once drew once per epoch, so from epoch 2 on it trained
    on other batches than single-device ``model.fit``: the epoch-2 loss drift (0.4687 vs
    0.4547) the developers' notes recorded.
    """
    draws = tf.data.Dataset.range(count).shuffle(count, seed=seed, reshuffle_each_iteration=True)
    orders = []
    for epoch in range(epochs):
        if epoch:
            next(iter(draws))  # The draw model.fit makes when an epoch ends, unused.
        orders.append(np.fromiter(draws.as_numpy_iterator(), np.int64, count))
    return orders


def _in_multi_worker_mode(strategy: tf.distribute.Strategy) -> bool:
    """Whether ``strategy`` spans several workers (a MultiWorkerMirroredStrategy with a
    cluster; one without TF_CONFIG is a local strategy that model.fit handles)."""
    in_multi_worker = getattr(strategy.extended, "_in_multi_worker_mode", None)
    return bool(in_multi_worker()) if callable(in_multi_worker) else False


def _distributed(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset):
    """``dataset`` (batched with the global batch size) split over every replica of
    ``strategy``.

    In-memory data has no files to shard, so every worker reads it all and keeps its part of
    each global batch (DATA sharding; AUTO would try FILE first and warn).
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def _fit_multi_worker(
    model: keras.Model,
    strategy: tf.distribute.Strategy,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    validation: tuple[np.ndarray, np.ndarray] | None,
    callbacks: Sequence[keras.callbacks.Callback],
    verbose: int,
) -> dict:
    """:func:`fit` under a multi-worker strategy: a custom loop on ``strategy.run``.

    Same data order, loss, optimizer and learning-rate schedule as ``model.fit``: the model's
    compiled optimizer (created under the strategy's scope, so its slots are mirrored and it
    all-reduces the gradients itself), mean sparse cross-entropy over each global batch, and
    the callbacks driven through a ``keras.callbacks.CallbackList`` with the epoch logs
    ``loss``, ``accuracy`` (and ``val_loss``, ``val_accuracy``), so EarlyStopping and
    GradualChannelPruning behave as under ``model.fit``.  Every worker runs the same callbacks
    on the same all-reduced logs, so their decisions (stop, prune) agree.
    """
    steps = math.ceil(len(x) / batch_size)
    orders = model_fit_orders(len(x), seed, epochs)
    validation_set = None
    if validation is not None:
        validation_set = _distributed(
            strategy, _dataset(*validation, batch_size=256, shuffle=False, seed=seed)
        )
    train_step, evaluate_step = _distributed_steps(model, strategy)
    callback_list = keras.callbacks.CallbackList(
        list(callbacks),
        add_history=True,
        add_progbar=verbose != 0,
        model=model,
        verbose=verbose,
        epochs=epochs,
        steps=steps,
    )
    model.stop_training = False
    logs: dict[str, float] = {}
    start = time.perf_counter()
    callback_list.on_train_begin()
    for epoch in range(epochs):
        callback_list.on_epoch_begin(epoch)
        loss_sum = correct_sum = 0.0
        # A fixed step count (the same on every worker, as they all hold the whole data set)
        # rather than waiting for the iterator to run out keeps the workers' collectives in
        # step; the last global batch may be short, and its mean divides by its true size.
        order = orders[epoch]
        iterator = iter(
            _distributed(
                strategy, _dataset(x[order], y[order], batch_size, shuffle=False, seed=seed)
            )
        )
        for step in range(steps):
            callback_list.on_train_batch_begin(step)
            global_size = min(batch_size, len(x) - step * batch_size)
            batch_loss, batch_correct = train_step(
                next(iterator), tf.constant(global_size, tf.int64)
            )
            loss_sum += float(batch_loss)
            correct_sum += float(batch_correct)
            callback_list.on_train_batch_end(
                step,
                {
                    "loss": float(batch_loss) / global_size,
                    "accuracy": float(batch_correct) / global_size,
                },
            )
        logs = {"loss": loss_sum / len(x), "accuracy": correct_sum / len(x)}
        if validation_set is not None:
            totals = np.zeros(3)
            for batch in validation_set:
                totals += [float(value) for value in evaluate_step(batch)]
            logs.update(val_loss=totals[0] / totals[2], val_accuracy=totals[1] / totals[2])
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end(logs)
    history = model.history.history
    return {
        "history": history,
        "seconds": time.perf_counter() - start,
        "epochs": len(history.get("loss", [])),
    }


def _distributed_steps(model: keras.Model, strategy: tf.distribute.Strategy):
    """The training and evaluation steps of :func:`_fit_multi_worker`, as ``tf.function``s.

    ``train_step(batch, global_size)`` applies one optimizer step and returns the summed loss
    and correct count over the global batch; ``evaluate_step(batch)`` returns the summed loss,
    correct count and example count.  Both are reduced over the replicas.
    """
    optimizer = model.optimizer
    with strategy.scope():
        # Build the slots now, under the scope: building them lazily inside the replica
        # function would create variables in a tf.function's replica context.
        optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=None)

    def per_example(features, labels, training: bool):
        probabilities = model(features, training=training)
        losses = tf.cast(loss_fn(labels, probabilities), tf.float32)
        correct = tf.cast(
            tf.equal(tf.argmax(probabilities, -1, output_type=tf.int64), tf.cast(labels, tf.int64)),
            tf.float32,
        )
        return losses, correct

    def replica_train(features, labels, global_size):
        with tf.GradientTape() as tape:
            losses, correct = per_example(features, labels, training=True)
            # Sum over the replica, divided by the GLOBAL batch size: the optimizer sums the
            # replicas' gradients, which makes the mean over the whole batch, as model.fit.
            loss = tf.nn.compute_average_loss(losses, global_batch_size=global_size)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return tf.reduce_sum(losses), tf.reduce_sum(correct)

    def replica_evaluate(features, labels):
        losses, correct = per_example(features, labels, training=False)
        return (
            tf.reduce_sum(losses),
            tf.reduce_sum(correct),
            tf.cast(tf.shape(losses)[0], tf.float32),
        )

    def reduce_sum(values):
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in values]

    @tf.function
    def train_step(batch, global_size):
        return reduce_sum(strategy.run(replica_train, args=(*batch, global_size)))

    @tf.function
    def evaluate_step(batch):
        return reduce_sum(strategy.run(replica_evaluate, args=batch))

    return train_step, evaluate_step


def model_input(model: keras.Model):
    """The model's input tensor, for building sub-models (one built on the one-element input
    list would warn about the input structure on every call)."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs
