"""Keras 3 layers whose output channels (or units) can be pruned and whose activations can be
measured in the same pass: a masked twin of every convolution kind (Conv1D/2D/3D, grouped
included; SeparableConv1D/2D, whose pointwise outputs are masked; DepthwiseConv1D/2D, whose
``C_in * depth_multiplier`` outputs are masked) and of Dense (on ``[N, D]``, or pointwise on the
last axis of ``[N, ..., D]``).

A pruned channel is multiplied by 0 *after* bias and activation, so neither its bias nor its
weights reach the output, and the gradient is ``dy * mask * act'(z)``: fine-tuning cannot
revive it.  The mask is a non-trainable weight saved with the model, after Keras' own
variables.

A masked convolution may also carry the ``BatchNormalization`` that follows it (a tracked
sub-layer, ``batch_normalization=``; :func:`fineprune_tf.convert` fuses conv -> BN (->
activation) chains this way).  It then computes ``act(BN(conv(x) + b)) * mask``: the mask sits
at the end of the chain, so a pruned channel is exactly 0 (not BN's shift) and the statistics
see the post-BN, post-activation value.  ``activation`` is then the one *after* BN (the conv's
own activation was linear).  The BN trains as usual (batch statistics in training, moving
statistics updated, gamma / beta learned); the mask stays the channel's one source of truth.

Backends: on TensorFlow the layers call :func:`fineprune_tf.ops.masked_activation` (the compiled
op, or a composite XLA can fuse inside ``jit_compile``); on JAX and PyTorch the same composite
is written in ``keras.ops``.  Everything else in fineprune_tf (defenses, curves, export,
scripts) is TensorFlow-only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import keras
import numpy as np
from keras import activations, ops

from fineprune_tf import _keras_compat
from fineprune_tf import ops as fp_ops
from fineprune_tf.activations import activation_name, cross_channel_activation

__all__ = [
    "MASKED_CONVOLUTIONS",
    "MASKED_LAYERS",
    "PLAIN_OF",
    "MaskedConv1D",
    "MaskedConv2D",
    "MaskedConv3D",
    "MaskedDense",
    "MaskedDepthwiseConv1D",
    "MaskedDepthwiseConv2D",
    "MaskedLayerMixin",
    "MaskedSeparableConv1D",
    "MaskedSeparableConv2D",
    "StatsSink",
    "masked_layers",
]

# Activations the masking applies itself; any other activation runs before a "linear" masking.
_FUSED = {activations.relu: "relu", activations.linear: "linear"}


class StatsSink(Protocol):
    """What :meth:`MaskedLayerMixin.recording_stats` passes each call's statistics to.

    ``add`` receives float32 ``[C]`` sums of ``a``, of ``a**2`` and of ``a > 0`` over one call's
    non-channel axes (``a = act(z)``, before the mask), and the number of entries per channel in
    that call (a scalar).  :mod:`fineprune_tf.stats` holds the implementations.
    """

    def add(self, channel_sum, channel_sum_sq, positive_count, entries) -> None: ...


def _masked_activation(z, mask, activation: str, compute_stats: bool):
    """``(act(z) * mask, stats or None)`` on the current Keras backend.

    TensorFlow takes the compiled op (or its composite); other backends the ``keras.ops``
    composite, whose autodiff gives ``dy * mask * act'(z)`` with ``act'(0) = 0``.
    """
    mask = ops.stop_gradient(ops.cast(mask, z.dtype))
    if keras.backend.backend() == "tensorflow":
        result = fp_ops.masked_activation(
            z, mask, activation=activation, compute_stats=compute_stats
        )
        stats = (
            result.channel_sum,
            result.channel_sum_sq,
            ops.cast(result.positive_count, "float32"),
        )
        return result.y, stats if compute_stats else None
    activated = ops.relu(z) if activation == "relu" else z
    y = activated * mask
    if not compute_stats:
        return y, None
    flat = ops.reshape(ops.cast(ops.stop_gradient(activated), "float32"), (-1, z.shape[-1]))
    return y, (
        ops.sum(flat, axis=0),
        ops.sum(ops.square(flat), axis=0),
        ops.sum(ops.cast(flat > 0, "float32"), axis=0),
    )


class MaskedLayerMixin:
    """The pruning interface shared by every masked layer (convolutions, :class:`MaskedDense`)."""

    #: The fused ``BatchNormalization`` sub-layer (masked convolutions only), or None.
    batch_normalization: keras.layers.BatchNormalization | None = None

    def _build_mask(self, channels: int) -> None:
        self._mask = self.add_weight(
            name="mask", shape=(channels,), initializer="ones", trainable=False, dtype=self.dtype
        )
        self._stats_sink = None

    def _masked_output(self, outputs, training=None):
        if self.batch_normalization is not None:
            outputs = self.batch_normalization(outputs, training=training)
        fused = _FUSED.get(self.activation)
        if fused is None:
            outputs, fused = self.activation(outputs), "linear"
        sink = getattr(self, "_stats_sink", None)
        y, stats = _masked_activation(outputs, self._mask, fused, compute_stats=sink is not None)
        if sink is not None:
            entries = ops.cast(ops.size(outputs), "float32") / float(self.channels)
            sink.add(*stats, entries)
        return y

    @contextlib.contextmanager
    def recording_stats(self, sink: StatsSink) -> Iterator[StatsSink]:
        """Within the block, each call of the layer passes its channel statistics to ``sink``.

        Only calls *traced or run* inside the block record: a ``tf.function`` traced outside
        it (``model.predict``'s, say) never does.  :func:`fineprune_tf.stats.collect` is built on
        this; use it directly to record inside your own loop::

            with layer.recording_stats(recorder):
                model(x)
        """
        if getattr(self, "_stats_sink", None) is not None:
            raise RuntimeError(f"{self.name}: statistics are already being recorded")
        self._stats_sink = sink
        try:
            yield sink
        finally:
            self._stats_sink = None

    @property
    def channels(self) -> int:
        """Number of output channels (conv filters or dense units)."""
        return int(self._mask.shape[0])

    @property
    def mask_variable(self) -> keras.Variable:
        """The non-trainable ``[C]`` mask weight itself (to tell it from kernel and bias)."""
        return self._mask

    @property
    def mask(self) -> np.ndarray:
        """float32 ``[C]``: 1 for an active channel, 0 for a pruned one."""
        return np.asarray(keras.ops.convert_to_numpy(self._mask), dtype=np.float32)

    def set_mask(self, mask) -> None:
        """Sets the whole mask (``[C]``, values 0 or 1)."""
        mask = np.asarray(mask, dtype=np.float32).reshape(-1)
        if mask.shape != (self.channels,):
            raise ValueError(
                f"{self.name}: mask has {mask.shape[0]} entries, the layer has "
                f"{self.channels} channels"
            )
        self._mask.assign(mask.astype(self._mask.dtype))

    @property
    def active_channels(self) -> np.ndarray:
        """int64 indices of the channels that are not pruned, ascending."""
        return np.flatnonzero(self.mask != 0).astype(np.int64)

    @property
    def pruned_channels(self) -> np.ndarray:
        """int64 indices of the pruned channels, ascending."""
        return np.flatnonzero(self.mask == 0).astype(np.int64)

    def _channel_indices(self, channels) -> np.ndarray:
        if isinstance(channels, (int, np.integer)):
            channels = [channels]
        indices = np.asarray(
            list(channels) if isinstance(channels, Iterable) else channels, dtype=np.int64
        ).reshape(-1)
        bad = indices[(indices < 0) | (indices >= self.channels)]
        if bad.size:
            raise ValueError(
                f"{self.name}: channel indices {bad.tolist()} are outside [0, {self.channels})"
            )
        return indices

    def prune(self, channels) -> None:
        """Zeroes the given output channels (an index or an iterable of indices).

        Raises:
          ValueError: the layer's activation mixes channels (softmax, ...): no channel of it
            can be pruned on its own.
        """
        if cross_channel_activation(self):
            raise ValueError(
                f"{self.name}: activation={activation_name(self.activation)!r} mixes the "
                "layer's channels, so they cannot be pruned independently"
            )
        mask = self.mask
        mask[self._channel_indices(channels)] = 0.0
        self.set_mask(mask)

    def restore(self, channels=None) -> None:
        """Re-activates the given channels (all channels when ``channels`` is None)."""
        mask = self.mask
        mask[slice(None) if channels is None else self._channel_indices(channels)] = 1.0
        self.set_mask(mask)

    # keras-hub's pattern for an extra variable: Keras' own (kernel[, bias]) first, the mask
    # appended at the next free index.  Files written before this change hold the same
    # (kernel, bias, mask) layout, so they load unchanged.
    # Keras classes that keep ``Layer``'s generic saving (separable, depthwise) already store
    # every variable, the mask last (it is the last non-trainable one): nothing to append.
    _keras_saves_the_mask = False

    def save_own_variables(self, store) -> None:
        if not self.built:
            return
        super().save_own_variables(store)
        if not self._keras_saves_the_mask:
            store[str(len(store.keys()))] = self._mask

    def load_own_variables(self, store) -> None:
        super().load_own_variables(store)  # Checks the count (mask included) first.
        if self.built and not self._keras_saves_the_mask:
            self._mask.assign(store[str(len(store.keys()) - 1)])

    def _check_supported(self) -> None:
        if getattr(self, "lora_rank", None):
            raise ValueError(
                f"{type(self).__name__} does not support LoRA. Received: lora_rank={self.lora_rank}"
            )
        # Said explicitly because Keras' "auto" jit choice trusts it: the layer is XLA-safe on
        # every backend (TensorFlow switches to the composite inside an XLA cluster).
        self.supports_jit = True


def _batch_normalization_layer(value: Any, dtype_policy: Any) -> Any:
    """The fused BN from a ``batch_normalization=`` argument: None, an unbuilt layer or its
    serialized config (what :meth:`get_config` writes).  It computes in the conv's dtype
    policy (a BN of another policy is re-made from its config)."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = keras.saving.deserialize_keras_object(value)
    if type(value) is not keras.layers.BatchNormalization:
        raise ValueError(
            "batch_normalization must be a keras.layers.BatchNormalization (or its config). "
            f"Received: batch_normalization={value!r}"
        )
    if value.dtype_policy.name != dtype_policy.name:
        if value.built:
            raise ValueError(
                f"the fused BatchNormalization must use the layer's dtype policy "
                f"{dtype_policy.name!r}. Received: {value.dtype_policy.name!r}"
            )
        value = keras.layers.BatchNormalization.from_config(
            dict(value.get_config(), dtype=dtype_policy)
        )
    return value


class _MaskedConvMixin(MaskedLayerMixin):
    """build/call shared by the masked convolutions: the stock layer's linear part (``_linear``,
    a public ``keras.ops`` convolution), its bias, the fused BatchNormalization if any, then the
    mask (and fused activation).

    channels_last only: the mask and the fused op act on the last axis.
    """

    def __init__(self, *args, batch_normalization=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.data_format != "channels_last":
            raise ValueError(
                f"{type(self).__name__} supports data_format='channels_last' only. Received: "
                f"data_format={self.data_format!r}"
            )
        self._check_supported()
        self.batch_normalization = _batch_normalization_layer(
            batch_normalization, self.dtype_policy
        )

    def build(self, input_shape):
        super().build(input_shape)
        self._build_mask(self._output_channels(input_shape))
        bn = self.batch_normalization
        if bn is not None:
            output_shape = self.compute_output_shape(input_shape)
            if bn.axis not in (-1, len(output_shape) - 1):
                raise ValueError(
                    f"{self.name}: the fused BatchNormalization must normalise the channel "
                    f"(last) axis. Received: axis={bn.axis}"
                )
            if not bn.built:
                bn.build(output_shape)

    def get_config(self):
        config = super().get_config()
        bn = self.batch_normalization
        config["batch_normalization"] = (
            None if bn is None else keras.saving.serialize_keras_object(bn)
        )
        return config

    def _output_channels(self, input_shape) -> int:
        return self.filters

    def _linear(self, inputs):
        return self.convolution_op(inputs, self.kernel)

    def call(self, inputs, training=None):
        outputs = self._linear(inputs)
        if self.use_bias:
            outputs = ops.add(outputs, self.bias)  # [C] broadcasts over the last axis
        return self._masked_output(outputs, training=training)


@keras.saving.register_keras_serializable(package="fineprune_tf")
class MaskedConv1D(_MaskedConvMixin, keras.layers.Conv1D):
    """``keras.layers.Conv1D`` with prunable filters: input ``[N, W, C_in]``, output
    ``[N, W', filters]`` (``padding="causal"`` included)."""

    def _linear(self, inputs):
        padding = self.padding
        if padding == "causal":  # left-pad by the dilated kernel extent, as Conv1D does
            left = self.dilation_rate[0] * (self.kernel_size[0] - 1)
            inputs = ops.pad(inputs, [[0, 0], [left, 0], [0, 0]])
            padding = "valid"
        return ops.conv(
            inputs,
            self.kernel,
            strides=list(self.strides),
            padding=padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )


@keras.saving.register_keras_serializable(package="fineprune_tf")
class MaskedConv2D(_MaskedConvMixin, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` with prunable output channels and fused activation statistics.

    Takes every ``Conv2D`` argument, ``groups`` included. Input ``[N, H, W, C_in]``
    (channels_last only), output ``[N, H', W', filters]``.
    """


@keras.saving.register_keras_serializable(package="fineprune_tf")
class MaskedConv3D(_MaskedConvMixin, keras.layers.Conv3D):
    """``keras.layers.Conv3D`` with prunable filters: input ``[N, D, H, W, C_in]``, output
    ``[N, D', H', W', filters]``."""


class _SeparableLinear:
    _keras_saves_the_mask = True  # SeparableConv keeps Layer's save_own_variables

    def _linear(self, inputs):
        return ops.separable_conv(
            inputs,
            self.depthwise_kernel,
            self.pointwise_kernel,
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )


@keras.saving.register_keras_serializable(package="fineprune_tf")
class MaskedSeparableConv1D(_SeparableLinear, _MaskedConvMixin, keras.layers.SeparableConv1D):
    """``keras.layers.SeparableConv1D`` whose pointwise output channels (``filters``) are
    prunable: input ``[N, W, C_in]``, output ``[N, W', filters]``."""


@keras.saving.register_keras_serializable(package="fineprune_tf")
class MaskedSeparableConv2D(_SeparableLinear, _MaskedConvMixin, keras.layers.SeparableConv2D):
    """``keras.layers.SeparableConv2D`` whose pointwise output channels (``filters``) are
    prunable: input ``[N, H, W, C_in]``, output ``[N, H', W', filters]``."""


class _DepthwiseLinear:
    _keras_saves_the_mask = True  # DepthwiseConv keeps Layer's save_own_variables

    def _output_channels(self, input_shape) -> int:
        return int(input_shape[-1]) * self.depth_multiplier

    def _linear(self, inputs):
        return ops.depthwise_conv(
            inputs,
            self.kernel,
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )


@keras.saving.register_keras_serializable(package="fineprune_tf")
class MaskedDepthwiseConv1D(_DepthwiseLinear, _MaskedConvMixin, keras.layers.DepthwiseConv1D):
    """``keras.layers.DepthwiseConv1D`` with prunable output channels: input ``[N, W, C]``,
    output ``[N, W', C * depth_multiplier]``; output channel ``c * depth_multiplier + k`` is
    computed from input channel ``c`` only."""


@keras.saving.register_keras_serializable(package="fineprune_tf")
class MaskedDepthwiseConv2D(_DepthwiseLinear, _MaskedConvMixin, keras.layers.DepthwiseConv2D):
    """``keras.layers.DepthwiseConv2D`` with prunable output channels: input ``[N, H, W, C]``,
    output ``[N, H', W', C * depth_multiplier]``; output channel ``c * depth_multiplier + k``
    is computed from input channel ``c`` only.  Pruning every output of input channel ``c``
    frees that channel of the producer (what :func:`fineprune_tf.export.shrink` removes)."""


@keras.saving.register_keras_serializable(package="fineprune_tf")
class MaskedDense(MaskedLayerMixin, keras.layers.Dense):
    """``keras.layers.Dense`` with prunable units (neurons); input ``[N, D]``, output
    ``[N, units]``.

    On a rank-3 to 5 input ``[N, ..., D]`` it is a pointwise ("1x1") layer on the last axis, as
    Keras' Dense is (ConvNeXt's ``pointwise_conv_1``): output ``[N, ..., units]``, unit ``u``
    masked at every position, its statistics averaged over the batch and every position (the
    fused op takes ranks 2 to 5)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_supported()

    def build(self, input_shape):
        if not 2 <= len(input_shape) <= 5:
            raise ValueError(
                "MaskedDense expects an input of rank 2 to 5, [N, D] or [N, ..., D]. Received: "
                f"input_shape={tuple(input_shape)}"
            )
        super().build(input_shape)
        self._build_mask(self.units)

    def call(self, inputs, training=None):
        outputs = ops.matmul(inputs, self.kernel)
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        return self._masked_output(outputs)


#: Masked convolution class -> the stock Keras class it extends (what conversion replaces and
#: export writes back).
PLAIN_OF: dict[type, type] = {
    MaskedConv1D: keras.layers.Conv1D,
    MaskedConv2D: keras.layers.Conv2D,
    MaskedConv3D: keras.layers.Conv3D,
    MaskedSeparableConv1D: keras.layers.SeparableConv1D,
    MaskedSeparableConv2D: keras.layers.SeparableConv2D,
    MaskedDepthwiseConv1D: keras.layers.DepthwiseConv1D,
    MaskedDepthwiseConv2D: keras.layers.DepthwiseConv2D,
    MaskedDense: keras.layers.Dense,
}
#: Every masked convolution class.
MASKED_CONVOLUTIONS: tuple[type, ...] = tuple(c for c in PLAIN_OF if c is not MaskedDense)
#: Every masked layer class (what a saved model may name, see :mod:`fineprune_tf.io`).
MASKED_LAYERS: tuple[type, ...] = tuple(PLAIN_OF)


def masked_layers(model: keras.Model) -> list[MaskedLayerMixin]:
    """All masked layers of ``model`` (nested models included), in ``model.layers`` order."""
    return [
        layer
        for layer in _keras_compat.flatten_layers(model)
        if isinstance(layer, MaskedLayerMixin)
    ]
