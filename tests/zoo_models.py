"""The models of the zoo test matrix (issue 12 point 7): ``keras.applications`` networks with
``weights=None`` and small inputs, and hand-built production patterns.  Each builder returns a
stock (unconverted) Keras model with deterministic weights; ``calibrate_batchnorm`` gives a
model's BatchNormalization layers the moving statistics of real-looking data, so that pruned
channels change the outputs (a random BN with unit moving variance blows logits up to ~1e2 in
ResNet50, where float rounding, not pruning, decides the comparison).
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from fineprune_tf import model_io

A = keras.applications
CLASSES = 10


def calibrate_batchnorm(model: keras.Model, x: np.ndarray, batches: int = 4) -> None:
    """Sets every BatchNormalization's moving mean and variance to the batch statistics of its
    input on ``x`` (``batches`` chunks, in graph order), like a short training pass would."""
    norms = [
        layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)
    ]
    for layer in norms:
        layer.momentum = 0.0
    count = len(next(iter(x.values())) if isinstance(x, dict) else x)
    for rows in np.array_split(np.arange(count), batches):
        model(model_io.take(x, rows), training=True)
    for layer in norms:
        layer.momentum = 0.99


def _all_layers(model: keras.Model) -> list:
    layers = []
    for layer in model.layers:
        layers.extend(_all_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return layers


def speech_conv1d(classes: int = CLASSES) -> keras.Model:
    """A keyword-spotting CNN on ``[32 frames, 9 MFCCs]``: a causal Conv1D, pooling, a Conv1D +
    BN + ReLU block (also trained end to end in tests/test_conv_zoo.py)."""
    inputs = keras.Input((32, 9), name="mfcc")
    x = keras.layers.Conv1D(16, 5, padding="causal", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling1D(2, name="pool1")(x)
    x = keras.layers.Conv1D(24, 3, use_bias=False, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.GlobalAveragePooling1D(name="gap")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="speech_conv1d")


def grouped_conv() -> keras.Model:
    """A ResNeXt-style block: 1x1 conv, grouped 3x3 conv (groups=4), 1x1 conv."""
    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="stem")(inputs)
    x = keras.layers.Conv2D(32, 1, activation="relu", name="reduce")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", groups=4, activation="relu", name="grouped")(x)
    x = keras.layers.Conv2D(24, 1, activation="relu", name="expand")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="grouped_conv")


def two_input() -> keras.Model:
    """An image + metadata-vector model: a conv branch and a dense branch, concatenated."""
    image = keras.Input((16, 16, 3), name="image")
    meta = keras.Input((6,), name="meta")
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="conv1")(image)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    m = keras.layers.Dense(8, activation="relu", name="meta_dense")(meta)
    x = keras.layers.Concatenate(name="joined")([x, m])
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="probs")(x)
    return keras.Model({"image": image, "meta": meta}, outputs, name="two_input")


def mobilenet_v2() -> keras.Model:
    return A.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=CLASSES)


def backbone_as_layer(backbone: keras.Model | None = None, classes: int = CLASSES) -> keras.Model:
    """The transfer-learning pattern: a feature extractor used as one layer, named "backbone"
    (default a MobileNetV2 0.35 without its top; tests/test_real_models.py passes its own)."""
    if backbone is None:
        backbone = A.MobileNetV2(
            input_shape=(32, 32, 3), alpha=0.35, weights=None, include_top=False
        )
    backbone = keras.Model(backbone.inputs, backbone.output, name="backbone")
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            backbone,
            keras.layers.GlobalAveragePooling2D(name="gap"),
            keras.layers.Dense(classes, activation="softmax", name="head"),
        ],
        name="transfer",
    )


#: name -> (builder, fast: runs in CI).  Input sizes are the smallest each network accepts
#: (Xception 71, the others 32).
MODELS: dict[str, tuple[Callable[[], keras.Model], bool]] = {
    "conv1d_audio": (speech_conv1d, True),
    "grouped_conv": (grouped_conv, True),
    "two_input": (two_input, True),
    "MobileNetV2": (mobilenet_v2, False),
    "backbone_as_layer": (backbone_as_layer, False),
    "ResNet50": (lambda: A.ResNet50(input_shape=(32, 32, 3), weights=None, classes=CLASSES), False),
    "ResNet50V2": (
        lambda: A.ResNet50V2(input_shape=(32, 32, 3), weights=None, classes=CLASSES),
        False,
    ),
    "EfficientNetB0": (
        lambda: A.EfficientNetB0(input_shape=(32, 32, 3), weights=None, classes=CLASSES),
        False,
    ),
    "DenseNet121": (
        lambda: A.DenseNet121(input_shape=(32, 32, 3), weights=None, classes=CLASSES),
        False,
    ),
    "MobileNetV3Small": (
        lambda: A.MobileNetV3Small(
            input_shape=(32, 32, 3), weights=None, classes=CLASSES, include_preprocessing=False
        ),
        False,
    ),
    "ConvNeXtTiny": (
        lambda: A.ConvNeXtTiny(
            input_shape=(32, 32, 3), weights=None, classes=CLASSES, include_preprocessing=False
        ),
        False,
    ),
    "Xception": (lambda: A.Xception(input_shape=(71, 71, 3), weights=None, classes=CLASSES), False),
    "NASNetMobile": (
        lambda: A.NASNetMobile(input_shape=(32, 32, 3), weights=None, classes=CLASSES),
        False,
    ),
}


def inputs_for(model: keras.Model, n: int, seed: int):
    """Seeded inputs in [0, 1] for ``model``: an array, or a dict by input name."""
    rng = np.random.default_rng(seed)
    arrays = {
        name: rng.uniform(0.0, 1.0, (n, *tensor.shape[1:])).astype("float32")
        for name, tensor in zip(model_io.input_names(model), model.inputs, strict=True)
    }
    return next(iter(arrays.values())) if len(arrays) == 1 else arrays
