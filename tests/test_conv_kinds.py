"""Every convolution kind of issue 12 as a masked layer: equal to its Keras layer while unmasked,
exact zeros once pruned, saved and loaded, converted from a stock model with the right channel
role, measured by the fused op, and shrunk exactly by export."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import fineprune_tf as fp
from fineprune_tf import export, stats
from fineprune_tf import layers as fl
from fineprune_tf.graph import Role, role_of
from fineprune_tf.io import inspect_keras_config, load_model

# (masked class, stock class, constructor arguments, per-sample input shape, role)
KINDS = {
    "conv1d_causal": (
        fl.MaskedConv1D,
        keras.layers.Conv1D,
        dict(filters=6, kernel_size=3, padding="causal", dilation_rate=2, activation="relu"),
        (12, 4),
        Role.MIXES,
    ),
    "conv2d_grouped": (
        fl.MaskedConv2D,
        keras.layers.Conv2D,
        dict(filters=8, kernel_size=3, groups=2, activation="relu"),
        (8, 8, 4),
        Role.GROUPED,
    ),
    # groups == C_in: a depthwise convolution (ConvNeXt's), 2 outputs per input channel.
    "conv2d_depthwise_groups": (
        fl.MaskedConv2D,
        keras.layers.Conv2D,
        dict(filters=6, kernel_size=3, groups=3, padding="same", activation="relu"),
        (6, 6, 3),
        Role.SPATIAL,
    ),
    "conv3d": (
        fl.MaskedConv3D,
        keras.layers.Conv3D,
        dict(filters=6, kernel_size=2, activation="relu"),
        (4, 5, 5, 3),
        Role.MIXES,
    ),
    "separable1d": (
        fl.MaskedSeparableConv1D,
        keras.layers.SeparableConv1D,
        dict(filters=6, kernel_size=3, depth_multiplier=2, padding="same", activation="relu"),
        (12, 4),
        Role.MIXES,
    ),
    "separable2d": (
        fl.MaskedSeparableConv2D,
        keras.layers.SeparableConv2D,
        dict(filters=6, kernel_size=3, activation="relu"),
        (8, 8, 3),
        Role.MIXES,
    ),
    # sigmoid(0) = 0.5: the mask, not a zero kernel, makes a pruned channel 0.
    "depthwise1d": (
        fl.MaskedDepthwiseConv1D,
        keras.layers.DepthwiseConv1D,
        dict(kernel_size=3, depth_multiplier=2, activation="sigmoid"),
        (12, 3),
        Role.SPATIAL,
    ),
    "depthwise2d": (
        fl.MaskedDepthwiseConv2D,
        keras.layers.DepthwiseConv2D,
        dict(kernel_size=3, depth_multiplier=2, padding="same", activation="relu"),
        (6, 6, 3),
        Role.SPATIAL,
    ),
}


def _x(shape, n=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype("float32")


def _pair(kind):
    masked_cls, stock_cls, kwargs, shape, _ = KINDS[kind]
    masked, stock = masked_cls(**kwargs), stock_cls(**kwargs)
    masked.build((None, *shape))
    stock.build((None, *shape))
    rng = np.random.default_rng(1)
    for variable in stock.weights:
        variable.assign(rng.standard_normal(variable.shape).astype("float32") * 0.5)
    for mine, theirs in zip(masked.weights, stock.weights, strict=False):
        mine.assign(theirs)
    return masked, stock, shape


def _model(kind, masked=True):
    masked_cls, stock_cls, kwargs, shape, _ = KINDS[kind]
    inputs = keras.Input(shape, name="x")
    x = (masked_cls if masked else stock_cls)(name="layer", **kwargs)(inputs)
    pool = (
        keras.layers.GlobalAveragePooling1D
        if len(shape) == 2
        else keras.layers.GlobalAveragePooling2D
        if len(shape) == 3
        else keras.layers.GlobalAveragePooling3D
    )
    outputs = keras.layers.Dense(3, name="head")(pool(name="pool")(x))
    return keras.Model(inputs, outputs, name=f"model_{kind}")


@pytest.mark.parametrize("kind", KINDS)
def test_unmasked_equals_the_keras_layer(kind):
    masked, stock, shape = _pair(kind)
    x = _x(shape)
    np.testing.assert_allclose(np.asarray(masked(x)), np.asarray(stock(x)), rtol=0, atol=1e-6)
    assert masked.channels == np.asarray(stock(x)).shape[-1]
    assert masked.mask.tolist() == [1.0] * masked.channels


@pytest.mark.parametrize("kind", KINDS)
def test_pruned_channels_are_exact_zeros_and_the_others_unchanged(kind):
    masked, stock, shape = _pair(kind)
    x = _x(shape)
    pruned = [0, 3, masked.channels - 1]
    masked.prune(pruned)
    y, want = np.asarray(masked(x)), np.asarray(stock(x))
    assert not np.any(y[..., pruned])
    keep = masked.active_channels
    np.testing.assert_allclose(y[..., keep], want[..., keep], rtol=0, atol=1e-6)
    assert masked.pruned_channels.tolist() == sorted(pruned)


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_keep_the_mask(kind, tmp_path):
    model = _model(kind)
    layer = model.get_layer("layer")
    layer.prune([1, 2])
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = _x(KINDS[kind][3])
    assert type(loaded.get_layer("layer")) is KINDS[kind][0]
    np.testing.assert_array_equal(loaded.get_layer("layer").mask, layer.mask)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)


def _every_kind_model():
    inputs = keras.Input((10, 10, 3))
    x = fl.MaskedSeparableConv2D(4, 3, activation="relu")(inputs)
    x = fl.MaskedDepthwiseConv2D(3)(x)
    x = keras.layers.Reshape((36, 4))(x)
    x = fl.MaskedConv1D(5, 3)(x)
    x = keras.layers.Reshape((2, 2, 8, 5))(keras.layers.Cropping1D((1, 1))(x))
    x = fl.MaskedConv3D(2, 1)(x)
    return keras.Model(inputs, keras.layers.Flatten()(x))


def test_the_safe_loaders_config_check_allows_every_masked_kind():
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(_every_kind_model())))
    assert inspect_keras_config(config) == []


@pytest.mark.slow  # ~25 s: the loader's bounded child process
def test_the_safe_loader_loads_every_masked_kind(tmp_path):
    path = tmp_path / "all.keras"
    _every_kind_model().save(path)
    loaded = load_model(path)
    assert [
        type(layer).__name__ for layer in loaded.layers if "Masked" in type(layer).__name__
    ] == ["MaskedSeparableConv2D", "MaskedDepthwiseConv2D", "MaskedConv1D", "MaskedConv3D"]


@pytest.mark.parametrize("kind", KINDS)
def test_convert_makes_the_masked_twin_with_the_stock_role(kind):
    stock = _model(kind, masked=False)
    converted = fp.convert(stock)
    layer = converted.get_layer("layer")
    assert type(layer) is KINDS[kind][0]
    x = _x(KINDS[kind][3])
    np.testing.assert_allclose(np.asarray(converted(x)), np.asarray(stock(x)), atol=1e-6)
    assert role_of(layer) is KINDS[kind][4] is role_of(stock.get_layer("layer"))


def test_statistics_of_rank_3_and_5_layers_come_from_the_op_and_match_numpy():
    inputs = keras.Input((4, 5, 5, 3))
    a = fl.MaskedConv3D(6, 2, activation="relu", name="c3")(inputs)
    b = keras.layers.Reshape((3 * 4 * 4, 6))(a)
    c = fl.MaskedConv1D(5, 3, name="c1")(b)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(c))
    x = _x((4, 5, 5, 3), n=20)
    measured = stats.collect(model, x, batch_size=8)
    probe = keras.Model(inputs, [a, c])
    for name, values in zip(("c3", "c1"), probe(x), strict=True):
        flat = np.asarray(values, np.float64).reshape(-1, values.shape[-1])
        np.testing.assert_allclose(measured[name].mean, flat.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(measured[name].dormant_fraction, (flat <= 0).mean(0))
        assert measured[name].count == flat.shape[0]


def _with_consumer(kind):
    """The kind's layer between a producing conv and a consuming conv of the same rank."""
    masked_cls, _, kwargs, shape, _ = KINDS[kind]
    conv = {2: keras.layers.Conv1D, 3: keras.layers.Conv2D, 4: keras.layers.Conv3D}[len(shape)]
    inputs = keras.Input(shape, name="x")
    # A groups == C_in convolution stays depthwise only on as many channels as it was made for.
    width = shape[-1] if kwargs.get("groups") == shape[-1] else shape[-1] * 2
    x = conv(width, 1, activation="relu", name="producer")(inputs)
    x = masked_cls(name="layer", **kwargs)(x)
    x = conv(5, 2, name="consumer")(x)
    x = keras.layers.Flatten(name="flat")(x)
    return fp.convert(keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name=kind))


@pytest.mark.parametrize("kind", KINDS)
def test_shrink_removes_pruned_channels_exactly(kind):
    model = _with_consumer(kind)
    layer, producer = model.get_layer("layer"), model.get_layer("producer")
    half = np.arange(0, layer.channels, 2)
    if role_of(layer) is Role.SPATIAL:
        # Depthwise channels follow their input: every other input channel is pruned in the
        # producer and, with its m outputs (depth_multiplier, filters / groups), in the layer.
        m = fp.graph.channel_multiplier(layer)
        inputs_of = np.arange(0, layer.channels // m, 2)
        half = np.sort(np.concatenate([inputs_of * m + k for k in range(m)]))
        producer.prune(inputs_of)
    layer.prune(half)
    shrunk = export.shrink(model)
    x = _x(KINDS[kind][3], n=4)
    want = np.asarray(model(x))
    np.testing.assert_allclose(
        np.asarray(shrunk(x)), want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max())
    )
    assert all(type(lay).__module__.startswith("keras.") for lay in shrunk.layers)
    width = shrunk.get_layer("layer").output.shape[-1]
    assert width == len(layer.active_channels)
    assert shrunk.get_layer("consumer").kernel.shape[-2] == width
    assert export.count_params_and_flops(shrunk)[0] < export.count_params_and_flops(model)[0]


def test_grouped_conv_keeps_as_many_channels_in_every_group():
    """8 filters in 2 groups, 3 pruned in the first and 1 in the second: the first group keeps
    one pruned channel (as exact zeros) so both keep 3; grouping stays right (exact outputs)."""
    model = _with_consumer("conv2d_grouped")
    layer = model.get_layer("layer")
    layer.prune([0, 1, 2, 5])
    shrunk = export.shrink(model)
    x = _x(KINDS["conv2d_grouped"][3], n=4)
    np.testing.assert_allclose(np.asarray(shrunk(x)), np.asarray(model(x)), atol=1e-5)
    plain = shrunk.get_layer("layer")
    assert plain.groups == 2 and plain.filters == 6
    assert shrunk.get_layer("producer").filters == 8  # a grouped conv reads every input


def test_depthwise_outputs_pruned_alone_stay_but_are_zero():
    """Without the producer's channel the depthwise outputs cannot be removed (the producer
    still computes the channel): shrink keeps them, zeroed, and stays exact."""
    model = _with_consumer("depthwise2d")
    layer = model.get_layer("layer")
    layer.prune([0, 1, 4])
    shrunk = export.shrink(model)
    x = _x(KINDS["depthwise2d"][3], n=4)
    np.testing.assert_allclose(np.asarray(shrunk(x)), np.asarray(model(x)), atol=1e-5)
    assert shrunk.get_layer("layer").output.shape[-1] == layer.channels
    out = np.asarray(keras.Model(shrunk.input, shrunk.get_layer("layer").output)(x))
    assert not np.any(out[..., [0, 1, 4]]) and np.any(out[..., 2])


def test_pruning_the_depthwise_producer_alone_keeps_its_channel():
    """The producer's pruned channel still feeds unpruned depthwise outputs (as the constant 0,
    through the depthwise bias): removed only with them, never wrongly."""
    model = _with_consumer("depthwise2d")
    model.get_layer("producer").prune([1])
    shrunk = export.shrink(model)
    x = _x(KINDS["depthwise2d"][3], n=4)
    np.testing.assert_allclose(np.asarray(shrunk(x)), np.asarray(model(x)), atol=1e-5)
