"""fp.graph.channel_groups: masked layers' output channels coupled by Add, Multiply (SE gates),
depthwise layers and concatenations, pruned together so that shrink removes them."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import fineprune_tf as fp
from fineprune_tf import export
from fineprune_tf.graph import channel_groups


def _x(model, n=4, seed=0):
    return (
        np.random.default_rng(seed).standard_normal((n, *model.input_shape[1:])).astype("float32")
    )


def _residual_se_model():
    inputs = keras.Input((10, 10, 3), name="image")
    stem = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    a = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="a")(stem)
    b = keras.layers.Conv2D(8, 3, padding="same", name="b")(a)
    r = keras.layers.Add(name="add")([stem, b])
    r = keras.layers.ReLU(name="relu")(r)
    g = keras.layers.GlobalAveragePooling2D(keepdims=True, name="squeeze")(r)
    g = keras.layers.Conv2D(8, 1, activation="sigmoid", name="se")(g)
    r = keras.layers.Multiply(name="gate")([r, g])
    d = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(r)
    side = keras.layers.Conv2D(4, 3, name="side")(r)
    c = keras.layers.Concatenate(name="cat")([d, side])
    t = keras.layers.Conv2D(5, 1, activation="relu", name="tail")(c)
    out = keras.layers.Dense(3, name="head")(keras.layers.Flatten(name="flat")(t))
    return fp.convert(keras.Model(inputs, out, name="residual_se"))


def test_residual_add_se_gate_and_depthwise_are_one_group():
    groups = channel_groups(_residual_se_model())
    first = groups[0]
    assert list(first.members) == ["stem", "b", "se", "dw"]
    assert first.size == 8 and first.removable
    np.testing.assert_array_equal(first.members["stem"][:, 0], np.arange(8))
    np.testing.assert_array_equal(first.members["b"][:, 0], np.arange(8))
    np.testing.assert_array_equal(first.members["dw"], np.arange(16).reshape(8, 2))
    # Concatenation places channels side by side; it couples nobody with anybody else.
    assert [list(g.members) for g in groups[1:]] == [["a"], ["side"], ["tail"]]
    assert all(g.removable for g in groups)


def test_pruning_half_of_a_group_lets_shrink_remove_it_everywhere():
    model = _residual_se_model()
    x = _x(model)
    group = channel_groups(model)[0]
    group.prune(model, np.arange(0, group.size, 2))
    assert model.get_layer("dw").pruned_channels.tolist() == [0, 1, 4, 5, 8, 9, 12, 13]
    shrunk = export.shrink(model)
    np.testing.assert_allclose(np.asarray(shrunk(x)), np.asarray(model(x)), atol=1e-5)
    widths = {
        name: shrunk.get_layer(name).output.shape[-1]
        for name in ("stem", "b", "add", "se", "gate", "dw", "cat")
    }
    assert widths == {"stem": 4, "b": 4, "add": 4, "se": 4, "gate": 4, "dw": 8, "cat": 12}


def test_pruning_one_member_alone_is_not_enough_to_remove_the_channel():
    model = _residual_se_model()
    model.get_layer("b").prune([0, 1, 2, 3])
    shrunk = export.shrink(model)
    assert shrunk.get_layer("add").output.shape[-1] == 8  # stem still carries them


def test_blocked_groups_say_why():
    inputs = keras.Input((6, 6, 4), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.Add(name="skip")([inputs, x])  # the input's channels cannot go
    y = keras.layers.Conv2D(6, 1, name="normed")(x)
    y = keras.layers.LayerNormalization(name="ln")(y)  # cross-channel: needs every channel
    z = keras.layers.Conv2D(6, 1, name="before_grouped")(x)
    z = keras.layers.Conv2D(6, 1, groups=2, name="grouped")(z)  # reads every input channel
    model = fp.convert(keras.Model(inputs, [y, z]))
    reasons = {tuple(g.members): g.blocked for g in channel_groups(model)}
    assert reasons[("conv",)] == ("a model input",)
    assert reasons[("normed",)] == ("ln (LayerNormalization, cross_channel) needs every channel",)
    assert reasons[("before_grouped",)] == ("grouped (MaskedConv2D, grouped) needs every channel",)
    assert reasons[("grouped",)] == ("a model output",)
    assert [tuple(g.members) for g in channel_groups(model) if g.reaches_output] == [("grouped",)]


@pytest.mark.slow  # ~20 s on 2 cores: keras.applications MobileNetV2, convert, shrink
def test_mobilenetv2_half_of_every_group_shrinks_exactly():
    stock = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10, classifier_activation=None
    )  # logits
    # Calibrated BN (moving statistics = those of a batch): with fresh statistics the random
    # network's logits are ~1e-14 and any equality would be vacuous.
    for layer in stock.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    stock(_x(stock, n=16, seed=1), training=True)
    model = fp.convert(stock)
    x = _x(model)
    for group in channel_groups(model):
        if group.removable and group.size > 1:
            group.prune(model, np.arange(0, group.size, 2))
    shrunk = export.shrink(model)
    want = np.asarray(model(x))
    assert np.std(want, axis=0).max() > 1e-3  # the logits depend on the input: not vacuous
    np.testing.assert_allclose(
        np.asarray(shrunk(x)), want, atol=1e-5 * max(1.0, np.abs(want).max())
    )
    report = export.shrink_report(model, shrunk)
    # The mask sits before BN (BN-aware masks are not done): a pruned channel still carries
    # BN's shift, which 'same'-padded depthwise convs cannot absorb, so much stays.
    assert report.flop_reduction > 0.05, str(report)
