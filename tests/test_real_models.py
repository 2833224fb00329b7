"""The library on models defenders actually have (issue 12): keras.applications networks with
``weights=None`` and small inputs, and hand-built production patterns."""

import re

import keras
import numpy as np
import pytest

from fineprune_tf import convert, models
from tests.zoo_models import backbone_as_layer

A = keras.applications


@pytest.fixture(scope="module")
def zoo():
    """Built once per module (~15 s on 2 cores together)."""
    return {
        "MobileNetV3Small": A.MobileNetV3Small(
            input_shape=(32, 32, 3), weights=None, classes=10, include_preprocessing=False
        ),
        "ResNet50": A.ResNet50(input_shape=(32, 32, 3), weights=None, classes=10),
        "MobileNetV2": A.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10),
    }


@pytest.mark.parametrize(
    "name, layer, why",
    [
        # Before issue 12: 'logits', the 10-class classifier conv.
        (
            "MobileNetV3Small",
            "conv_2",
            r"on every input-to-output path; not the classifier conv "
            r"'logits' \(10 channels\)",
        ),
        # Before: 'conv1_conv', the stem (the only conv no skip connection bypasses).
        ("ResNet50", "conv5_block3_3_conv", r"1 weighted layer from the output, the last of 4"),
        ("MobileNetV2", "Conv_1", r"1 weighted layer from the output, on every"),
    ],
)
def test_default_layer_of_keras_applications(zoo, name, layer, why):
    choice = models.default_layer(zoo[name])
    assert choice.name == layer
    assert choice.reason.startswith(f"{layer!r} (")
    assert re.search(why, choice.reason), choice.reason
    assert models.last_conv_layer(zoo[name]) == layer


@pytest.mark.parametrize("task", models.TASKS)
def test_default_layer_of_the_paper_models_is_the_papers(task):
    choice = models.default_layer(models.build(task, preset="cpu"))
    assert choice.name == models.PRUNED_LAYER[task]
    assert "on every input-to-output path" in choice.reason


def _conv_head(classes: int, head_width: int) -> keras.Model:
    """conv body -> 1x1 conv head of ``head_width`` -> GAP -> softmax, the MobileNet pattern."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="body1")(inputs)
    x = keras.layers.Conv2D(7, 3, activation="relu", name="body2")(x)
    x = keras.layers.Conv2D(head_width, 1, name="head")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    if head_width != classes:
        x = keras.layers.Dense(classes)(x)
    return keras.Model(inputs, keras.layers.Activation("softmax")(x))


def test_a_conv_feeding_the_output_is_the_classifier_never_the_default():
    choice = models.default_layer(_conv_head(classes=5, head_width=5))
    assert choice.name == "body2"
    assert "not the classifier conv 'head' (5 channels)" in choice.reason
    # The same conv followed by a Dense is a hidden layer, and the closest to the output.
    assert models.default_layer(_conv_head(classes=5, head_width=9)).name == "head"
    inputs = keras.Input((8, 8, 3))
    only_head = keras.Model(
        inputs,
        keras.layers.GlobalAveragePooling2D()(
            keras.layers.Conv2D(4, 1, activation="softmax", name="logits")(inputs)
        ),
    )
    with pytest.raises(ValueError, match=r"no prunable convolution layer before its classifier"):
        models.default_layer(only_head)


def test_residual_model_picks_the_last_block_not_the_stem():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    for block in range(2):
        y = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name=f"b{block}_a")(x)
        y = keras.layers.Conv2D(8, 3, padding="same", name=f"b{block}_b")(y)
        x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    choice = models.default_layer(keras.Model(inputs, outputs))
    assert choice.name == "b1_b"
    # stem, b0_b and b1_b are all 1 weighted layer from the output (identity skips); the stem
    # is on every path but its channels are summed into the later blocks.
    assert "the last of 3 at that distance" in choice.reason


def test_pointwise_dense_layers_are_candidates_and_a_flat_dense_is_not():
    # ConvNeXt's blocks are Dense layers on feature maps (pointwise convs), which convert
    # masks: the last block's, not the stem before them all, is the default.
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 2, strides=2, name="stem")(inputs)
    for block in range(2):
        y = keras.layers.LayerNormalization()(x)
        y = keras.layers.Dense(16, activation="gelu", name=f"b{block}_pointwise_1")(y)
        x = keras.layers.Add()([x, keras.layers.Dense(8, name=f"b{block}_pointwise_2")(y)])
    x = keras.layers.Dense(12, name="flat_hidden")(keras.layers.GlobalAveragePooling2D()(x))
    choice = models.default_layer(keras.Model(inputs, keras.layers.Dense(3)(x)))
    assert choice.name == "b1_pointwise_2"  # 2 weighted layers away; flat_hidden is no conv
    assert "2 weighted layers from the output" in choice.reason
    converted = convert(keras.Model(inputs, keras.layers.Dense(3)(x)))
    assert converted.get_layer(choice.name).channels == 8


def test_backbone_as_a_layer_mobilenetv2_converts_exactly_and_picks_its_last_conv(zoo):
    backbone = zoo["MobileNetV2"]
    features = keras.Model(backbone.inputs, backbone.get_layer("out_relu").output)
    transfer = backbone_as_layer(features, classes=4)
    choice = models.default_layer(transfer)
    assert choice.name == "backbone.Conv_1"
    converted = convert(transfer)
    assert converted.get_layer(choice.name).channels == 1280
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(converted(x)), np.asarray(transfer(x)), atol=1e-6)


_KINDS = {
    # kind: (input shape, layer factory); every kind's stock and masked class.
    "Conv1D": ((12, 2), lambda name: keras.layers.Conv1D(5, 3, name=name)),
    "Conv3D": ((6, 6, 6, 2), lambda name: keras.layers.Conv3D(5, 3, name=name)),
    "SeparableConv1D": ((12, 2), lambda name: keras.layers.SeparableConv1D(5, 3, name=name)),
    "SeparableConv2D": ((8, 8, 2), lambda name: keras.layers.SeparableConv2D(5, 3, name=name)),
    "DepthwiseConv1D": (
        (12, 2),
        lambda name: keras.layers.DepthwiseConv1D(3, depth_multiplier=2, name=name),
    ),
    "DepthwiseConv2D": (
        (8, 8, 2),
        lambda name: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name=name),
    ),
}


@pytest.mark.parametrize("masked", [False, True], ids=["stock", "masked"])
@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_every_conv_kind_gets_a_default_layer(kind, masked):
    # Before: "model ... has no Conv2D layer" for all of these.
    shape, make = _KINDS[kind]
    inputs = keras.Input(shape)
    x = make("first")(inputs)
    x = keras.layers.Activation("relu")(make("second")(x))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    if masked:
        model = convert(model)
        assert type(model.get_layer("second")).__name__ == f"Masked{kind}"
    choice = models.default_layer(model)
    assert choice.name == "second"
    # Depthwise layers have no ``filters``: 2 input channels x depth_multiplier 2 twice.
    channels = 8 if kind.startswith("Depthwise") else 5
    assert choice.reason.startswith(f"'second' ({channels} channels)"), choice.reason


def test_a_grouped_conv_counts_as_a_weighted_layer():
    # A grouped 1x1 conv as the classifier: ``body`` is one weighted layer from the output, not
    # the classifier (before: distance 0, so "no prunable ... (the classifier convs ['body'])").
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="body")(inputs)
    x = keras.layers.Conv2D(4, 1, groups=2, name="grouped_head")(x)
    outputs = keras.layers.Activation("softmax")(keras.layers.GlobalAveragePooling2D()(x))
    choice = models.default_layer(keras.Model(inputs, outputs))
    assert choice.name == "body"
    assert "1 weighted layer from the output" in choice.reason
    assert "not the classifier" not in choice.reason


def test_a_model_without_convolutions_is_refused_in_one_line():
    dense_only = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"has no convolution layer \(Conv1D/2D/3D"):
        models.default_layer(dense_only)
