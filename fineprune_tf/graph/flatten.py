"""Nested models inlined into one functional graph.

The standard transfer-learning model is a backbone *used as a layer*
(``keras.Sequential([backbone, GlobalAveragePooling2D(), Dense(10)])``, or ``backbone(x,
training=False)`` in a functional head).  Such a model has one node for the whole backbone, so
nothing inside it can be converted, ranked or shrunk.  :func:`flatten_nested` rewrites it into a
single functional graph with the nested models' layers called directly.

Names: a layer of nested model ``backbone`` becomes ``backbone.<name>`` (``backbone.inner.<name>``
two levels down).  Keras refuses ``/`` in layer names, hence the dot.
"""

from __future__ import annotations

from typing import Any

import keras

from fineprune_tf import _keras_compat as compat
from fineprune_tf.graph.errors import ConversionError
from fineprune_tf.graph.walker import Graph, GraphNode

__all__ = ["SEPARATOR", "flatten_nested", "has_nested"]

#: Between a nested model's name and its layer's name in a flattened model.
SEPARATOR = "."


def has_nested(model: keras.Model | Graph) -> bool:
    """Whether any call of the model's graph is itself a Keras model."""
    graph = model if isinstance(model, Graph) else Graph(model)
    return any(isinstance(gnode.layer, keras.Model) for gnode in graph.nodes)


def _flat(struct: Any, default: list) -> list:
    return default if struct is None else keras.tree.flatten(struct)


class _Inliner:
    """Rebuilds a graph, inlining nested models; each original layer gets one copy (shared
    layers and nested models called twice stay shared)."""

    def __init__(self):
        self.copies: dict[int, tuple[Any, Any]] = {}  # id(original) -> (original, copy)
        self.names: set[str] = set()  # new names given so far

    def _copy(self, layer: Any, prefix: str) -> Any:
        if not isinstance(layer, keras.layers.Layer):
            return layer  # a stateless keras.ops operation
        if id(layer) not in self.copies:
            name = prefix + layer.name
            if name in self.names:
                raise ConversionError(
                    f"flattening nested models gives two layers named {name!r}; rename one"
                )
            self.names.add(name)
            config = dict(layer.get_config(), name=name)
            self.copies[id(layer)] = (layer, type(layer).from_config(config))
        return self.copies[id(layer)][1]

    def run(self, graph: Graph, tensor_map: dict[int, Any], prefix: str, inference: bool) -> None:
        """Runs ``graph``'s nodes on the new tensors in ``tensor_map`` (filled for its inputs),
        adding every output.  ``inference``: an enclosing call had ``training=False``."""
        for gnode in graph.nodes:
            args, kwargs = gnode.fill_in(tensor_map)
            if isinstance(gnode.layer, keras.Model):
                outputs = self._inline(gnode, args, kwargs, prefix, inference)
            else:
                if inference and compat.accepts_training(gnode.layer):
                    kwargs = dict(kwargs, training=False)
                outputs = keras.tree.flatten(self._copy(gnode.layer, prefix)(*args, **kwargs))
            for old, new in zip(gnode.outputs, outputs, strict=True):
                tensor_map[id(old)] = new

    def _inline(
        self, gnode: GraphNode, args: tuple, kwargs: dict, prefix: str, inference: bool
    ) -> list:
        inner = Graph(gnode.layer)
        extra = set(kwargs) - {"training", "mask"}
        if len(args) != 1 or extra or kwargs.get("mask") is not None:
            raise ConversionError(
                f"nested model {gnode.name!r} is called with arguments other than its inputs "
                "and training=; it cannot be flattened"
            )
        given = keras.tree.flatten(args[0])
        wanted = _flat(compat.input_struct(gnode.layer), inner.inputs)
        if len(given) != len(wanted):
            raise ConversionError(
                f"nested model {gnode.name!r} takes {len(wanted)} inputs, is called on {len(given)}"
            )
        tensor_map = {id(t): new for t, new in zip(wanted, given, strict=True)}
        inference = inference or kwargs.get("training") is False
        self.run(inner, tensor_map, prefix + gnode.name + SEPARATOR, inference)
        outputs = _flat(compat.output_struct(gnode.layer), inner.outputs)
        return [tensor_map[id(t)] for t in outputs]

    def copy_weights(self) -> None:
        for original, copy in self.copies.values():
            copy_layer_weights(original, copy)


def flatten_nested(model: keras.Model) -> keras.Model:
    """A copy of ``model`` with every nested Functional / Sequential model (at any depth)
    inlined: one functional graph computing the same outputs.

    Top-level layers keep their names; a layer of nested model ``m`` is named ``m.<name>``.
    Weights are copied (the result shares no variables with ``model``); a layer called several
    times (shared, or inside a nested model called several times) has one copy, called as
    often.  A nested model called with ``training=False`` (the frozen-backbone pattern) passes
    ``training=False`` to its layers' calls, so its BatchNormalization stays in inference mode
    when the flat model is fine-tuned, as it did before.

    Raises:
      ConversionError: a nested model that is subclassed or called with extra arguments, or
        two flattened layers with the same name (e.g. a top-level layer literally named
        ``backbone.conv``).
    """
    graph = Graph(model)
    inliner = _Inliner()
    tensor_map: dict[int, Any] = {}
    for t, input_name in zip(graph.inputs, graph.input_names, strict=True):
        tensor_map[id(t)] = keras.Input(batch_shape=t.shape, dtype=t.dtype, name=input_name)
    inliner.run(graph, tensor_map, prefix="", inference=False)
    inputs = keras.tree.map_structure(lambda t: tensor_map[id(t)], compat.input_struct(model))
    outputs = keras.tree.map_structure(lambda t: tensor_map[id(t)], compat.output_struct(model))
    flat = keras.Model(inputs, outputs, name=model.name)
    inliner.copy_weights()
    return flat


def copy_layer_weights(source: keras.layers.Layer, target: keras.layers.Layer) -> None:
    """``target.set_weights(source.get_weights())``, refusing a copy whose weights differ in
    number (a clone built from another configuration)."""
    weights = source.get_weights()
    if len(weights) != len(target.weights):
        raise ConversionError(
            f"layer {source.name!r}: the copy has {len(target.weights)} weights, the original "
            f"{len(weights)}"
        )
    target.set_weights(weights)
