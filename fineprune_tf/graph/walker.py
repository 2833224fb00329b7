"""The call graph of a functional Keras model: nodes in order, producers, consumers, inputs.

Every other module that needs a model's structure (curves, shrink/export, conversion, the
defenses' activation read-out, the default pruned layer) walks a :class:`Graph` rather than
Keras' private node tables (those are read once, in :mod:`fineprune_tf._keras_compat`).

Designed to be the base of dependency groups (Torch-Pruning's DepGraph builds its groups from
the same three facts: each node's inputs and outputs and each operation's type, with
inter-layer edges producer -> consumer and intra-layer edges in -> out for channel-passing
operations; here the edges are the tensors and the types are :func:`node_role`).  A nested
model is one node today; flattening it only changes how :class:`Graph` collects its nodes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import keras
import numpy as np

from fineprune_tf import _keras_compat as compat
from fineprune_tf.graph.errors import ConversionError
from fineprune_tf.graph.registry import Role, role_of

__all__ = ["Graph", "GraphNode", "node_role", "static_shape"]


def static_shape(tensor: Any) -> tuple[int, ...] | None:
    """Per-sample shape of a symbolic tensor (batch axis dropped), or None if any is unknown."""
    dims = tuple(tensor.shape[1:])
    if any(d is None for d in dims):
        return None
    return tuple(int(d) for d in dims)


@dataclasses.dataclass(eq=False)
class GraphNode:
    """One call of a layer (or Keras operation) in a functional graph.

    Attributes:
      index: position in :attr:`Graph.nodes` (a topological order).
      layer: the called layer / operation.
      node: Keras' ``Node`` for that call (use the methods below rather than its fields).
      inputs: the flat list of symbolic input tensors (``KerasTensor``), in call order.
      outputs: the flat list of symbolic output tensors.
    """

    index: int
    layer: Any
    node: Any
    inputs: list
    outputs: list

    @property
    def name(self) -> str:
        return self.layer.name

    def arguments(self) -> tuple[tuple, dict]:
        """The call's ``(args, kwargs)``, tensors symbolic."""
        return compat.call_arguments(self.node)

    def fill_in(self, values: dict[int, Any]) -> tuple[tuple, dict]:
        """The call's ``(args, kwargs)`` with each symbolic tensor ``t`` -> ``values[id(t)]``."""
        return compat.fill_in(self.node, values)

    def is_single_tensor_call(self) -> bool:
        """One positional tensor argument, one output, and as keywords at most ``training``
        and a None ``mask`` (what Keras records for BatchNormalization)."""
        args, kwargs = self.arguments()
        return (
            len(args) == 1
            and len(self.inputs) == 1
            and args[0] is self.inputs[0]
            and set(kwargs) <= {"training", "mask"}
            and kwargs.get("mask") is None
            and len(self.outputs) == 1
        )

    def run(self, values: dict[int, Any]) -> list:
        """Runs the call on concrete tensors ``values`` (by symbolic tensor id), in inference
        mode as ``Functional.call`` does; returns the flat outputs."""
        args, kwargs = self.fill_in(values)
        if compat.accepts_training(self.layer):
            kwargs = dict(kwargs, training=False)
        return keras.tree.flatten(self.layer(*args, **kwargs))


def _is_symbolic(value: Any) -> bool:
    return isinstance(value, keras.KerasTensor)


def _per_channel_constant(value: Any, tensor: Any) -> bool:
    """A Python / numpy number, or a numpy array that broadcasts against ``tensor`` along the
    channel axis only: shape ``()``, ``(1, ..., 1)`` or ``(1, ..., 1, C)``, rank at most the
    tensor's (so it never widens the tensor)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number, np.ndarray)):
        return False
    shape = np.shape(value)
    if len(shape) > len(tensor.shape) or any(d != 1 for d in shape[:-1]):
        return False
    return not shape or shape[-1] in (1, tensor.shape[-1])


def _arithmetic_role(gnode: GraphNode) -> Role:
    """The role of a bare ``keras.ops`` arithmetic call (``x + 3.0``, ``x * (1 / 6)``,
    ``x * y``: what Python operators on symbolic tensors record, e.g. MobileNetV3's
    hard-sigmoid).

    ELEMENTWISE for add / subtract / multiply / divide of either two tensors (like the
    ``Add`` / ``Multiply`` layers: channel ``c`` of the output is a function of channel ``c`` of
    each) or one tensor and a per-channel constant (:func:`_per_channel_constant`) that does not
    change its shape.  Whether a pruned channel stays exactly 0 through it (``x + 3`` maps 0 to
    3, ``x * f(x)`` keeps 0) is not decided here: shrink carries each removed channel's
    constant through the call and folds it into the consumer (:mod:`fineprune_tf.export`).
    Division by a tensor is OPAQUE (a pruned divisor is a division by zero), as is any other
    operation."""
    kind = compat.arithmetic_operations().get(type(gnode.layer))
    args, kwargs = gnode.arguments()
    if kind is None or kwargs or len(args) != 2 or len(gnode.outputs) != 1:
        return Role.OPAQUE
    symbolic = [_is_symbolic(a) for a in args]
    if kind == "divide" and symbolic[1]:
        return Role.OPAQUE
    if all(symbolic):
        return Role.ELEMENTWISE
    if not any(symbolic):
        return Role.OPAQUE
    tensor, constant = (args[0], args[1]) if symbolic[0] else (args[1], args[0])
    if tuple(tensor.shape) != tuple(gnode.outputs[0].shape):
        return Role.OPAQUE
    return Role.ELEMENTWISE if _per_channel_constant(constant, tensor) else Role.OPAQUE


def node_role(gnode: GraphNode) -> Role:
    """The registry's :func:`~fineprune_tf.graph.role_of` for this call, made OPAQUE when the
    call does not act on the last axis (BatchNormalization / Concatenate on another axis).  A
    bare ``keras.ops`` call is ELEMENTWISE when it is per-channel arithmetic
    (:func:`_arithmetic_role`), else OPAQUE."""
    layer = gnode.layer
    if not isinstance(layer, keras.layers.Layer):
        return _arithmetic_role(gnode)
    role = role_of(layer)
    axis = getattr(layer, "axis", None)
    if role in (Role.ELEMENTWISE, Role.CONCAT) and isinstance(axis, int):
        rank = len((gnode.outputs[0] if role is Role.CONCAT else gnode.inputs[0]).shape)
        if axis not in (-1, rank - 1):
            return Role.OPAQUE
    return role


class Graph:
    """The call graph of a functional (or built Sequential) Keras model.

    Nodes are listed producers before consumers, in Keras' own execution order.  Tensors are
    identified by ``id(KerasTensor)``.

    Raises:
      ConversionError: ``model`` is not a Keras model, is subclassed (no functional graph) or is
        an unbuilt Sequential.
    """

    def __init__(self, model: keras.Model):
        if not isinstance(model, keras.Model):
            raise ConversionError(f"expected a keras.Model, got {type(model).__name__}")
        functional = compat.functional_of(model)
        if functional is None:
            if isinstance(model, keras.Sequential):
                raise ConversionError(
                    f"Sequential model {model.name!r} is not built (it has no Input): build "
                    "it (or give it a keras.Input) before converting it"
                )
            raise ConversionError(
                f"model {model.name!r} is a subclassed model ({type(model).__name__}): its "
                "graph is Python code, not a functional graph, so its layers cannot be "
                "re-wired. Rebuild it as a functional or Sequential model."
            )
        self.model = model
        self.inputs: list = list(functional.inputs)
        self.outputs: list = list(functional.outputs)
        self.nodes: list[GraphNode] = [
            GraphNode(
                index=i,
                layer=node.operation,
                node=node,
                inputs=list(node.input_tensors),
                outputs=list(node.outputs),
            )
            for i, node in enumerate(compat.nodes_in_order(functional))
        ]
        self.producer: dict[int, GraphNode] = {}
        self.consumers: dict[int, list[GraphNode]] = {}
        self.tensors: dict[int, Any] = {id(t): t for t in self.inputs}
        self.calls_per_layer: dict[int, int] = {}
        for gnode in self.nodes:
            for t in gnode.outputs:
                self.producer[id(t)] = gnode
                self.tensors[id(t)] = t
            for t in gnode.inputs:
                self.consumers.setdefault(id(t), []).append(gnode)
                self.tensors.setdefault(id(t), t)
            key = id(gnode.layer)
            self.calls_per_layer[key] = self.calls_per_layer.get(key, 0) + 1

    # -- structure

    @property
    def output_ids(self) -> set[int]:
        return {id(t) for t in self.outputs}

    @property
    def input_names(self) -> list[str]:
        """Names of the model's input layers, in ``model.inputs`` order."""
        return [compat.producing_operation(t).name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """Names of the layers producing the model's outputs."""
        return [compat.producing_operation(t).name for t in self.outputs]

    def layers(self) -> list:
        """Distinct called layers / operations, in first-call order."""
        seen: dict[int, Any] = {}
        for gnode in self.nodes:
            seen.setdefault(id(gnode.layer), gnode.layer)
        return list(seen.values())

    def nodes_of(self, layer: Any) -> list[GraphNode]:
        """Every call of ``layer`` in this graph, in order."""
        return [gnode for gnode in self.nodes if gnode.layer is layer]

    def consumers_of(self, tensor: Any) -> list[GraphNode]:
        return self.consumers.get(id(tensor), [])

    def producer_of(self, tensor: Any) -> GraphNode | None:
        """The node producing ``tensor``; None for a model input."""
        return self.producer.get(id(tensor))

    def producer_names(self) -> dict[str, list[str]]:
        """Layer name -> names of the layers (input layers included) producing its inputs, for
        the first call of each layer."""
        names: dict[str, list[str]] = {}
        for gnode in self.nodes:
            names.setdefault(gnode.name, [compat.producing_operation(t).name for t in gnode.inputs])
        return names

    def ancestors(
        self, targets: Iterable[Any], stop: Callable[[Any], bool] = lambda t: False
    ) -> list[GraphNode]:
        """The nodes needed to compute ``targets`` (tensors), not looking past tensors for
        which ``stop`` is true (nor past model inputs), in topological order."""
        found: dict[int, GraphNode] = {}
        stack = [t for t in targets if not stop(t)]
        while stack:
            gnode = self.producer.get(id(stack.pop()))
            if gnode is None or id(gnode) in found:
                continue
            found[id(gnode)] = gnode
            stack.extend(u for u in gnode.inputs if not stop(u))
        return sorted(found.values(), key=lambda g: g.index)

    def chain_end(self, tensor: Any, follow: Callable[[GraphNode], bool]) -> Any:
        """Follows ``tensor`` through single consumers ``follow`` accepts (each with one input
        and one output), returning the last tensor of the chain."""
        while True:
            consumers = self.consumers_of(tensor)
            if (
                len(consumers) != 1
                or len(consumers[0].inputs) != 1
                or len(consumers[0].outputs) != 1
                or not follow(consumers[0])
            ):
                return tensor
            tensor = consumers[0].outputs[0]

    def distances_to_outputs(self, weight: Callable[[GraphNode], int]) -> dict[int, int]:
        """For every node (by :attr:`GraphNode.index`), the smallest total ``weight`` of the
        nodes *after* it on a path from its outputs to a model output (0 for a node producing
        an output).  Nodes that reach no output are left out.  ``weight`` counts what a path
        passes through, e.g. 1 for a weighted layer and 0 for pooling: the graph distance the
        default pruned layer is chosen by."""
        outputs = self.output_ids
        tensor_dist: dict[int, int] = {}
        node_dist: dict[int, int] = {}
        for gnode in reversed(self.nodes):
            here = [0 if id(t) in outputs else tensor_dist.get(id(t)) for t in gnode.outputs]
            here = [d for d in here if d is not None]
            if not here:
                continue
            node_dist[gnode.index] = min(here)
            through = node_dist[gnode.index] + weight(gnode)
            for t in gnode.inputs:
                tensor_dist[id(t)] = min(tensor_dist.get(id(t), through), through)
        return node_dist

    def on_every_path(self, layer: Any) -> bool:
        """Whether every path from a model input to a model output passes through a call of
        ``layer`` (the layer is not bypassed by a skip connection or a branch)."""
        blocked = {id(g) for g in self.nodes_of(layer)}
        inputs = {id(t) for t in self.inputs}
        stack, seen = list(self.outputs), set()
        while stack:
            t = stack.pop()
            if id(t) in inputs:
                return False
            if id(t) in seen:
                continue
            seen.add(id(t))
            gnode = self.producer.get(id(t))
            if gnode is not None and id(gnode) not in blocked:
                stack.extend(gnode.inputs)
        return True

    # -- rebuilding

    def rebuild(
        self, call: Callable[[GraphNode, tuple, dict], Any], name: str | None = None
    ) -> keras.Model:
        """Re-runs the graph symbolically on fresh ``keras.Input``s (same names, shapes, dtypes).

        ``call(gnode, args, kwargs)`` must return the new outputs of ``gnode`` given its new
        arguments (the original arguments with every symbolic tensor replaced by its new
        counterpart, non-tensor arguments such as ``training=`` unchanged).

        Returns a functional ``keras.Model`` with the original input / output structure.
        """
        tensor_map: dict[int, Any] = {}
        for t, input_name in zip(self.inputs, self.input_names, strict=True):
            tensor_map[id(t)] = keras.Input(batch_shape=t.shape, dtype=t.dtype, name=input_name)
        for gnode in self.nodes:
            args, kwargs = gnode.fill_in(tensor_map)
            outputs = keras.tree.flatten(call(gnode, args, kwargs))
            if len(outputs) != len(gnode.outputs):
                raise ConversionError(
                    f"layer {gnode.name!r}: rebuilt call returned {len(outputs)} outputs, "
                    f"expected {len(gnode.outputs)}"
                )
            for old, new in zip(gnode.outputs, outputs, strict=True):
                tensor_map[id(old)] = new
        inputs = keras.tree.map_structure(
            lambda t: tensor_map[id(t)], compat.input_struct(self.model)
        )
        outputs = keras.tree.map_structure(
            lambda t: tensor_map[id(t)], compat.output_struct(self.model)
        )
        return keras.Model(inputs, outputs, name=name or self.model.name)
