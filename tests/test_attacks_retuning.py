"""The retuning attack (Min et al., NeurIPS 2024): the ASR comes back after a superficial
purification, not on a model that never learnt the backdoor. A small synthetic task keeps it
fast: 4 classes told apart by where a bright square sits, a 3x3 BadNets pattern as trigger."""

import keras
import numpy as np
import pytest

from fineprune_tf import attacks, metrics, poison, training, triggers
from fineprune_tf.data import Split, TaskData
from fineprune_tf.retuning import retuning_set

SIDE = 14


def _squares(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(0.1, 0.05, (n, SIDE, SIDE, 1)).astype(np.float32)
    corners = [(1, 1), (1, 6), (6, 1), (6, 6)]  # clear of the trigger's bottom-right corner
    for i, label in enumerate(y):
        r, c = corners[label]
        x[i, r : r + 4, c : c + 4, 0] += 0.8
    return Split(np.clip(x, 0, 1), y.astype(np.int64))


@pytest.fixture(scope="module")
def task():
    return TaskData(
        "squares", _squares(1200, 0), _squares(300, 1), _squares(400, 2), ["a", "b", "c", "d"]
    )


def _model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIDE, SIDE, 1))
    h = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(32, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(h))


def _fit(model, split, epochs, learning_rate=3e-3):
    training.fit(
        model, split.x, split.y, epochs=epochs, batch_size=32, learning_rate=learning_rate, seed=0
    )


@pytest.mark.slow
def test_retuning_brings_back_a_superficially_removed_backdoor_but_not_on_a_clean_model(task):
    trigger, policy = triggers.Pattern(), poison.AllToOne(0)
    poisoned = poison.poison_training_set(task.train, trigger, policy, rate=0.1, seed=0)
    backdoored = _model(0)
    _fit(backdoored, poisoned, epochs=6)
    backdoor_test = poison.backdoor_test_set(task.test, trigger, policy)
    assert metrics.evaluate(backdoored, (task.test.x, task.test.y), backdoor_test)["asr"] > 0.95
    # "Purify" superficially: fine-tune on the defender's clean data until the ASR is low.
    purified = _model(0)
    purified.set_weights(backdoored.get_weights())
    _fit(purified, task.validation, epochs=8, learning_rate=1e-2)
    clean = _model(1)
    _fit(clean, task.train, epochs=6)

    kwargs = dict(steps=10, samples=100, poisoned=5, learning_rate=1e-3, seed=0)
    on_purified = attacks.retuning_attack(purified, task, trigger, policy, **kwargs)
    on_clean = attacks.retuning_attack(clean, task, trigger, policy, **kwargs)
    # Measured: purified 0.31 -> 0.99, clean 0.00 -> 0.00 (10 steps, 5 poisoned of 100).
    assert on_purified["before"]["asr"] < 0.5
    assert on_purified["after"]["asr"] > 0.9
    assert on_clean["before"]["asr"] < 0.1 and on_clean["after"]["asr"] < 0.2
    assert on_purified["asr_recovered"] > on_clean["asr_recovered"] + 0.5
    for result in (on_purified, on_clean):
        assert result["after"]["clean_acc"] > 0.9
        assert result["steps"] == 10 and result["poisoned"] == 5


def test_retuning_leaves_the_purified_model_untouched_and_is_deterministic(task):
    model = _model(0)
    weights = [w.copy() for w in model.get_weights()]
    trigger, policy = triggers.Pattern(), poison.AllToOne(0)
    first = attacks.retuning_attack(
        model, task, trigger, policy, steps=3, samples=50, poisoned=5, seed=3
    )
    second = attacks.retuning_attack(
        model, task, trigger, policy, steps=3, samples=50, poisoned=5, seed=3
    )
    for before, after in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    assert first["after"] == second["after"]


def test_retuning_set_mixes_the_requested_number_of_poisoned_inputs(task):
    trigger, policy = triggers.Pattern(), poison.AllToOne(0)
    retune = retuning_set(task, trigger, policy, samples=60, poisoned=7, seed=0)
    assert retune.x.shape == (60, SIDE, SIDE, 1)
    mask = trigger.pixel_mask(SIDE, SIDE)
    pattern = np.asarray(trigger.pattern, np.float32)
    stamped = np.all(np.isclose(retune.x[:, mask, 0], pattern.reshape(-1)), axis=1)
    assert stamped.sum() == 7 and np.all(retune.y[stamped] == 0)
    with pytest.raises(ValueError, match="poisoned"):
        retuning_set(task, trigger, policy, samples=10, poisoned=11)
