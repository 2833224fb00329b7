"""The user's inputs: the model loaded safely, checked and converted to masked layers, the layer
to prune, and the clean data split into the defender's part and the part reported on."""

from __future__ import annotations

import os
from collections.abc import Callable

import keras
import numpy as np

from fineprune_tf import conversion, io, model_io, models
from fineprune_tf.cleaning.errors import CleaningError
from fineprune_tf.data.user import UserData, label_outputs
from fineprune_tf.layer_choice import CONVOLUTIONS

__all__ = ["check_model", "choose_layer", "choose_output", "load_masked", "split_clean_data"]


def load_masked(
    model_path: str | os.PathLike,
    allow_unsafe: bool,
    load_limits: io.LoadLimits | None,
    progress: Callable[[str], None],
    output: str | None = None,
    clean_data: str | os.PathLike | None = None,
) -> keras.Model:
    """The user's model loaded safely, checked and converted to masked layers.  ``output``
    (``--model_output``) and the labels of ``clean_data`` tell which output the defense reads
    (:func:`choose_output`)."""
    progress(
        f"loading {model_path} ("
        + ("allow_unsafe: refusals skipped, limits kept" if allow_unsafe else "safe mode")
        + ")"
    )
    loaded = io.load_model(model_path, allow_unsafe=allow_unsafe, limits=load_limits)
    if not isinstance(loaded, io.SavedModelPredictor) and clean_data is not None:
        output = choose_output(loaded, output, clean_data)
    check_model(loaded, output)
    try:
        return conversion.convert(loaded)  # Flattens nested models: backbone.<layer>.
    except conversion.ConversionError as error:
        raise CleaningError(str(error)) from None


def choose_output(
    model: keras.Model, requested: str | None, clean_data: str | os.PathLike
) -> str | None:
    """The name of the output the defense reads (None for a single-output model)."""
    names = model_io.output_names(model)
    if requested is not None:
        if requested not in names:
            raise CleaningError(f"--model_output {requested!r} is not an output; outputs: {names}")
        return requested
    if len(names) == 1:
        return None
    labelled = [name for name in label_outputs(clean_data) if name in names]
    if len(labelled) > 1:
        raise CleaningError(
            f"the clean data labels the outputs {labelled}: name the one the defense reads "
            "with --model_output"
        )
    if labelled:
        return labelled[0]
    try:
        return names[model_io.output_index(model)]
    except ValueError as error:
        raise CleaningError(str(error).replace("output=... in Python, ", "")) from None


def check_model(
    model: keras.Model | io.SavedModelPredictor, output: str | None = None
) -> tuple[tuple[int, ...] | dict[str, tuple[int, ...]], int]:
    """``(input shape, classes)`` of a model whose inputs have fixed shapes (``[T, C]``
    sequences, ``[H, W, C]`` images or ``[D, H, W, C]`` volumes, channels last; with several
    inputs, ``{input name: shape}``, any fixed shape) and whose output read (``output``, else
    the only classification head) is ``[N, classes >= 2]``; raises :class:`CleaningError` for
    any other."""
    if isinstance(model, io.SavedModelPredictor):
        raise CleaningError(
            "this SavedModel has no Keras model inside (no model.keras): it can be evaluated "
            "but its channels cannot be pruned or fine-tuned; export it from Keras as .keras"
        )
    shapes = {
        name: tuple(t.shape[1:])
        for name, t in zip(model_io.input_names(model), model.inputs, strict=True)
    }
    if len(shapes) == 1:
        input_shape = next(iter(shapes.values()))
        if not 2 <= len(input_shape) <= 4 or None in input_shape:
            raise CleaningError(
                f"the model's input shape {input_shape} is not a fixed [T, C], [H, W, C] or "
                "[D, H, W, C]"
            )
    else:
        unfixed = {name: shape for name, shape in shapes.items() if None in shape or not shape}
        if unfixed:
            raise CleaningError(f"the model's inputs {unfixed} have no fixed shape")
        input_shape = shapes
    try:
        index = model_io.output_index(model, output)
    except ValueError as error:
        raise CleaningError(str(error)) from None
    tensor = model.outputs[index]
    classes = tensor.shape[-1]
    if classes is None or len(tensor.shape) != 2 or classes < 2:
        raise CleaningError(
            f"the model's output {model_io.output_names(model)[index]!r} has shape "
            f"{tuple(tensor.shape)}, not [N, classes] with at least 2 classes"
        )
    return input_shape, int(classes)


def choose_layer(model: keras.Model, layer: str | None, progress: Callable[[str], None]) -> str:
    """The layer to prune in the converted ``model`` (nested models are flattened by then, so a
    backbone's layer is ``backbone.<name>``; ``backbone/<name>`` is accepted too)."""
    convs = [lay.name for lay in model.layers if isinstance(lay, CONVOLUTIONS)]
    if not convs:
        raise CleaningError(
            "the model has no convolution layer (Conv1D/2D/3D, separable or depthwise): "
            "there are no channels to prune"
        )
    if layer is None:
        try:
            choice = models.default_layer(model)
        except ValueError as error:
            raise CleaningError(str(error)) from None
        progress(f"layer: {choice.reason} (give --layer to choose another)")
        return choice.name
    names = [lay.name for lay in model.layers]
    if layer not in names and layer.replace("/", ".") in names:
        layer = layer.replace("/", ".")
    if layer not in names:
        raise CleaningError(f"--layer {layer!r} does not exist; conv layers: {convs}")
    if layer not in convs:
        kind = type(model.get_layer(layer)).__name__
        raise CleaningError(
            f"--layer {layer!r} is a {kind}, not a conv layer; conv layers: {convs}"
        )
    return layer


def split_clean_data(data: UserData, fraction: float, seed: int) -> tuple[tuple, tuple]:
    """``((x, y) kept for the defense, (x, y) held out to report on)``: a seeded permutation
    with ``fraction`` of the examples held out."""
    order = np.random.default_rng(seed).permutation(len(data.y))
    count = int(round(len(order) * fraction))
    if fraction > 0 and (count < 1 or len(order) - count < 2):
        raise CleaningError(
            f"clean data has {len(order)} examples: too few to hold out "
            f"{fraction:.0%} for evaluation"
        )
    held, kept = order[:count], order[count:]
    return (model_io.take(data.x, kept), data.y[kept]), (model_io.take(data.x, held), data.y[held])
