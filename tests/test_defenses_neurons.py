"""ANP, RNP and CLP on planted backdoors: each removes what it is designed to remove."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from fineprune_tf import defenses
from fineprune_tf.defenses import neurons
from fineprune_tf.defenses.anp import anp_losses, anp_mask_values
from fineprune_tf.defenses.rnp import unlearn
from fineprune_tf.layers import MaskedConv2D
from tests.test_defenses import blob_data, planted_backdoor_model, planted_data, trainable_model

BACKDOOR = 15


def lipschitz_planted_model(dormant: bool, batchnorm: bool = False) -> keras.Model:
    """16 conv channels on a [6, 6, 1] input: 15 with small random 3x3 kernels and channel 15, a
    trigger detector with a 10x larger kernel (a checkerboard).  ``dormant``: its bias keeps it
    silent on inputs in [0, 1]; otherwise it also fires on clean data."""
    rng = np.random.default_rng(0)
    inputs = keras.Input((6, 6, 1))
    conv = MaskedConv2D(16, 3, activation=None if batchnorm else "relu", name="conv")
    x = conv(inputs)
    if batchnorm:
        x = keras.layers.BatchNormalization(name="bn")(x)
        x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    classifier = keras.layers.Dense(2, activation="softmax", name="out")
    outputs = classifier(x)
    kernel = rng.normal(0, 0.3, (3, 3, 1, 16)).astype(np.float32)
    pattern = np.indices((3, 3)).sum(axis=0) % 2
    kernel[:, :, 0, BACKDOOR] = 10.0 * pattern
    conv.kernel.assign(kernel)
    bias = np.zeros(16, np.float32)
    bias[BACKDOOR] = -10.0 * pattern.sum() if dormant else 0.0
    conv.bias.assign(bias)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("dormant", [True, False])
def test_clp_finds_the_planted_channel_without_data(dormant):
    model = lipschitz_planted_model(dormant)
    result = defenses.clp(model, u=3.0)
    assert result.details["pruned"] == {"conv": [BACKDOOR]}
    np.testing.assert_array_equal(result.model.get_layer("conv").pruned_channels, [BACKDOOR])
    bounds = result.details["uclc"]["conv"]
    assert bounds[BACKDOOR] == pytest.approx(20.0, rel=1e-5)  # ||10 * pattern||, 4 ones


def test_clp_pairs_conv_with_the_following_batchnorm():
    model = lipschitz_planted_model(dormant=True, batchnorm=True)
    bn = model.get_layer("bn")
    gamma = np.ones(16, np.float32)
    gamma[BACKDOOR] = 0.01  # The BN scales the planted channel down: no longer an outlier.
    bn.gamma.assign(gamma)
    assert neurons.batchnorm_after(model) == {"conv": bn}
    bounds = defenses.channel_lipschitz(model)["conv"]
    assert bounds[BACKDOOR] < np.median(bounds)
    assert defenses.clp(model, u=3.0).details["pruned"] == {"conv": []}


def test_the_pruning_defense_misses_a_backdoor_that_is_not_dormant_but_clp_does_not():
    model = lipschitz_planted_model(dormant=False)
    x = np.random.default_rng(1).uniform(0, 1, (200, 6, 6, 1)).astype(np.float32)
    order, means = defenses.rank_channels(model, "conv", x)
    # The planted channel is the MOST active on clean data: activation pruning reaches it last.
    assert order[-1] == BACKDOOR
    assert defenses.clp(model, u=3.0).details["pruned"]["conv"] == [BACKDOOR]


def test_multipliers_of_one_are_the_model_and_zero_is_pruning():
    model = trainable_model()
    x, _ = blob_data(8, seed=0)
    groups = neurons.neuron_groups(model)
    ones = [tf.ones([g.channels]) for g in groups]
    np.testing.assert_allclose(
        neurons.forward_with_multipliers(model, groups, x, ones, ones), model(x), atol=1e-6
    )
    cut = [tf.ones([g.channels]) for g in groups]
    cut[1] = tf.constant([0.0] + [1.0] * 11)
    pruned = defenses.clone(model)
    pruned.get_layer("conv2").prune([0])
    np.testing.assert_allclose(
        neurons.forward_with_multipliers(model, groups, x, cut, cut), pruned(x), atol=1e-6
    )


def test_anp_gradients_match_finite_differences():
    model = trainable_model(seed=1)
    x, y = blob_data(16, seed=4)
    groups = neurons.neuron_groups(model)
    rng = np.random.default_rng(0)
    values = {
        name: [tf.Variable(rng.uniform(lo, hi, g.channels).astype(np.float32)) for g in groups]
        for name, (lo, hi) in {
            "mask": (0.5, 1.0),
            "noise": (-0.4, 0.4),
            "bias": (-0.4, 0.4),
        }.items()
    }

    def loss():
        return anp_losses(
            model, groups, x, y, values["mask"], values["noise"], values["bias"], 0.2
        )[2]

    with tf.GradientTape() as tape:
        total = loss()
    flat = [v for name in ("mask", "noise", "bias") for v in values[name]]
    grads = tape.gradient(total, flat)
    step = 1e-2
    for variable, grad in zip(flat, grads, strict=True):
        for channel in (0, variable.shape[0] - 1):
            original = variable.numpy()
            bumped = original.copy()
            bumped[channel] += step
            variable.assign(bumped)
            up = float(loss())
            bumped[channel] -= 2 * step
            variable.assign(bumped)
            down = float(loss())
            variable.assign(original)
            numeric = (up - down) / (2 * step)
            assert float(grad[channel]) == pytest.approx(numeric, rel=0.05, abs=2e-4)


def test_anp_perturbation_step_raises_the_loss():
    model = trainable_model(seed=2)
    x, y = blob_data(64, seed=5)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=3, verbose=0)
    groups = neurons.neuron_groups(model)
    ones = [tf.ones([g.channels]) for g in groups]
    noise = [tf.Variable(tf.zeros([g.channels])) for g in groups]
    bias = [tf.Variable(tf.zeros([g.channels])) for g in groups]
    with tf.GradientTape() as tape:
        _, before, _ = anp_losses(model, groups, x, y, ones, noise, bias, 0.2)
    grads = tape.gradient(before, [*noise, *bias])
    for variable, grad in zip([*noise, *bias], grads, strict=True):
        variable.assign_add(0.05 * tf.sign(grad))
    _, after, _ = anp_losses(model, groups, x, y, ones, noise, bias, 0.2)
    assert float(after) > float(before)


def test_anp_masks_out_the_planted_dormant_backdoor_neuron():
    model = planted_backdoor_model()
    (x, y), _ = planted_data(200, seed=7)
    groups, masks = anp_mask_values(model, x, y, iterations=60, batch_size=64)
    mask = masks[0]
    assert [g.layer.name for g in groups] == ["conv"]
    assert int(np.argmin(mask)) == 2 and mask[2] < 0.2
    assert mask[0] > 0.5 and mask[1] > 0.5  # The neurons clean data needs are kept.


def test_anp_result_prunes_through_the_masks_and_keeps_clean_accuracy():
    model = planted_backdoor_model()
    validation, backdoor = planted_data(300, seed=8)
    evaluation = planted_data(300, seed=9)
    result = defenses.anp(model, validation, iterations=60, batch_size=64, evaluation=evaluation)
    assert 2 in result.details["pruned"]["conv"]
    assert result.asr == 0.0 and result.clean_acc >= 0.98
    assert 2 in result.model.get_layer("conv").pruned_channels
    assert result.forward_passes > 0 and result.backward_passes > 0


def test_rnp_unlearning_raises_the_clean_loss():
    model = trainable_model(seed=3)
    x, y = blob_data(200, seed=6)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=5, verbose=0)
    before = model.evaluate(x, y, verbose=0)
    unlearned = defenses.clone(model)
    history = unlearn(unlearned, x, y, learning_rate=0.01, max_epochs=20)
    unlearned.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    after = unlearned.evaluate(x, y, verbose=0)
    assert after[0] > before[0] + 0.5
    assert history["accuracy"][-1] <= 0.2 or history["epochs"] == 20
    assert after[1] < before[1]


def test_rnp_runs_end_to_end_and_chooses_on_the_holdout():
    model = trainable_model(seed=3)
    x, y = blob_data(200, seed=6)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=5, verbose=0)
    result = defenses.rnp(model, (x, y), unlearning_epochs=5, recovering_epochs=3)
    curve = result.details["holdout_curve"]
    assert curve and result.details["threshold"] in [t for t, _ in curve] + [-1.0]
    base = result.details["base_holdout_acc"]
    assert (base - result.holdout_acc) * 100 <= 2.0 + 1e-9
    assert set(result.details["mask_values"]) == {"conv1", "conv2"}


@pytest.fixture(scope="module")
def mobilenet_v2():
    """Converted MobileNetV2 (alpha 0.35, 32x32, weights=None) with calibrated BN statistics,
    40 inputs and its own predictions as labels."""
    import fineprune_tf as fp
    from tests import zoo_models

    keras.utils.set_random_seed(0)
    stock = zoo_models.mobilenet_v2()
    x = zoo_models.inputs_for(stock, 40, seed=0)
    zoo_models.calibrate_batchnorm(stock, x)
    model = fp.convert(stock)
    return model, (x, np.argmax(model.predict(x, verbose=0), axis=-1))


def _check_on_mobilenet(model, result, scored: str) -> None:
    from fineprune_tf.layers import MASKED_CONVOLUTIONS
    from tests.test_defenses_groups import assert_group_consistent_and_shrinkable

    convs = {layer.name for layer in model.layers if isinstance(layer, MASKED_CONVOLUTIONS)}
    depthwise = {name for name in convs if "depthwise" in name}
    assert len(depthwise) == 17 and len(convs) == 52
    # Every conv is scored and prunable, the 17 depthwise ones included.
    assert set(result.details[scored]) == convs
    assert set(result.details["pruned"]) == convs
    assert any(result.details["pruned"][name] for name in depthwise)
    for name, channels in result.details["pruned"].items():
        assert sorted(result.model.get_layer(name).pruned_channels.tolist()) == sorted(channels)
    assert assert_group_consistent_and_shrinkable(result.model) > 0


@pytest.mark.slow
def test_anp_rnp_clp_score_and_prune_every_group_of_a_converted_mobilenet_v2(mobilenet_v2):
    model, data = mobilenet_v2
    pairs = neurons.batchnorm_after(model)
    # Every conv of MobileNetV2, depthwise ones included, carries its fused BN.
    assert len(pairs) == 52
    _check_on_mobilenet(model, defenses.clp(model, u=3.0), "uclc")
    # One iteration each: tracing ANP's and RNP's steps costs more than running them eagerly.
    tf.config.run_functions_eagerly(True)
    try:
        anp = defenses.anp(model, data, iterations=1, batch_size=8, threshold=0.9)
        rnp = defenses.rnp(
            model, data, unlearning_epochs=1, recovering_epochs=1, batch_size=20, threshold=0.9
        )
    finally:
        tf.config.run_functions_eagerly(False)
    _check_on_mobilenet(model, anp, "mask_values")
    _check_on_mobilenet(model, rnp, "mask_values")


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FINEPRUNE_ZOO") != "all",
    reason="FMP attacks each of MobileNetV2's 7,040 channels: 98-118 s on 2 shared cores; runs "
    "with the keras.applications zoo (FINEPRUNE_ZOO=all); the residual + depthwise model of "
    "tests/test_defenses_groups.py checks the same in CI",
)
def test_fmp_scores_and_prunes_every_group_of_a_converted_mobilenet_v2(mobilenet_v2):
    model, data = mobilenet_v2
    settings = defenses.FineTuneSettings(learning_rate=1e-3, max_epochs=1)
    result = defenses.fmp(model, data, probe_samples=1, settings=settings)
    _check_on_mobilenet(model, result, "sensitivity")


@pytest.mark.slow
def test_fst_finds_and_redraws_the_classifier_of_a_converted_mobilenet_v2(mobilenet_v2):
    from fineprune_tf.defenses.fst import FstSettings, classifier_layer

    model, data = mobilenet_v2
    head = classifier_layer(model)
    assert head.name == "predictions"
    before = head.kernel.numpy()
    # One epoch, eagerly: tracing (and XLA-compiling) MobileNetV2's training step costs more
    # than the epoch (262 s against 40 s, both measured beside a running CI).
    tf.config.run_functions_eagerly(True)
    try:
        result = defenses.fst(model, data, settings=FstSettings(max_epochs=1))
    finally:
        tf.config.run_functions_eagerly(False)
    after = result.model.get_layer("predictions").kernel.numpy()
    # Re-drawn and tuned away from the attacker's classifier, at the attacker's norm.
    assert np.sum(after * before) < 0.5 * np.sum(before * before)
    assert np.linalg.norm(after) == pytest.approx(np.linalg.norm(before), rel=1e-4)
    assert result.details["fine_tuning"]["epochs"] == 1
    np.testing.assert_array_equal(head.kernel.numpy(), before)  # the input model is untouched
