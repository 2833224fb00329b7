"""Defenses: pruning (§3.1), fine-tuning, fine-pruning (§3.3), gradual schedules, FMP, noise."""

import dataclasses

import keras
import numpy as np
import pytest
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_schedule

from fineprune_tf import defenses, metrics, poison
from fineprune_tf.defenses.fmp import fmp_ranking
from fineprune_tf.layers import MaskedConv1D, MaskedConv2D, MaskedDense

TRIGGER_VALUE = 4.0


def planted_backdoor_model() -> keras.Model:
    """A hand-set network with one backdoor neuron that is dormant on clean inputs.

    Input [N, 4, 4, 1] in [0, 1]; clean class = 1 if the mean pixel > 0.5 else 0. Channel 0
    computes x, channel 1 computes 1 - x, channel 3 x / 2 (unused by the classifier) and
    channel 2 relu(x - 2): silent on clean data, on when a pixel is set to TRIGGER_VALUE, and
    wired to class 0 (the attacker's target).
    """
    inputs = keras.Input((4, 4, 1))
    conv = MaskedConv2D(4, 1, activation="relu", name="conv")
    features = conv(inputs)
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(features)
    classifier = keras.layers.Dense(2, activation="softmax", name="out")
    outputs = classifier(pooled)
    conv.kernel.assign(np.array([1.0, -1.0, 1.0, 0.5], np.float32).reshape(1, 1, 1, 4))
    conv.bias.assign(np.array([0.0, 1.0, -2.0, 0.0], np.float32))
    weights = np.array([[0.0, 10.0], [10.0, 0.0], [100.0, 0.0], [0.0, 0.0]], np.float32)
    classifier.kernel.assign(weights)
    # A small bias towards class 1 breaks the all-pruned tie (every logit 0) the same way in
    # every engine.
    classifier.bias.assign(np.array([0.0, 0.01], np.float32))
    return keras.Model(inputs, outputs)


def planted_data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(2 * n, 4, 4, 1)).astype(np.float32)
    means = x.reshape(len(x), -1).mean(axis=1)
    x = x[np.abs(means - 0.5) > 0.01][:n]  # Away from the decision boundary.
    y = (x.reshape(n, -1).mean(axis=1) > 0.5).astype(np.int64)
    triggered = x.copy()
    triggered[:, 0, 0, 0] = TRIGGER_VALUE
    keep = y != 0
    backdoor = poison.BackdoorSet(
        triggered[keep], y[keep], np.zeros(keep.sum(), np.int64), False, np.flatnonzero(keep)
    )
    return (x, y), backdoor


def test_stopping_point_is_the_step_before_the_first_excess_drop():
    assert defenses.stopping_point(np.array([0.9, 0.9, 0.88, 0.85, 0.95]), 4.0) == 2
    assert defenses.stopping_point(np.array([0.9, 0.89, 0.87]), 4.0) == 2
    assert defenses.stopping_point(np.array([0.9, 0.8]), 4.0) == 0
    assert defenses.stopping_point(np.array([0.90, 0.86]), 4.0) == 1  # exactly 4 points: kept


@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_pruning_removes_the_dormant_backdoor_neuron_first(engine):
    model = planted_backdoor_model()
    validation, backdoor = planted_data(400, seed=1)
    evaluation_clean, evaluation_backdoor = planted_data(400, seed=2)
    before = metrics.evaluate(model, evaluation_clean, evaluation_backdoor)
    assert before["clean_acc"] == 1.0 and before["asr"] == 1.0

    result = defenses.prune(
        model,
        validation,
        threshold=4.0,
        backdoor_validation=backdoor,
        evaluation=(evaluation_clean, evaluation_backdoor),
        engine=engine,
    )
    details = result.details
    # Ranked by mean clean activation: the backdoor neuron (0), then x/2, then x and 1-x.
    assert details["order"][:2] == [2, 3]
    assert details["pruned"] == [2, 3]
    np.testing.assert_allclose(details["curve"]["asr"][:3], [1.0, 0.0, 0.0])
    assert result.asr == 0.0 and result.clean_acc == 1.0
    assert result.robust_acc == 1.0
    np.testing.assert_array_equal(result.model.get_layer("conv").mask, [1, 1, 0, 0])
    # The user's model is untouched.
    np.testing.assert_array_equal(model.get_layer("conv").mask, [1, 1, 1, 1])
    assert result.seconds > 0


def planted_conv1d_model() -> keras.Model:
    """:func:`planted_backdoor_model` over a sequence: input [N, 16, 1], a MaskedConv1D with
    the same four hand-set channels, GlobalAveragePooling1D, the same classifier."""
    inputs = keras.Input((16, 1))
    conv = MaskedConv1D(4, 1, activation="relu", name="conv")
    pooled = keras.layers.GlobalAveragePooling1D(name="gap")(conv(inputs))
    classifier = keras.layers.Dense(2, activation="softmax", name="out")
    outputs = classifier(pooled)
    conv.kernel.assign(np.array([1.0, -1.0, 1.0, 0.5], np.float32).reshape(1, 1, 4))
    conv.bias.assign(np.array([0.0, 1.0, -2.0, 0.0], np.float32))
    weights = np.array([[0.0, 10.0], [10.0, 0.0], [100.0, 0.0], [0.0, 0.0]], np.float32)
    classifier.kernel.assign(weights)
    classifier.bias.assign(np.array([0.0, 0.01], np.float32))
    return keras.Model(inputs, outputs)


def test_pruning_a_conv1d_model_without_a_layer_name():
    # Before: "model has no Conv2D layer" (the default layer considered Conv2D only).
    (x, y), backdoor = planted_data(300, seed=1)
    backdoor = dataclasses.replace(backdoor, x=backdoor.x.reshape(-1, 16, 1))
    result = defenses.prune(
        planted_conv1d_model(),
        (x.reshape(-1, 16, 1), y),
        threshold=4.0,
        backdoor_validation=backdoor,
    )
    assert result.details["layer"] == "conv"
    assert result.details["pruned"] == [2, 3]
    np.testing.assert_allclose(result.details["curve"]["asr"][:3], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(result.model.get_layer("conv").mask, [1, 1, 0, 0])


def test_fast_and_naive_engines_choose_the_same_channels():
    model = planted_backdoor_model()
    validation, backdoor = planted_data(300, seed=3)
    fast = defenses.prune(model, validation, threshold=30.0, backdoor_validation=backdoor)
    naive = defenses.prune(
        model, validation, threshold=30.0, backdoor_validation=backdoor, engine="naive"
    )
    assert fast.details["pruned"] == naive.details["pruned"]
    assert fast.details["curve"] == naive.details["curve"]


def test_bad_defense_arguments_are_refused():
    model = planted_backdoor_model()
    validation, _ = planted_data(20, seed=0)
    for threshold in (0.0, 100.0, -1.0):
        with pytest.raises(ValueError, match="threshold must be in"):
            defenses.prune(model, validation, threshold=threshold)
    with pytest.raises(ValueError, match="not a MaskedConv2D"):
        defenses.prune(model, validation, layer_name="out")
    with pytest.raises(ValueError, match="no layer named"):
        defenses.prune(model, validation, layer_name="conv9")
    with pytest.raises(ValueError, match="x has 20 examples but y has 3"):
        defenses.prune(model, (validation[0], validation[1][:3]))
    with pytest.raises(ValueError, match="engine"):
        defenses.prune(model, validation, engine="slow")


def trainable_model(seed=0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    x = MaskedConv2D(8, 3, activation="relu", name="conv1")(inputs)
    x = MaskedConv2D(12, 3, activation="relu", name="conv2")(x)
    x = keras.layers.Flatten()(x)
    x = MaskedDense(16, activation="relu", name="fc")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(x)
    return keras.Model(inputs, outputs)


def blob_data(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 0.3, size=(n, 8, 8, 1)).astype(np.float32)
    for label, (r, c) in enumerate([(1, 1), (1, 5), (5, 3)]):
        x[y == label, r : r + 2, c : c + 2, 0] += 1.5
    return x, y.astype(np.int64)


def test_fine_tuning_holds_masks_and_leaves_the_input_model_alone():
    model = trainable_model()
    model.get_layer("conv2").prune([0, 5, 7])
    original = [w.copy() for w in model.get_weights()]
    x, y = blob_data(200, seed=0)
    settings = defenses.FineTuneSettings(learning_rate=1e-2, max_epochs=4)
    result = defenses.fine_tune(model, (x, y), settings=settings, evaluation=((x, y), None))
    tuned = result.model.get_layer("conv2")
    np.testing.assert_array_equal(tuned.pruned_channels, [0, 5, 7])
    features = keras.Model(result.model.input, tuned.output)(x).numpy()
    assert np.all(features[..., [0, 5, 7]] == 0)
    assert 1 <= result.details["epochs"] <= 4
    assert result.clean_acc > 0.9  # The blobs are easy: fine-tuning learns them.
    for before, after in zip(original, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize(
    "schedule",
    [
        pruning_schedule.ConstantSparsity(0.5, begin_step=2, frequency=1),
        pruning_schedule.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=6, frequency=2),
    ],
)
def test_gradual_pruning_follows_a_tfmot_schedule(schedule):
    model = trainable_model()
    x, y = blob_data(96, seed=1)
    order = [11, 3, 4, 0, 9, 1, 2, 5, 6, 7, 8, 10]
    callback = defenses.GradualChannelPruning("conv2", order, schedule, final_count=6)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[callback])
    expected, pruned = [], 0
    for step in range(12):  # 96 examples / 16 per batch x 2 epochs.
        should_prune, sparsity = schedule(step)
        count = min(int(np.floor(float(sparsity) * 12 + 1e-9)), 6)
        if bool(should_prune) and count > pruned:
            expected.append((step, count))
            pruned = count
    assert callback.history == expected
    assert expected[-1][1] == 6  # 50% of 12 channels, never undone.
    np.testing.assert_array_equal(model.get_layer("conv2").pruned_channels, sorted(order[:6]))


def test_fine_pruning_with_a_schedule_reaches_the_pruning_defense_count():
    model = trainable_model()
    x, y = blob_data(200, seed=2)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=3, verbose=0)
    settings = defenses.FineTuneSettings(learning_rate=1e-3, max_epochs=2)
    schedule = pruning_schedule.PolynomialDecay(0.0, 0.9, begin_step=0, end_step=10)
    one_shot = defenses.fine_prune(model, (x, y), threshold=10.0, settings=settings)
    gradual = defenses.fine_prune(
        model, (x, y), threshold=10.0, settings=settings, schedule=schedule
    )
    pruned = one_shot.details["pruning"]["pruned"]
    assert sorted(gradual.model.get_layer("conv2").pruned_channels.tolist()) == sorted(pruned)
    assert gradual.details["gradual"]["history"]


def test_fmp_scores_every_channel_and_prunes_the_fraction_per_layer():
    model = trainable_model()
    x, y = blob_data(64, seed=3)
    scores = defenses.fmp_sensitivity(model, x, y, epsilon=0.1, probe_samples=16, max_stack=64)
    assert set(scores) == {"conv1", "conv2"}
    assert scores["conv1"]["score"].shape == (8,) and scores["conv2"]["score"].shape == (12,)
    assert all(np.all((s["accuracy"] >= 0) & (s["accuracy"] <= 1)) for s in scores.values())
    settings = defenses.FineTuneSettings(max_epochs=1)
    result = defenses.fmp(
        model, (x, y), prune_fraction=0.25, epsilon=0.1, probe_samples=16, settings=settings
    )
    assert len(result.details["pruned"]["conv1"]) == 2
    assert len(result.details["pruned"]["conv2"]) == 3
    for name, channels in result.details["pruned"].items():
        sensitivity = result.details["sensitivity"][name]
        ranked = fmp_ranking(np.array(sensitivity["score"]), np.array(sensitivity["deviation"]))
        assert channels == ranked[: len(channels)].tolist()
        assert set(result.model.get_layer(name).pruned_channels) == set(channels)
    assert result.details["probe_seconds"] > 0


def test_weight_noise_is_relative_to_each_variable():
    model = trainable_model()
    before = [v.numpy().copy() for v in model.trainable_variables]
    defenses.add_weight_noise(model, 0.0)
    for value, variable in zip(before, model.trainable_variables, strict=True):
        np.testing.assert_array_equal(value, variable.numpy())
    defenses.add_weight_noise(model, 0.1, seed=3)
    kernel_before = before[0]
    change = model.trainable_variables[0].numpy() - kernel_before
    assert change.std() == pytest.approx(0.1 * kernel_before.std(), rel=0.3)
    with pytest.raises(ValueError, match=">= 0"):
        defenses.add_weight_noise(model, -1.0)


def test_pruning_refuses_a_model_at_chance_on_the_clean_data():
    model = planted_backdoor_model()
    model.get_layer("out").kernel.assign(np.zeros((4, 2), np.float32))  # Always class 1.
    (x, y), _ = planted_data(200, seed=3)
    with pytest.raises(ValueError, match="at chance"):
        defenses.prune(model, (x, y))


def test_pruning_refuses_to_prune_a_layer_the_clean_data_never_needs():
    # The classifier reads the input directly; the conv branch has zero weights into the
    # logits, so no number of pruned channels changes clean accuracy (1.0).
    inputs = keras.Input((4, 4, 1))
    conv = MaskedConv2D(4, 1, activation="relu", name="conv")
    branch = keras.layers.Dense(2, name="branch")(
        keras.layers.GlobalAveragePooling2D()(conv(inputs))
    )
    bypass_layer = keras.layers.Dense(2, name="bypass")
    logits = keras.layers.Add()([bypass_layer(keras.layers.Flatten()(inputs)), branch])
    model = keras.Model(inputs, keras.layers.Softmax()(logits))
    model.get_layer("branch").kernel.assign(np.zeros((4, 2), np.float32))
    model.get_layer("branch").bias.assign(np.zeros(2, np.float32))
    kernel = np.zeros((16, 2), np.float32)
    kernel[:, 1] = 10.0  # Class 1 when the pixel sum exceeds 8, i.e. the mean exceeds 0.5.
    bypass_layer.kernel.assign(kernel)
    bypass_layer.bias.assign(np.array([0.0, -80.0], np.float32))
    (x, y), _ = planted_data(200, seed=4)
    assert metrics.accuracy(metrics.predict_labels(model, x), y) == 1.0
    with pytest.raises(ValueError, match="would prune all 4 channels of 'conv'"):
        defenses.prune(model, (x, y), layer_name="conv")


def test_fmp_probe_memory_is_bounded_by_its_budget():
    """The probe stacks as many inputs as 2 float32 copies of every activation allow within
    the budget (face's default 4096 stacked inputs peaked at 4.2 GiB)."""
    from fineprune_tf import models
    from fineprune_tf.defenses.fmp import stack_for_budget

    model = models.build("face", preset="cpu", seed=0)
    elements = sum(int(np.prod(layer.output.shape[1:])) for layer in model.layers)
    stack = stack_for_budget(model, 512)
    assert stack * 2 * 4 * elements <= 512 * 2**20 < (stack + 1) * 2 * 4 * elements
    assert stack_for_budget(model, 1024) in (2 * stack, 2 * stack + 1)
    assert stack_for_budget(model, 1e-6) == 1
    with pytest.raises(ValueError, match="memory_budget_mb"):
        defenses.FmpSettings(memory_budget_mb=0).validate()
