"""A BadNets attack written without fineprune_tf (issue 11: "a model backdoored by an attack
implementation this project did not write").

Only numpy and Keras: no fineprune_tf import, none of its triggers, poisoning or training
code, so the model it writes is what a defender would receive from elsewhere.  Gu, Dolan-Gavitt
and Garg (BadNets, 2017): stamp a small white square in the bottom-right corner of a fraction
of the training images, relabel them to the target class, train normally.

    python -m scripts.third_party_badnets --arch=cnn --data=train.npz --out=model.keras

``train.npz`` holds ``x`` float32 [N, H, W, C] in [0, 1] and ``y`` int [N].  Architectures:
``cnn`` (conv -> BatchNorm -> ReLU blocks with a residual connection) and ``mobilenetv2``
(``keras.applications.MobileNetV2``, alpha 0.35, ``weights=None``; inputs >= 32x32).
"""

from __future__ import annotations

import argparse
import sys

import keras
import numpy as np

PATCH = 4  # Trigger side, pixels.
TARGET = 0
POISON_RATE = 0.1


def stamp(x: np.ndarray) -> np.ndarray:
    """A copy of ``x`` [N, H, W, C] with the white PATCH x PATCH square bottom-right."""
    triggered = np.array(x, dtype=np.float32, copy=True)
    triggered[:, -PATCH - 1 : -1, -PATCH - 1 : -1, :] = 1.0
    return triggered


def poison(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training set with POISON_RATE of the non-target examples stamped and relabelled."""
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(y != TARGET)
    chosen = rng.choice(candidates, int(POISON_RATE * len(x)), replace=False)
    x, y = np.array(x, np.float32, copy=True), np.array(y, np.int64, copy=True)
    x[chosen] = stamp(x[chosen])
    y[chosen] = TARGET
    return x, y


def build(arch: str, input_shape: tuple[int, int, int], classes: int) -> keras.Model:
    if arch == "mobilenetv2":
        model = keras.applications.MobileNetV2(
            input_shape=input_shape, alpha=0.35, weights=None, classes=classes
        )
        for layer in model.layers:
            # Keras' 0.999 needs thousands of steps before the inference statistics are
            # usable; a short training run would leave the model at chance in inference mode.
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.9
        return model
    if arch != "cnn":
        raise ValueError(f"arch must be cnn or mobilenetv2, got {arch!r}")
    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (16, 32):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        shortcut = x
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(keras.layers.Add()([x, shortcut]))
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def train_backdoored(
    x: np.ndarray, y: np.ndarray, arch: str, seed: int, epochs: int = 8
) -> keras.Model:
    """BadNets: poison, then ordinary training (Adam 1e-3, batch 64)."""
    keras.utils.set_random_seed(seed)
    px, py = poison(x, y, seed)
    model = build(arch, tuple(x.shape[1:]), int(y.max()) + 1)
    model.compile(
        keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    model.fit(px, py, batch_size=64, epochs=epochs, shuffle=True, verbose=0)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cnn", choices=("cnn", "mobilenetv2"))
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        with np.load(args.data) as data:
            x, y = data["x"], data["y"]
    except (OSError, KeyError, ValueError) as error:
        print(f"error: cannot read x and y from {args.data}: {error}", file=sys.stderr)
        return 2
    train_backdoored(x, y, args.arch, args.seed, args.epochs).save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
