"""Serving a pruned model: physically remove pruned channels, and export plain Keras /
TensorFlow artefacts that need neither ``fineprune_tf`` nor its custom op.

* :func:`shrink` rewrites a (masked) model into a smaller **plain** Keras model — standard
  ``Conv2D`` / ``Dense`` / ``DepthwiseConv2D`` / ``BatchNormalization`` ... layers only — with
  the same predictions.
* :func:`to_plain` does the same without removing anything (pruned channels become all-zero
  weights), for when the exact original shapes are wanted.
* :func:`export_saved_model` writes a TF SavedModel with a stock ``serving_default`` signature,
  plus the ``.keras`` file of the same plain model inside the SavedModel directory.
* :func:`count_params_and_flops` / :func:`shrink_report` measure what shrinking saved.

How :func:`shrink` decides what can go
--------------------------------------
Every tensor of the graph gets, per channel (last axis), a *constant value* when the channel is
the same number at every position for every input (``NaN`` = "live", input-dependent).  The
sources are the pruned channels of masked layers (exactly 0: the mask multiplies *after* bias
and activation).  Constants propagate through channel-wise layers (BatchNormalization, ReLU and
other activations, pooling, Dropout, ...: computed by running the original layer on a constant
tensor, so BN's shift ``beta - gamma*mean/sqrt(var+eps)`` is reproduced bit for bit),
DepthwiseConv2D, Flatten / Reshape, Concatenate (offsets) and element-wise merges (Add, ...:
constant only if constant on every input).

A constant channel is removed when every consumer can absorb it exactly:

* ``Dense`` (any input rank): always — ``bias += v * W[c, :]`` (``W[i, :]`` for the flattened
  row ``i = ((h * W) + w) * C + c`` after Flatten).
* ``Conv2D``: when ``v == 0``, or when the convolution has no effective padding ('valid', or
  'same' that happens to pad nothing, e.g. 1x1) — then every output position sees the constant
  through the full kernel and ``bias[o] += v * sum_{kh,kw} W[kh, kw, c, o]``.  With real 'same'
  padding the border positions see fewer taps, so a non-zero constant channel is **kept**
  (e.g. conv -> BN -> ReLU with a positive BN shift feeding a 'same' conv): its producer then
  computes it with all-zero weights, which is exact.
* channel-wise layers, DepthwiseConv2D, Flatten, Concatenate: the channel simply disappears
  from their inputs and outputs (BN / PReLU parameters sliced).
* Add and other merges: a channel is kept if *any* input keeps it, and then every input keeps
  it (the union is kept); a pruned branch channel that is kept contributes its exact value
  (0, or its BN constant).
* model outputs and every other layer (a "barrier": Conv2DTranspose, LayerNormalization,
  softmax, shared weighted layers, keras.ops calls, ...): all channels are kept.

A kept pruned channel of a masked layer is computed by the plain layer with zero kernel slice
and zero bias, which gives ``act(0)``: exact for ReLU / linear / tanh / ... (``act(0) == 0``);
for other activations (sigmoid, softplus, ...) a ``Rescaling(scale=mask)`` layer named
``<layer>_mask`` is appended, which multiplies by the 0/1 mask exactly.

Folding constants reorders float32 sums, so predictions agree to rounding error (~1e-7 on
softmax outputs), not bit for bit.  Models must be float32 and channels_last.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import shutil
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from fineprune_tf import io as fp_io
from fineprune_tf.conversion import (
    ConversionError,
    FunctionalGraph,
    GraphNode,
    check_not_quantized,
    clone_layer,
    to_numpy,
)
from fineprune_tf.layers import MaskedConv2D, MaskedDense, MaskedLayerMixin

__all__ = [
    "KERAS_FILENAME",
    "ShrinkReport",
    "count_params_and_flops",
    "export_saved_model",
    "shrink",
    "shrink_report",
    "to_plain",
]

#: The ``.keras`` copy of the exported model, inside the SavedModel directory.
KERAS_FILENAME = "model.keras"

# Output channel c depends on input channel c only, channel count unchanged.
_CHANNELWISE = (
    keras.layers.BatchNormalization, keras.layers.Activation, keras.layers.ReLU,
    keras.layers.LeakyReLU, keras.layers.ELU, keras.layers.PReLU, keras.layers.Dropout,
    keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D, keras.layers.SpatialDropout3D,
    keras.layers.GaussianNoise, keras.layers.GaussianDropout, keras.layers.AlphaDropout,
    keras.layers.ActivityRegularization, keras.layers.Identity,
    keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D,
    keras.layers.AveragePooling1D, keras.layers.AveragePooling2D, keras.layers.AveragePooling3D,
    keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D, keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D, keras.layers.GlobalMaxPooling3D,
    keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D, keras.layers.ZeroPadding3D,
    keras.layers.Cropping1D, keras.layers.Cropping2D, keras.layers.Cropping3D,
    keras.layers.UpSampling1D, keras.layers.UpSampling2D, keras.layers.UpSampling3D,
)
_MERGES = (keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply,
           keras.layers.Average, keras.layers.Maximum, keras.layers.Minimum)
_TRANSPOSED = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
               keras.layers.Conv3DTranspose)
_CROSS_CHANNEL_ACTIVATIONS = ("softmax", "log_softmax")
# Stand-in for unknown spatial sizes when a layer is evaluated on a constant input.
_UNKNOWN_DIM = 32


# ----------------------------------------------------------------------------------------------
# Channel analysis.


def _channels(t) -> int | None:
    shape = t.shape
    if len(shape) < 2 or shape[-1] is None:
        return None
    return int(shape[-1])


def _kind(graph: FunctionalGraph, gnode: GraphNode) -> str:
    """How channels flow through ``gnode``: conv, dense, depthwise, channelwise, flatten,
    reshape_channel, concat, merge or barrier (keep everything)."""
    layer = gnode.layer
    if not isinstance(layer, keras.layers.Layer):
        return "barrier"
    if any(_channels(t) is None for t in gnode.inputs + gnode.outputs):
        return "barrier"
    if len(gnode.outputs) != 1:
        return "barrier"
    shared = graph.calls_per_layer[id(layer)] > 1
    has_weights = bool(layer.weights)
    if shared and has_weights:
        return "barrier"  # one set of weights cannot be sliced two ways
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return "barrier"
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return "depthwise"
    if isinstance(layer, keras.layers.Conv2D):
        return "conv" if layer.groups == 1 else "barrier"
    if isinstance(layer, keras.layers.Dense):
        return "dense"
    if isinstance(layer, keras.layers.BatchNormalization):
        axis = layer.axis if isinstance(layer.axis, int) else None
        rank = len(gnode.inputs[0].shape)
        return "channelwise" if axis in (-1, rank - 1) else "barrier"
    if isinstance(layer, keras.layers.Activation):
        name = keras.activations.serialize(layer.activation)
        return "barrier" if name in _CROSS_CHANNEL_ACTIVATIONS else "channelwise"
    if isinstance(layer, _CHANNELWISE):
        return "channelwise"
    if isinstance(layer, keras.layers.Flatten):
        return "flatten"
    if isinstance(layer, keras.layers.Reshape):
        in_shape, out_shape = gnode.inputs[0].shape, gnode.outputs[0].shape
        if in_shape[-1] == out_shape[-1]:
            return "reshape_channel"  # row-major reshape keeping the last axis: c stays c
        if len(out_shape) == 2 and all(d is not None for d in in_shape[1:]):
            return "flatten"
        return "barrier"
    if isinstance(layer, keras.layers.Concatenate):
        rank = len(gnode.outputs[0].shape)
        return "concat" if layer.axis in (-1, rank - 1) else "barrier"
    if isinstance(layer, _MERGES):
        shapes = {tuple(t.shape[1:]) for t in gnode.inputs}
        return "merge" if len(shapes) == 1 else "barrier"
    return "barrier"


def _effective_padding(layer, input_shape) -> bool:
    """Whether a convolution pads its input (then a constant input channel does not give a
    spatially constant contribution)."""
    if layer.padding == "valid":
        return False
    spatial = input_shape[1:-1]
    for n, k, s, d in zip(spatial, layer.kernel_size, layer.strides, layer.dilation_rate,
                          strict=True):
        extent = (k - 1) * d + 1
        if extent == 1:
            continue
        if n is None:
            return True
        out = math.ceil(n / s)
        if max((out - 1) * s + extent - n, 0) > 0:
            return True
    return False


def _evaluate_constant(gnode: GraphNode, in_consts: list[np.ndarray]) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """Runs ``gnode.layer`` (inference mode) on inputs whose channels hold their constants
    (live channels 0).  Returns ``(value[C_out], uniform[C_out])`` of the output."""
    arrays = []
    for t, const in zip(gnode.inputs, in_consts, strict=True):
        shape = [1] + [_UNKNOWN_DIM if d is None else int(d) for d in t.shape[1:]]
        fill = np.where(np.isnan(const), 0.0, const).astype(np.float32)
        arrays.append(np.ascontiguousarray(np.broadcast_to(fill, shape)))
    result = gnode.layer(arrays if len(arrays) > 1 else arrays[0], training=False)
    out = np.asarray(to_numpy(result), dtype=np.float64)
    flat = out.reshape(-1, out.shape[-1])
    lo, hi = flat.min(axis=0), flat.max(axis=0)
    # Equal up to float32 rounding (e.g. 'same' average pooling divides different sums by
    # different counts at the border).
    uniform = (hi - lo) <= 1e-6 * np.maximum(np.abs(hi), np.abs(lo))
    return flat[0], uniform


@dataclasses.dataclass
class _Plan:
    graph: FunctionalGraph
    kinds: dict[int, str]                # gnode.index -> kind
    const: dict[int, np.ndarray | None]  # tensor id -> float64 [C], NaN = live
    keep: dict[int, np.ndarray | None]   # tensor id -> bool [C] channels kept (None: all)


def _forward_constants(graph: FunctionalGraph, kinds: dict[int, str]) -> dict:
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
        if kind in ("conv", "dense"):
            if isinstance(layer, MaskedLayerMixin):
                const[id(out)][layer.mask == 0] = 0.0  # masked *after* bias and activation
        elif kind in ("channelwise", "depthwise", "merge"):
            if kind == "merge":
                source = np.all([~np.isnan(x) for x in ins], axis=0)
            elif kind == "depthwise":
                source = np.repeat(~np.isnan(ins[0]), layer.depth_multiplier)
            else:
                source = ~np.isnan(ins[0])
            if source.any():
                value, uniform = _evaluate_constant(gnode, ins)
                const[id(out)] = np.where(source & uniform, value, np.nan)
        elif kind == "flatten":
            positions = _channels(out) // _channels(gnode.inputs[0])
            const[id(out)] = np.tile(ins[0], positions)
        elif kind == "reshape_channel":
            const[id(out)] = ins[0].copy()
        elif kind == "concat":
            const[id(out)] = np.concatenate(ins)
    return const


def _needs(gnode: GraphNode, kind: str, r_out: np.ndarray | None,
           const: dict) -> list[np.ndarray | None]:
    """Channels of each input that ``gnode`` needs, given the output channels required of it
    (``None`` = all)."""
    ins = gnode.inputs
    if kind == "barrier":
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
    if r_out is None:
        return [None] * len(ins)
    if kind == "depthwise":
        m = gnode.layer.depth_multiplier
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


def _plan(graph: FunctionalGraph, remove: bool) -> _Plan:
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
            for t, need in zip(gnode.inputs, _needs(gnode, kinds[gnode.index], r_out, const),
                               strict=True):
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
            full = [np.ones(_channels(t), bool) if a is None else a
                    for t, a in zip(gnode.inputs, a_in, strict=True)]
            if kind in ("conv", "dense"):
                r_out = required[id(out)]
                if isinstance(gnode.layer, MaskedLayerMixin) and r_out is not None:
                    keep[id(out)] = r_out | (gnode.layer.mask != 0)
            elif kind == "depthwise":
                keep[id(out)] = np.repeat(full[0], gnode.layer.depth_multiplier)
            elif kind in ("channelwise", "reshape_channel"):
                keep[id(out)] = a_in[0]
            elif kind == "flatten":
                positions = _channels(out) // _channels(gnode.inputs[0])
                keep[id(out)] = None if a_in[0] is None else np.tile(a_in[0], positions)
            elif kind == "concat":
                keep[id(out)] = (None if all(a is None for a in a_in)
                                 else np.concatenate(full))
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
    """Every removed channel must be constant and every required channel produced."""
    for tid, t in graph.tensors.items():
        kept, req = keep.get(tid), required.get(tid)
        if kept is None:
            continue
        if req is None or (req & ~kept).any():
            raise ConversionError(
                f"internal error: tensor {t.name} lacks required channels after shrinking")
        values = const[tid]
        if np.isnan(values[~kept]).any():
            raise ConversionError(f"internal error: a live channel of {t.name} was removed")


# ----------------------------------------------------------------------------------------------
# Building the plain model.


def _mask_of(layer) -> np.ndarray | None:
    return layer.mask if isinstance(layer, MaskedLayerMixin) else None


def _act_zero_is_zero(activation) -> bool:
    value = to_numpy(activation(np.zeros(1, np.float32)))
    return bool(np.asarray(value).reshape(-1)[0] == 0.0)


def _select(mask: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n, bool) if mask is None else mask


class _Builder:
    def __init__(self, plan: _Plan):
        self.plan = plan
        self.clones: dict[int, Any] = {}
        self.weights: list[tuple[Any, list[np.ndarray]]] = []
        self.names = {layer.name for layer in plan.graph.layers()
                      if isinstance(layer, keras.layers.Layer)}
        self.summary: dict[str, tuple[int, int]] = {}

    def _unique(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self.names:
            candidate, i = f"{name}_{i}", i + 1
        self.names.add(candidate)
        return candidate

    def call(self, gnode: GraphNode, args: tuple, kwargs: dict) -> Any:
        layer = gnode.layer
        if not isinstance(layer, keras.layers.Layer):
            return layer(*args, **kwargs)
        kind = self.plan.kinds[gnode.index]
        if kind in ("conv", "dense") or (
                kind == "barrier" and isinstance(layer, (MaskedConv2D, MaskedDense))):
            return self._weighted(gnode, kind, args, kwargs)
        if kind == "depthwise":
            return self._depthwise(gnode, args, kwargs)
        if id(layer) not in self.clones:
            overrides = {}
            if kind == "reshape_channel" or (kind == "flatten" and isinstance(
                    layer, keras.layers.Reshape)):
                overrides = self._reshape_target(gnode)
            clone = clone_layer(layer, **overrides)
            self.clones[id(layer)] = clone
            weights = layer.get_weights()
            if kind == "channelwise" and weights:
                a_in = self.plan.keep[id(gnode.inputs[0])]
                if a_in is not None:
                    weights = [w[..., a_in] if w.ndim and w.shape[-1] == a_in.size else w
                               for w in weights]
            self.weights.append((clone, weights))
        return self.clones[id(layer)](*args, **kwargs)

    def _reshape_target(self, gnode: GraphNode) -> dict:
        target = list(gnode.layer.target_shape)
        a_in = self.plan.keep[id(gnode.inputs[0])]
        if a_in is None:
            return {}
        if self.plan.kinds[gnode.index] == "flatten":
            return {"target_shape": (-1,)}
        if target[-1] != -1:
            target[-1] = int(a_in.sum())
        return {"target_shape": tuple(target)}

    def _weighted(self, gnode: GraphNode, kind: str, args: tuple, kwargs: dict) -> Any:
        """Conv2D / Dense (masked or not): slice input rows and output columns, fold removed
        constant inputs into the bias, zero pruned-but-kept outputs."""
        layer = gnode.layer
        if id(layer) in self.clones:  # a shared layer (barrier): same weights, all channels
            return self._apply(layer, args, kwargs)
        check_not_quantized(layer)
        is_conv = isinstance(layer, keras.layers.Conv2D)
        if is_conv and layer.groups != 1 and isinstance(layer, MaskedLayerMixin):
            raise ConversionError(f"layer {layer.name!r}: grouped MaskedConv2D is not supported")
        kernel = np.asarray(to_numpy(layer.kernel), np.float64)
        bias = (np.asarray(to_numpy(layer.bias), np.float64)
                if layer.use_bias else np.zeros(kernel.shape[-1]))
        in_t, out_t = gnode.inputs[0], gnode.outputs[0]
        a_in = _select(self.plan.keep[id(in_t)], kernel.shape[-2]) if kind != "barrier" else \
            np.ones(kernel.shape[-2], bool)
        a_out = _select(self.plan.keep[id(out_t)], kernel.shape[-1]) if kind != "barrier" else \
            np.ones(kernel.shape[-1], bool)
        removed = ~a_in
        if removed.any():
            values = self.plan.const[id(in_t)][removed]
            # A constant input channel adds the same amount at every (unpadded) position.
            taps = kernel[..., removed, :].reshape(-1, int(removed.sum()), kernel.shape[-1])
            bias = bias + np.einsum("sco,c->o", taps, values)
        kernel = kernel[..., a_in, :][..., a_out]
        bias = bias[a_out]
        mask = _mask_of(layer)
        needs_rescale = False
        if mask is not None:
            pruned = mask[a_out] == 0
            kernel[..., pruned] = 0.0
            bias[pruned] = 0.0
            needs_rescale = bool(pruned.any()) and not _act_zero_is_zero(layer.activation)
        size = int(a_out.sum())
        use_bias = bool(layer.use_bias or np.any(bias != 0))
        if is_conv:
            clone = clone_layer(layer, keras.layers.Conv2D, filters=size, use_bias=use_bias)
        else:
            clone = clone_layer(layer, keras.layers.Dense, units=size, use_bias=use_bias)
        weights = [kernel.astype(np.float32)] + ([bias.astype(np.float32)] if use_bias else [])
        self.clones[id(layer)] = clone
        self.weights.append((clone, weights))
        if mask is not None:
            self.summary[layer.name] = (mask.size, size)
        if needs_rescale:
            self.clones[("rescale", id(layer))] = keras.layers.Rescaling(
                scale=mask[a_out].astype(np.float32), name=self._unique(f"{layer.name}_mask"))
        return self._apply(layer, args, kwargs)

    def _apply(self, layer, args, kwargs):
        out = self.clones[id(layer)](*args, **kwargs)
        rescale = self.clones.get(("rescale", id(layer)))
        return out if rescale is None else rescale(out)

    def _depthwise(self, gnode: GraphNode, args: tuple, kwargs: dict) -> Any:
        layer = gnode.layer
        check_not_quantized(layer)
        a_in = self.plan.keep[id(gnode.inputs[0])]
        clone = clone_layer(layer)
        weights = layer.get_weights()
        if a_in is not None:
            m = layer.depth_multiplier
            weights = [weights[0][:, :, a_in, :]] + (
                [weights[1].reshape(-1, m)[a_in].reshape(-1)] if len(weights) > 1 else [])
        self.clones[id(layer)] = clone
        self.weights.append((clone, weights))
        return clone(*args, **kwargs)

    def finish(self) -> None:
        for clone, weights in self.weights:
            if len(weights) != len(clone.weights):
                raise ConversionError(
                    f"layer {clone.name!r}: {len(clone.weights)} weights after rebuilding, "
                    f"{len(weights)} computed")
            clone.set_weights(weights)


def _check_shrinkable(graph: FunctionalGraph) -> None:
    graph.check_layers("shrink/export")
    for layer in graph.layers():
        if isinstance(layer, keras.layers.Layer):
            check_not_quantized(layer)
            policy = getattr(layer, "dtype_policy", None)
            if policy is not None and policy.compute_dtype not in ("float32",) and layer.weights:
                raise ConversionError(
                    f"layer {layer.name!r} computes in {policy.compute_dtype}; only float32 "
                    "models are supported")


def _rebuild_plain(model: keras.Model, remove: bool, verify: bool) -> keras.Model:
    graph = FunctionalGraph(model)
    _check_shrinkable(graph)
    plan = _plan(graph, remove=remove)
    builder = _Builder(plan)
    plain = graph.rebuild(builder.call)
    builder.finish()
    if any(isinstance(layer, MaskedLayerMixin) for layer in plain.layers):
        raise ConversionError("internal error: a masked layer survived")
    if verify:
        _verify(model, plain)
    for name, (before, after) in builder.summary.items():
        if after != before:
            logging.info("fineprune_tf.export: %s keeps %d of %d channels", name, after, before)
    return plain


def _random_inputs(model: keras.Model, n: int, seed: int):
    """Standard-normal float32 inputs in the model's input structure (None when an input is
    not floating point)."""
    rng = np.random.default_rng(seed)
    struct = getattr(model, "_inputs_struct", None)
    flat = keras.tree.flatten(struct if struct is not None else model.inputs)
    arrays = []
    for t in flat:
        if not str(t.dtype).startswith("float"):
            return None
        shape = [n] + [_UNKNOWN_DIM if d is None else int(d) for d in t.shape[1:]]
        arrays.append(rng.standard_normal(shape).astype(np.float32))
    if len(arrays) == 1:
        return arrays[0]
    return keras.tree.pack_sequence_as(struct, arrays) if struct is not None else arrays


def _verify(reference: keras.Model, candidate: keras.Model, atol: float = 1e-4) -> None:
    """Raises when ``candidate`` does not reproduce ``reference`` on a few random inputs."""
    x = _random_inputs(reference, 4, seed=0)
    if x is None:
        return
    want = keras.tree.flatten(reference(x, training=False))
    got = keras.tree.flatten(candidate(x, training=False))
    for a, b in zip(want, got, strict=True):
        diff = float(np.max(np.abs(to_numpy(a)
                                   - to_numpy(b))))
        if not diff <= atol:
            raise ConversionError(
                f"internal error: the rebuilt model differs from {reference.name!r} by {diff:g} "
                "on random inputs")


def shrink(model: keras.Model, verify: bool = True) -> keras.Model:
    """Removes pruned channels for real and returns a smaller plain Keras model.

    Args:
      model: a functional / built Sequential model of built-in Keras layers and
        ``fineprune_tf`` masked layers (float32, channels_last).  Not modified.
      verify: compare the result with ``model`` on 4 random normal inputs and raise if any
        output differs by more than 1e-4 (a self-check; costs two small forward passes).

    Returns:
      A functional model with the same name, layer names (the masked layers become
      ``keras.layers.Conv2D`` / ``Dense`` of the same names), inputs and output shapes, and the
      same predictions as ``model`` up to float32 rounding.  It contains no ``fineprune_tf``
      layer or op: its ``.keras`` file loads with stock Keras.  See the module docstring for
      which channels can be removed.

    Raises:
      ConversionError: subclassed/unbuilt model, custom / code-carrying / quantized / nested
        layers (named), non-float32 layers, grouped MaskedConv2D.
    """
    return _rebuild_plain(model, remove=True, verify=verify)


def to_plain(model: keras.Model, verify: bool = True) -> keras.Model:
    """Like :func:`shrink` but keeps every channel: masked layers become plain ``Conv2D`` /
    ``Dense`` with the pruned kernel slices and biases set to 0 (plus a ``Rescaling`` mask
    when ``act(0) != 0``).  Same shapes and parameter count as ``model``."""
    return _rebuild_plain(model, remove=False, verify=verify)


# ----------------------------------------------------------------------------------------------
# Cost accounting.


def count_params_and_flops(model: keras.Model) -> tuple[int, int]:
    """``(params, flops)`` of ``model``.

    ``params``: number of scalars in every weight (trainable or not, BN statistics included)
    except the pruning masks of masked layers (masks are not parameters of the served network).
    ``flops``: multiply-adds of the convolution and dense layers for a batch of one (shared
    layers counted once per call): Conv ``H_out * W_out * kh * kw * C_in / groups * C_out``,
    DepthwiseConv ``H_out * W_out * kh * kw * C_in * multiplier``, SeparableConv depthwise +
    pointwise, Conv2DTranspose ``H_in * W_in * kh * kw * C_in * C_out / groups``, Dense
    ``D_in * units`` (times the positions for a rank-3+ input).  Pruned channels of a masked
    layer still count (the masked layer computes them): shrink first to measure savings.

    Raises:
      ConversionError: subclassed model, or a conv / dense layer whose spatial size is unknown.
    """
    graph = FunctionalGraph(model)
    params = 0
    seen: set[int] = set()
    for layer in graph.layers():
        if not isinstance(layer, keras.layers.Layer) or id(layer) in seen:
            continue
        seen.add(id(layer))
        masks = {id(layer._mask)} if isinstance(layer, MaskedLayerMixin) else set()
        params += sum(int(np.prod(w.shape)) for w in layer.weights if id(w) not in masks)
    flops = 0
    for gnode in graph.nodes:
        flops += _node_flops(gnode)
    return params, flops


def _positions(shape, what: str, layer) -> int:
    dims = shape[1:-1]
    if any(d is None for d in dims):
        raise ConversionError(
            f"layer {layer.name!r}: unknown {what} size {tuple(shape)}; FLOPs need a fixed "
            "input shape")
    return int(np.prod(dims)) if dims else 1


def _node_flops(gnode: GraphNode) -> int:
    layer = gnode.layer
    if not isinstance(layer, keras.layers.Layer) or not gnode.inputs:
        return 0
    in_shape, out_shape = gnode.inputs[0].shape, gnode.outputs[0].shape
    if isinstance(layer, keras.layers.Dense):
        return _positions(in_shape, "input", layer) * int(in_shape[-1]) * int(layer.units)
    if isinstance(layer, _TRANSPOSED):
        k = int(np.prod(layer.kernel_size))
        groups = getattr(layer, "groups", 1) or 1
        return (_positions(in_shape, "input", layer) * k * int(in_shape[-1])
                * int(out_shape[-1]) // groups)
    if isinstance(layer, keras.layers.DepthwiseConv2D | keras.layers.DepthwiseConv1D):
        k = int(np.prod(layer.kernel_size))
        return _positions(out_shape, "output", layer) * k * int(out_shape[-1])
    if isinstance(layer, keras.layers.SeparableConv2D | keras.layers.SeparableConv1D):
        k = int(np.prod(layer.kernel_size))
        mid = int(in_shape[-1]) * layer.depth_multiplier
        return _positions(out_shape, "output", layer) * (k * mid + mid * int(out_shape[-1]))
    if isinstance(layer, keras.layers.Conv1D | keras.layers.Conv2D | keras.layers.Conv3D):
        k = int(np.prod(layer.kernel_size))
        return (_positions(out_shape, "output", layer) * k * int(in_shape[-1])
                // layer.groups * int(out_shape[-1]))
    return 0


@dataclasses.dataclass(frozen=True)
class ShrinkReport:
    """Cost of a model before and after :func:`shrink` (see :func:`count_params_and_flops`)."""

    params_before: int
    params_after: int
    flops_before: int
    flops_after: int

    @property
    def param_reduction(self) -> float:
        """Fraction of parameters removed, in [0, 1]."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def flop_reduction(self) -> float:
        """Fraction of multiply-adds removed, in [0, 1]."""
        return 1.0 - self.flops_after / self.flops_before if self.flops_before else 0.0

    def __str__(self) -> str:
        return (f"params {self.params_before:,} -> {self.params_after:,} "
                f"(-{100 * self.param_reduction:.1f}%), multiply-adds "
                f"{self.flops_before:,} -> {self.flops_after:,} "
                f"(-{100 * self.flop_reduction:.1f}%)")


def shrink_report(original: keras.Model, shrunk: keras.Model) -> ShrinkReport:
    """Parameter and FLOP counts of ``original`` and ``shrunk`` (e.g. ``shrink(original)``)."""
    p0, f0 = count_params_and_flops(original)
    p1, f1 = count_params_and_flops(shrunk)
    return ShrinkReport(p0, p1, f0, f1)


# ----------------------------------------------------------------------------------------------
# SavedModel export.


def _serving_function(model: keras.Model, output_name: str) -> tf.types.experimental.Callable:
    """A ``tf.function`` with one named float32 ``[None, ...]`` argument per model input,
    returning a dict of named outputs."""
    flat_inputs = keras.tree.flatten(model._inputs_struct)
    specs = []
    for t in flat_inputs:
        if t.dtype != "float32":
            raise ConversionError(f"input {t.name!r} has dtype {t.dtype}; only float32 inputs "
                                  "are exported")
        specs.append(tf.TensorSpec((None, *t.shape[1:]), tf.float32,
                                   name=t._keras_history.operation.name))
    output_layers = [t._keras_history.operation.name for t in keras.tree.flatten(model.outputs)]

    def serve(*inputs):
        x = keras.tree.pack_sequence_as(model._inputs_struct, list(inputs))
        y = keras.tree.flatten(model(x, training=False))
        if len(y) == 1:
            return {output_name: y[0]}
        return dict(zip(output_layers, y, strict=True))

    return tf.function(serve, input_signature=specs)


def export_saved_model(model: keras.Model, path: str | os.PathLike, shrink: bool = True,
                       output_name: str = "probabilities", overwrite: bool = False,
                       verify: bool = True) -> keras.Model:
    """Writes ``model`` as a TF SavedModel servable by stock TensorFlow.

    Layout::

      path/saved_model.pb, path/variables/, ...   the SavedModel (tag "serve")
      path/model.keras                            the same plain Keras model (KERAS_FILENAME)

    The ``serving_default`` signature takes one float32 tensor per model input, named after
    the input layer (e.g. ``input``: ``[None, H, W, C]``, batch dimension unknown) and returns
    ``{output_name: [None, num_classes]}`` (the model's output: probabilities for the task
    models; for several outputs, one entry per output layer name).  Inference mode (dropout
    off, BN moving statistics).

    Args:
      model: a (masked) functional / Sequential model.
      path: directory to create.
      shrink: remove pruned channels (:func:`shrink`); otherwise export :func:`to_plain`'s model
        (same shapes, pruned weights zeroed).  Either way the artefact contains only stock
        TensorFlow ops and Keras layers: serving never needs ``fineprune_tf`` or its custom op.
      output_name: key of the (single) output in the signature.
      overwrite: replace an existing ``path``; otherwise an existing non-empty path is an error.
      verify: check the plain model against ``model`` (see :func:`shrink`) and re-inspect the
        written graph with :func:`fineprune_tf.io.inspect_saved_model`.

    Returns:
      The plain Keras model that was exported.
    """
    path = pathlib.Path(path)
    if path.exists():
        if not overwrite and (path.is_file() or any(path.iterdir())):
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    plain = _rebuild_plain(model, remove=shrink, verify=verify)
    serve = _serving_function(plain, output_name)
    archive = keras.export.ExportArchive()
    archive.track(plain)
    archive.add_endpoint("serving_default", serve)
    archive.write_out(str(path), verbose=False)
    plain.save(str(path / KERAS_FILENAME))
    if verify:
        findings = fp_io.inspect_saved_model(path)
        if findings:
            raise ConversionError(
                "internal error: the exported graph contains refused ops: "
                + "; ".join(str(f) for f in findings))
    return plain
