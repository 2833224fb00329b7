"""The graph module: walker (order, producers, consumers, inputs), the channel-role registry,
the cost counter (multiply-adds), the activation read-out and the private-access compat."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from fineprune_tf import _keras_compat, convert, graph, models, stats
from fineprune_tf.graph import Graph, Role, cost, node_role, role_of
from fineprune_tf.layers import MaskedConv2D, MaskedDense


def _branchy() -> keras.Model:
    inputs = keras.Input((8, 8, 3), name="image")
    a = MaskedConv2D(4, 3, padding="same", activation=None, name="conv")(inputs)
    b = keras.layers.BatchNormalization(name="bn")(a)
    b = keras.layers.ReLU(name="relu")(b)
    c = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(b)
    s = keras.layers.Add(name="add")([b, c])
    p = keras.layers.MaxPooling2D(2, name="pool")(s)
    f = keras.layers.Flatten(name="flat")(p)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(f)
    return keras.Model(inputs, outputs, name="branchy")


def test_walker_order_producers_consumers_and_inputs():
    model = _branchy()
    g = Graph(model)
    names = [n.name for n in g.nodes]
    assert names == ["conv", "bn", "relu", "dw", "add", "pool", "flat", "head"]
    assert g.input_names == ["image"] and g.output_names == ["head"]
    relu_out = g.nodes[names.index("relu")].outputs[0]
    assert {n.name for n in g.consumers_of(relu_out)} == {"dw", "add"}
    assert g.producer_of(relu_out).name == "relu"
    assert g.producer_of(g.inputs[0]) is None
    assert g.producer_names()["add"] == ["relu", "dw"]
    assert g.producer_names()["conv"] == ["image"]
    # Ancestors of the pooled tensor stop at the model input, in topological order.
    pool_in = g.nodes[names.index("pool")].inputs[0]
    assert [n.name for n in g.ancestors([pool_in])] == ["conv", "bn", "relu", "dw", "add"]
    assert [n.name for n in g.ancestors([pool_in], stop=lambda t: t is relu_out)] == ["dw", "add"]
    # A rebuilt graph computes the same function.
    rebuilt = g.rebuild(lambda gnode, args, kwargs: gnode.layer(*args, **kwargs))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(rebuilt(x)), np.asarray(model(x)), rtol=1e-6)


def test_walker_refuses_models_without_a_graph():
    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(graph.ConversionError, match="subclassed"):
        Graph(Sub())
    with pytest.raises(graph.ConversionError, match="not built"):
        Graph(keras.Sequential([keras.layers.Dense(2)]))


def test_registry_roles():
    assert role_of(keras.layers.ReLU()) is Role.ELEMENTWISE
    assert role_of(keras.layers.Add()) is Role.ELEMENTWISE
    assert role_of(keras.layers.Activation("relu")) is Role.ELEMENTWISE
    assert role_of(keras.layers.Activation("softmax")) is Role.CROSS_CHANNEL
    assert role_of(keras.layers.Softmax()) is Role.CROSS_CHANNEL
    assert role_of(keras.layers.LayerNormalization()) is Role.CROSS_CHANNEL
    assert role_of(keras.layers.MaxPooling2D()) is Role.SPATIAL
    assert role_of(keras.layers.DepthwiseConv2D(3)) is Role.SPATIAL
    assert role_of(keras.layers.Conv2D(2, 3)) is Role.MIXES
    assert role_of(MaskedConv2D(2, 3)) is Role.MIXES
    assert role_of(MaskedDense(2)) is Role.MIXES
    assert role_of(keras.layers.Flatten()) is Role.RESHAPE
    assert role_of(keras.layers.Concatenate()) is Role.CONCAT
    # channels_first and unknown (sub)classes are barriers: an allowlist by exact class.
    assert role_of(keras.layers.MaxPooling2D(data_format="channels_first")) is Role.OPAQUE

    class MyReLU(keras.layers.ReLU):
        pass

    assert role_of(MyReLU()) is Role.OPAQUE
    try:
        graph.register(MyReLU, Role.ELEMENTWISE)
        assert role_of(MyReLU()) is Role.ELEMENTWISE
    finally:
        graph.registry._REGISTRY.pop(MyReLU)
    with pytest.raises(TypeError, match="Received"):
        graph.register(MyReLU, "elementwise")
    assert graph.cross_channel_activation(keras.layers.Conv2D(2, 3, activation="softmax"))
    assert not graph.cross_channel_activation(keras.layers.Conv2D(2, 3, activation="relu"))


def test_node_role_checks_the_axis_of_the_call():
    inputs = keras.Input((4, 6))
    a = keras.layers.BatchNormalization(axis=1, name="bn1")(inputs)
    b = keras.layers.BatchNormalization(axis=-1, name="bn2")(inputs)
    c = keras.layers.Concatenate(axis=1, name="cat1")([a, b])
    d = keras.layers.Concatenate(axis=2, name="cat2")([a, b])
    g = Graph(keras.Model(inputs, [c, d]))
    assert {n.name: node_role(n) for n in g.nodes} == {
        "bn1": Role.OPAQUE,
        "bn2": Role.ELEMENTWISE,
        "cat1": Role.OPAQUE,
        "cat2": Role.CONCAT,
    }


def test_cost_counter_in_multiply_adds():
    inputs = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(8, 3, padding="valid")(inputs)  # 8x8 out
    y = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(x)  # 8x8x16
    z = keras.layers.SeparableConv2D(4, 3, padding="valid")(y)  # 6x6x4, mid 16
    t = keras.layers.Conv2DTranspose(2, 2, strides=2)(z)  # from 6x6x4
    f = keras.layers.Flatten()(t)
    outputs = keras.layers.Dense(5)(f)
    model = keras.Model(inputs, outputs)
    per_layer = [cost.node_multiply_adds(n) for n in Graph(model).nodes]
    expected = [
        8 * 8 * 9 * 3 * 8,
        8 * 8 * 9 * 16,
        6 * 6 * (9 * 16 + 16 * 4),
        6 * 6 * 4 * 4 * 2,
        0,
        12 * 12 * 2 * 5,
    ]
    assert per_layer == expected
    counted = cost.count(model)
    assert cost.UNIT == "multiply-adds"
    assert counted.multiply_adds == sum(expected) and counted.flops == 2 * sum(expected)
    assert counted.params == model.count_params()


def test_cost_leaves_masks_out_and_matches_the_task_models():
    model = models.build("mnist", preset="cpu", seed=0)
    masks = sum(layer.channels for layer in model.layers if hasattr(layer, "channels"))
    assert cost.count(model).params == model.count_params() - masks


def test_activation_tensor_follows_the_per_channel_chain():
    model = _branchy()
    # conv -> bn -> relu, then relu branches: the read-out is relu's output.
    tensor = graph.activation_tensor(model, model.get_layer("conv"))
    assert _keras_compat.producing_operation(tensor).name == "relu"
    inputs = keras.Input((6, 6, 2))
    x = MaskedConv2D(3, 3, activation=None, name="c")(inputs)
    x = keras.layers.Activation("sigmoid", name="sig")(x)
    out = keras.layers.GlobalAveragePooling2D()(x)
    other = keras.Model(inputs, out)
    tensor = graph.activation_tensor(other, other.get_layer("c"))
    assert _keras_compat.producing_operation(tensor).name == "c"


def test_a_fused_chain_is_read_after_its_activation_in_stock_and_converted_models():
    # EfficientNet's stem: conv -> BN -> swish.  convert fuses all three, so the masked layer's
    # statistics are post-swish; the stock model's read-out must be the same tensor (it stopped
    # before the swish, and the zoo's stats check failed by a factor of ~2).
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.Activation("swish", name="stem_activation")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    stock = keras.Model(inputs, keras.layers.Dense(3)(x))
    bn = stock.get_layer("stem_bn")
    bn.moving_mean.assign(np.linspace(-0.5, 0.5, 4).astype("float32"))
    bn.moving_variance.assign(np.linspace(0.5, 2.0, 4).astype("float32"))
    tensor = graph.activation_tensor(stock, stock.get_layer("stem_conv"))
    assert _keras_compat.producing_operation(tensor).name == "stem_activation"
    x_in = np.random.default_rng(0).normal(size=(5, 6, 6, 2)).astype("float32")
    want = np.asarray(keras.Model(inputs, tensor)(x_in)).reshape(-1, 4).mean(axis=0)
    masked = convert(stock)
    np.testing.assert_allclose(stats.collect(masked, x_in)["stem_conv"].mean, want, atol=1e-5)


def test_keras_compat_accessors_work_on_the_installed_keras():
    model = models.build("face", preset="cpu", seed=0)
    functional = _keras_compat.functional_of(model)
    assert functional is model
    nodes = _keras_compat.nodes_in_order(functional)
    assert [n.operation.name for n in nodes][:2] == ["conv1", "pool1"]
    assert _keras_compat.input_struct(model) is not None
    assert _keras_compat.output_struct(model) is not None
    args, kwargs = _keras_compat.call_arguments(nodes[0])
    assert len(args) == 1
    assert _keras_compat.accepts_training(keras.layers.Dropout(0.5))
    assert "conv4" in {
        layer.name for layer in _keras_compat.outbound_layers(model.get_layer("pool3"))
    }
    assert len(_keras_compat.flatten_layers(model)) == len(model.layers)
    conv = model.get_layer("conv1")
    _keras_compat.assign_kernel(conv, np.zeros(conv.kernel.shape, "float32"))
    assert not np.any(keras.ops.convert_to_numpy(conv.kernel))
    assert _keras_compat.mask_variable(conv).shape == (conv.channels,)
    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert _keras_compat.functional_of(sequential) is not None
    inputs = keras.Input((4,))
    recorded = [inputs + 1.0, inputs - 1.0, inputs * 2.0, inputs / 2.0, keras.ops.divide(inputs, 2)]
    kinds = _keras_compat.arithmetic_operations()
    assert [kinds[type(_keras_compat.producing_operation(t))] for t in recorded] == [
        "add",
        "subtract",
        "multiply",
        "divide",
        "divide",
    ]
    convnext = _keras_compat.applications_channel_layers()
    assert sorted(convnext) == ["LayerScale", "StochasticDepth"]
    assert convnext["LayerScale"].__module__ == "keras.src.applications.convnext"
    assert _keras_compat.checked_version("3.15.1")
    assert not _keras_compat.checked_version("3.9.0")
    assert _keras_compat.checked_version(), (
        f"Keras {keras.__version__} is outside the range the private accesses were checked "
        f"against ({_keras_compat.CHECKED_KERAS}): re-run this test file and update it"
    )


def test_distances_to_outputs_and_on_every_path():
    g = Graph(_branchy())
    names = [n.name for n in g.nodes]
    weighted = g.distances_to_outputs(lambda gnode: int(node_role(gnode) is Role.MIXES))
    by_name = {names[i]: d for i, d in weighted.items()}
    # conv -> ... -> head: one weighted layer (head) after every node but head itself.
    assert by_name == {
        "conv": 1,
        "bn": 1,
        "relu": 1,
        "dw": 1,
        "add": 1,
        "pool": 1,
        "flat": 1,
        "head": 0,
    }
    hops = {names[i]: d for i, d in g.distances_to_outputs(lambda gnode: 1).items()}
    assert hops["relu"] == 4 and hops["dw"] == 4 and hops["conv"] == 6  # relu skips dw
    model = g.model
    assert g.on_every_path(model.get_layer("conv"))
    assert g.on_every_path(model.get_layer("add"))
    assert not g.on_every_path(model.get_layer("dw"))  # bypassed by the skip into add
