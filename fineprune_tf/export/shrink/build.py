"""Building the plain (shrunk) model from a :class:`~fineprune_tf.export.shrink.plan._Plan`:
masked layers become their stock classes (:data:`fineprune_tf.layers.PLAIN_OF`), removed
channels are sliced out and their constants folded into the consumers' biases."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from fineprune_tf import _keras_compat as compat
from fineprune_tf.conversion import ConversionError, check_not_quantized, clone_layer, to_numpy
from fineprune_tf.export.shrink.plan import _Plan
from fineprune_tf.graph import GraphNode, channel_multiplier
from fineprune_tf.layers import PLAIN_OF, MaskedLayerMixin

_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
#: Per-channel layers whose configuration states their width (rebuilt with the kept count).
_WIDTH_ARGUMENTS = {
    cls: "projection_dim"
    for name, cls in compat.applications_channel_layers().items()
    if name == "LayerScale"
}


def _mask_of(layer) -> np.ndarray | None:
    return layer.mask if isinstance(layer, MaskedLayerMixin) else None


def _has_batchnorm(layer) -> bool:
    return getattr(layer, "batch_normalization", None) is not None


def _folded(layer, kernel: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(kernel, bias)`` (float64, output channel on the kernel's last axis) with the masked
    layer's fused BatchNormalization folded in, exact for inference-mode BN after a linear
    conv: ``kernel * s`` and ``beta + (bias - mean) * s``, ``s = gamma / sqrt(var + eps)`` per
    output channel.  Unchanged when the layer carries no BN."""
    if not _has_batchnorm(layer):
        return kernel, bias
    bn = layer.batch_normalization
    variance = np.asarray(to_numpy(bn.moving_variance), np.float64)
    scale = 1.0 / np.sqrt(variance + float(bn.epsilon))
    if bn.scale:
        scale = scale * np.asarray(to_numpy(bn.gamma), np.float64)
    shift = np.asarray(to_numpy(bn.beta), np.float64) if bn.center else 0.0
    mean = np.asarray(to_numpy(bn.moving_mean), np.float64)
    return kernel * scale, shift + (bias - mean) * scale


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
        self.names = {
            layer.name for layer in plan.graph.layers() if isinstance(layer, keras.layers.Layer)
        }
        self.summary: dict[str, tuple[int, int]] = {}

    def _unique(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self.names:
            candidate, i = f"{name}_{i}", i + 1
        self.names.add(candidate)
        return candidate

    def call(self, gnode: GraphNode, args: tuple, kwargs: dict) -> Any:
        layer = gnode.layer
        kind = self.plan.kinds[gnode.index]
        if not isinstance(layer, keras.layers.Layer):
            return self._operation(gnode, kind, args, kwargs)
        masked_barrier = kind == "barrier" and isinstance(layer, MaskedLayerMixin)
        if kind == "separable" or (masked_barrier and isinstance(layer, _SEPARABLE)):
            return self._separable(gnode, kind, args, kwargs)
        if kind == "depthwise" or (masked_barrier and isinstance(layer, _DEPTHWISE)):
            return self._depthwise(gnode, kind, args, kwargs)
        if kind in ("conv", "dense", "grouped") or masked_barrier:
            return self._weighted(gnode, kind, args, kwargs)
        if id(layer) not in self.clones:
            overrides = {}
            if kind == "reshape_channel" or (
                kind == "flatten" and isinstance(layer, keras.layers.Reshape)
            ):
                overrides = self._reshape_target(gnode)
            width_argument = _WIDTH_ARGUMENTS.get(type(layer))
            a_in = self.plan.keep[id(gnode.inputs[0])] if gnode.inputs else None
            if kind == "channelwise" and width_argument and a_in is not None:
                overrides = {width_argument: int(a_in.sum())}
            clone = clone_layer(layer, **overrides)
            self.clones[id(layer)] = clone
            weights = layer.get_weights()
            if kind == "channelwise" and weights:
                a_in = self.plan.keep[id(gnode.inputs[0])]
                if a_in is not None:
                    weights = [
                        w[..., a_in] if w.ndim and w.shape[-1] == a_in.size else w for w in weights
                    ]
            self.weights.append((clone, weights))
        return self.clones[id(layer)](*args, **kwargs)

    def _operation(self, gnode: GraphNode, kind: str, args: tuple, kwargs: dict) -> Any:
        """A bare ``keras.ops`` call, reused: a per-channel constant operand (``x * gamma``,
        ``gamma`` of shape ``[..., C]``) keeps the kept channels of its tensor operand."""
        a_in = self.plan.keep[id(gnode.inputs[0])] if kind == "channelwise" else None
        if a_in is not None:
            args = tuple(
                np.asarray(a)[..., a_in]
                if not isinstance(a, keras.KerasTensor) and np.ndim(a) and np.shape(a)[-1] > 1
                else a
                for a in args
            )
        return gnode.layer(*args, **kwargs)

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
        """Conv1D/2D/3D / Dense (masked or not; grouped convs keep their inputs): slice input
        rows and output columns, fold removed constant inputs into the bias, zero
        pruned-but-kept outputs."""
        layer = gnode.layer
        if id(layer) in self.clones:  # a shared layer (barrier): same weights, all channels
            return self._apply(layer, args, kwargs)
        check_not_quantized(layer)
        is_conv = not isinstance(layer, keras.layers.Dense)
        kernel = np.asarray(to_numpy(layer.kernel), np.float64)
        bias = (
            np.asarray(to_numpy(layer.bias), np.float64)
            if layer.use_bias
            else np.zeros(kernel.shape[-1])
        )
        kernel, bias = _folded(layer, kernel, bias)
        in_t, out_t = gnode.inputs[0], gnode.outputs[0]
        # A grouped conv's kernel holds C_in / groups input rows; it keeps every input channel.
        a_in = (
            _select(self.plan.keep[id(in_t)], kernel.shape[-2])
            if kind not in ("barrier", "grouped")
            else np.ones(kernel.shape[-2], bool)
        )
        a_out = (
            _select(self.plan.keep[id(out_t)], kernel.shape[-1])
            if kind != "barrier"
            else np.ones(kernel.shape[-1], bool)
        )
        removed = ~a_in
        if removed.any():
            values = self.plan.const[id(in_t)][removed]
            # A constant input channel adds the same amount at every (unpadded) position.
            taps = kernel[..., removed, :].reshape(-1, int(removed.sum()), kernel.shape[-1])
            bias = bias + np.einsum("sco,c->o", taps, values)
        kernel = kernel[..., a_in, :][..., a_out]
        bias = bias[a_out]
        self._zero_pruned(layer, a_out, kernel, bias)
        size = int(a_out.sum())
        use_bias = bool(layer.use_bias or np.any(bias != 0) or _has_batchnorm(layer))
        plain = PLAIN_OF.get(type(layer), type(layer))
        clone = clone_layer(
            layer, plain, **{"filters" if is_conv else "units": size}, use_bias=use_bias
        )
        weights = [kernel.astype(np.float32)] + ([bias.astype(np.float32)] if use_bias else [])
        self.clones[id(layer)] = clone
        self.weights.append((clone, weights))
        return self._apply(layer, args, kwargs)

    def _zero_pruned(self, layer, a_out: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> None:
        """Zeroes the kept-but-pruned outputs of a masked layer in place (``kernel``'s last
        axis and ``bias`` are its kept outputs ``a_out``), and registers a ``Rescaling`` by the
        mask when ``act(0) != 0``."""
        mask = _mask_of(layer)
        if mask is None:
            return
        pruned = mask[a_out] == 0
        kernel[..., pruned] = 0.0
        bias[pruned] = 0.0
        self.summary[layer.name] = (mask.size, int(a_out.sum()))
        if pruned.any() and not _act_zero_is_zero(layer.activation):
            self.clones[("rescale", id(layer))] = keras.layers.Rescaling(
                scale=mask[a_out].astype(np.float32), name=self._unique(f"{layer.name}_mask")
            )

    def _kept(self, kind: str, tensor: Any, size: int) -> np.ndarray:
        """The kept channels of ``tensor`` (all of them when ``gnode`` is a barrier)."""
        return _select(None if kind == "barrier" else self.plan.keep[id(tensor)], size)

    def _bias(self, layer, size: int) -> np.ndarray:
        return np.asarray(to_numpy(layer.bias), np.float64) if layer.use_bias else np.zeros(size)

    def _separable(self, gnode: GraphNode, kind: str, args: tuple, kwargs: dict) -> Any:
        """SeparableConv1D/2D (masked or not): removed input channels are exactly zero (the
        plan removes no other), so they are sliced out of both kernels with nothing to fold."""
        layer = gnode.layer
        if id(layer) in self.clones:
            return self._apply(layer, args, kwargs)
        check_not_quantized(layer)
        depthwise = np.asarray(to_numpy(layer.depthwise_kernel), np.float64)
        pointwise = np.asarray(to_numpy(layer.pointwise_kernel), np.float64)
        pointwise, bias = _folded(layer, pointwise, self._bias(layer, pointwise.shape[-1]))
        a_in = self._kept(kind, gnode.inputs[0], depthwise.shape[-2])
        a_out = self._kept(kind, gnode.outputs[0], pointwise.shape[-1])
        depthwise = depthwise[..., a_in, :]
        pointwise = pointwise[..., np.repeat(a_in, layer.depth_multiplier), :][..., a_out]
        bias = bias[a_out]
        self._zero_pruned(layer, a_out, pointwise, bias)
        use_bias = bool(layer.use_bias or np.any(bias != 0) or _has_batchnorm(layer))
        clone = clone_layer(
            layer,
            PLAIN_OF.get(type(layer), type(layer)),
            filters=int(a_out.sum()),
            use_bias=use_bias,
        )
        weights = [depthwise, pointwise] + ([bias] if use_bias else [])
        self.clones[id(layer)] = clone
        self.weights.append((clone, [w.astype(np.float32) for w in weights]))
        return self._apply(layer, args, kwargs)

    def _apply(self, layer, args, kwargs):
        out = self.clones[id(layer)](*args, **kwargs)
        rescale = self.clones.get(("rescale", id(layer)))
        return out if rescale is None else rescale(out)

    def _depthwise(self, gnode: GraphNode, kind: str, args: tuple, kwargs: dict) -> Any:
        """DepthwiseConv1D/2D (masked or not), or a convolution with ``groups == C_in``:
        output channels follow the kept input channels (``m`` per input channel,
        :func:`~fineprune_tf.graph.channel_multiplier`); pruned-but-kept outputs are zeroed."""
        layer = gnode.layer
        if id(layer) in self.clones:
            return self._apply(layer, args, kwargs)
        check_not_quantized(layer)
        m = channel_multiplier(layer)
        kernel = np.asarray(to_numpy(layer.kernel), np.float64)
        grouped = not isinstance(layer, _DEPTHWISE)
        if grouped:  # [k..., 1, C_in * m] -> the depthwise layout [k..., C_in, m]
            kernel = kernel.reshape(*kernel.shape[:-2], -1, m)
        flat, bias = _folded(  # [k..., C_out]: output c * m + k
            layer, kernel.reshape(*kernel.shape[:-2], -1), self._bias(layer, kernel.shape[-2] * m)
        )
        kernel = flat.reshape(kernel.shape)
        a_in = self._kept(kind, gnode.inputs[0], kernel.shape[-2])
        a_out = np.repeat(a_in, m)
        kernel = kernel[..., a_in, :]
        flat = kernel.reshape(*kernel.shape[:-2], -1)
        bias = bias[a_out]
        self._zero_pruned(layer, a_out, flat, bias)
        use_bias = bool(layer.use_bias or np.any(bias != 0) or _has_batchnorm(layer))
        sizes = {"filters": int(a_out.sum()), "groups": int(a_in.sum())} if grouped else {}
        clone = clone_layer(
            layer, PLAIN_OF.get(type(layer), type(layer)), use_bias=use_bias, **sizes
        )
        weights = [
            flat.reshape(*kernel.shape[:-2], 1, -1) if grouped else flat.reshape(kernel.shape)
        ]
        weights += [bias] if use_bias else []
        self.clones[id(layer)] = clone
        self.weights.append((clone, [w.astype(np.float32) for w in weights]))
        return self._apply(layer, args, kwargs)

    def finish(self) -> None:
        for clone, weights in self.weights:
            if len(weights) != len(clone.weights):
                raise ConversionError(
                    f"layer {clone.name!r}: {len(clone.weights)} weights after rebuilding, "
                    f"{len(weights)} computed"
                )
            clone.set_weights(weights)
