"""The victim networks of Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018, §2.3), in Keras 3.

One functional model per task, in two presets that share topology and layer names:

* ``preset="paper"``: the published architectures.

  - ``face``: DeepID (Sun et al. 2014) as in Fig. 1 — input 55x47x3; conv1 20@4x4, pool1 2x2,
    conv2 40@3x3, pool2, conv3 60@3x3, pool3, conv4 80@2x2 (all convolutions unpadded, pools
    2x2/2); ``deepid = Dense(160)(concat(flatten(pool3), flatten(conv4)))``; ``softmax`` over
    1283 identities.  Sun et al.'s locally shared weights in conv3/conv4 are ordinary
    convolutions here, so that every channel is one prunable filter.
  - ``speech``: single-tower AlexNet (Krizhevsky 2012) on a 227x227x1 spectrogram image (our
    choice: AlexNet's canonical 227x227 crop, one channel because a spectrogram is grey-scale):
    conv1 96@11x11/4, pool1 3x3/2, conv2 256@5x5, pool2, conv3 384@3x3, conv4 384@3x3,
    conv5 256@3x3, pool5, fc6 4096, fc7 4096 (dropout 0.5 after each), fc8 over 10 digits.
  - ``traffic``: the ZF-net feature extractor of BadNets' Faster-RCNN (conv1 96@7x7/2, pool1
    3x3/2, conv2 256@5x5/2, pool2, conv3 384, conv4 384, conv5 256 @3x3) on 224x224x3 sign
    crops; ``pool5`` (3x3/2 on the 14x14 conv5 map) yields the same 6x6x256 map as F-RCNN's
    RoI pooling, followed by F-RCNN's three fully connected layers fc6 4096, fc7 4096 (dropout
    0.5), fc8 over 3 classes.  The region-proposal network is not needed on crops.
  - ``mnist``: BadNets' MNIST CNN (Gu et al. 2017): conv1 16@5x5, pool1 2x2, conv2 32@5x5,
    pool2 2x2, fc1 512, fc2 over 10 digits.

  Local response normalisation (AlexNet, ZF) is omitted: Keras has no LRN layer and it has no
  parameters, so parameter counts are unaffected.

* ``preset="cpu"``: the same graph (same layer names, same DeepID branch) with widths, kernels,
  strides and pool padding scaled to the repository's small default data, so that a model
  trains (:func:`default_training`, poisoned data) in about 10-50 s on 2 CPU cores.  The
  pruned layer (:data:`PRUNED_LAYER`) keeps 32-64 channels for a meaningful pruning curve.

Every convolution is a :class:`~fineprune_tf.layers.MaskedConv2D` with a fused ReLU (statistics
are of the ReLU output, which is what §3.1 ranks neurons by), every hidden fully connected
layer a :class:`~fineprune_tf.layers.MaskedDense` with ReLU, and the classifier a plain
``keras.layers.Dense`` with softmax.  Models output class probabilities ``[N, num_classes]``.

The default layer to prune in any model (:func:`default_layer`, :class:`LayerChoice`) lives in
:mod:`fineprune_tf.layer_choice` and is re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import keras
import numpy as np

from fineprune_tf.layer_choice import LayerChoice, default_layer, last_conv_layer
from fineprune_tf.layers import MaskedConv2D, MaskedDense
from fineprune_tf.recipes import SCHEDULES, compile_model, default_training, make_optimizer

__all__ = [
    "CLASSIFIER_LAYER",
    "PRESETS",
    "PRUNED_LAYER",
    "SCHEDULES",
    "TASKS",
    "Architecture",
    "ConvSpec",
    "PoolSpec",
    "architecture",
    "build",
    "compile_model",
    "LayerChoice",
    "default_layer",
    "default_training",
    "last_conv_layer",
    "make_optimizer",
    "pruned_layer",
]

TASKS = ("face", "speech", "traffic", "mnist")
PRESETS = ("paper", "cpu")

#: The layer whose channels the paper prunes (§3.1: the last convolutional layer of the shared
#: trunk; for DeepID that is conv3, which feeds both conv4 and the DeepID layer).
PRUNED_LAYER: dict[str, str] = {
    "face": "conv3",
    "speech": "conv5",
    "traffic": "conv5",
    "mnist": "conv2",
}

#: Name of the softmax classifier layer per task.
CLASSIFIER_LAYER: dict[str, str] = {
    "face": "softmax",
    "speech": "fc8",
    "traffic": "fc8",
    "mnist": "fc2",
}


@dataclass(frozen=True)
class ConvSpec:
    """A ReLU convolution (MaskedConv2D); ``kernel`` is (kh, kw)."""

    name: str
    filters: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: str = "valid"


@dataclass(frozen=True)
class PoolSpec:
    """A max-pooling layer."""

    name: str
    size: int
    strides: int
    padding: str = "valid"


@dataclass(frozen=True)
class Architecture:
    """A network description: ``trunk`` (convs and pools, in order), an optional ``branch``
    convolution applied to the trunk's output whose flattened output is concatenated with the
    flattened trunk output (DeepID's conv4), ``hidden`` (name, units) ReLU FC layers, each
    followed by a ``Dropout(dropout)`` layer unless ``dropout`` is None, then the softmax
    ``classifier``."""

    family: str
    trunk: tuple[ConvSpec | PoolSpec, ...]
    hidden: tuple[tuple[str, int], ...]
    classifier: str
    input_shape: tuple[int, int, int]
    num_classes: int
    branch: ConvSpec | None = None
    dropout: float | None = None


def _c(name, filters, kernel, strides=1, padding="valid") -> ConvSpec:
    return ConvSpec(
        name, filters, (kernel, kernel) if isinstance(kernel, int) else kernel, strides, padding
    )


# Paper presets: the published tables.
_PAPER: dict[str, Architecture] = {
    "face": Architecture(
        family="deepid",
        trunk=(
            _c("conv1", 20, 4),
            PoolSpec("pool1", 2, 2),
            _c("conv2", 40, 3),
            PoolSpec("pool2", 2, 2),
            _c("conv3", 60, 3),
            PoolSpec("pool3", 2, 2),
        ),
        branch=_c("conv4", 80, 2),
        hidden=(("deepid", 160),),
        classifier="softmax",
        input_shape=(55, 47, 3),
        num_classes=1283,
    ),
    "speech": Architecture(
        family="alexnet",
        trunk=(
            _c("conv1", 96, 11, 4),
            PoolSpec("pool1", 3, 2),
            _c("conv2", 256, 5, padding="same"),
            PoolSpec("pool2", 3, 2),
            _c("conv3", 384, 3, padding="same"),
            _c("conv4", 384, 3, padding="same"),
            _c("conv5", 256, 3, padding="same"),
            PoolSpec("pool5", 3, 2),
        ),
        hidden=(("fc6", 4096), ("fc7", 4096)),
        classifier="fc8",
        dropout=0.5,
        input_shape=(227, 227, 1),
        num_classes=10,
    ),
    "traffic": Architecture(
        family="zf_frcnn",
        trunk=(
            _c("conv1", 96, 7, 2, "same"),
            PoolSpec("pool1", 3, 2, "same"),
            _c("conv2", 256, 5, 2, "same"),
            PoolSpec("pool2", 3, 2, "same"),
            _c("conv3", 384, 3, padding="same"),
            _c("conv4", 384, 3, padding="same"),
            _c("conv5", 256, 3, padding="same"),
            PoolSpec("pool5", 3, 2),
        ),
        hidden=(("fc6", 4096), ("fc7", 4096)),
        classifier="fc8",
        dropout=0.5,
        input_shape=(224, 224, 3),
        num_classes=3,
    ),
    "mnist": Architecture(
        family="badnets_mnist",
        trunk=(
            _c("conv1", 16, 5),
            PoolSpec("pool1", 2, 2),
            _c("conv2", 32, 5),
            PoolSpec("pool2", 2, 2),
        ),
        hidden=(("fc1", 512),),
        classifier="fc2",
        input_shape=(28, 28, 1),
        num_classes=10,
    ),
}

# CPU presets: same names and graph, sized for the default data of fineprune_tf.data.
_CPU: dict[str, Architecture] = {
    # DeepID is already small and the default face data has the paper's 55x47x3 input: only
    # the number of identities differs.
    "face": replace(_PAPER["face"], num_classes=40),
    # 32x13 MFCC images: AlexNet's 11x11/4 conv1 and unpadded pools would collapse the
    # 13-wide axis, so conv1 is 5x5/2 and every conv and pool is "same"-padded
    # (32x13 -> conv1 16x7 -> pool1 8x4 -> pool2 4x2 -> pool5 2x1).
    "speech": Architecture(
        family="alexnet",
        trunk=(
            _c("conv1", 32, 5, 2, "same"),
            PoolSpec("pool1", 3, 2, "same"),
            _c("conv2", 64, 5, padding="same"),
            PoolSpec("pool2", 3, 2, "same"),
            _c("conv3", 96, 3, padding="same"),
            _c("conv4", 96, 3, padding="same"),
            _c("conv5", 64, 3, padding="same"),
            PoolSpec("pool5", 3, 2, "same"),
        ),
        # Dropout layers kept (same graph as AlexNet) but off: with 10 % poisoned inputs and the
        # all-to-all policy, dropout 0.3 left the test ASR at ~0.82 after 20 epochs, vs ~0.9.
        hidden=(("fc6", 256), ("fc7", 256)),
        classifier="fc8",
        dropout=0.0,
        input_shape=(32, 13, 1),
        num_classes=10,
    ),
    # 32x32 crops: ZF's kernels and strides unchanged, with Caffe's padded pools ("same"):
    # 32 -> conv1 16 -> pool1 8 -> conv2 4 -> pool2 2 -> conv3-5 2 -> pool5 1; only the widths
    # shrink.  The unpadded 3x3/2 pool5 of the paper preset would collapse a 2x2 map.
    "traffic": Architecture(
        family="zf_frcnn",
        trunk=(
            _c("conv1", 32, 7, 2, "same"),
            PoolSpec("pool1", 3, 2, "same"),
            _c("conv2", 64, 5, 2, "same"),
            PoolSpec("pool2", 3, 2, "same"),
            _c("conv3", 96, 3, padding="same"),
            _c("conv4", 96, 3, padding="same"),
            _c("conv5", 64, 3, padding="same"),
            PoolSpec("pool5", 3, 2, "same"),
        ),
        hidden=(("fc6", 128), ("fc7", 128)),
        classifier="fc8",
        dropout=0.3,
        input_shape=(32, 32, 3),
        num_classes=3,
    ),
    # BadNets' MNIST CNN trains in seconds as published.
    "mnist": _PAPER["mnist"],
}

_ARCHITECTURES = {"paper": _PAPER, "cpu": _CPU}


def _check_task_preset(task: str, preset: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")


def architecture(task: str, preset: str = "cpu") -> Architecture:
    """The :class:`Architecture` description :func:`build` uses for ``task`` and ``preset``."""
    _check_task_preset(task, preset)
    return _ARCHITECTURES[preset][task]


def _out_size(size: int, kernel: int, strides: int, padding: str) -> int:
    # Keras/TF conventions: "same" -> ceil(n / s); "valid" -> floor((n - k) / s) + 1.
    if padding == "same":
        return math.ceil(size / strides)
    return (size - kernel) // strides + 1


def _spatial_shapes(
    arch: Architecture, input_shape: tuple[int, int, int], where: str
) -> dict[str, tuple[int, int]]:
    """Output (H, W) of every spatial layer; raises if a layer's output would be empty."""
    h, w = input_shape[:2]
    shapes: dict[str, tuple[int, int]] = {}

    def step(spec: ConvSpec | PoolSpec, h: int, w: int) -> tuple[int, int]:
        if isinstance(spec, ConvSpec):
            (kh, kw), s = spec.kernel, spec.strides
        else:
            kh = kw = spec.size
            s = spec.strides
        oh, ow = _out_size(h, kh, s, spec.padding), _out_size(w, kw, s, spec.padding)
        if oh < 1 or ow < 1:
            raise ValueError(
                f"{where}: input shape {tuple(input_shape)} is too small: layer {spec.name!r} "
                f"({kh}x{kw}/{s}, padding {spec.padding!r}) would map its {h}x{w} input to "
                f"{oh}x{ow}. Use a larger input or the other preset."
            )
        shapes[spec.name] = (oh, ow)
        return oh, ow

    for spec in arch.trunk:
        h, w = step(spec, h, w)
    if arch.branch is not None:
        step(arch.branch, h, w)
    return shapes


def _layer_seeds(seed: int | None, count: int) -> list[int | None]:
    if seed is None:
        return [None] * count
    # Distinct per-layer seeds: an integer-seeded Keras initializer repeats its values, so one
    # seed shared by all layers would give equal-shaped layers identical weights.
    states = np.random.SeedSequence(int(seed)).generate_state(count)
    return [int(s) & 0x7FFFFFFF for s in states]


def build(
    task: str,
    preset: str = "cpu",
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
    seed: int | None = None,
) -> keras.Model:
    """Builds the functional Keras model for ``task``.

    Args:
      task: ``"face"``, ``"speech"``, ``"traffic"`` or ``"mnist"``.
      preset: ``"paper"`` (published architecture) or ``"cpu"`` (same graph, scaled down).
      num_classes: classifier width; defaults to the preset's (paper: 1283/10/3/10, cpu:
        40/10/3/10, matching ``fineprune_tf.data``'s default data).
      input_shape: ``(H, W, C)``; defaults to the preset's (paper: 55x47x3, 227x227x1,
        224x224x3, 28x28x1; cpu: 55x47x3, 32x13x1, 32x32x3, 28x28x1).
      seed: makes the initial weights (and dropout masks' seeds) deterministic; None draws
        them from Keras' global random state (``keras.utils.set_random_seed``).

    Returns:
      A model mapping float32 ``[N, H, W, C]`` to softmax probabilities ``[N, num_classes]``,
      named ``f"{task}_{preset}"``.

    Raises:
      ValueError: unknown task or preset, malformed ``input_shape`` or ``num_classes``, or an
        input too small for the architecture (the message names the layer that collapses).
    """
    arch = architecture(task, preset)
    where = f"models.build({task!r}, preset={preset!r})"
    if input_shape is None:
        input_shape = arch.input_shape
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or not all(
        isinstance(d, (int, np.integer)) and d > 0 for d in input_shape
    ):
        raise ValueError(
            f"{where}: input_shape must be 3 positive integers (H, W, C), got {input_shape}"
        )
    input_shape = tuple(int(d) for d in input_shape)
    if num_classes is None:
        num_classes = arch.num_classes
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"{where}: num_classes must be an integer >= 2, got {num_classes!r}")
    _spatial_shapes(arch, input_shape, where)

    weighted = [s for s in arch.trunk if isinstance(s, ConvSpec)]
    n_layers = len(weighted) + (arch.branch is not None) + len(arch.hidden) * 2 + 1
    seeds = iter(_layer_seeds(seed, n_layers))

    def conv(spec: ConvSpec) -> MaskedConv2D:
        return MaskedConv2D(
            spec.filters,
            spec.kernel,
            strides=spec.strides,
            padding=spec.padding,
            activation="relu",
            kernel_initializer=keras.initializers.HeUniform(next(seeds)),
            name=spec.name,
        )

    inputs = keras.Input(shape=input_shape, name="input")
    x = inputs
    for spec in arch.trunk:
        if isinstance(spec, ConvSpec):
            x = conv(spec)(x)
        else:
            x = keras.layers.MaxPooling2D(
                spec.size, spec.strides, padding=spec.padding, name=spec.name
            )(x)
    if arch.branch is not None:
        # DeepID: the last pool feeds both the branch conv and, directly, the DeepID layer, so
        # the 160-unit layer sees two scales of features (Sun et al. 2014, Fig. 1).
        branch = conv(arch.branch)(x)
        x = keras.layers.Concatenate(name="concat")(
            [
                keras.layers.Flatten(name=f"flatten_{arch.trunk[-1].name}")(x),
                keras.layers.Flatten(name=f"flatten_{arch.branch.name}")(branch),
            ]
        )
    else:
        x = keras.layers.Flatten(name="flatten")(x)
    for name, units in arch.hidden:
        x = MaskedDense(
            units,
            activation="relu",
            name=name,
            kernel_initializer=keras.initializers.HeUniform(next(seeds)),
        )(x)
        dropout_seed = next(seeds)
        if arch.dropout is not None:
            x = keras.layers.Dropout(
                arch.dropout, seed=dropout_seed, name=f"drop{name.removeprefix('fc')}"
            )(x)
    outputs = keras.layers.Dense(
        int(num_classes),
        activation="softmax",
        name=arch.classifier,
        kernel_initializer=keras.initializers.GlorotUniform(next(seeds)),
    )(x)
    return keras.Model(inputs, outputs, name=f"{task}_{preset}")


def pruned_layer(model: keras.Model, task: str | None = None) -> MaskedConv2D:
    """The layer the paper prunes (:data:`PRUNED_LAYER`) in a model from :func:`build`.

    ``task`` defaults to the prefix of the model's name (``"face_cpu"`` -> ``"face"``).
    """
    if task is None:
        task = model.name.split("_", 1)[0]
        if task not in PRUNED_LAYER:
            raise ValueError(
                f"cannot infer the task from model name {model.name!r}; pass task= one of "
                f"{', '.join(TASKS)}"
            )
    elif task not in PRUNED_LAYER:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    layer = model.get_layer(PRUNED_LAYER[task])
    if not isinstance(layer, MaskedConv2D):
        raise TypeError(f"layer {layer.name!r} of {model.name!r} is not a MaskedConv2D")
    return layer
