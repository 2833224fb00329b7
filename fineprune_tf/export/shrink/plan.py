"""Which channels :func:`fineprune_tf.export.shrink` can remove: per-tensor constants forward,
required channels backward (see :mod:`fineprune_tf.export` for the rules)."""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from fineprune_tf.conversion import ConversionError, to_numpy
from fineprune_tf.graph import Graph, GraphNode, Role, channel_multiplier, node_role
from fineprune_tf.layers import MaskedLayerMixin

# Stand-in for unknown spatial sizes when a layer is evaluated on a constant input.
UNKNOWN_DIM = 32


def _channels(t) -> int | None:
    shape = t.shape
    if len(shape) < 2 or shape[-1] is None:
        return None
    return int(shape[-1])


_CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)


def _kind(graph: Graph, gnode: GraphNode) -> str:
    """How channels flow through ``gnode`` (from the graph registry's role, narrowed to what
    the builder can rewrite): conv, dense, separable, depthwise, channelwise, flatten,
    reshape_channel, concat, merge or barrier (keep everything).  A convolution with ``groups``
    equal to its input channels is "depthwise"; per-channel bare ``keras.ops`` arithmetic is
    "channelwise" (one tensor and a constant) or "merge" (two tensors).

    A masked grouped convolution (:attr:`Role.GROUPED`) is "grouped": it needs every input
    channel, and drops pruned outputs as long as every group keeps as many (see
    :func:`_equal_per_group`); a plain one is a barrier."""
    layer = gnode.layer
    if len(gnode.outputs) != 1 or any(_channels(t) is None for t in gnode.inputs + gnode.outputs):
        return "barrier"
    role = node_role(gnode)
    if not isinstance(layer, keras.layers.Layer):  # bare keras.ops arithmetic (x + 3.0)
        if role is not Role.ELEMENTWISE:
            return "barrier"
        if len(gnode.inputs) == 1:
            return "channelwise"
        return "merge" if _broadcast_merge(gnode) else "barrier"
    if graph.calls_per_layer[id(layer)] > 1 and layer.weights:
        return "barrier"  # one set of weights cannot be sliced two ways
    if role is Role.GROUPED:
        return "grouped" if isinstance(layer, MaskedLayerMixin) else "barrier"
    if role is Role.MIXES:
        if isinstance(layer, _CONVOLUTIONS):
            return "conv"
        if isinstance(layer, _SEPARABLE):
            return "separable"
        return "dense" if isinstance(layer, keras.layers.Dense) else "barrier"
    if role is Role.SPATIAL:
        if isinstance(layer, _DEPTHWISE + _CONVOLUTIONS):  # a conv here has groups == C_in
            return "depthwise"
        return "barrier" if hasattr(layer, "depth_multiplier") else "channelwise"
    if role is Role.ELEMENTWISE:
        if len(gnode.inputs) == 1:
            return "channelwise"
        return "merge" if _broadcast_merge(gnode) else "barrier"
    if role is Role.CONCAT:
        return "concat"
    if role is Role.RESHAPE:
        return _reshape_kind(gnode)
    return "barrier"


def _broadcast_merge(gnode: GraphNode) -> bool:
    """Whether every input of a multi-input element-wise call has the output's channels and
    either its size or 1 on every other axis (a squeeze-excitation gate ``[N, 1, 1, C]``
    multiplying ``[N, H, W, C]``): channel ``c`` of the output then depends on channel ``c`` of
    each input only."""
    out = gnode.outputs[0].shape
    for t in gnode.inputs:
        if len(t.shape) != len(out) or t.shape[-1] != out[-1]:
            return False
        if any(d not in (o, 1) for d, o in zip(t.shape[1:-1], out[1:-1], strict=True)):
            return False
    return True


def _equal_per_group(keep: np.ndarray, groups: int) -> np.ndarray:
    """``keep`` (bool ``[C_out]``) grown so that every group keeps as many output channels: the
    rebuilt grouped conv assigns output ``o`` to group ``o // (C_out' / groups)``, so unequal
    counts would move channels to another group.  Added channels are pruned ones (computed as
    exact zeros), the first of each group."""
    per_group = keep.reshape(groups, -1).copy()
    target = int(per_group.sum(axis=1).max())
    for row in per_group:
        missing = target - int(row.sum())
        if missing:
            row[np.flatnonzero(~row)[:missing]] = True
    return per_group.reshape(-1)


def _reshape_kind(gnode: GraphNode) -> str:
    if isinstance(gnode.layer, keras.layers.Flatten):
        return "flatten"
    in_shape, out_shape = gnode.inputs[0].shape, gnode.outputs[0].shape
    if in_shape[-1] == out_shape[-1]:
        return "reshape_channel"  # row-major reshape keeping the last axis: c stays c
    if len(out_shape) == 2 and all(d is not None for d in in_shape[1:]):
        return "flatten"
    return "barrier"


def _effective_padding(layer, input_shape) -> bool:
    """Whether a convolution pads its input (then a constant input channel does not give a
    spatially constant contribution)."""
    if layer.padding == "valid":
        return False
    spatial = input_shape[1:-1]
    for n, k, s, d in zip(
        spatial, layer.kernel_size, layer.strides, layer.dilation_rate, strict=True
    ):
        extent = (k - 1) * d + 1
        if extent == 1:
            continue
        if n is None:
            return True
        out = math.ceil(n / s)
        if max((out - 1) * s + extent - n, 0) > 0:
            return True
    return False


def _evaluate_constant(
    gnode: GraphNode, in_consts: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Runs ``gnode``'s call (inference mode, its other arguments as recorded: the ``3.0`` of
    ``x + 3.0``) on inputs whose channels hold their constants (live channels 0).  Returns
    ``(value[C_out], uniform[C_out])`` of the output."""
    arrays = {}
    for t, const in zip(gnode.inputs, in_consts, strict=True):
        shape = [1] + [UNKNOWN_DIM if d is None else int(d) for d in t.shape[1:]]
        fill = np.where(np.isnan(const), 0.0, const).astype(np.float32)
        arrays[id(t)] = np.ascontiguousarray(np.broadcast_to(fill, shape))
    (result,) = gnode.run(arrays)
    out = np.asarray(to_numpy(result), dtype=np.float64)
    flat = out.reshape(-1, out.shape[-1])
    lo, hi = flat.min(axis=0), flat.max(axis=0)
    # Equal up to float32 rounding (e.g. 'same' average pooling divides different sums by
    # different counts at the border).
    uniform = (hi - lo) <= 1e-6 * np.maximum(np.abs(hi), np.abs(lo))
    return flat[0], uniform


@dataclasses.dataclass
class _Plan:
    graph: Graph
    kinds: dict[int, str]  # gnode.index -> kind
    const: dict[int, np.ndarray | None]  # tensor id -> float64 [C], NaN = live
    keep: dict[int, np.ndarray | None]  # tensor id -> bool [C] channels kept (None: all)


def _forward_constants(graph: Graph, kinds: dict[int, str]) -> dict:
    const: dict[int, np.ndarray | None] = {}
    for t in graph.inputs:
        c = _channels(t)
        const[id(t)] = None if c is None else np.full(c, np.nan)
    for gnode in graph.nodes:
        kind = kinds[gnode.index]
        ins = [const[id(t)] for t in gnode.inputs]
        for t in gnode.outputs:
            c = _channels(t)
            const[id(t)] = None if c is None else np.full(c, np.nan)
        if kind == "barrier":
            continue
        out = gnode.outputs[0]
        layer = gnode.layer
        if kind in ("conv", "dense", "separable", "grouped"):
            if isinstance(layer, MaskedLayerMixin):
                const[id(out)][layer.mask == 0] = 0.0  # masked *after* bias and activation
        elif kind in ("channelwise", "depthwise", "merge"):
            if kind == "merge":
                source = np.all([~np.isnan(x) for x in ins], axis=0)
            elif kind == "depthwise":
                source = np.repeat(~np.isnan(ins[0]), channel_multiplier(layer))
            else:
                source = ~np.isnan(ins[0])
            if source.any():
                value, uniform = _evaluate_constant(gnode, ins)
                const[id(out)] = np.where(source & uniform, value, np.nan)
            if isinstance(layer, MaskedLayerMixin):  # a masked depthwise conv
                const[id(out)][layer.mask == 0] = 0.0
        elif kind == "flatten":
            positions = _channels(out) // _channels(gnode.inputs[0])
            const[id(out)] = np.tile(ins[0], positions)
        elif kind == "reshape_channel":
            const[id(out)] = ins[0].copy()
        elif kind == "concat":
            const[id(out)] = np.concatenate(ins)
    return const


def _needs(
    gnode: GraphNode, kind: str, r_out: np.ndarray | None, const: dict
) -> list[np.ndarray | None]:
    """Channels of each input that ``gnode`` needs, given the output channels required of it
    (``None`` = all)."""
    ins = gnode.inputs
    if kind in ("barrier", "grouped"):
        return [None] * len(ins)
    in_const = const[id(ins[0])]
    live = np.isnan(in_const)
    # Cross-channel layers: what they need of their input does not depend on which of their
    # outputs are required.
    if kind == "conv":
        if _effective_padding(gnode.layer, ins[0].shape):
            return [live | (in_const != 0)]
        return [live]
    if kind == "dense":
        return [live]
    if kind == "separable":
        # Only exactly-zero input channels are removed: a constant one would add a
        # position-dependent amount through the padded depthwise step.
        return [live | (in_const != 0)]
    m = channel_multiplier(gnode.layer)
    if kind == "depthwise" and isinstance(gnode.layer, MaskedLayerMixin):
        # An input channel whose every output is pruned is not read (its outputs are 0).
        live = live & (gnode.layer.mask.reshape(-1, m) != 0).any(axis=1)
    if r_out is None:
        return [None] * len(ins)
    if kind == "depthwise":
        return [live | r_out.reshape(-1, m).any(axis=1)]
    if kind in ("channelwise", "reshape_channel"):
        return [r_out.copy()]
    if kind == "merge":
        return [r_out.copy() for _ in ins]
    if kind == "flatten":
        return [r_out.reshape(-1, _channels(ins[0])).any(axis=0)]
    if kind == "concat":
        sizes = np.cumsum([_channels(t) for t in ins])[:-1]
        return list(np.split(r_out, sizes))
    raise AssertionError(kind)


def _plan(graph: Graph, remove: bool) -> _Plan:
    kinds = {g.index: _kind(graph, g) for g in graph.nodes}
    const = _forward_constants(graph, kinds)
    if not remove:
        return _Plan(graph, kinds, const, {tid: None for tid in graph.tensors})
    extra: dict[int, np.ndarray] = {}
    while True:
        # Backward: what consumers (and model outputs) require of every tensor.
        required: dict[int, np.ndarray | None] = {}
        outputs = graph.output_ids
        for tid, t in graph.tensors.items():
            c = _channels(t)
            if c is None or tid in outputs or not graph.consumers.get(tid):
                required[tid] = None
            else:
                required[tid] = extra.get(tid, np.zeros(c, bool)).copy()
        for gnode in reversed(graph.nodes):
            r_out = required[id(gnode.outputs[0])] if len(gnode.outputs) == 1 else None
            if r_out is not None and not r_out.any():
                r_out[0] = True  # a zero-width tensor would break most layers: keep one
            for t, need in zip(
                gnode.inputs, _needs(gnode, kinds[gnode.index], r_out, const), strict=True
            ):
                if required[id(t)] is None:
                    continue
                required[id(t)] = None if need is None else (required[id(t)] | need)
        # Forward: what each producer actually produces (a superset of what is required).
        keep: dict[int, np.ndarray | None] = {id(t): None for t in graph.inputs}
        conflicts: dict[int, np.ndarray] = {}
        for gnode in graph.nodes:
            kind = kinds[gnode.index]
            a_in = [keep[id(t)] for t in gnode.inputs]
            for t in gnode.outputs:
                keep[id(t)] = None
            if kind == "barrier":
                continue
            out = gnode.outputs[0]
            full = [
                np.ones(_channels(t), bool) if a is None else a
                for t, a in zip(gnode.inputs, a_in, strict=True)
            ]
            if kind in ("conv", "dense", "separable"):
                r_out = required[id(out)]
                if isinstance(gnode.layer, MaskedLayerMixin) and r_out is not None:
                    keep[id(out)] = r_out | (gnode.layer.mask != 0)
            elif kind == "grouped":
                r_out = required[id(out)]
                if r_out is not None:
                    keep[id(out)] = _equal_per_group(
                        r_out | (gnode.layer.mask != 0), gnode.layer.groups
                    )
            elif kind == "depthwise":
                keep[id(out)] = np.repeat(full[0], channel_multiplier(gnode.layer))
            elif kind in ("channelwise", "reshape_channel"):
                keep[id(out)] = a_in[0]
            elif kind == "flatten":
                positions = _channels(out) // _channels(gnode.inputs[0])
                keep[id(out)] = None if a_in[0] is None else np.tile(a_in[0], positions)
            elif kind == "concat":
                keep[id(out)] = None if all(a is None for a in a_in) else np.concatenate(full)
            elif kind == "merge":
                union = np.any(full, axis=0)
                if any(not np.array_equal(f, union) for f in full):
                    conflicts[id(out)] = union
                keep[id(out)] = None if all(a is None for a in a_in) else union
            if keep[id(out)] is not None and keep[id(out)].all():
                keep[id(out)] = None
        if not conflicts:
            break
        grew = False
        for tid, union in conflicts.items():
            old = extra.get(tid, np.zeros_like(union))
            grew |= bool((union & ~old).any())
            extra[tid] = old | union
        if not grew:
            raise ConversionError("internal error: merge inputs keep different channels")
    _check_plan(graph, kinds, const, keep, required)
    return _Plan(graph, kinds, const, keep)


def _check_plan(graph, kinds, const, keep, required) -> None:
    """Every required channel must be produced, and every removed one constant unless nothing
    needs it: a constant channel zero-padded (ZeroPadding2D) is no longer constant, yet when
    it feeds only a masked depthwise layer whose outputs of that channel are all pruned, it is
    rightly removed with them."""
    for tid, t in graph.tensors.items():
        kept, req = keep.get(tid), required.get(tid)
        if kept is None:
            continue
        if req is None or (req & ~kept).any():
            raise ConversionError(
                f"internal error: tensor {t.name} lacks required channels after shrinking"
            )
        values = const[tid]
        if np.isnan(values[~kept & req]).any():
            raise ConversionError(f"internal error: a live channel of {t.name} was removed")
