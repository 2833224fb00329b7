"""Dependency groups: output channels of masked layers that are tied together by the graph, so
they can only be removed together (Torch-Pruning's DepGraph, VainF/Torch-Pruning,
``torch_pruning/dependency``, for Keras functional graphs).

Every channel of every tensor is a vertex; the graph registry's roles
(:mod:`fineprune_tf.graph.registry`) say which vertices are the same channel:

* element-wise layers (BatchNormalization, ReLU, Dropout, ...) tie input ``c`` to output ``c``;
  multi-input ones (``Add``, ``Multiply``, ... : residual streams, squeeze-excitation gates)
  tie channel ``c`` of every same-width input and of the output;
* spatial layers (pooling, padding, global pooling) tie ``c`` to ``c``; depthwise convolutions
  (and convolutions with ``groups`` equal to their input channels, ConvNeXt's) tie output
  ``c * m + k`` to input ``c`` (``m``: :func:`~fineprune_tf.graph.registry.channel_multiplier`);
* bare ``keras.ops`` arithmetic (``x + 3.0``, ``x * y``) is element-wise when
  :func:`~fineprune_tf.graph.node_role` says so; a channel's constant through it (0 + 3) is
  shrink's business, not the grouping's;
* ``Concatenate`` ties input ``i``'s channel ``c`` to output ``offset_i + c``;
* reshapes that keep the last axis tie ``c`` to ``c``; ``Flatten`` ties feature ``f`` to
  channel ``f mod C``;
* channel-mixing layers (conv, dense, separable) start new channels: their *input* channels
  are simply consumed, their outputs are new vertices.

A connected component is one *coupled channel*; the masked layers whose outputs lie in it are
what must be pruned together to remove it.  Unlike DepGraph, which treats unknown operations as
element-wise, an unknown (opaque), cross-channel or grouped consumer *blocks* the component:
shrink needs every channel there, so the group is reported with the reason and not removable.
(A grouped convolution's own outputs are removable, in equal numbers per group: shrink keeps
the first pruned ones of the smaller groups, as zeros.)

Components with the same masked layers (and the same number of channels in each) form one
:class:`ChannelGroup`: e.g. the residual stream of a ResNet stage, whose channel ``j`` is
channel ``j`` of every conv added into it.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import keras
import numpy as np

from fineprune_tf.graph.registry import Role, channel_multiplier
from fineprune_tf.graph.walker import Graph, GraphNode, node_role
from fineprune_tf.layers import MaskedLayerMixin

__all__ = ["ChannelGroup", "channel_groups"]


#: The reason :class:`ChannelGroup.blocked` gives for channels that reach a model output.
OUTPUT_REASON = "a model output"


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Output channels of masked layers that are removable only together.

    Attributes:
      members: layer name -> int64 ``[K, n]``: row ``j`` lists the ``n`` channels of that layer
        in coupled channel ``j`` (``n`` is 1 except for depthwise layers, ``depth_multiplier``).
      blocked: why these channels cannot be removed by :func:`fineprune_tf.export.shrink` even
        when every member is pruned (empty when they can): they reach a model output, come from
        a model input or a layer that is not masked, or feed a layer that needs every channel.
    """

    members: dict[str, np.ndarray]
    blocked: tuple[str, ...]

    @property
    def size(self) -> int:
        """``K``, the number of coupled channels."""
        return int(next(iter(self.members.values())).shape[0])

    @property
    def removable(self) -> bool:
        return not self.blocked

    @property
    def reaches_output(self) -> bool:
        """Whether these channels are (element-wise) a model output: pruning them changes
        the output's width, so defenses leave them alone."""
        return OUTPUT_REASON in self.blocked

    def prune(self, model: keras.Model, rows) -> None:
        """Prunes coupled channels ``rows`` (indices into ``[0, size)``) in every member."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        for name, channels in self.members.items():
            model.get_layer(name).prune(channels[rows].reshape(-1))


class _Channels:
    """Union-find over (tensor, channel) vertices, one integer id per vertex."""

    def __init__(self):
        self.base: dict[int, int] = {}
        self.parent: list[int] = []

    def ids(self, tensor: Any) -> np.ndarray | None:
        """The vertex ids of a tensor's channels (None when its width is unknown)."""
        width = tensor.shape[-1] if len(tensor.shape) >= 2 else None
        if width is None:
            return None
        if id(tensor) not in self.base:
            self.base[id(tensor)] = len(self.parent)
            self.parent.extend(range(len(self.parent), len(self.parent) + int(width)))
        start = self.base[id(tensor)]
        return np.arange(start, start + int(width))

    def find(self, v: int) -> int:
        root = v
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[v] != root:
            self.parent[v], v = root, self.parent[v]
        return root

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        for u, v in zip(a.tolist(), b.tolist(), strict=True):
            ru, rv = self.find(u), self.find(v)
            if ru != rv:
                self.parent[max(ru, rv)] = min(ru, rv)


def _tie_node(gnode: GraphNode, channels: _Channels) -> str | None:
    """Ties the channels ``gnode`` passes through; returns a blocking reason for its inputs
    when it needs all of them (an opaque / cross-channel / grouped layer), else None."""
    role = node_role(gnode)
    outs = [channels.ids(t) for t in gnode.outputs]
    ins = [channels.ids(t) for t in gnode.inputs]
    if role in (Role.MIXES,) and len(gnode.outputs) == 1:
        return None
    if len(outs) != 1 or outs[0] is None or any(i is None for i in ins):
        return f"{gnode.name} ({type(gnode.layer).__name__}) needs every channel"
    out = outs[0]
    if role is Role.ELEMENTWISE:
        for i in ins:
            if i.size == out.size:
                channels.tie(i, out)
            elif i.size != 1:  # a width-1 input broadcasts: it couples nothing
                return f"{gnode.name} mixes inputs of different widths"
        return None
    if role is Role.SPATIAL and len(ins) == 1:
        m = channel_multiplier(gnode.layer)
        if out.size != ins[0].size * m:
            return f"{gnode.name} changes the channel count"
        channels.tie(np.repeat(ins[0], m), out)
        return None
    if role is Role.CONCAT:
        channels.tie(np.concatenate(ins), out)
        return None
    if role is Role.RESHAPE and len(ins) == 1:
        if out.size == ins[0].size:
            channels.tie(ins[0], out)
            return None
        if out.size % ins[0].size == 0 and len(gnode.outputs[0].shape) == 2:  # a flatten
            channels.tie(np.tile(ins[0], out.size // ins[0].size), out)
            return None
    return f"{gnode.name} ({type(gnode.layer).__name__}, {role.value}) needs every channel"


def channel_groups(model: keras.Model | Graph) -> list[ChannelGroup]:
    """The dependency groups of ``model``'s masked layers (see the module docstring).

    Returns:
      One :class:`ChannelGroup` per set of coupled masked layers, in the order their first
      member is called; a masked layer not coupled to any other forms a group of its own.
      Shared masked layers (called more than once) are left out: one mask serves every call.
    """
    graph = model if isinstance(model, Graph) else Graph(model)
    channels = _Channels()
    blocked: dict[int, set[str]] = defaultdict(set)  # vertex -> reasons (resolved to roots)
    producers: dict[int, tuple[str, int]] = {}  # vertex -> (masked layer, its channel)
    order: dict[str, int] = {}
    for t in graph.inputs:
        ids = channels.ids(t)
        if ids is not None:
            for v in ids.tolist():
                blocked[v].add("a model input")
    for gnode in graph.nodes:
        reason = _tie_node(gnode, channels)
        if reason is not None:
            for t in gnode.inputs:
                ids = channels.ids(t)
                for v in [] if ids is None else ids.tolist():
                    blocked[v].add(reason)
        layer = gnode.layer
        out = channels.ids(gnode.outputs[0]) if gnode.outputs else None
        if out is None or node_role(gnode) not in (Role.MIXES, Role.GROUPED):
            continue
        if not isinstance(layer, MaskedLayerMixin) or graph.calls_per_layer[id(layer)] != 1:
            for v in out.tolist():
                blocked[v].add(f"{gnode.name} is not a masked layer called once")
            continue
        order.setdefault(layer.name, gnode.index)
        producers.update({v: (layer.name, c) for c, v in enumerate(out.tolist())})
    _depthwise_members(graph, channels, producers, order)
    for t in graph.outputs:
        ids = channels.ids(t)
        for v in [] if ids is None else ids.tolist():
            blocked[v].add(OUTPUT_REASON)
    return _collect(channels, producers, blocked, order)


def _depthwise_members(graph: Graph, channels: _Channels, producers: dict, order: dict) -> None:
    """Masked depthwise layers (SPATIAL, tied to their input) are members too: their output
    channels are pruned with the coupled channel."""
    for gnode in graph.nodes:
        layer = gnode.layer
        if (
            isinstance(layer, MaskedLayerMixin)
            and node_role(gnode) is Role.SPATIAL
            and graph.calls_per_layer[id(layer)] == 1
        ):
            out = channels.ids(gnode.outputs[0])
            if out is not None:
                order.setdefault(layer.name, gnode.index)
                producers.update({v: (layer.name, c) for c, v in enumerate(out.tolist())})


def _collect(
    channels: _Channels, producers: dict, blocked: dict, order: dict
) -> list[ChannelGroup]:
    components: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    reasons: dict[int, set[str]] = defaultdict(set)
    for v, (name, c) in producers.items():
        components[channels.find(v)][name].append(c)
    for v, why in blocked.items():
        reasons[channels.find(v)] |= why
    by_signature: dict[tuple, list[int]] = defaultdict(list)
    for root, members in components.items():
        signature = tuple(sorted((name, len(cs)) for name, cs in members.items()))
        by_signature[signature].append(root)
    groups = []
    for signature, roots in by_signature.items():
        roots.sort(key=lambda r: min(components[r][signature[0][0]]))
        members = {
            name: np.asarray([sorted(components[r][name]) for r in roots], np.int64)
            for name, _ in sorted(signature, key=lambda item: order[item[0]])
        }
        why = sorted(set().union(*(reasons[r] for r in roots)))
        groups.append(ChannelGroup(members, tuple(why)))
    groups.sort(key=lambda g: min(order[name] for name in g.members))
    return groups
