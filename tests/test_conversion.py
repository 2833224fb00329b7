"""convert(): stock Conv2D/Dense -> masked twins, same graph, names and outputs."""

import keras
import numpy as np
import pytest

import fineprune_tf as fp
from fineprune_tf import conversion as fp_convert
from fineprune_tf import export, models
from fineprune_tf.conversion import ConversionError, convert
from fineprune_tf.graph import Graph, flatten_nested


def _randomize_bn(model, seed=0):
    """Non-trivial BN statistics so that BN is not an identity in the tests."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c),
                    rng.normal(0, 0.5, c),
                    rng.normal(0, 0.5, c),
                    rng.uniform(0.5, 1.5, c),
                ]
            )
    return model


def resnet_like():
    inputs = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    y = keras.layers.Conv2D(8, 3, padding="same", name="block_conv1")(x)
    y = keras.layers.BatchNormalization(name="block_bn1")(y)
    y = keras.layers.Activation("relu", name="block_relu1")(y)
    y = keras.layers.Conv2D(8, 3, padding="same", name="block_conv2")(y)
    y = keras.layers.BatchNormalization(name="block_bn2")(y)
    x = keras.layers.Add(name="block_add")([x, y])
    x = keras.layers.ReLU(name="block_out")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    outputs = keras.layers.Dense(4, activation="softmax", name="classifier")(x)
    return _randomize_bn(keras.Model(inputs, outputs, name="resnet_like"))


def concat_depthwise():
    inputs = keras.Input((10, 10, 3), name="image")
    a = keras.layers.Conv2D(6, 3, activation="relu", name="conv_a")(inputs)
    b = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(inputs)
    b = keras.layers.Conv2D(5, 1, activation="relu", name="conv_b")(b)
    x = keras.layers.Concatenate(name="concat")([a, b])
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = keras.layers.Dense(12, activation="relu", name="fc")(x)
    logits = keras.layers.Dense(3, name="logits")(x)
    outputs = keras.layers.Activation("softmax", name="probs")(logits)
    return keras.Model(inputs, outputs, name="concat_depthwise")


def _x(model, n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *model.input_shape[1:])).astype("float32")


def _max_diff(a, b, x):
    # Eager calls: predict() would trace a tf.function per model (~1 s each).
    return float(
        np.max(np.abs(np.asarray(a(x, training=False)) - np.asarray(b(x, training=False))))
    )


def test_resnet_with_bn_and_residual_add_converts_exactly():
    """Default: conv -> BN (-> ReLU) chains become one masked layer, masked at the chain's end."""
    model = resnet_like()
    converted = convert(model)
    assert _max_diff(model, converted, _x(model)) <= 1e-5
    absorbed = {"stem_bn", "stem_relu", "block_bn1", "block_relu1", "block_bn2"}
    assert [layer.name for layer in converted.layers] == [
        layer.name for layer in model.layers if layer.name not in absorbed
    ]
    stem, conv1, conv2 = (converted.get_layer(n) for n in ("stem", "block_conv1", "block_conv2"))
    for layer, bn, activation in (
        (stem, "stem_bn", "relu"),
        (conv1, "block_bn1", "relu"),
        (conv2, "block_bn2", "linear"),  # feeds the Add: the BN is fused, the Add stays
    ):
        assert type(layer) is fp.MaskedConv2D
        assert layer.batch_normalization.name == bn
        assert keras.activations.serialize(layer.activation) == activation
    assert type(converted.get_layer("hidden")) is keras.layers.Dense  # dense=False
    # A pruned channel is exactly 0 at the end of the chain, where the Add reads it.
    probe = keras.Model(converted.inputs, converted.get_layer("block_add").input)
    stem.prune([0, 1, 2])
    conv2.prune([1])
    a, b = (np.asarray(t) for t in probe(_x(model)))
    assert np.all(a[..., :3] == 0) and np.all(b[..., 1] == 0)
    assert np.abs(a[..., 3:]).max() > 0
    # The original is untouched and shares no variables with the copy.
    assert type(model.get_layer("stem")) is keras.layers.Conv2D
    stem.batch_normalization.gamma.assign(np.zeros(8, "float32"))
    assert float(np.abs(model.get_layer("stem_bn").gamma.numpy()).min()) > 0


def test_fuse_batchnorm_false_keeps_the_former_placement():
    model = resnet_like()
    converted = convert(model, fuse_batchnorm=False)
    assert _max_diff(model, converted, _x(model)) <= 1e-5
    assert [layer.name for layer in converted.layers] == [layer.name for layer in model.layers]
    # conv(linear) -> BN -> ReLU stays that way: the mask applies to the conv's linear output.
    stem = converted.get_layer("stem")
    assert stem.activation is keras.activations.linear and not stem.use_bias
    assert stem.batch_normalization is None
    assert type(converted.get_layer("stem_bn")) is keras.layers.BatchNormalization
    assert (
        converted.get_layer("block_add").input[0].name
        == converted.get_layer("stem_relu").output.name
    )


def test_fused_batchnorm_keeps_training_and_pruned_channels_stay_zero():
    """BN trains normally inside the fused layer (moving statistics, gamma / beta); a pruned
    channel stays exactly 0 and its BN parameters get no gradient."""
    model = resnet_like()
    converted = convert(model)
    stem = converted.get_layer("stem")
    stem.prune([0, 5])
    bn = stem.batch_normalization
    before = [np.asarray(w) for w in bn.weights]
    converted.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    x = _x(model, n=16)
    converted.fit(x, np.arange(16) % 4, epochs=2, batch_size=8, verbose=0)
    after = [np.asarray(w) for w in bn.weights]
    gamma0, beta0, mean0, _ = before
    gamma1, beta1, mean1, _ = after
    assert not np.allclose(mean0, mean1)  # moving statistics updated
    live = np.setdiff1d(np.arange(8), [0, 5])
    assert not np.allclose(gamma0[live], gamma1[live])  # gamma learned
    np.testing.assert_array_equal(gamma0[[0, 5]], gamma1[[0, 5]])  # no gradient when pruned
    np.testing.assert_array_equal(beta0[[0, 5]], beta1[[0, 5]])
    out = np.asarray(keras.Model(converted.inputs, stem.output)(x, training=True))
    assert np.all(out[..., [0, 5]] == 0)


def test_concat_depthwise_and_hidden_dense_conversion():
    model = concat_depthwise()
    converted = convert(model, dense=True)
    x = _x(model)
    assert _max_diff(model, converted, x) <= 1e-5
    assert type(converted.get_layer("conv_a")) is fp.MaskedConv2D
    assert type(converted.get_layer("conv_b")) is fp.MaskedConv2D
    assert type(converted.get_layer("dw")) is fp.layers.MaskedDepthwiseConv2D  # issue 12
    assert type(converted.get_layer("fc")) is fp.MaskedDense
    # "logits" feeds the output through a parameter-free Activation: it is the classifier.
    assert type(converted.get_layer("logits")) is keras.layers.Dense
    with_classifier = convert(model, dense=True, classifier=True)
    assert type(with_classifier.get_layer("logits")) is fp.MaskedDense
    assert _max_diff(model, with_classifier, x) <= 1e-5
    only = convert(model, layer_names=["conv_b"])
    assert type(only.get_layer("conv_a")) is keras.layers.Conv2D
    assert type(only.get_layer("conv_b")) is fp.MaskedConv2D


def test_converted_model_prunes_by_layer_name():
    model = concat_depthwise()
    converted = convert(model)
    x = _x(model)
    converted.get_layer("conv_a").prune([0, 3])
    probe = keras.Model(converted.inputs, converted.get_layer("conv_a").output)
    out = np.asarray(probe(x))
    assert np.all(out[..., [0, 3]] == 0) and np.any(out[..., 1] != 0)
    assert _max_diff(model, converted, x) > 0


@pytest.mark.parametrize("task", models.TASKS)
def test_task_models_round_trip_through_a_plain_twin(task):
    masked = models.build(task, preset="cpu", seed=3)
    layer = models.pruned_layer(masked)
    layer.prune(np.arange(0, layer.channels, 4))
    # A stock-Keras twin of the task topology (what a supplier would ship) ...
    twin = export.to_plain(masked)
    assert not fp.layers.masked_layers(twin)
    x = _x(masked, n=4)
    assert _max_diff(masked, twin, x) <= 1e-5
    # ... converts back to the task model's layer types, with all masks open.
    back = convert(twin, dense=True)
    for original, again in zip(masked.layers, back.layers, strict=True):
        assert original.name == again.name and type(original) is type(again)
    assert all(m.mask.all() for m in fp.layers.masked_layers(back))
    assert _max_diff(masked, back, x) <= 1e-5
    # Converting an already masked model is a copy that keeps the masks.
    again = convert(masked)
    np.testing.assert_array_equal(models.pruned_layer(again, task).mask, layer.mask)
    assert _max_diff(masked, again, x) == 0.0


def test_sequential_and_shared_multi_input_models():
    seq = keras.Sequential(
        [
            keras.Input((8, 8, 1), name="pixels"),
            keras.layers.Conv2D(3, 3, activation="relu", name="c"),
            keras.layers.Flatten(name="f"),
            keras.layers.Dense(2, name="d"),
        ],
        name="seq",
    )
    converted = convert(seq)
    assert converted.name == "seq" and converted.layers[0].name == "pixels"
    assert [layer.name for layer in converted.layers[1:]] == ["c", "f", "d"]
    x = _x(seq)
    assert _max_diff(seq, converted, x) <= 1e-5

    # A siamese model: one Conv2D called on two inputs, a multi-input Add.
    left, right = keras.Input((6, 6, 2), name="left"), keras.Input((6, 6, 2), name="right")
    shared = keras.layers.Conv2D(4, 3, activation="relu", name="shared")
    merged = keras.layers.Add(name="add")([shared(left), shared(right)])
    out = keras.layers.Dense(2, name="out")(keras.layers.Flatten()(merged))
    siamese = keras.Model([left, right], out, name="siamese")
    converted = convert(siamese)
    assert len(converted.get_layer("shared")._inbound_nodes) == 2
    assert [t.name for t in converted.inputs] == ["left", "right"]
    xs = [np.random.default_rng(s).standard_normal((4, 6, 6, 2)).astype("float32") for s in (1, 2)]
    np.testing.assert_allclose(converted(xs), siamese(xs), atol=1e-5)


class _Backdoor(keras.layers.Layer):
    def call(self, x):
        return x


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(2, 3)

    def call(self, x):
        return self.conv(x)


def test_refusals_name_the_problem():
    inputs = keras.Input((8, 8, 3))
    with pytest.raises(ConversionError, match=r"'trojan'.*_Backdoor"):
        convert(keras.Model(inputs, keras.layers.Conv2D(2, 3)(_Backdoor(name="trojan")(inputs))))
    lam = keras.layers.Lambda(lambda t: t * 2.0, name="evil")(inputs)
    with pytest.raises(ConversionError, match=r"'evil' \(Lambda\)"):
        convert(keras.Model(inputs, keras.layers.Conv2D(2, 3)(lam)))
    nhwc = keras.Input((3, 8, 8))
    first = keras.layers.Conv2D(2, 3, data_format="channels_first", name="cf")(nhwc)
    with pytest.raises(ConversionError, match=r"'cf'.*channels_first"):
        convert(keras.Model(nhwc, first))
    # Grouped convolutions convert since issue 12 (tests/test_conv_kinds.py).
    vector = keras.Input((4,))
    dense_only = keras.Model(vector, keras.layers.Dense(2)(vector))
    with pytest.raises(ConversionError, match="no Conv2D"):
        convert(dense_only)
    sub = _Subclassed()
    sub(np.zeros((1, 8, 8, 3), "float32"))
    with pytest.raises(ConversionError, match="subclassed"):
        convert(sub)
    with pytest.raises(ConversionError, match="not built"):
        convert(keras.Sequential([keras.layers.Conv2D(2, 3)]))
    with pytest.raises(ConversionError, match="not convertible"):
        convert(concat_depthwise(), layer_names=["flatten"])


def test_graph_helper_lists_nodes_topologically():
    graph = fp_convert.FunctionalGraph(models.build("face", preset="cpu", seed=0))
    order = [node.name for node in graph.nodes]
    assert order.index("pool3") < order.index("conv4") < order.index("flatten_conv4")
    assert {n.name for n in graph.consumers[id(graph.nodes[order.index("pool3")].outputs[0])]} == {
        "conv4",
        "flatten_pool3",
    }


def _backbone(name="backbone"):
    inputs = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="block_1_expand")(x)
    x = keras.layers.Add(name="add")([x, y])
    return keras.Model(inputs, x, name=name)


def _nested_x(n=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 12, 12, 3)).astype("float32")


def test_backbone_as_a_layer_is_flattened_with_traceable_names():
    backbone = _backbone()
    _randomize_bn(backbone, seed=2)
    sequential = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            backbone,
            keras.layers.GlobalAveragePooling2D(name="gap"),
            keras.layers.Dense(5, activation="softmax", name="head"),
        ],
        name="transfer",
    )
    inputs = keras.Input((12, 12, 3))
    frozen = backbone(inputs, training=False)  # the Keras transfer-learning guide's pattern
    functional = keras.Model(
        inputs,
        keras.layers.Dense(5, name="head")(keras.layers.GlobalAveragePooling2D(name="gap")(frozen)),
    )
    x = _nested_x()
    for model in (sequential, functional):
        converted = convert(model)
        names = [layer.name for layer in converted.layers]
        assert "backbone.block_1_expand" in names
        assert len(set(names)) == len(names)
        assert isinstance(converted.get_layer("backbone.stem"), fp.MaskedConv2D)
        # The BN is fused into its conv and keeps its traceable name there.
        assert converted.get_layer("backbone.stem").batch_normalization.name == "backbone.bn"
        assert not any(isinstance(layer, keras.Model) for layer in converted.layers)
        np.testing.assert_allclose(np.asarray(converted(x)), np.asarray(model(x)), atol=1e-6)
        # training=True too: the frozen backbone's BN stays in inference mode, the other's not.
        np.testing.assert_allclose(
            np.asarray(converted(x, training=True)), np.asarray(model(x, training=True)), atol=1e-5
        )
    # Pruning the flattened backbone works as on any model.
    converted.get_layer("backbone.block_1_expand").prune([0, 3])
    assert not np.allclose(np.asarray(converted(x)), np.asarray(functional(x)), atol=1e-6)


def test_two_level_nesting_and_shared_layers_and_shared_backbones():
    inner = _backbone("inner")
    middle_in = keras.Input((12, 12, 3))
    middle = keras.Model(
        middle_in, keras.layers.Conv2D(4, 1, name="proj")(inner(middle_in)), name="middle"
    )
    left, right = keras.Input((12, 12, 3), name="left"), keras.Input((12, 12, 3), name="right")
    shared = keras.layers.Conv2D(4, 1, name="shared")
    a, b = shared(middle(left)), shared(middle(right))  # one backbone for both inputs
    out = keras.layers.Dense(3, name="head")(
        keras.layers.GlobalAveragePooling2D(name="gap")(
            keras.layers.Concatenate(name="cat")([a, b])
        )
    )
    model = keras.Model([left, right], out, name="siamese")
    x = [_nested_x(seed=1), _nested_x(seed=2)]
    flat = flatten_nested(model)
    names = [layer.name for layer in flat.layers]
    assert "middle.inner.block_1_expand" in names and "middle.proj" in names
    assert len(set(names)) == len(names)
    graph = Graph(flat)
    assert graph.calls_per_layer[id(flat.get_layer("middle.inner.stem"))] == 2  # still shared
    assert graph.calls_per_layer[id(flat.get_layer("shared"))] == 2
    np.testing.assert_allclose(np.asarray(flat(x)), np.asarray(model(x)), atol=1e-6)
    converted = convert(model)
    np.testing.assert_allclose(np.asarray(converted(x)), np.asarray(model(x)), atol=1e-6)
    assert flat.get_layer("middle.inner.stem").kernel is not inner.get_layer("stem").kernel
