"""The static analysis of a model's graph around the pruned layer ``L``: which calls form the
prefix, the per-channel region, the linear frontier and the per-step rest (see
:mod:`fineprune_tf.curves` for the method).  Channel roles come from the graph registry."""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from fineprune_tf.curves.result import CurvePlanInfo
from fineprune_tf.graph import Graph, GraphNode, Role, node_role, static_shape
from fineprune_tf.graph.cost import node_multiply_adds
from fineprune_tf.layers import MaskedLayerMixin


@dataclasses.dataclass
class _PInfo:
    """Where a per-channel tensor's elements come from.

    ``channel_map``: int32, the tensor's per-sample shape, the pruned layer's channel of each
    element.  ``channels_last``: the last axis *is* that channel axis.
    """

    channel_map: np.ndarray
    channels_last: bool


@dataclasses.dataclass
class _Piece:
    """A slice ``[start, stop)`` of a frontier Dense layer's input features."""

    tensor: Any
    kind: str  # "p" (per-channel), "const" (mask-independent) or "dyn" (per step)
    start: int
    stop: int
    columns: np.ndarray | None = None  # "p": int32 [C, S], the features of each channel


@dataclasses.dataclass
class _Frontier:
    node: GraphNode
    layer: keras.layers.Layer
    kind: str  # "dense" or "conv"
    pieces: list[_Piece]
    u_shape: tuple[int, ...]  # per-sample pre-activation shape


def size(tensor: Any) -> int:
    """Elements per sample of a symbolic tensor (0 if its shape is not fully known)."""
    shape = static_shape(tensor)
    return int(np.prod(shape)) if shape is not None else 0


def _flops(gnode: GraphNode) -> float:
    """FLOPs (2 x multiply-adds, :mod:`fineprune_tf.graph.cost`) of one call per sample."""
    return 2.0 * node_multiply_adds(gnode)


def _channels_last_map(shape: tuple[int, ...], channels: int) -> np.ndarray | None:
    if not shape or shape[-1] != channels:
        return None
    return np.broadcast_to(np.arange(channels, dtype=np.int32), shape).copy()


def _per_channel_output(gnode: GraphNode, info: _PInfo, channels: int) -> _PInfo | None:
    """The channel map of ``gnode``'s output if it acts per channel on its input, else None:
    ``g(a * m) = where(m, g(a), g(0))`` holds channel by channel (inference mode)."""
    out_shape = static_shape(gnode.outputs[0])
    if out_shape is None or not gnode.is_single_tensor_call():
        return None
    role = node_role(gnode)
    if role is Role.ELEMENTWISE:
        return info if out_shape == info.channel_map.shape else None
    if role is Role.RESHAPE:
        # Row-major reshapes keep every element's channel.
        if int(np.prod(out_shape)) != info.channel_map.size:
            return None
        channel_map = info.channel_map.reshape(out_shape)
        pattern = _channels_last_map(out_shape, channels)
        return _PInfo(channel_map, pattern is not None and np.array_equal(pattern, channel_map))
    if role is Role.SPATIAL:
        if not info.channels_last:
            return None
        pattern = _channels_last_map(out_shape, channels)
        return None if pattern is None else _PInfo(pattern, True)
    return None


def _channel_columns(channel_map: np.ndarray, channels: int) -> np.ndarray | None:
    """int32 ``[C, S]``: the flat positions of each channel, if every channel has ``S``."""
    flat = channel_map.reshape(-1)
    counts = np.bincount(flat, minlength=channels)
    if counts.min() != counts.max() or counts[0] == 0:
        return None
    return np.argsort(flat, kind="stable").reshape(channels, -1).astype(np.int32)


def _plain_linear(op: Any) -> bool:
    return not getattr(op, "lora_enabled", False) and getattr(op, "quantization_mode", None) is None


def _dense_ok(op: Any) -> bool:
    return isinstance(op, keras.layers.Dense) and _plain_linear(op)


def _conv_ok(op: Any) -> bool:
    return (
        isinstance(op, keras.layers.Conv2D)
        and _plain_linear(op)
        and op.groups == 1
        and op.data_format == "channels_last"
    )


class _Plan:
    """The decomposition of ``model`` around ``layer`` (one call of it)."""

    def __init__(self, model: keras.Model, layer: MaskedLayerMixin):
        self.layer = layer
        # The graph is used while planning only: the plan keeps its nodes and producers but not
        # the Graph, which holds the model (a plan is cached weakly keyed by its model, in
        # curves.engine; a strong reference back would keep every model alive).
        graph = self._graph(model, layer)
        self.nodes = graph.nodes
        self.input, self.output = graph.inputs[0], graph.outputs[0]
        self.channels = layer.channels
        self.dtype = tf.as_dtype(layer.compute_dtype)
        self.producer = graph.producer
        self.kinds, self.pinfo = self._classify()
        self.frontiers = self._frontiers()
        self._demand()
        l_out = self.layer_node.outputs[0]
        # Nodes of the per-channel region needed for T1, and of the prefix.
        self.p_nodes = graph.ancestors(self.t1, stop=lambda t: t is l_out)
        prefix_targets = [self.layer_node.inputs[0], *self.rest_consts, *self.u0_consts]
        self.prefix_nodes = graph.ancestors(prefix_targets)
        self.mode = "incremental" if self.frontier_list else "batched-masks"

    # -- analysis steps

    def _graph(self, model: keras.Model, layer: MaskedLayerMixin) -> Graph:
        try:
            graph = Graph(model)
        except ValueError as error:
            raise ValueError(
                f"pruning_curve needs a functional or built Sequential model: {error}"
            ) from error
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise ValueError(
                f"pruning_curve needs a model with one input and one output; "
                f"{model.name!r} has {len(graph.inputs)} and "
                f"{len(graph.outputs)}"
            )
        own = graph.nodes_of(layer)
        if len(own) != 1:
            raise ValueError(
                f"layer {layer.name!r} is called {len(own)} times in the model "
                "graph; pruning curves need a layer called exactly once (a layer "
                "inside a nested model is not supported)"
            )
        self.layer_node = own[0]
        if not self.layer_node.is_single_tensor_call():
            raise ValueError(f"layer {layer.name!r} must be called on a single tensor")
        if static_shape(self.layer_node.outputs[0]) is None:
            raise ValueError(f"layer {layer.name!r} has an output of unknown shape")
        return graph

    def _classify(self) -> tuple[dict[int, str], dict[int, _PInfo]]:
        """Kinds of every tensor: "const" (independent of the mask), "p" (per-channel function
        of L's output, with its channel map), "dyn" (anything else depending on the mask)."""
        kinds: dict[int, str] = {id(self.input): "const"}
        pinfo: dict[int, _PInfo] = {}
        l_out = self.layer_node.outputs[0]
        for gnode in self.nodes:
            if gnode is self.layer_node:
                kinds[id(l_out)] = "p"
                pinfo[id(l_out)] = _PInfo(
                    _channels_last_map(static_shape(l_out), self.channels), True
                )
                continue
            ins = gnode.inputs
            if all(kinds.get(id(t)) == "const" for t in ins):
                kinds.update({id(t): "const" for t in gnode.outputs})
                continue
            out_info = None
            if len(ins) == 1 and kinds.get(id(ins[0])) == "p":
                out_info = _per_channel_output(gnode, pinfo[id(ins[0])], self.channels)
            for t in gnode.outputs:
                kinds[id(t)] = "p" if out_info is not None else "dyn"
                if out_info is not None:
                    pinfo[id(t)] = out_info
        return kinds, pinfo

    def _frontiers(self) -> dict[int, _Frontier]:
        """Frontier layers: linear layers whose input is (partly) per-channel."""
        frontiers = {}
        for gnode in self.nodes:
            if gnode is self.layer_node or self.kinds[id(gnode.outputs[0])] != "dyn":
                continue
            frontier = self._frontier(gnode)
            if frontier is not None:
                frontiers[id(gnode)] = frontier
        return frontiers

    def _demand(self) -> None:
        """Demand analysis from the output: which nodes run per step, which per-channel
        tensors are rebuilt (``materialized``), which constants the prefix must provide, and
        the per-channel tensors kept per sample (``t1``)."""
        rest: dict[int, GraphNode] = {}
        materialized: dict[int, Any] = {}
        rest_consts: dict[int, Any] = {}
        u0_consts: dict[int, Any] = {}
        used: dict[int, _Frontier] = {}
        seen: set[int] = set()
        stack = [self.output]
        while stack:
            t = stack.pop()
            if id(t) in seen:
                continue
            seen.add(id(t))
            kind = self.kinds[id(t)]
            if kind == "const":
                rest_consts[id(t)] = t
                continue
            if kind == "p":
                materialized[id(t)] = t
                continue
            gnode = self.producer[id(t)]
            rest[id(gnode)] = gnode
            frontier = self.frontiers.get(id(gnode))
            if frontier is None:
                stack.extend(gnode.inputs)
                continue
            used[id(gnode)] = frontier
            for piece in frontier.pieces:
                if piece.kind == "dyn":
                    stack.append(piece.tensor)
                elif piece.kind == "const":
                    u0_consts[id(piece.tensor)] = piece.tensor
        self.rest_nodes = sorted(rest.values(), key=lambda g: g.index)
        self.frontier_list = sorted(used.values(), key=lambda f: f.node.index)
        self.materialized = list(materialized.values())
        self.rest_consts = list(rest_consts.values())
        self.u0_consts = list(u0_consts.values())
        t1: dict[int, Any] = dict(materialized)
        for frontier in self.frontier_list:
            t1.update({id(p.tensor): p.tensor for p in frontier.pieces if p.kind == "p"})
        self.t1 = list(t1.values())
        self.t1_index = {id(t): i for i, t in enumerate(self.t1)}

    def _frontier(self, gnode: GraphNode) -> _Frontier | None:
        op = gnode.layer
        if not gnode.is_single_tensor_call():
            return None
        x = gnode.inputs[0]
        u_shape = static_shape(gnode.outputs[0])
        if u_shape is None:
            return None
        if _conv_ok(op):
            info = self.pinfo.get(id(x))
            if self.kinds[id(x)] == "p" and info.channels_last and static_shape(x) is not None:
                return _Frontier(gnode, op, "conv", [_Piece(x, "p", 0, size(x))], u_shape)
            return None
        if not _dense_ok(op) or len(x.shape) != 2:
            return None
        if self.kinds[id(x)] == "p":
            columns = _channel_columns(self.pinfo[id(x)].channel_map, self.channels)
            if columns is None:
                return None
            return _Frontier(gnode, op, "dense", [_Piece(x, "p", 0, size(x), columns)], u_shape)
        pieces = self._concat_pieces(x)
        if pieces is None:
            return None
        return _Frontier(gnode, op, "dense", pieces, u_shape)

    def _concat_pieces(self, x: Any) -> list[_Piece] | None:
        """The pieces of a Dense input built by a ``Concatenate`` of rank-2 tensors, at least
        one per-channel (DeepID's ``deepid`` layer); None otherwise."""
        concat = self.producer.get(id(x))
        if concat is None or node_role(concat) is not Role.CONCAT:
            return None
        parts = concat.inputs
        args, kwargs = concat.arguments()
        if (
            len(args) != 1
            or kwargs
            or any(len(t.shape) != 2 or static_shape(t) is None for t in parts)
        ):
            return None
        pieces, start = [], 0
        for t in parts:
            kind, columns = self.kinds[id(t)], None
            if kind == "p":
                columns = _channel_columns(self.pinfo[id(t)].channel_map, self.channels)
                if columns is None:
                    return None
            pieces.append(_Piece(t, kind, start, start + size(t), columns))
            start += size(t)
        if not any(p.kind == "p" for p in pieces) or start != int(x.shape[-1]):
            return None
        return pieces

    # -- costs

    def info(self) -> CurvePlanInfo:
        rest = 0.0
        frontier_flops = 0.0
        prefix = sum(_flops(n) for n in self.prefix_nodes) + _flops(self.layer_node)
        for gnode in self.rest_nodes:
            frontier = self.frontiers.get(id(gnode))
            if frontier is None:
                rest += _flops(gnode)
            elif frontier.kind == "conv":
                frontier_flops += _flops(gnode)
            else:
                units = frontier.layer.units
                for piece in frontier.pieces:
                    work = 2.0 * (piece.stop - piece.start) * units
                    if piece.kind == "p":
                        frontier_flops += work
                    elif piece.kind == "dyn":
                        rest += work
                    else:
                        prefix += work
        forward = sum(_flops(n) for n in self.nodes)
        materialized = sorted({self.producer[id(t)].layer.name for t in self.materialized})
        return CurvePlanInfo(
            mode=self.mode,
            frontier=tuple(f.layer.name for f in self.frontier_list),
            materialized=tuple(materialized),
            forward_flops=forward,
            prefix_flops=prefix,
            frontier_flops=frontier_flops,
            rest_flops=rest,
        )

    def bytes_per_sample(self) -> tuple[int, int]:
        """(chunk state per sample, per-step working set per sample), in bytes."""
        item = self.dtype.size
        u = sum(int(np.prod(f.u_shape)) for f in self.frontier_list)
        state = (
            item * (sum(size(t) for t in self.t1) + u + sum(size(t) for t in self.rest_consts))
            + self.channels
        )
        # Per step: the updated pre-activations and contributions, and every tensor of the
        # remaining layers (twice: inputs and outputs may be alive together).
        rest_tensors = sum(size(t) for gnode in self.rest_nodes for t in gnode.outputs)
        step = item * (
            3 * u
            + 2 * rest_tensors
            + sum(size(t) for t in self.materialized)
            + sum(size(t) for t in self.rest_consts)
        )
        return max(state, 1), max(step, 1)
