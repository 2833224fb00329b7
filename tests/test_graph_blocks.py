"""Modern blocks through the graph, convert and shrink (issue 12): a ConvNeXt block (depthwise
``Conv2D(groups=C)``, LayerNormalization, pointwise Dense 4C, gelu, Dense C, LayerScale, residual
``+``) and a MobileNetV3 block whose hard-sigmoid / hard-swish are bare ``keras.ops`` arithmetic
(``x + 3.0``, ``ReLU(6.)``, ``* (1 / 6)``, ``x * hard_sigmoid(x)``).  Seconds on 2 cores."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import fineprune_tf as fp
from fineprune_tf import _keras_compat as compat
from fineprune_tf import export
from fineprune_tf.graph import Graph, Role, channel_groups, node_role

LayerScale = compat.applications_channel_layers()["LayerScale"]
RTOL = 1e-5


def _x(model, n=4, seed=0):
    shape = (n, *model.input_shape[1:])
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def _assert_close(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=RTOL * scale)


def _randomize(model):
    """Weights far from their initial values (LayerScale starts at a constant, biases at 0),
    so that a wrong slice or fold shows in the outputs."""
    rng = np.random.default_rng(7)
    for variable in model.weights:
        if variable.trainable:
            variable.assign(rng.normal(0.0, 0.5, variable.shape).astype("float32"))


def _convnext_block() -> keras.Model:
    """keras.applications.ConvNeXt's stem and block (keras/src/applications/convnext.py), C=8."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 2, strides=2, name="stem")(inputs)
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="stem_ln")(x)
    shortcut = x
    x = keras.layers.Conv2D(8, 3, padding="same", groups=8, name="depthwise")(x)
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="ln")(x)
    x = keras.layers.Dense(32, name="pointwise_1")(x)
    x = keras.layers.Activation("gelu", name="gelu")(x)
    x = keras.layers.Dense(8, name="pointwise_2")(x)
    x = LayerScale(1e-6, 8, name="layer_scale")(x)
    x = keras.layers.Activation("linear", name="identity")(x)
    x = shortcut + x  # a bare keras.ops Add, as in ConvNeXtBlock
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="head_ln")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="convnext_block")
    _randomize(model)
    return model


def test_convnext_block_converts_and_its_hidden_channels_form_a_removable_group():
    stock = _convnext_block()
    model = fp.convert(stock)
    x = _x(model)
    _assert_close(model(x), stock(x))
    kinds = {name: type(model.get_layer(name)).__name__ for name in ("pointwise_1", "head")}
    assert kinds == {"pointwise_1": "MaskedDense", "head": "Dense"}  # the classifier stays
    groups = {tuple(g.members): g for g in channel_groups(model)}
    hidden = groups[("pointwise_1",)]
    assert hidden.removable and hidden.size == 32
    # The depthwise channels follow the residual stream, which LayerNormalization normalises
    # over the channels: blocked, with the reason.
    residual = groups[("depthwise", "pointwise_2")]
    assert "ln (LayerNormalization, cross_channel) needs every channel" in residual.blocked
    assert not groups[("stem",)].removable
    # Channels are read where they end: before gelu and before LayerScale (a learned scale).
    for name in ("pointwise_1", "pointwise_2"):
        layer = model.get_layer(name)
        assert fp.graph.activation_tensor(model, layer) is layer.output


def test_convnext_block_half_pruned_shrinks_exactly_and_smaller():
    model = fp.convert(_convnext_block())
    x = _x(model)
    hidden = next(g for g in channel_groups(model) if list(g.members) == ["pointwise_1"])
    hidden.prune(model, np.arange(0, hidden.size, 2))
    shrunk = export.shrink(model)
    _assert_close(shrunk(x), model(x))
    assert shrunk.get_layer("pointwise_1").units == 16
    assert shrunk.get_layer("pointwise_2").kernel.shape == (16, 8)
    report = export.shrink_report(model, shrunk)
    assert report.params_after < report.params_before, str(report)
    assert report.flops_after < report.flops_before, str(report)


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 2, 4)], ids=["rank3", "rank5"])
def test_pointwise_dense_is_masked_at_every_position_and_measured_per_unit(shape):
    # Ranks 3 and 5 ([N, T, D], [N, D, H, W, C]); the ConvNeXt block above covers rank 4.
    inputs = keras.Input(shape, name="features")
    hidden = keras.layers.Dense(6, activation="relu", name="pointwise")(inputs)
    pooled = keras.layers.Flatten(name="flat")(hidden)
    stock = keras.Model(inputs, keras.layers.Dense(2, name="head")(pooled))
    model = fp.convert(stock)  # no Conv at all: a pointwise Dense is reason enough
    layer = model.get_layer("pointwise")
    assert isinstance(layer, fp.MaskedDense)
    x = _x(model, n=6)
    values = np.asarray(keras.Model(stock.input, hidden)(x), np.float64).reshape(-1, 6)
    measured = fp.stats.collect(model, x, batch_size=3)["pointwise"]
    np.testing.assert_allclose(measured.mean, values.mean(axis=0), rtol=1e-5, atol=1e-6)
    layer.prune([1, 4])
    out = np.asarray(keras.Model(model.input, layer.output)(x))
    assert not np.any(out[..., [1, 4]]) and np.any(out[..., 0])


def _hard_sigmoid(x):
    # keras/src/applications/mobilenet_v3.py: bare keras.ops add and multiply around ReLU6.
    return keras.layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)


def _hard_swish_block() -> keras.Model:
    """A MobileNetV3 inverted-residual block with a squeeze-excitation gate, its activations
    written as bare ``keras.ops`` arithmetic (hard-swish ``x * hard_sigmoid(x)``)."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 1, use_bias=False, name="expand")(inputs)
    x = keras.layers.BatchNormalization(name="expand_bn")(x)
    x = x * _hard_sigmoid(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="depthwise")(x)
    x = keras.layers.BatchNormalization(name="depthwise_bn")(x)
    x = x * _hard_sigmoid(x)
    g = keras.layers.GlobalAveragePooling2D(keepdims=True, name="squeeze")(x)
    g = keras.layers.Conv2D(4, 1, activation="relu", name="se_reduce")(g)
    g = _hard_sigmoid(keras.layers.Conv2D(8, 1, name="se_expand")(g))
    x = keras.layers.Multiply(name="se_mul")([x, g])
    x = keras.layers.Conv2D(6, 1, name="project")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="hard_swish_block")
    _randomize(model)
    for layer in model.layers:  # BN statistics of real-looking activations
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(_x(model, n=16, seed=3), training=True)
    return model


def test_bare_arithmetic_roles():
    inputs = keras.Input((4, 4, 3))
    other = keras.layers.ReLU()(inputs)
    calls = {
        "plus_scalar": inputs + 3.0,
        "scalar_minus": 2.0 - inputs,
        "times_per_channel": inputs * np.array([1.0, 2.0, 3.0], "float32"),
        "over_scalar": inputs / 6.0,
        "times_tensor": inputs * other,
        "scalar_over": 1.0 / inputs,  # a pruned channel would divide by zero
        "over_tensor": inputs / other,
        "plus_spatial_map": inputs + np.ones((4, 4, 1), "float32"),  # not per channel
        "widening": inputs + np.ones((2, 1, 1, 3), "float32"),  # not one sample's shape
    }
    graph = Graph(keras.Model(inputs, list(calls.values())))
    producer = {id(gnode.outputs[0]): gnode for gnode in graph.nodes}
    roles = {name: node_role(producer[id(t)]) for name, t in calls.items()}
    elementwise = {"plus_scalar", "scalar_minus", "times_per_channel", "over_scalar"}
    assert roles == {
        name: Role.ELEMENTWISE if name in elementwise | {"times_tensor"} else Role.OPAQUE
        for name in calls
    }


def test_hard_swish_block_is_one_removable_group_shrunk_exactly():
    stock = _hard_swish_block()
    model = fp.convert(stock)
    x = _x(model)
    _assert_close(model(x), stock(x))
    groups = {tuple(g.members): g for g in channel_groups(model)}
    # The SE gate multiplies channel c of the block by channel c of se_expand's hard-sigmoid:
    # one coupled channel.  A pruned one is 0 * hard_sigmoid(0) = 0 * 0.5 = 0.
    gated = groups[("expand", "depthwise", "se_expand")]
    assert gated.removable and gated.size == 8
    assert all(g.removable for g in groups.values())
    gated.prune(model, np.arange(0, gated.size, 2))
    shrunk = export.shrink(model)
    _assert_close(shrunk(x), model(x))
    widths = {
        name: shrunk.get_layer(name).output.shape[-1]
        for name in ("expand", "depthwise", "se_expand", "se_mul")
    }
    assert widths == {"expand": 4, "depthwise": 4, "se_expand": 4, "se_mul": 4}
    report = export.shrink_report(model, shrunk)
    assert report.params_after < report.params_before, str(report)


def test_a_constant_made_by_bare_arithmetic_is_folded_into_the_consumer():
    """``x + 3.0`` maps a pruned channel to 3, not 0: shrink removes it and adds its
    contribution (3 times the consumer's weights) to the consumer's bias."""
    inputs = keras.Input((6, 6, 3), name="image")
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Conv2D(4, 1, name="consumer")(x + 3.0)
    stock = keras.Model(inputs, keras.layers.Flatten(name="flat")(x))
    _randomize(stock)
    model = fp.convert(stock)
    model.get_layer("conv").prune([0, 2, 5])
    shrunk = export.shrink(model)
    x = _x(model)
    _assert_close(shrunk(x), model(x))
    assert shrunk.get_layer("consumer").kernel.shape[-2] == 3


@pytest.mark.parametrize("scale", ["layer_scale", "per_channel_constant"])
def test_per_channel_scales_keep_only_the_kept_channels(scale):
    """LayerScale (``x * gamma``) and a bare ``x * constant[C]`` are element-wise: pruned
    channels of the conv before them are removed, the scale sliced with them."""
    inputs = keras.Input((6, 6, 3), name="image")
    x = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    if scale == "layer_scale":
        x = LayerScale(0.5, 8, name="scale")(x)
    else:
        x = x * np.linspace(-1.0, 2.0, 8).astype("float32")
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    stock = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    _randomize(stock)
    model = fp.convert(stock)
    (group,) = channel_groups(model)
    assert group.removable and list(group.members) == ["conv"]
    group.prune(model, [1, 2, 6])
    shrunk = export.shrink(model)
    x = _x(model)
    _assert_close(shrunk(x), model(x))
    assert shrunk.get_layer("head").kernel.shape[0] == 5
    if scale == "layer_scale":
        assert shrunk.get_layer("scale").projection_dim == 5
