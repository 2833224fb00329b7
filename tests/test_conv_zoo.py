"""End to end on the conv kinds production models use (issue 12): a speech-like Conv1D model and a
MobileNet-like block (SeparableConv2D, DepthwiseConv2D + BN), each trained on a small learnable
task, then convert -> stats.collect -> defenses.prune -> export.shrink, plus the fast pruning
curve against the naive one on the new layer kinds."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import fineprune_tf as fp
from fineprune_tf import curves, defenses, export, stats
from tests.zoo_models import speech_conv1d

CLASSES = 3


def _speech_data(n, seed):
    """[n, 32 frames, 9 coefficients]: class k raises coefficients 3k..3k+2 in frames 8-23."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.standard_normal((n, 32, 9)).astype("float32") * 0.5
    for i, k in enumerate(y):
        x[i, 8:24, 3 * k : 3 * k + 3] += 1.5
    return x, y.astype("int64")


def _image_data(n, seed):
    """[n, 12, 12, 3]: class k brightens the centre of colour channel k."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.standard_normal((n, 12, 12, 3)).astype("float32") * 0.5
    for i, k in enumerate(y):
        x[i, 3:9, 3:9, k] += 1.5
    return x, y.astype("int64")


def _speech_model():
    return speech_conv1d(CLASSES)


def _mobilenet_block():
    inputs = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="stem")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.ReLU(6.0, name="dw_relu")(x)
    x = keras.layers.Conv2D(16, 1, activation="relu", name="project")(x)
    x = keras.layers.SeparableConv2D(20, 3, activation="relu", name="sep")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="mobilenet_block")


def _trained(build, data, seed):
    keras.utils.set_random_seed(seed)
    model = build()
    x, y = data(384, seed)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=6, verbose=0)
    return model


@pytest.fixture(scope="module")
def zoo():
    """~10 s on 2 cores for both."""
    return {
        "speech": (_trained(_speech_model, _speech_data, 1), _speech_data, "conv2"),
        "mobilenet": (_trained(_mobilenet_block, _image_data, 2), _image_data, "sep"),
    }


def _accuracy(model, x, y):
    return float(np.mean(np.argmax(np.asarray(model(x, training=False)), -1) == y))


@pytest.mark.parametrize("name", ["speech", "mobilenet"])
def test_convert_stats_prune_shrink_end_to_end(zoo, name):
    stock, data, layer_name = zoo[name]
    x, y = data(256, 7)
    assert _accuracy(stock, x, y) > 0.9  # a task the model solves: pruning is meaningful

    model = fp.convert(stock)
    masked = [type(layer).__name__ for layer in model.layers if "Masked" in type(layer).__name__]
    assert (
        masked
        == (
            {
                "speech": ["MaskedConv1D", "MaskedConv1D"],
                "mobilenet": [
                    "MaskedConv2D",
                    "MaskedDepthwiseConv2D",
                    "MaskedConv2D",
                    "MaskedSeparableConv2D",
                ],
            }[name]
        )
    )
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(stock(x)), atol=1e-6)

    # Statistics through the fused op equal a probe sub-model of the stock network.
    measured = stats.collect(model, x, batch_size=64)
    for layer in fp.layers.masked_layers(model):
        if layer.activation is not keras.activations.relu:
            continue
        # Read where the fused layer's channel ends (conv -> BN -> ReLU: after the ReLU).
        probe = keras.Model(
            stock.input, fp.graph.activation_tensor(stock, stock.get_layer(layer.name))
        )
        flat = np.asarray(probe(x), np.float64).reshape(-1, layer.channels)
        np.testing.assert_allclose(measured[layer.name].mean, flat.mean(0), rtol=1e-5, atol=1e-6)

    result = defenses.prune(model, (x, y), layer_name=layer_name, threshold=4.0)
    pruned = result.model.get_layer(layer_name)
    assert result.details["pruned_count"] == pruned.pruned_channels.size > 0
    assert _accuracy(result.model, x, y) >= _accuracy(model, x, y) - 0.04 - 1e-9

    shrunk = export.shrink(result.model)
    want = np.asarray(result.model(x))
    np.testing.assert_allclose(
        np.asarray(shrunk(x)), want, atol=1e-5 * max(1.0, np.abs(want).max())
    )
    assert shrunk.get_layer(layer_name).output.shape[-1] == len(pruned.active_channels)
    report = export.shrink_report(result.model, shrunk)
    assert report.params_after < report.params_before
    assert report.flops_after < report.flops_before


def test_half_of_every_depthwise_chain_pruned_shrinks_the_block(zoo):
    """stem -> dw -> dw_bn -> project: pruning a stem channel together with its depthwise
    output removes both, and the BN / ReLU6 in between (fused into dw by convert, folded into
    it by shrink) go with them."""
    stock, data, _ = zoo["mobilenet"]
    model = fp.convert(stock)
    gone = np.arange(0, 12, 2)
    model.get_layer("stem").prune(gone)
    model.get_layer("dw").prune(gone)
    shrunk = export.shrink(model)
    x, _ = data(16, 3)
    np.testing.assert_allclose(np.asarray(shrunk(x)), np.asarray(model(x)), atol=1e-5)
    for layer_name in ("stem", "dw"):
        assert shrunk.get_layer(layer_name).output.shape[-1] == 6, layer_name


@pytest.mark.parametrize("name", ["speech", "mobilenet"])
def test_fast_pruning_curve_equals_the_naive_one_on_new_kinds(zoo, name):
    stock, data, layer_name = zoo[name]
    model = fp.convert(stock)
    x, y = data(96, 11)
    order = np.argsort(
        stats.collect(model, x, layer_names=[layer_name])[layer_name].mean, kind="stable"
    )
    order = order[:8]  # the first steps: enough to cross the frontier logic, fast
    fast = curves.pruning_curve(model, layer_name, order, (x, y), None, batch_size=48)
    naive = curves.naive_pruning_curve(model, layer_name, order, (x, y), None, batch_size=48)
    np.testing.assert_array_equal(fast.clean_acc, naive.clean_acc)
