"""Models with several inputs or outputs: their inputs as arrays, the output a defense reads, and
a one-input, one-output view of them that the defenses and the pruning-curve engine run on.

Inputs of a model with several inputs are given as a dict by input name
(``{"image": [N, H, W, C], "meta": [N, D]}``) or a list / tuple in ``model.inputs`` order; a
model with one input takes its array.  :func:`arrange_inputs` turns any of these into what the
model is called with, checking names, count, shapes and lengths.

A defense measures one output: the one the caller names, else the only classification head
(an output ``[N, K]`` with ``K >= 2``).  :func:`output_index` refuses an ambiguous model with
one line naming its heads.

:class:`PackedView` is the model seen as one input ``[N, D]`` (every input flattened and
concatenated, cast back to its dtype inside the view) and one output: the same layer objects,
so its layer names, weights and masks are the model's.  A defense runs on the view with packed
data, and :meth:`PackedView.restore` copies the defended view's weights and masks back into a
copy of the whole model (layers the view does not reach, e.g. another head, keep theirs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from fineprune_tf import _keras_compat as compat

__all__ = [
    "PackedView",
    "arrange_inputs",
    "input_names",
    "is_single_io",
    "matches_inputs",
    "num_examples",
    "output_index",
    "output_names",
    "select_labels",
    "take",
]


def input_names(model: keras.Model) -> list[str]:
    """Names of the model's inputs (their input layers' names, as in a served signature), in
    ``model.inputs`` order."""
    return [compat.producing_operation(tensor).name for tensor in model.inputs]


def output_names(model: keras.Model) -> list[str]:
    """Names of the model's outputs (their layers' names), in ``model.outputs`` order."""
    return [compat.producing_operation(tensor).name for tensor in model.outputs]


def is_single_io(model: keras.Model) -> bool:
    """Whether the model has one input and one output (what the defenses run on directly); a
    subclassed model without a functional graph counts as one (it is called as given)."""
    inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
    if inputs is None or outputs is None:
        return True
    return len(inputs) == 1 and len(outputs) == 1


def num_examples(x: Any) -> int:
    """Number of examples in an array or a dict / list of equally long arrays."""
    lengths = {len(value) for value in _leaves(x)}
    if len(lengths) != 1:
        raise ValueError(f"the inputs hold different numbers of examples. Received: {lengths}")
    return lengths.pop()


def _leaves(x: Any) -> list:
    if isinstance(x, Mapping):
        return [x[key] for key in x]
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def take(x: Any, index: Any) -> Any:
    """Rows ``index`` (an int array or a slice) of an array or of every array of a dict / list."""
    if isinstance(x, Mapping):
        return {key: np.asarray(value)[index] for key, value in x.items()}
    if isinstance(x, (list, tuple)):
        return [np.asarray(value)[index] for value in x]
    return np.asarray(x)[index]


def arrange_inputs(model: keras.Model, x: Any) -> Any:
    """``x`` as the model is called with it: its array (one input), else its arrays in the
    structure the model was built on (a dict by input name or a list); ``x`` may be a dict by
    input name, a list / tuple in ``model.inputs`` order, or an array.

    Raises ValueError naming the model's inputs when ``x`` does not fit them.
    """
    names = input_names(model)
    if isinstance(x, Mapping):
        unknown = sorted(set(x) - set(names))
        missing = [name for name in names if name not in x]
        if unknown or missing:
            raise ValueError(
                f"the inputs must be keyed by the model's input names {names}. Received: "
                f"{sorted(x)}"
            )
        arrays = [x[name] for name in names]
    elif isinstance(x, (list, tuple)):
        arrays = list(x)
    else:
        arrays = [x]
    if len(arrays) != len(names):
        raise ValueError(
            f"the model has {len(names)} input(s) {names}. Received: {len(arrays)} array(s)"
        )
    arrays = [np.asarray(array) for array in arrays]
    for name, array, spec in zip(names, arrays, model.inputs, strict=True):
        expected = tuple(spec.shape[1:])
        if array.ndim != len(spec.shape) or any(
            want is not None and got != want
            for got, want in zip(array.shape[1:], expected, strict=True)
        ):
            raise ValueError(
                f"input {name!r} takes examples of shape {expected}. Received: an array of "
                f"shape {array.shape}"
            )
    num_examples(arrays)
    if len(arrays) == 1:
        return arrays[0]
    return keras.tree.pack_sequence_as(model.input, arrays)  # the structure the model was built on


def matches_inputs(model: keras.Model, data: Any) -> bool:
    """Whether ``data`` (a dict, list or tuple) is the model's inputs rather than a data tuple
    such as ``(x, y)``: a dict keyed by the input names, or a sequence of as many arrays as the
    model has inputs whose shapes fit them (a model with several inputs only)."""
    if isinstance(data, Mapping):
        return set(data) == set(input_names(model))
    if len(model.inputs) < 2 or not isinstance(data, (list, tuple)):
        return False
    try:
        arrange_inputs(model, data)
    except (ValueError, TypeError):
        return False
    return True


def output_index(model: keras.Model, output: str | int | None = None) -> int:
    """Index in ``model.outputs`` of the output a defense reads.

    Args:
      output: an output name (its layer's name) or index; None: the only classification head
        (an output ``[N, K]``, ``K >= 2``).

    Raises:
      ValueError (one line): no such output, or None with no or several classification heads.
    """
    names = output_names(model)
    if output is not None:
        if isinstance(output, (int, np.integer)) and not isinstance(output, bool):
            if 0 <= output < len(names):
                return int(output)
        elif output in names:
            return names.index(output)
        raise ValueError(f"the model has no output {output!r}; its outputs are {names}")
    heads = [
        index
        for index, tensor in enumerate(model.outputs)
        if len(tensor.shape) == 2 and (tensor.shape[-1] or 0) >= 2
    ]
    if len(heads) == 1:
        return heads[0]
    if not heads:
        raise ValueError(
            f"none of the model's outputs {names} is a classification head [N, classes >= 2]"
        )
    raise ValueError(
        f"the model has {len(heads)} classification heads {[names[i] for i in heads]}: name "
        "the one the defense reads (output=... in Python, --model_output in the CLI)"
    )


def select_labels(model: keras.Model, y: Any, output: str | int | None = None) -> tuple[Any, int]:
    """``(labels of the output read, its index)``: ``y`` is the labels of that output, or a dict
    ``{output name: labels}`` (one entry, or the one named by ``output``)."""
    if not isinstance(y, Mapping):
        return y, output_index(model, output)
    names = output_names(model)
    unknown = sorted(set(y) - set(names))
    if unknown:
        raise ValueError(f"labels for outputs {unknown} the model does not have; outputs: {names}")
    if output is None:
        if len(y) != 1:
            raise ValueError(
                f"labels are given for the outputs {sorted(y)}: name the one the defense reads "
                "(output=... in Python, --model_output in the CLI)"
            )
        output = next(iter(y))
    index = output_index(model, output)
    if names[index] not in y:
        raise ValueError(f"no labels for output {names[index]!r}; labels given for {sorted(y)}")
    return y[names[index]], index


def _rerun(model: keras.Model, inputs: list, output: int) -> Any:
    """Output ``output`` of ``model``'s graph run on new ``inputs`` with the same layer objects
    (so the view shares names, weights and masks with the model)."""
    from fineprune_tf.graph.walker import Graph  # graph imports layers; keep this module light

    graph = Graph(model)
    tensors = {id(old): new for old, new in zip(graph.inputs, inputs, strict=True)}
    for gnode in graph.nodes:
        args, kwargs = gnode.fill_in(tensors)
        outputs = keras.tree.flatten(gnode.layer(*args, **kwargs))
        for old, new in zip(gnode.outputs, outputs, strict=True):
            tensors[id(old)] = new
    return tensors[id(graph.outputs[output])]


class PackedView:
    """``model`` seen as one float32 input ``[N, D]`` and one output (``model.outputs[output]``).

    Attributes:
      model: the original model; output: the index of the output read.
      view: the one-input, one-output Keras model; it shares ``model``'s layer objects.
      sizes: per input, its flattened size (the columns it takes in the packed input).
    """

    def __init__(self, model: keras.Model, output: str | int | None = None):
        self.model = model
        self.output = output_index(model, output)
        self.sizes = [math.prod(tensor.shape[1:]) for tensor in model.inputs]
        if any(size is None for size in self.sizes):
            raise ValueError(
                "every input needs a fixed shape to be packed. Received: "
                f"{[tuple(t.shape) for t in model.inputs]}"
            )
        taken = {layer.name for layer in model.layers}
        name = next(
            candidate
            for candidate in ("packed_inputs", *(f"packed_inputs_{i}" for i in range(1, 100)))
            if candidate not in taken
        )
        packed = keras.Input((sum(self.sizes),), name=name)
        parts, start = [], 0
        for tensor, size in zip(model.inputs, self.sizes, strict=True):
            part = keras.ops.reshape(packed[:, start : start + size], (-1, *tensor.shape[1:]))
            parts.append(part if tensor.dtype == "float32" else keras.ops.cast(part, tensor.dtype))
            start += size
        output_tensor = _rerun(model, parts, self.output)
        self.view = keras.Model(packed, output_tensor, name=f"{model.name}_view")

    def pack(self, x: Any) -> np.ndarray:
        """float32 ``[N, D]``: the model's inputs (see :func:`arrange_inputs`) side by side."""
        arrays = keras.tree.flatten(arrange_inputs(self.model, x))
        return np.concatenate(
            [np.asarray(a, np.float32).reshape(len(a), -1) for a in arrays], axis=1
        )

    def restore(self, defended: keras.Model) -> keras.Model:
        """A copy of the whole model carrying ``defended``'s weights and masks (``defended``:
        the view, or a copy of it a defense returned), layer by layer name."""
        copy = keras.models.clone_model(self.model)
        copy.set_weights(self.model.get_weights())
        by_name = {layer.name: layer for layer in defended.layers}
        for layer in copy.layers:
            source = by_name.get(layer.name)
            if source is not None and layer.weights:
                layer.set_weights(source.get_weights())
        return copy
