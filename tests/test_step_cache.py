"""A training step compiled once and reused (``fineprune_tf.step_cache``) gives the same numbers,
bit for bit, as compiling every model afresh: weights, masks, seed states and histories after
several epochs with dropout, a cosine schedule, a partial last batch and the ``converge`` rule."""

import keras
import numpy as np
import pytest

from fineprune_tf import poison, retuning, step_cache, training, triggers
from fineprune_tf.data import Split, TaskData
from fineprune_tf.defenses.callbacks import ConvergenceSelection
from fineprune_tf.defenses.fine_tuning import FineTuneSettings, fine_tune
from fineprune_tf.layers import MaskedConv2D, MaskedDense

SIDE = 12


def _split(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int64)
    x = rng.normal(0.2, 0.1, (n, SIDE, SIDE, 1)).astype(np.float32)
    for i, label in enumerate(y):
        x[i, 4 * label : 4 * label + 3, 2:6, 0] += 0.7
    return Split(np.clip(x, 0, 1), y)


def _model(seed: int, width: int = 6) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIDE, SIDE, 1), name="image")
    h = MaskedConv2D(width, 3, activation="relu", name="conv")(inputs)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = MaskedDense(16, activation="relu", name="fc")(h)
    h = keras.layers.Dropout(0.3, seed=11, name="drop")(h)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(h))


def _values(model: keras.Model) -> list[np.ndarray]:
    """Every variable: weights, masks and the dropout's seed state."""
    return [np.array(v.numpy()) for v in model.variables]


def _seed_state(model: keras.Model) -> np.ndarray:
    return next(v for v in model.variables if "seed_generator" in v.path).numpy()


def _fits(models: list[keras.Model], train: Split, holdout: Split) -> list[dict]:
    """Fits each model in turn, as a cell's fine-tunings do: two rates on one model (its seed
    state carried over), then a pruned model of the same structure."""
    histories = []
    for model, rate in zip(models, (3e-3, 1e-3, 3e-3), strict=True):
        rule = ConvergenceSelection(start_accuracy=0.3)
        fitted = training.fit(
            model,
            train.x,
            train.y,
            epochs=3,
            batch_size=32,  # 150 examples: a partial last batch of 22
            learning_rate=rate,
            schedule="cosine",
            seed=4,
            validation=(holdout.x, holdout.y),
            callbacks=[rule],
        )
        histories.append({**fitted["history"], "chosen": rule.chosen})
    return histories


def _three_models() -> list[keras.Model]:
    first = _model(0)
    pruned = _model(0)
    pruned.get_layer("conv").prune([1, 4])
    return [first, first, pruned]


def test_a_reused_step_trains_bit_for_bit_like_a_fresh_one():
    train, holdout = _split(150, 0), _split(40, 1)
    fresh_models = _three_models()
    fresh = _fits(fresh_models, train, holdout)
    reused_models = _three_models()
    with step_cache.reuse_compiled_steps() as cache:
        reused = _fits(reused_models, train, holdout)
        assert (cache.misses, cache.hits) == (2, 1)  # one trainer per rate, the first reused
    assert fresh == reused
    for a, b in zip(fresh_models, reused_models, strict=True):
        for x, y in zip(_values(a), _values(b), strict=True):
            np.testing.assert_array_equal(x, y)
    # The pruned channels stayed pruned and the weights moved.
    assert reused_models[2].get_layer("conv").pruned_channels.tolist() == [1, 4]
    assert not np.array_equal(_values(reused_models[2])[0], _values(_model(0))[0])


def test_fine_tuning_with_its_learning_rate_rule_is_unchanged_by_reuse():
    clean = _split(200, 2)
    settings = FineTuneSettings(max_epochs=3, seed=1)
    base = _model(3)
    without = fine_tune(base, (clean.x, clean.y), settings=settings)
    with step_cache.reuse_compiled_steps() as cache:
        within = fine_tune(base, (clean.x, clean.y), settings=settings)
        within_again = fine_tune(base, (clean.x, clean.y), settings=settings)
        assert (cache.misses, cache.hits) == (2, 2)  # one trainer per candidate rate
    assert within_again.details["rate_runs"] == without.details["rate_runs"]
    assert within.details["rate_runs"] == without.details["rate_runs"]
    assert within.details["train_loss"] == without.details["train_loss"]
    for x, y in zip(_values(without.model), _values(within.model), strict=True):
        np.testing.assert_array_equal(x, y)


def test_another_structure_or_batch_shape_gets_its_own_trainer():
    spec = step_cache.CompileSpec("adam", 1e-3, 10)
    cache = step_cache.StepCache()
    first = cache.trainer(_model(0), spec, (150, 32))
    assert cache.trainer(_model(1), spec, (150, 32)) is first
    assert cache.trainer(_model(0, width=5), spec, (150, 32)) is not first
    assert cache.trainer(_model(0), spec, (151, 32)) is not first
    for other in ((1e-3, None), (3e-3, 10), (1e-3, 11)):
        assert (
            cache.trainer(_model(0), step_cache.CompileSpec("adam", *other), (150, 32)) is not first
        )
    assert (cache.hits, cache.misses) == (1, 6)


@pytest.fixture(scope="module")
def task():
    return TaskData("toy", _split(300, 3), _split(60, 4), _split(120, 5), ["a", "b", "c"])


def test_the_retuning_attack_gives_the_same_numbers_from_a_reused_step(task):
    trigger, policy = triggers.Pattern(), poison.AllToOne(0)
    purified, other = _model(5), _model(6)
    other.get_layer("conv").prune([0])
    # Trained: its dropout seed state has moved on, and the attack's copy must start afresh.
    training.fit(other, task.train.x, task.train.y, epochs=1, batch_size=64, learning_rate=1e-3)
    assert _seed_state(other).tolist() != _seed_state(_model(6)).tolist()
    kwargs = dict(steps=6, samples=60, poisoned=6, seed=2)
    start = _values(purified)
    without = [
        retuning.retuning_attack(m, task, trigger, policy, **kwargs) for m in (purified, other)
    ]
    with step_cache.reuse_compiled_steps() as cache:
        within = [
            retuning.retuning_attack(m, task, trigger, policy, **kwargs)
            for m in (purified, other, purified)
        ]
        assert (cache.misses, cache.hits) == (1, 2)
    for a, b in zip(without + without[:1], within, strict=True):
        assert a["after"] == b["after"] and a["before"] == b["before"]
    # The purified model is never modified, seed state included.
    for x, y in zip(start, _values(purified), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_fresh_copy_of_an_unseeded_random_layer_is_not_taken_from_the_cache(task):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIDE, SIDE, 1), name="image")
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.Dropout(0.2)(keras.layers.Dense(8, activation="relu")(h))  # seed None
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(h))
    trigger, policy = triggers.Pattern(), poison.AllToOne(0)
    with step_cache.reuse_compiled_steps() as cache:
        retuning.retuning_attack(model, task, trigger, policy, steps=2, samples=40, poisoned=4)
        assert (cache.misses, cache.hits) == (0, 0)


def test_a_fresh_copy_from_the_cache_starts_from_fresh_seeds_not_the_models(task):
    model = _model(7)
    training.fit(model, task.train.x, task.train.y, epochs=1, batch_size=64, learning_rate=1e-3)
    spec = step_cache.CompileSpec("adam", 1e-3, metrics=(), jit_compile=False)
    x, y = task.train.x[:96], task.train.y[:96]
    kwargs = dict(shapes=(96, 32), fresh_copy=True, batch_size=32, epochs=2, verbose=0)
    _, copy = step_cache.fit(model, spec, 3, x, y, **kwargs)
    expected = _values(copy)
    with step_cache.reuse_compiled_steps():
        step_cache.fit(_model(8), spec, 3, x, y, **kwargs)  # the trainer's own state moves on
        _, reused = step_cache.fit(model, spec, 3, x, y, **kwargs)
        for a, b in zip(expected, _values(reused), strict=True):
            np.testing.assert_array_equal(a, b)


def test_the_statistics_pass_is_traced_once_per_structure_with_the_same_numbers():
    """Six defended models of one structure (different weights and masks), as a leaderboard
    run's pruning cells see them: one-shot collectors trace a pass each (six traces, which made
    TensorFlow warn about frequent retracing); through the cache one pass is traced once, the
    channel statistics are the one-shot ones bit for bit, and the caller's model is left as it
    was."""
    from fineprune_tf import stats

    x = _split(150, 3).x  # two batches of 128, the last one partial
    models = []
    for seed in range(6):
        model = _model(seed)
        model.get_layer("conv").prune([seed % 6])
        models.append(model)
    expected = [stats.collect(m, x, layer_names=["conv"]) for m in models]
    before = [_values(m) for m in models]
    with step_cache.reuse_compiled_steps() as cache:
        got = [step_cache.collect_stats(m, x, layer_names=["conv"]) for m in models]
        assert (cache.misses, cache.hits) == (1, 5)
        (stats_pass,) = cache._stats_passes.values()
        (traced,) = stats_pass.collector._traced.values()
        assert stats_pass.passes == 6 and traced.experimental_get_tracing_count() == 1
    for mine, theirs in zip(got, expected, strict=True):
        for field in ("mean", "std", "dormant_fraction", "count"):
            np.testing.assert_array_equal(
                getattr(mine["conv"], field), getattr(theirs["conv"], field)
            )
    for model, values in zip(models, before, strict=True):
        for now, then in zip(_values(model), values, strict=True):
            np.testing.assert_array_equal(now, then)
    # Without a cache it is the one-shot collector.
    plain = step_cache.collect_stats(models[0], x, layer_names=["conv"])
    np.testing.assert_array_equal(plain["conv"].mean, expected[0]["conv"].mean)
