"""Pruning curves of the pruning defense (Fine-Pruning §3.1), at close to their arithmetic cost.

The defense prunes the channels of one layer (the last convolution) one at a time, in increasing
order of mean clean activation, and records the clean accuracy and the attack success rate after
every channel.  Done naively (:func:`naive_pruning_curve`) that is ``K`` full forward passes over
the validation data for ``K`` channels.  :func:`pruning_curve` gives the same predictions for a
fraction of the work:

1. **Prefix once.**  The layers up to the pruned layer ``L`` do not depend on ``L``'s mask: they
   run once over the data, giving ``a = act(z)``, ``L``'s *unmasked* activation ``[n, H, W, C]``.
2. **Per-channel region.**  Operations after ``L`` that act on each channel separately (pooling,
   flatten/reshape, inference-mode BatchNormalization, element-wise activations, dropout,
   padding, cropping, up-sampling) commute with the mask: for such a stack ``g``, the tensor
   ``g(a * m)`` equals ``where(m, g(a), g(0))`` channel by channel.  ``T1 = g(a)`` is computed
   once per sample and ``T0 = g(0)`` once in all.
3. **Linear frontier, updated incrementally.**  A Dense or Conv2D layer ``F`` fed by the
   per-channel region (directly, or through a ``Concatenate`` with other tensors, as DeepID's
   ``deepid`` layer) has pre-activations ``Z_F(m) = W . g(a * m) + b``.  Pruning channel ``c``
   changes them by exactly ``-W . (g(a)_c - g(0)_c)`` -- ``F`` applied to one input channel, so
   over a whole curve these updates cost one pass of ``F``.
4. **Only the rest per step.**  Everything after the frontier's non-linearity (and any tensor the
   decomposition cannot handle, which is rebuilt as ``where(m, T1, T0)``) runs per step.  A step
   is evaluated only for the samples it can change: if channel ``c`` is identically zero on
   sample ``i`` (a dormant channel, the common case the defense prunes first), pruning it leaves
   sample ``i``'s prediction unchanged.  All steps of a chunk of samples run in one
   ``tf.while_loop`` that keeps only the current pre-activations, so one call per chunk and no
   per-step Python.

If ``L``'s output feeds something that is not per-channel (``describe(...).mode ==
"batched-masks"``), the engine falls back to stacking masked copies ``a * m_k`` of the prefix
output for several steps along the batch axis and running the whole suffix on them (still one
prefix pass in all, and still only for the samples each step can change).

Predictions equal the naive loop's except where float summation order decides an exact tie: the
incremental pre-activations differ from a direct evaluation by rounding (a float32 running sum
of per-channel contributions, error of order 1e-7 relative per step), so a top-2 margin of order
1e-6 can flip.  The tests check that any difference is such a tie.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from fineprune_tf import metrics
from fineprune_tf.layers import MaskedLayerMixin

__all__ = ["CurvePlanInfo", "PruningCurve", "describe", "naive_pruning_curve", "pruning_curve"]

_MB = 1024 * 1024
_MAX_GROUP = 16  # steps per loop iteration (unrolled in the trace)
_GROUP_ROWS = 4096  # rows per iteration beyond which larger batches gain nothing


# ---------------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class PruningCurve:
    """Clean accuracy and attack success after each pruned channel.

    Arrays are indexed by step ``k = 0..K``: ``k`` channels of ``order`` pruned, ``k = 0`` the
    model as given (its current mask, so channels already pruned stay pruned).

    Attributes:
      layer_name: the pruned layer.
      channels: its number of channels ``C``.
      already_pruned: channels already pruned in the starting mask.
      pruned: int64 ``[K+1]``, channel removed at step ``k`` (``-1`` at ``k = 0``).
      clean_acc: float64 ``[K+1]``, accuracy on the clean data, in ``[0, 1]``.
      asr: float64 ``[K+1]``, attack success rate (NaN without backdoor data); targeted: the
        fraction of backdoored inputs classified as the attacker's label (inputs whose true label
        is the attacker's are left out, as :func:`fineprune_tf.metrics.attack_success_rate`);
        untargeted: ``1 - robust_acc / clean_acc``.
      robust_acc: float64 ``[K+1]``, accuracy of the backdoored inputs w.r.t. their true labels
        (NaN without backdoor data).
      predictions_clean: int64 ``[K+1, N]`` arg-max labels on the clean data.
      predictions_backdoor: int64 ``[K+1, M]`` on the backdoored data, or None.
      targeted: whether the backdoor is targeted (None without backdoor data).
      info: engine details: mode, frontier layers, chunk size, evaluated and total
        (step, sample) rows, wall seconds in all and per phase.
    """

    layer_name: str
    channels: int
    already_pruned: int
    pruned: np.ndarray
    clean_acc: np.ndarray
    asr: np.ndarray
    robust_acc: np.ndarray
    predictions_clean: np.ndarray
    predictions_backdoor: np.ndarray | None
    targeted: bool | None
    info: dict = dataclasses.field(default_factory=dict, compare=False)

    @property
    def steps(self) -> int:
        """``K``, the number of pruning steps after the starting model."""
        return len(self.pruned) - 1

    def as_dict(self) -> dict:
        """JSON-ready summary (no per-sample predictions); NaN becomes None."""

        def floats(values: np.ndarray) -> list:
            return [None if math.isnan(v) else float(v) for v in values]

        return {
            "layer": self.layer_name, "channels": self.channels,
            "already_pruned": self.already_pruned, "pruned": self.pruned.tolist(),
            "clean_acc": floats(self.clean_acc), "asr": floats(self.asr),
            "robust_acc": floats(self.robust_acc), "targeted": self.targeted,
        }


@dataclasses.dataclass(frozen=True)
class CurvePlanInfo:
    """How :func:`pruning_curve` evaluates a layer's curve, with per-sample costs in FLOPs.

    FLOPs count multiply-adds of convolutions and dense layers as 2 (element-wise work,
    pooling and the masked activations are left out: they are memory-bound and small).

    Attributes:
      mode: ``"incremental"`` (linear frontier layers updated per channel) or
        ``"batched-masks"`` (whole suffix re-run per step on stacked masked copies).
      frontier: names of the frontier layers updated incrementally.
      materialized: names of the layers whose per-channel outputs are rebuilt per step.
      forward_flops: one full forward pass, per sample.
      prefix_flops: the layers before the pruned one plus the pruned layer (and constant parts
        of the frontier), per sample; run once.
      frontier_flops: the frontier layers' per-channel updates summed over all ``C`` channels,
        per sample (= one pass of the frontier's mask-dependent part).
      rest_flops: what every evaluated (step, sample) pair costs.
    """

    mode: str
    frontier: tuple[str, ...]
    materialized: tuple[str, ...]
    forward_flops: float
    prefix_flops: float
    frontier_flops: float
    rest_flops: float

    def bound_flops(self, samples: int, evaluated_rows: int) -> float:
        """Arithmetic work of a curve: one prefix pass over ``samples``, the frontier updates
        (one frontier pass in all), and ``rest_flops`` per evaluated (step, sample) pair."""
        return samples * (self.prefix_flops + self.frontier_flops) + evaluated_rows * (
            self.rest_flops)


# ---------------------------------------------------------------------------- validation


def _masked_layer(model: keras.Model, layer_name: str) -> MaskedLayerMixin:
    try:
        layer = model.get_layer(layer_name)
    except ValueError as error:
        masked = [layer.name for layer in model.layers if isinstance(layer, MaskedLayerMixin)]
        raise ValueError(
            f"model {model.name!r} has no layer named {layer_name!r}; its masked layers are "
            f"{masked}") from error
    if not isinstance(layer, MaskedLayerMixin):
        raise ValueError(
            f"layer {layer_name!r} of model {model.name!r} is a {type(layer).__name__}, not a "
            "masked layer (MaskedConv2D / MaskedDense): it has no channel mask to prune")
    if not layer.built:
        raise ValueError(f"layer {layer_name!r} is not built; call the model once first")
    return layer


def _check_order(order: Any, channels: int, layer_name: str) -> np.ndarray:
    values = np.asarray(order)
    if values.ndim != 1:
        raise ValueError(f"order must be a 1-D sequence of channel indices, got shape "
                         f"{values.shape}")
    if values.size and not np.issubdtype(values.dtype, np.integer):
        if not np.issubdtype(values.dtype, np.floating) or np.any(values != np.round(values)):
            raise ValueError(f"order must hold integer channel indices, got dtype {values.dtype}")
    values = values.astype(np.int64)
    bad = values[(values < 0) | (values >= channels)]
    if bad.size:
        raise ValueError(f"order has channel indices {sorted(set(bad.tolist()))} outside "
                         f"[0, {channels}) of layer {layer_name!r}")
    unique, counts = np.unique(values, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"order repeats channels {unique[counts > 1].tolist()}")
    return values


@dataclasses.dataclass
class _Backdoor:
    x: np.ndarray
    y_true: np.ndarray
    y_attacker: np.ndarray | None
    targeted: bool


def _backdoor(backdoor: Any) -> _Backdoor | None:
    if backdoor is None:
        return None
    x = np.asarray(metrics.backdoor_field(backdoor, "x"))
    y_true = np.asarray(metrics.backdoor_field(backdoor, "y_true")).reshape(-1)
    y_attacker = metrics.backdoor_field(backdoor, "y_attacker", None)
    targeted = bool(metrics.backdoor_field(backdoor, "targeted"))
    if len(x) == 0:
        raise ValueError("the backdoor data is empty")
    if len(y_true) != len(x):
        raise ValueError(f"backdoor x has {len(x)} inputs but y_true has {len(y_true)} labels")
    if y_attacker is not None:
        y_attacker = np.asarray(y_attacker).reshape(-1)
        if len(y_attacker) != len(x):
            raise ValueError(f"backdoor x has {len(x)} inputs but y_attacker has "
                             f"{len(y_attacker)} labels")
    elif targeted:
        raise ValueError("a targeted backdoor needs y_attacker")
    return _Backdoor(x, y_true, y_attacker, targeted)


def _clean_arrays(clean: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` arrays from a tuple or a dataset of ``(x, y)`` batches."""
    if isinstance(clean, tf.data.Dataset):
        xs, ys = [], []
        for element in clean.as_numpy_iterator():
            if not isinstance(element, tuple) or len(element) < 2:
                raise ValueError("a clean dataset must yield (x, y) batches")
            xs.append(np.asarray(element[0]))
            ys.append(np.asarray(element[1]).reshape(-1))
        if not xs:
            raise ValueError("the clean dataset is empty")
        x, y = np.concatenate(xs), np.concatenate(ys)
    else:
        if not isinstance(clean, (tuple, list)) or len(clean) != 2:
            raise ValueError("clean must be an (x, y) pair of arrays or a tf.data.Dataset of "
                             "(x, y) batches")
        x, y = np.asarray(clean[0]), np.asarray(clean[1]).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"clean x has {len(x)} inputs but y has {len(y)} labels")
    if len(x) == 0:
        raise ValueError("the clean data is empty")
    return x, y


class _CleanStream:
    """Clean inputs batch by batch, from arrays or streamed from a dataset of ``(x, y)``
    batches (never held whole); ``y`` is complete once :meth:`batches` is exhausted."""

    def __init__(self, clean: Any):
        self.dataset = clean if isinstance(clean, tf.data.Dataset) else None
        self._y: list[np.ndarray] = []
        if self.dataset is None:
            self.x, y = _clean_arrays(clean)
            self._y = [y]

    def batches(self) -> Iterator[np.ndarray]:
        if self.dataset is None:
            yield self.x
            return
        seen = 0
        for element in self.dataset.as_numpy_iterator():
            if not isinstance(element, tuple) or len(element) < 2:
                raise ValueError("a clean dataset must yield (x, y) batches")
            x, y = np.asarray(element[0]), np.asarray(element[1]).reshape(-1)
            if len(x) != len(y):
                raise ValueError(f"a clean dataset batch has {len(x)} inputs but {len(y)} "
                                 "labels")
            seen += len(x)
            self._y.append(y)
            yield x
        if seen == 0:
            raise ValueError("the clean data is empty")

    @property
    def y(self) -> np.ndarray:
        return np.concatenate(self._y)


def _make_curve(layer: MaskedLayerMixin, mask0: np.ndarray, order: np.ndarray,
                y: np.ndarray, pred_clean: np.ndarray, backdoor: _Backdoor | None,
                pred_backdoor: np.ndarray | None, keep_backdoor: bool,
                info: dict) -> PruningCurve:
    steps = len(order) + 1
    clean_acc = (pred_clean == y[None, :]).mean(axis=1).astype(np.float64)
    asr = np.full(steps, np.nan)
    robust = np.full(steps, np.nan)
    if backdoor is not None:
        for k in range(steps):
            robust[k] = metrics.robust_accuracy(pred_backdoor[k], backdoor.y_true)
            asr[k] = metrics.attack_success_rate(
                pred_backdoor[k], backdoor.y_attacker, targeted=backdoor.targeted,
                y_true=backdoor.y_true, clean_acc=clean_acc[k])
    return PruningCurve(
        layer_name=layer.name, channels=layer.channels,
        already_pruned=int(np.sum(mask0 == 0)),
        pruned=np.concatenate([[-1], order]).astype(np.int64),
        clean_acc=clean_acc, asr=asr, robust_acc=robust,
        predictions_clean=pred_clean.astype(np.int64),
        predictions_backdoor=(pred_backdoor.astype(np.int64)
                              if backdoor is not None and keep_backdoor else None),
        targeted=None if backdoor is None else backdoor.targeted, info=info)


# ---------------------------------------------------------------------------- naive loop


def naive_pruning_curve(model: keras.Model, layer_name: str, order: Sequence[int], clean: Any,
                        backdoor: Any = None, *, batch_size: int = 256,
                        memory_budget_mb: float = 256,
                        return_backdoor_predictions: bool = True) -> PruningCurve:
    """The reference loop: for each step set the mask and ``model.predict`` every input.

    Same signature and result as :func:`pruning_curve` (``memory_budget_mb`` is accepted and
    ignored).  Costs ``K + 1`` full forward passes over clean and backdoored data.
    """
    del memory_budget_mb
    start = time.perf_counter()
    layer = _masked_layer(model, layer_name)
    order = _check_order(order, layer.channels, layer_name)
    x, y = _clean_arrays(clean)
    bd = _backdoor(backdoor)
    mask0 = layer.mask
    steps = len(order) + 1
    pred_clean = np.empty((steps, len(x)), np.int64)
    pred_bd = np.empty((steps, len(bd.x)), np.int64) if bd is not None else None

    def predict(inputs: np.ndarray) -> np.ndarray:
        return np.argmax(model.predict(inputs, batch_size=batch_size, verbose=0), axis=-1)

    try:
        mask = mask0.copy()
        for k in range(steps):
            if k:
                mask[order[k - 1]] = 0.0
                layer.set_mask(mask)
            pred_clean[k] = predict(x)
            if bd is not None:
                pred_bd[k] = predict(bd.x)
    finally:
        layer.set_mask(mask0)
    info = {"engine": "naive", "seconds": time.perf_counter() - start,
            "evaluated_rows": steps * (len(x) + (len(bd.x) if bd is not None else 0))}
    return _make_curve(layer, mask0, order, y, pred_clean, bd, pred_bd,
                       return_backdoor_predictions, info)


# ------------------------------------------------------------------------- graph analysis

# Layers applied to each channel separately (given inference mode): g(a * m) = where(m, g(a),
# g(0)) holds channel by channel.
_ELEMENTWISE = (
    keras.layers.Dropout,  # includes SpatialDropout1D/2D/3D; identity at inference
    keras.layers.GaussianNoise, keras.layers.GaussianDropout, keras.layers.AlphaDropout,
    keras.layers.ActivityRegularization, keras.layers.Identity,
    keras.layers.BatchNormalization,  # inference: a fixed affine map per feature
    keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU, keras.layers.PReLU,
)
# Windowed per-channel operations on channels-last maps.
_SPATIAL = (
    keras.layers.MaxPooling2D, keras.layers.AveragePooling2D, keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalAveragePooling2D, keras.layers.ZeroPadding2D, keras.layers.Cropping2D,
    keras.layers.UpSampling2D,
)
_CROSS_CHANNEL_ACTIVATIONS = ("softmax", "log_softmax")


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
    node: Any
    layer: keras.layers.Layer
    kind: str  # "dense" or "conv"
    pieces: list[_Piece]
    u_shape: tuple[int, ...]  # per-sample pre-activation shape


def _shape(tensor: Any) -> tuple[int, ...] | None:
    dims = tuple(tensor.shape[1:])
    if any(d is None for d in dims):
        return None
    return tuple(int(d) for d in dims)


def _size(tensor: Any) -> int:
    shape = _shape(tensor)
    return int(np.prod(shape)) if shape is not None else 0


def _channels_last_map(shape: tuple[int, ...], channels: int) -> np.ndarray | None:
    if not shape or shape[-1] != channels:
        return None
    return np.broadcast_to(np.arange(channels, dtype=np.int32), shape).copy()


def _simple_call(node: Any) -> bool:
    """One positional tensor argument, and as keywords at most ``training`` and a None
    ``mask`` (what Keras records for BatchNormalization)."""
    args, kwargs = node.arguments.args, node.arguments.kwargs
    return (len(args) == 1 and len(node.input_tensors) == 1 and args[0] is node.input_tensors[0]
            and set(kwargs) <= {"training", "mask"} and kwargs.get("mask") is None
            and len(node.outputs) == 1)


def _per_channel_output(node: Any, info: _PInfo, channels: int) -> _PInfo | None:
    """The channel map of ``node``'s output if it acts per channel on its input, else None."""
    op = node.operation
    out_shape = _shape(node.outputs[0])
    if out_shape is None or not _simple_call(node):
        return None
    if getattr(op, "data_format", "channels_last") != "channels_last":
        return None
    if isinstance(op, keras.layers.Activation):
        name = getattr(op.activation, "__name__", "")
        if name in _CROSS_CHANNEL_ACTIVATIONS:
            return None
        return info
    if isinstance(op, _ELEMENTWISE):
        return info if out_shape == info.channel_map.shape else None
    if isinstance(op, (keras.layers.Flatten, keras.layers.Reshape)):
        # Row-major reshapes keep every element's channel.
        if int(np.prod(out_shape)) != info.channel_map.size:
            return None
        channel_map = info.channel_map.reshape(out_shape)
        pattern = _channels_last_map(out_shape, channels)
        return _PInfo(channel_map, pattern is not None and np.array_equal(pattern, channel_map))
    if isinstance(op, _SPATIAL):
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


def _dense_ok(op: Any) -> bool:
    return (isinstance(op, keras.layers.Dense) and not getattr(op, "lora_enabled", False)
            and getattr(op, "quantization_mode", None) is None)


def _conv_ok(op: Any) -> bool:
    return (isinstance(op, keras.layers.Conv2D) and not getattr(op, "lora_enabled", False)
            and getattr(op, "quantization_mode", None) is None and op.groups == 1
            and op.data_format == "channels_last")


def _node_flops(node: Any) -> float:
    op = node.operation
    if isinstance(op, keras.layers.Conv2D):
        out = _shape(node.outputs[0]) or (0, 0, 0)
        cin = int(node.input_tensors[0].shape[-1])
        kh, kw = op.kernel_size
        return 2.0 * out[0] * out[1] * op.filters * kh * kw * cin / op.groups
    if isinstance(op, keras.layers.Dense):
        shape = _shape(node.input_tensors[0]) or (0,)
        return 2.0 * float(np.prod(shape)) * op.units
    return 0.0


def _call(node: Any, values: dict[int, Any]) -> list:
    """Runs ``node`` on the tensors in ``values`` (inference mode, as Functional.call)."""
    args, kwargs = node.arguments.fill_in(values)
    op = node.operation
    if "training" in getattr(op, "_call_context_args", ()):
        kwargs = dict(kwargs, training=False)
    return keras.tree.flatten(op(*args, **kwargs))


class _Plan:
    """The static analysis of a model's graph around the pruned layer: which layers form the
    prefix, the per-channel region, the linear frontier and the per-step rest."""

    def __init__(self, model: keras.Model, layer: MaskedLayerMixin):
        self.layer = layer
        fn = model._functional if isinstance(model, keras.Sequential) else model
        if fn is None or not hasattr(fn, "_nodes_by_depth"):
            raise ValueError(
                f"pruning_curve needs a functional or built Sequential model; "
                f"{type(model).__name__} {model.name!r} has no layer graph")
        if len(fn.inputs) != 1 or len(fn.outputs) != 1:
            raise ValueError(f"pruning_curve needs a model with one input and one output; "
                             f"{model.name!r} has {len(fn.inputs)} and {len(fn.outputs)}")
        self.input = fn.inputs[0]
        self.output = fn.outputs[0]
        nodes = [node for depth in sorted(fn._nodes_by_depth, reverse=True)
                 for node in fn._nodes_by_depth[depth] if not node.is_input]
        self.topo = {id(node): i for i, node in enumerate(nodes)}
        own = [node for node in nodes if node.operation is layer]
        if len(own) != 1:
            raise ValueError(f"layer {layer.name!r} is called {len(own)} times in the model "
                             "graph; pruning curves need a layer called exactly once (a layer "
                             "inside a nested model is not supported)")
        self.layer_node = own[0]
        if not _simple_call(self.layer_node):
            raise ValueError(f"layer {layer.name!r} must be called on a single tensor")
        channels = layer.channels
        self.channels = channels
        self.dtype = tf.as_dtype(layer.compute_dtype)

        producer: dict[int, Any] = {}
        for node in nodes:
            for t in node.outputs:
                producer[id(t)] = node
        self.producer = producer

        # Kinds: "const" (independent of the mask), "p" (per-channel function of L's output),
        # "dyn" (anything else depending on the mask: evaluated per step).
        kinds: dict[int, str] = {id(self.input): "const"}
        pinfo: dict[int, _PInfo] = {}
        l_out = self.layer_node.outputs[0]
        for node in nodes:
            if node is self.layer_node:
                shape = _shape(l_out)
                if shape is None:
                    raise ValueError(f"layer {layer.name!r} has an output of unknown shape")
                kinds[id(l_out)] = "p"
                pinfo[id(l_out)] = _PInfo(_channels_last_map(shape, channels), True)
                continue
            ins = node.input_tensors
            if all(kinds.get(id(t)) == "const" for t in ins):
                for t in node.outputs:
                    kinds[id(t)] = "const"
                continue
            out_info = None
            if len(ins) == 1 and kinds.get(id(ins[0])) == "p":
                out_info = _per_channel_output(node, pinfo[id(ins[0])], channels)
            for t in node.outputs:
                kinds[id(t)] = "p" if out_info is not None else "dyn"
                if out_info is not None:
                    pinfo[id(t)] = out_info
        self.kinds, self.pinfo = kinds, pinfo

        # Frontier layers: linear layers whose input is (partly) per-channel.
        self.frontiers: dict[int, _Frontier] = {}
        for node in nodes:
            if node is self.layer_node or kinds[id(node.outputs[0])] != "dyn":
                continue
            frontier = self._frontier(node)
            if frontier is not None:
                self.frontiers[id(node)] = frontier

        # Demand analysis from the output: which nodes run per step, which per-channel tensors
        # are rebuilt, which constants the prefix must provide.
        self.rest_nodes: list[Any] = []
        materialized: dict[int, Any] = {}
        rest_consts: dict[int, Any] = {}
        u0_consts: dict[int, Any] = {}
        used_frontiers: dict[int, _Frontier] = {}
        seen: set[int] = set()

        def visit(t: Any) -> None:
            if id(t) in seen:
                return
            seen.add(id(t))
            kind = kinds[id(t)]
            if kind == "const":
                rest_consts[id(t)] = t
                return
            if kind == "p":
                materialized[id(t)] = t
                return
            node = producer[id(t)]
            frontier = self.frontiers.get(id(node))
            if frontier is not None:
                used_frontiers[id(node)] = frontier
                for piece in frontier.pieces:
                    if piece.kind == "dyn":
                        visit(piece.tensor)
                    elif piece.kind == "const":
                        u0_consts[id(piece.tensor)] = piece.tensor
            else:
                for u in node.input_tensors:
                    visit(u)
            self.rest_nodes.append(node)

        visit(self.output)
        self.rest_nodes = sorted(set(self.rest_nodes), key=lambda n: self.topo[id(n)])
        self.frontier_list = sorted(used_frontiers.values(), key=lambda f: self.topo[id(f.node)])
        self.materialized = list(materialized.values())
        self.rest_consts = list(rest_consts.values())
        self.u0_consts = list(u0_consts.values())

        # Per-channel tensors kept per sample (T1): rebuilt ones and the frontiers' inputs.
        t1: dict[int, Any] = dict(materialized)
        for frontier in self.frontier_list:
            for piece in frontier.pieces:
                if piece.kind == "p":
                    t1[id(piece.tensor)] = piece.tensor
        self.t1 = list(t1.values())
        self.t1_index = {id(t): i for i, t in enumerate(self.t1)}

        # Nodes of the per-channel region needed for T1, and of the prefix.
        self.p_nodes = self._ancestors(self.t1, stop=lambda t: id(t) == id(l_out))
        prefix_targets = [self.layer_node.input_tensors[0], *self.rest_consts, *self.u0_consts]
        self.prefix_nodes = self._ancestors(prefix_targets, stop=lambda t: id(t) == id(
            self.input))
        self.mode = "incremental" if self.frontier_list else "batched-masks"

    # -- analysis helpers

    def _ancestors(self, targets: list, stop) -> list:
        found: dict[int, Any] = {}
        stack = [t for t in targets if not stop(t)]
        while stack:
            t = stack.pop()
            node = self.producer.get(id(t))
            if node is None or id(node) in found:
                continue
            found[id(node)] = node
            stack.extend(u for u in node.input_tensors if not stop(u))
        return sorted(found.values(), key=lambda n: self.topo[id(n)])

    def _frontier(self, node: Any) -> _Frontier | None:
        op = node.operation
        if not _simple_call(node):
            return None
        x = node.input_tensors[0]
        u_shape = _shape(node.outputs[0])
        if u_shape is None:
            return None
        if _conv_ok(op):
            info = self.pinfo.get(id(x))
            if self.kinds[id(x)] == "p" and info.channels_last and _shape(x) is not None:
                return _Frontier(node, op, "conv", [_Piece(x, "p", 0, _size(x))], u_shape)
            return None
        if not _dense_ok(op) or len(x.shape) != 2:
            return None
        if self.kinds[id(x)] == "p":
            columns = _channel_columns(self.pinfo[id(x)].channel_map, self.channels)
            if columns is None:
                return None
            return _Frontier(node, op, "dense", [_Piece(x, "p", 0, _size(x), columns)], u_shape)
        concat = self.producer.get(id(x))
        if concat is None or not isinstance(concat.operation, keras.layers.Concatenate):
            return None
        parts = concat.input_tensors
        if (concat.operation.axis not in (-1, 1) or len(concat.arguments.args) != 1
                or concat.arguments.kwargs or any(len(t.shape) != 2 or _shape(t) is None
                                                  for t in parts)):
            return None
        pieces, start = [], 0
        for t in parts:
            size, kind = _size(t), self.kinds[id(t)]
            columns = None
            if kind == "p":
                columns = _channel_columns(self.pinfo[id(t)].channel_map, self.channels)
                if columns is None:
                    return None
            pieces.append(_Piece(t, kind, start, start + size, columns))
            start += size
        if not any(p.kind == "p" for p in pieces) or start != int(x.shape[-1]):
            return None
        return _Frontier(node, op, "dense", pieces, u_shape)

    # -- costs

    def info(self) -> CurvePlanInfo:
        rest = 0.0
        frontier_flops = 0.0
        prefix = sum(_node_flops(n) for n in self.prefix_nodes) + _node_flops(self.layer_node)
        for node in self.rest_nodes:
            frontier = self.frontiers.get(id(node))
            if frontier is None:
                rest += _node_flops(node)
            elif frontier.kind == "conv":
                frontier_flops += _node_flops(node)
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
        forward = sum(_node_flops(n) for n in {id(n): n for n in self.producer.values()}.values())
        materialized = sorted({self.producer[id(t)].operation.name for t in self.materialized})
        return CurvePlanInfo(
            mode=self.mode, frontier=tuple(f.layer.name for f in self.frontier_list),
            materialized=tuple(materialized), forward_flops=forward, prefix_flops=prefix,
            frontier_flops=frontier_flops, rest_flops=rest)

    def bytes_per_sample(self) -> tuple[int, int]:
        """(chunk state per sample, per-step working set per sample), in bytes."""
        item = self.dtype.size
        u = sum(int(np.prod(f.u_shape)) for f in self.frontier_list)
        state = item * (sum(_size(t) for t in self.t1) + u
                        + sum(_size(t) for t in self.rest_consts)) + self.channels
        # Per step: the updated pre-activations and contributions, and every tensor of the
        # remaining layers (twice: inputs and outputs may be alive together).
        rest_tensors = sum(_size(t) for node in self.rest_nodes for t in node.outputs)
        step = item * (3 * u + 2 * rest_tensors + sum(_size(t) for t in self.materialized)
                       + sum(_size(t) for t in self.rest_consts))
        return max(state, 1), max(step, 1)


# ------------------------------------------------------------------------ compiled engine


class _Engine:
    """The tf.functions of a plan: the prefix pass and the per-step loop over one chunk."""

    def __init__(self, plan: _Plan):
        self.plan = plan
        p = plan
        dtype = p.dtype
        self.maps = {id(t): tf.constant(p.pinfo[id(t)].channel_map) for t in p.t1}
        self.columns = {id(piece.tensor): tf.constant(piece.columns)
                        for f in p.frontier_list for piece in f.pieces
                        if piece.columns is not None}
        t1_specs = [tf.TensorSpec([None, *_shape(t)], dtype) for t in p.t1]
        t0_specs = [tf.TensorSpec([1, *_shape(t)], dtype) for t in p.t1]
        u_specs = [tf.TensorSpec([None, *f.u_shape], dtype) for f in p.frontier_list]
        const_specs = [tf.TensorSpec([None, *_shape(t)], t.dtype) for t in p.rest_consts]
        x_spec = tf.TensorSpec([None, *_shape(p.input)], p.input.dtype)
        a_shape = _shape(p.layer_node.outputs[0])
        vector = tf.TensorSpec([None], tf.int32)

        # No AutoGraph: the traced code has no tensor-dependent Python control flow (the step
        # loop is an explicit tf.while_loop), and converting the Keras layers' code costs
        # seconds per trace.
        self.zeros = tf.function(self._zeros, autograph=False, input_signature=[
            tf.TensorSpec([1, *a_shape], dtype)])
        self.prefix = tf.function(self._prefix, autograph=False, input_signature=[
            x_spec, tf.TensorSpec([p.channels], dtype), t0_specs])
        self._run_specs = [
            u_specs, t1_specs, t0_specs, const_specs, vector, tf.TensorSpec([None], dtype),
            tf.TensorSpec([None, p.channels], dtype), vector, vector, vector]
        self._run_fns: dict[int, Any] = {}

    # -- helpers (traced)

    def _active(self, t: Any, active: tf.Tensor) -> tf.Tensor:
        """``active`` ``[R, C]`` spread over ``t``'s elements: ``[R, *shape(t)]`` (bool)."""
        info = self.plan.pinfo[id(t)]
        shape = _shape(t)
        if info.channels_last:
            keep = tf.reshape(active, [-1, *([1] * (len(shape) - 1)), self.plan.channels])
        else:
            keep = tf.reshape(tf.gather(active, tf.reshape(self.maps[id(t)], [-1]), axis=1),
                              [-1, *shape])
        return keep > 0

    def _p_region(self, a: tf.Tensor) -> list[tf.Tensor]:
        p = self.plan
        values = {id(p.layer_node.outputs[0]): a}
        for node in p.p_nodes:
            for t, v in zip(node.outputs, _call(node, values), strict=True):
                values[id(t)] = v
        return [values[id(t)] for t in p.t1]

    def _zeros(self, zeros: tf.Tensor) -> list[tf.Tensor]:
        return self._p_region(zeros)

    @staticmethod
    def _dense_pre(layer: Any, x: tf.Tensor, start: int | None = None,
                   stop: int | None = None) -> tf.Tensor:
        kernel = layer.kernel if start is None else layer.kernel[start:stop]
        return tf.matmul(x, tf.cast(kernel, x.dtype))

    @staticmethod
    def _bias(layer: Any, z: tf.Tensor) -> tf.Tensor:
        if getattr(layer, "bias", None) is None:
            return z
        return z + tf.cast(layer.bias, z.dtype)

    @staticmethod
    def _finish(layer: Any, z: tf.Tensor) -> tf.Tensor:
        if isinstance(layer, MaskedLayerMixin):
            return layer._masked_output(z)
        return z if layer.activation is None else layer.activation(z)

    # -- the prefix pass

    def _prefix(self, x: tf.Tensor, active0: tf.Tensor, t0s: list[tf.Tensor]):
        """One batch: ``T1`` per-channel tensors, frontier pre-activations at the starting mask,
        constants, and which channels are non-zero per sample (``[n, C]`` bool)."""
        p = self.plan
        values = {id(p.input): x}
        for node in p.prefix_nodes:
            for t, v in zip(node.outputs, _call(node, values), strict=True):
                values[id(t)] = v
        # The layer's mask is all ones during the run: this is the unmasked act(z).
        a = _call(p.layer_node, values)[0]
        t1s = self._p_region(a)
        active = active0[None, :]
        u0s = []
        for frontier in p.frontier_list:
            layer = frontier.layer
            if frontier.kind == "conv":
                piece = frontier.pieces[0]
                i = p.t1_index[id(piece.tensor)]
                xin = tf.where(self._active(piece.tensor, active), t1s[i], t0s[i])
                z = self._bias(layer, layer.convolution_op(xin, layer.kernel))
            else:
                z = None
                for piece in frontier.pieces:
                    if piece.kind == "dyn":
                        continue
                    if piece.kind == "p":
                        i = p.t1_index[id(piece.tensor)]
                        xin = tf.where(self._active(piece.tensor, active), t1s[i], t0s[i])
                    else:
                        xin = values[id(piece.tensor)]
                    if len(frontier.pieces) == 1:
                        part = self._dense_pre(layer, xin)
                    else:
                        part = self._dense_pre(layer, xin, piece.start, piece.stop)
                    z = part if z is None else z + part
                z = self._bias(layer, z)
            u0s.append(z)
        consts = [values[id(t)] for t in p.rest_consts]
        nonzero = tf.reduce_any(tf.not_equal(a, 0), axis=list(range(1, len(a.shape) - 1)))
        return t1s, u0s, consts, nonzero

    # -- the steps

    def _update(self, us: list, t1s: list, t0s: list, channel: tf.Tensor,
                live: tf.Tensor) -> list:
        """Frontier pre-activations after removing ``channel`` (unchanged if ``live == 0``):
        each frontier applied to that channel's change alone, subtracted."""
        p = self.plan
        out = []
        for frontier, u in zip(p.frontier_list, us, strict=True):
            layer = frontier.layer
            for piece in frontier.pieces:
                if piece.kind != "p":
                    continue
                i = p.t1_index[id(piece.tensor)]
                if frontier.kind == "conv":
                    index = tf.reshape(channel, [1])
                    delta = (tf.gather(t1s[i], index, axis=-1)
                             - tf.gather(t0s[i], index, axis=-1)) * live  # [n, h, w, 1]
                    kernel = tf.gather(layer.kernel, index, axis=2)  # [kh, kw, 1, Cout]
                    u = u - layer.convolution_op(delta, tf.cast(kernel, delta.dtype))
                else:
                    columns = self.columns[id(piece.tensor)][channel]  # [S]
                    n = tf.shape(t1s[i])[0]
                    delta = (tf.gather(tf.reshape(t1s[i], [n, -1]), columns, axis=1)
                             - tf.gather(tf.reshape(t0s[i], [1, -1]), columns, axis=1)) * live
                    kernel = tf.gather(layer.kernel[piece.start:piece.stop], columns)  # [S, D]
                    u = u - tf.matmul(delta, tf.cast(kernel, delta.dtype))  # [n, D]
            out.append(u)
        return out

    def _rest(self, rows: tf.Tensor, zs: list, t1s: list, t0s: list, active: tf.Tensor,
              consts: list) -> tf.Tensor:
        """int32 arg-max predictions ``[R]`` of the samples ``rows`` under the masks
        ``active`` ``[R, C]``, given their frontier pre-activations ``zs`` (``[R, ...]``)."""
        p = self.plan
        values: dict[int, Any] = {}
        const_index = {id(t): i for i, t in enumerate(p.rest_consts)}
        frontier_index = {id(f.node): i for i, f in enumerate(p.frontier_list)}

        def value(t: Any) -> tf.Tensor:
            key = id(t)
            if key not in values:
                kind = p.kinds[key]
                if kind == "const":
                    values[key] = tf.gather(consts[const_index[key]], rows)
                elif kind == "p":
                    i = p.t1_index[key]
                    values[key] = tf.where(self._active(t, active), tf.gather(t1s[i], rows),
                                           t0s[i])
                else:
                    raise AssertionError(f"tensor {t.name} evaluated before its producer")
            return values[key]

        for node in p.rest_nodes:
            frontier = p.frontiers.get(id(node))
            if frontier is None:
                inputs = {id(t): value(t) for t in node.input_tensors}
                outputs = _call(node, inputs)
            else:
                z = zs[frontier_index[id(node)]]
                for piece in frontier.pieces:
                    if piece.kind == "dyn":
                        z = z + self._dense_pre(frontier.layer, value(piece.tensor), piece.start,
                                                piece.stop)
                outputs = [self._finish(frontier.layer, z)]
            for t, v in zip(node.outputs, outputs, strict=True):
                values[id(t)] = v
        return tf.argmax(value(p.output), axis=-1, output_type=tf.int32)

    def run(self, group: int, *args) -> tf.Tensor:
        """:meth:`_run` with ``group`` steps per loop iteration (one trace per group size)."""
        fn = self._run_fns.get(group)
        if fn is None:
            fn = tf.function(functools.partial(self._run, group), autograph=False,
                             input_signature=self._run_specs)
            self._run_fns[group] = fn
        return fn(*args)

    def _run(self, group: int, us, t1s, t0s, consts, channels, live, active, splits, rows,
             row_steps):
        """All steps of one chunk in one graph, ``group`` steps per loop iteration.

        Step ``b`` predicts the samples ``rows[splits[b]:splits[b + 1]]`` (those it can
        change; ``row_steps`` gives each row's step) under mask ``active[b]`` ``[C]``; with
        frontier layers it first removes ``channels[b]`` (unless ``live[b] == 0``) from the
        running pre-activations.  Only those (``[n, ...]`` per frontier) stay alive from one
        step to the next, so memory does not grow with the number of steps.  The rows of a
        group's steps go through the layers after the frontier as one batch, which makes the
        matrix products larger and the loop shorter.  The number of steps must be a multiple of
        ``group`` (pad with no-op steps: ``live = 0`` and no rows).

        Returns the int32 predictions of every listed row, in order.
        """
        groups = tf.shape(channels)[0] // group
        labels = tf.TensorArray(tf.int32, size=groups, infer_shape=False, element_shape=[None])

        def body(g, us, labels):
            first = g * group
            parts: list[list[tf.Tensor]] = [[] for _ in us]
            for j in range(group):
                step = first + j
                if us:
                    us = self._update(us, t1s, t0s, channels[step], live[step])
                    selected = rows[splits[step]:splits[step + 1]]
                    for part, u in zip(parts, us, strict=True):
                        part.append(tf.gather(u, selected))
            lo, hi = splits[first], splits[first + group]
            zs = [tf.concat(part, 0) for part in parts]
            masks = tf.gather(active, row_steps[lo:hi])  # [R, C]
            labels = labels.write(g, self._rest(rows[lo:hi], zs, t1s, t0s, masks, consts))
            return g + 1, us, labels

        _, _, labels = tf.while_loop(lambda g, us, labels: g < groups, body,
                                     [tf.constant(0), list(us), labels])
        return labels.concat()


_CACHE_ATTRIBUTE = "_fineprune_curve_engines"


def _engine(model: keras.Model, layer: MaskedLayerMixin) -> _Engine:
    """The cached engine of (model, layer): tracing once makes repeated curves cheap.  Stored
    on the model itself (bypassing Keras' attribute tracking, so it is never saved) so that it
    lives exactly as long as the model."""
    cache = model.__dict__.get(_CACHE_ATTRIBUTE)
    if cache is None:
        cache = {}
        object.__setattr__(model, _CACHE_ATTRIBUTE, cache)
    key = (layer.name, id(layer))
    if key not in cache:
        cache[key] = _Engine(_Plan(model, layer))
    return cache[key]


def describe(model: keras.Model, layer_name: str) -> CurvePlanInfo:
    """How :func:`pruning_curve` decomposes ``model`` around ``layer_name``, with FLOP costs."""
    layer = _masked_layer(model, layer_name)
    return _engine(model, layer).plan.info()


# ---------------------------------------------------------------------------- the engine


def _concat(batches: list[list[tf.Tensor]]) -> list[tf.Tensor]:
    """Joins per-batch lists of tensors along the batch axis."""
    if len(batches) == 1:
        return list(batches[0])
    return [tf.concat(parts, 0) for parts in zip(*batches, strict=True)]


def _batches(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(x), size):
        yield x[start:start + size]


def pruning_curve(model: keras.Model, layer_name: str, order: Sequence[int], clean: Any,
                  backdoor: Any = None, *, batch_size: int = 256,
                  memory_budget_mb: float = 256,
                  return_backdoor_predictions: bool = True) -> PruningCurve:
    """Clean accuracy and attack success after pruning each channel of ``order`` in turn.

    Gives the predictions of :func:`naive_pruning_curve` (see the module docstring for how, and
    for the rounding caveat) at the cost of one pass of the layers up to ``layer_name``, one
    pass of the linear layers fed by it, and, per step, only the layers after those -- and only
    for the samples the removed channel can change.

    Args:
      model: a functional (or built Sequential) Keras model with one input and one output of
        class scores ``[N, classes]``; predictions are their arg-max.
      layer_name: a MaskedConv2D / MaskedDense layer called once in the model.
      order: channel indices ``[K]`` in pruning order (all channels or a prefix); distinct.  A
        channel already pruned in the starting mask gives a step that changes nothing.
      clean: ``(x [N, ...], y [N])`` arrays, or a ``tf.data.Dataset`` of ``(x, y)`` batches
        (streamed once, never held whole).
      backdoor: None, or an object (or mapping) with ``x [M, ...]``, ``y_true [M]``,
        ``y_attacker [M]`` (may be None when untargeted) and ``targeted``.
      batch_size: inputs per prefix batch.
      memory_budget_mb: bound on the engine's working set in MiB.  The data is processed in
        chunks of ``n`` samples, ``n`` the largest number whose state (the per-channel tensors
        ``T1``, the frontier pre-activations and the constants the later layers need) plus one
        step's working set (the updated pre-activations and every tensor of the layers after
        the frontier) fit in the budget; ``n >= 1``.  Peak memory is therefore about
        ``memory_budget_mb`` + one prefix batch of activations (``min(batch_size, n)``
        samples) + the model's weights + the int64 predictions ``[K+1, N+M]``, independent of
        ``N`` otherwise and of ``K``; it exceeds the budget only when one sample alone does.
      return_backdoor_predictions: keep ``predictions_backdoor`` in the result.

    Returns:
      A :class:`PruningCurve`.  The model is left as it was: the layer's mask is restored, even
      on error.

    Raises:
      ValueError: unknown layer, a layer without mask, an ``order`` with repeated or
        out-of-range channels, inputs and labels of different lengths, empty data.
    """
    start = time.perf_counter()
    layer = _masked_layer(model, layer_name)
    order = _check_order(order, layer.channels, layer_name)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not memory_budget_mb > 0:
        raise ValueError(f"memory_budget_mb must be > 0, got {memory_budget_mb}")
    clean_stream = _CleanStream(clean)
    bd = _backdoor(backdoor)
    engine = _engine(model, layer)
    plan = engine.plan
    mask0 = layer.mask
    channels = layer.channels
    steps = len(order) + 1

    # Step table: channel removed at each step and the mask after it.
    removed = np.concatenate([[0], order]).astype(np.int32)
    live = np.zeros(steps, bool)
    active = np.empty((steps, channels), np.float32)
    current = (mask0 != 0).astype(np.float32)
    active[0] = current
    for k, c in enumerate(order, start=1):
        live[k] = current[c] != 0
        current = current.copy()
        current[c] = 0.0
        active[k] = current

    sources = [clean_stream.batches()] + ([iter([bd.x])] if bd is not None else [])
    budget = float(memory_budget_mb) * _MB
    state_bytes, step_bytes = plan.bytes_per_sample()
    chunk = int(max(1, budget // (state_bytes + step_bytes)))
    prefix_batch = max(1, min(batch_size, chunk))
    # Steps per loop iteration.  With a frontier one: the per-step layers are small, and
    # grouping steps measured no faster (the extra gathers and concatenations cost what larger
    # matrix products save).  Without (the whole suffix per step): as many masked copies as
    # the rest of the budget holds, up to ~4096 rows.
    largest = chunk + prefix_batch - 1
    group = 1 if plan.frontier_list else int(max(1, min(
        steps, _MAX_GROUP, _GROUP_ROWS // largest,
        (budget - largest * state_bytes) // (largest * step_bytes))))

    chunk_predictions: list[np.ndarray] = []
    evaluated = 0
    # Wall time per phase (TF runs CPU functions synchronously, so this is their cost).
    phases = {"prefix": 0.0, "steps": 0.0}
    dtype = plan.dtype.as_numpy_dtype
    try:
        layer.set_mask(np.ones(channels, np.float32))
        t0s = engine.zeros(tf.zeros([1, *_shape(plan.layer_node.outputs[0])], plan.dtype))
        active0 = tf.constant(active[0].astype(dtype))

        def chunks() -> Iterator[list]:
            """Prefix outputs per batch, ``chunk`` samples (+ less than a batch) at a time."""
            pending, count = [], 0
            for source in sources:
                for x in source:
                    for xb in _batches(x, prefix_batch):
                        tic = time.perf_counter()
                        pending.append(engine.prefix(
                            tf.constant(xb, dtype=plan.input.dtype), active0, t0s))
                        phases["prefix"] += time.perf_counter() - tic
                        count += len(xb)
                        if count >= chunk:
                            yield pending
                            pending, count = [], 0
            if pending:
                yield pending

        for outs in chunks():
            t1s, us, consts = (_concat([o[i] for o in outs]) for i in range(3))
            nonzero = np.concatenate([o[3].numpy() for o in outs], 0)  # [n, C]
            del outs
            n = nonzero.shape[0]
            # A step changes sample i only if its channel is live and non-zero on i; the
            # others keep the previous step's prediction.  A step that changes no sample of
            # the chunk (a channel dormant on all of it) leaves the pre-activations exactly
            # as they were and is skipped altogether.
            affected = nonzero[:, removed].T & live[:, None]
            affected[0] = True
            run_steps = np.flatnonzero(affected.any(axis=1))
            affected_run = affected[run_steps]
            row_steps, rows = (v.astype(np.int32) for v in np.nonzero(affected_run))
            step_splits = np.concatenate([[0], np.cumsum(affected_run.sum(axis=1))])
            # Pad to whole groups with no-op steps (not live, no rows).
            padded = np.concatenate([run_steps, np.full(-len(run_steps) % group, 0)])
            live_run = live[padded].astype(dtype)
            live_run[len(run_steps):] = 0
            splits = np.concatenate([step_splits,
                                     np.full(len(padded) - len(run_steps), step_splits[-1])])
            tic = time.perf_counter()
            flat = engine.run(
                group, us, t1s, t0s, consts, tf.constant(removed[padded]),
                tf.constant(live_run), tf.constant(active[padded].astype(dtype)),
                tf.constant(splits.astype(np.int32)), tf.constant(rows),
                tf.constant(row_steps)).numpy()
            phases["steps"] += time.perf_counter() - tic
            evaluated += len(rows)
            labels = np.empty((steps, n), np.int64)
            labels[0] = flat[:n]
            for j in range(1, len(run_steps) + 1):
                # Steps between two evaluated ones change nothing: carry the labels forward.
                end = run_steps[j] if j < len(run_steps) else steps
                k = run_steps[j - 1]
                if j > 1:
                    labels[k] = labels[k - 1]
                    changed = slice(step_splits[j - 1], step_splits[j])
                    labels[k, rows[changed]] = flat[changed]
                labels[k + 1:end] = labels[k]
            chunk_predictions.append(labels)
    finally:
        layer.set_mask(mask0)

    predictions = np.concatenate(chunk_predictions, axis=1)
    y_clean = clean_stream.y
    n_clean = len(y_clean)
    total = predictions.shape[1]
    info = {
        "engine": "fast", "mode": plan.mode, "seconds": time.perf_counter() - start,
        "chunk_samples": chunk, "chunks": len(chunk_predictions),
        "steps_per_iteration": group,
        "evaluated_rows": int(evaluated), "all_rows": int(steps * total),
        "frontier": [f.layer.name for f in plan.frontier_list],
        "phase_seconds": phases,
    }
    return _make_curve(layer, mask0, order, y_clean, predictions[:, :n_clean], bd,
                       predictions[:, n_clean:] if bd is not None else None,
                       return_backdoor_predictions, info)
