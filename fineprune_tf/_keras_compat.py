"""Every private Keras member fineprune_tf touches, in one place.

Keras 3 has no public API for a functional model's call graph (its nodes in execution order,
the arguments each layer was called with, the layer that produced a symbolic tensor), nor for
a few other things the library needs.  Each access below names the private member it reads,
why no public equivalent serves, and is exercised by ``tests/test_graph.py`` so that a Keras
upgrade that moves one fails there, with the member's name, instead of deep inside a defense.

Checked against Keras 3.15.1 (the version this repository is developed and tested with).
Packaging declares ``keras>=3.10,<4``; versions other than the checked one are expected to work
(these members have been stable through Keras 3) but are not verified: :func:`checked_version`
says whether the running Keras is the checked one.

TensorFlow's private members (``tf.distribute``'s ``_in_multi_worker_mode``, a ConcreteFunction's
``_arg_keywords``) are not Keras' and live with their callers.
"""

from __future__ import annotations

import functools
from typing import Any

import keras
from keras.src.models.functional import Functional  # no public class to test for "functional"

#: The Keras versions (major, minor) these accesses were checked against, inclusive.
CHECKED_KERAS = ((3, 15), (3, 15))


def checked_version(version: str | None = None) -> bool:
    """Whether ``version`` (default: the running Keras) lies in :data:`CHECKED_KERAS`."""
    parts = (version or keras.__version__).split(".")
    major_minor = (int(parts[0]), int(parts[1]))
    return CHECKED_KERAS[0] <= major_minor <= CHECKED_KERAS[1]


def functional_of(model: keras.Model) -> Any | None:
    """The ``Functional`` graph of a functional model or a built Sequential, else None.

    A built Sequential keeps its graph in the private ``_functional`` (None until built).
    """
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model if isinstance(model, Functional) else None


def nodes_in_order(functional: Any) -> list:
    """The graph's Keras ``Node``s, producers before consumers, input nodes left out.

    Reads the private ``_nodes_by_depth`` (Keras' own execution order; deepest first).
    """
    by_depth = functional._nodes_by_depth
    return [
        node
        for depth in sorted(by_depth, reverse=True)
        for node in by_depth[depth]
        if node.operation is not None and not node.is_input
    ]


def input_struct(model: keras.Model) -> Any:
    """The nested structure of the model's symbolic inputs (private ``_inputs_struct``; the
    public ``model.inputs`` is flattened)."""
    functional = functional_of(model) or model
    return getattr(functional, "_inputs_struct", None)


def output_struct(model: keras.Model) -> Any:
    """The nested structure of the model's symbolic outputs (private ``_outputs_struct``)."""
    functional = functional_of(model) or model
    return getattr(functional, "_outputs_struct", None)


def producing_operation(tensor: Any) -> Any:
    """The layer (an ``InputLayer`` for a model input) that produced a symbolic tensor
    (private ``_keras_history``)."""
    return tensor._keras_history.operation


def call_arguments(node: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` a node's layer was called with, tensors symbolic (``node.arguments``
    is public on the private ``Node`` class)."""
    return tuple(node.arguments.args), dict(node.arguments.kwargs)


def fill_in(node: Any, values: dict[int, Any]) -> tuple[tuple, dict]:
    """A node's call arguments with every symbolic tensor ``t`` replaced by ``values[id(t)]``."""
    args, kwargs = node.arguments.fill_in(values)
    return tuple(args), dict(kwargs)


def accepts_training(operation: Any) -> bool:
    """Whether a layer's ``call`` takes ``training=`` (private ``_call_context_args``, what
    ``Functional.call`` itself uses to pass it on)."""
    return "training" in getattr(operation, "_call_context_args", ())


def outbound_layers(layer: keras.layers.Layer) -> list:
    """Layers called on this layer's outputs, in any model (private ``_outbound_nodes``).
    Prefer :class:`fineprune_tf.graph.Graph`'s consumers, which are scoped to one model."""
    return [node.operation for node in layer._outbound_nodes]


def flatten_layers(model: keras.Model) -> list:
    """Every layer of ``model``, nested models' layers included (private ``_flatten_layers``)."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def assign_kernel(layer: keras.layers.Layer, value: Any) -> None:
    """Writes a Conv/Dense layer's stored kernel.  The public ``kernel`` property adds the LoRA
    update and cannot be assigned; the variable is the private ``_kernel``."""
    layer._kernel.assign(value)


def mask_variable(layer: Any) -> Any:
    """The mask weight of a ``fineprune_tf`` masked layer (public since 0.2)."""
    return layer.mask_variable


def masked_output(layer: Any, outputs: Any) -> Any:
    """A masked layer's activation + mask applied to its pre-activations ``outputs``
    (``MaskedLayerMixin._masked_output``), for code that computes the linear part itself."""
    return layer._masked_output(outputs)


def keras_symbol(dotted_name: str) -> Any:
    """The object Keras' deserializer resolves ``dotted_name`` (``"keras.layers.Dense"``) to, or
    None: ``keras.src.api_export.get_symbol_from_name``, Keras' own API-name table, so the
    loader checks exactly what Keras would build (no public lookup by name exists)."""
    from keras.src import api_export

    return api_export.get_symbol_from_name(dotted_name)


def model_classes() -> tuple[type, ...]:
    """Keras' model classes a ``.keras`` config may name: ``Functional`` and ``Sequential`` have
    no public class object to compare with (``keras.Sequential`` is public, ``Functional`` not)."""
    from keras.src.models import sequential

    return (Functional, sequential.Sequential, keras.Model)


@functools.cache
def arithmetic_operations() -> dict[type, str]:
    """The ``keras.ops`` classes Python arithmetic on symbolic tensors records (``x + 3.0`` is
    an ``Add`` node, ``x * y`` a ``Multiply`` node), mapped to "add", "subtract", "multiply" or
    "divide".  The classes live in the private ``keras.src.ops.numpy``: the public
    ``keras.ops.add`` is a function, and a functional graph's node holds the class instance."""
    from keras.src.ops import numpy as knp

    return {
        knp.Add: "add",
        knp.Subtract: "subtract",
        knp.Multiply: "multiply",
        knp.Divide: "divide",
        knp.TrueDivide: "divide",
    }


@functools.cache
def applications_channel_layers() -> dict[str, type]:
    """The per-channel helper layers of ``keras.applications`` ConvNeXt, by name:
    ``LayerScale`` (``x * gamma``, ``gamma`` of shape ``[projection_dim]``) and
    ``StochasticDepth`` (identity at inference; at training a per-sample scalar).  Defined in the
    private ``keras.src.applications.convnext`` with no public export; an empty dict if a
    Keras version moves them (they then stay unknown, i.e. barriers)."""
    try:
        from keras.src.applications import convnext
    except ImportError:
        return {}
    return {
        name: getattr(convnext, name)
        for name in ("LayerScale", "StochasticDepth")
        if isinstance(getattr(convnext, name, None), type)
    }
