"""Short seeded training runs of every ``cpu`` preset on its task's default data.

Each run is cut short (fewer epochs, sometimes fewer examples than ``default_training``) to keep
the suite fast on 2 cores; the bounds are below what these runs reached when measured (in
parentheses), so they test that the model learns, not a lucky seed, and the same model before
training must stay under the bound, so reaching it takes learning.
"""

import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from fineprune_tf import data, metrics, models, training

# task: (load options, training examples used, epochs, accuracy bound, chance)
RUNS = {
    # 40 identities, 6 training images each (measured 0.59).
    "face": ({}, None, 16, 0.25, 1 / 40),
    # measured 0.82.
    "speech": ({}, 1200, 4, 0.6, 1 / 10),
    # Fewer rendered signs than the default 3000 (rendering dominates the run); measured 0.97.
    "traffic": (
        {"train_count": 900, "validation_count": 100, "test_count": 300},
        None,
        3,
        0.8,
        1 / 3,
    ),
    # measured 0.89.
    "mnist": ({}, 1500, 2, 0.8, 1 / 10),
}


@pytest.mark.parametrize("task", list(RUNS))
def test_cpu_preset_learns_its_task(task):
    options, limit, epochs, bound, chance = RUNS[task]
    task_data = data.load(task, seed=0, **options)
    x, y = task_data.train.x[:limit], task_data.train.y[:limit]
    keras.utils.set_random_seed(0)
    model = models.build(
        task, "cpu", num_classes=task_data.num_classes, input_shape=task_data.input_shape, seed=0
    )
    config = models.default_training(task)
    models.compile_model(model, task, train_size=len(x), epochs=epochs)
    untrained = metrics.accuracy(metrics.predict_labels(model, task_data.test.x), task_data.test.y)
    start = time.perf_counter()
    model.fit(x, y, batch_size=config["batch_size"], epochs=epochs, verbose=0)
    seconds = time.perf_counter() - start
    accuracy = metrics.accuracy(metrics.predict_labels(model, task_data.test.x), task_data.test.y)
    print(
        f"{task}: {len(x)} examples x {epochs} epochs in {seconds:.1f} s, "
        f"test accuracy {accuracy:.3f} (chance {chance:.3f})"
    )
    # The untrained model is near chance, so only learning clears the bound (a fit that
    # trains nothing, or on shuffled labels, stays under it).
    assert untrained < bound
    assert accuracy > bound
    assert accuracy > untrained + 0.5 * (bound - chance)


def test_training_is_deterministic_for_a_seed():
    task_data = data.load("mnist", seed=0)
    x, y = task_data.train.x[:128], task_data.train.y[:128]

    def train():
        keras.utils.set_random_seed(0)
        model = models.build("mnist", "cpu", seed=0)
        models.compile_model(model, "mnist", train_size=len(x), epochs=1)
        model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=True)
        return model.get_weights()

    first, second = train(), train()
    for a, b in zip(first, second, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The weights moved from their initial values (a fit that trained nothing would be
    # "deterministic" too).
    keras.utils.set_random_seed(0)
    initial = models.build("mnist", "cpu", seed=0).get_weights()
    assert max(float(np.abs(a - b).max()) for a, b in zip(first, initial, strict=True)) > 1e-3


class _RecordInputs(keras.layers.Layer):
    """Identity layer that records, when run eagerly, the first feature of every input row."""

    def __init__(self, seen: list, **kwargs):
        super().__init__(**kwargs)
        self.record = seen.extend  # A bound method: Keras would copy a list attribute.

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, x):
        if tf.executing_eagerly():
            self.record(int(v) for v in np.asarray(x)[:, 0])
        return x


def test_the_multi_worker_loop_draws_model_fits_data_order():
    """training.model_fit_orders (the multi-worker loop's batches) is the order model.fit
    visits training.fit's dataset in, epoch by epoch: same batches, so the same losses."""
    count, batch_size, epochs = 20, 4, 4
    x = np.arange(count, dtype="float32")[:, None]
    y = np.zeros(count, "int64")
    seen: list[int] = []
    inputs = keras.Input((1,))
    model = keras.Model(
        inputs, keras.layers.Dense(2, activation="softmax")(_RecordInputs(seen)(inputs))
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", run_eagerly=True)
    keras.utils.set_random_seed(0)
    model.fit(training._dataset(x, y, batch_size, True, 0), epochs=epochs, verbose=0, shuffle=False)
    visited = np.asarray(seen).reshape(epochs, count)

    keras.utils.set_random_seed(0)
    orders = training.model_fit_orders(count, 0, epochs)
    np.testing.assert_array_equal(np.stack(orders), visited)
    # Every epoch is a permutation, and they differ (the data is reshuffled).
    assert all(sorted(order) == list(range(count)) for order in orders)
    assert len({tuple(order) for order in orders}) == epochs
