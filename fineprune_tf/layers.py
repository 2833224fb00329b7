"""Keras 3 layers whose output channels (or units) can be pruned and whose activations can be
measured in the same pass, through :func:`fineprune_tf.ops.masked_activation`.

A pruned channel is multiplied by 0 *after* bias and activation, so neither its bias nor its
weights reach the output, and the op's gradient is ``dy * mask * act'(z)``: fine-tuning cannot
revive it.  The mask is a non-trainable weight saved with the model.
"""

from __future__ import annotations

from collections.abc import Iterable

import keras
import numpy as np
import tensorflow as tf
from keras import activations, ops

from fineprune_tf import ops as fp_ops

__all__ = ["MaskedConv2D", "MaskedDense", "MaskedLayerMixin", "masked_layers"]

# Activations the fused op applies itself; any other activation runs in TF before a "linear" op.
_FUSED = {activations.relu: "relu", activations.linear: "linear"}


class StatsRecorder:
    """Per-channel accumulators, attached to a layer only while statistics are collected.

    Plain ``tf.Variable``s in float64 (not Keras weights: they are scratch state and must not be
    saved with the model).  Shapes ``[C]``; ``elements`` counts entries per channel (N*H*W summed
    over batches).  They are on-read SUM variables, as Keras metrics are: under a
    ``tf.distribute`` strategy each replica accumulates its own share and reading sums them.
    """

    def __init__(self, channels: int):
        def zeros(shape):
            return tf.Variable(tf.zeros(shape, tf.float64), trainable=False,
                               synchronization=tf.VariableSynchronization.ON_READ,
                               aggregation=tf.VariableAggregation.SUM)

        self.sum, self.sum_sq, self.positive = zeros([channels]), zeros([channels]), zeros(
            [channels])
        self.elements = zeros([])

    def reset(self) -> None:
        for variable in (self.sum, self.sum_sq, self.positive, self.elements):
            variable.assign(tf.zeros_like(variable))

    def add(self, result: fp_ops.MaskedActivationResult, z: tf.Tensor) -> None:
        self.sum.assign_add(tf.cast(result.channel_sum, tf.float64))
        self.sum_sq.assign_add(tf.cast(result.channel_sum_sq, tf.float64))
        self.positive.assign_add(tf.cast(result.positive_count, tf.float64))
        per_channel = tf.size(z, out_type=tf.int64) // tf.cast(tf.shape(z)[-1], tf.int64)
        self.elements.assign_add(tf.cast(per_channel, tf.float64))


class MaskedLayerMixin:
    """The pruning interface shared by :class:`MaskedConv2D` and :class:`MaskedDense`."""

    def _build_mask(self, channels: int) -> None:
        self._mask = self.add_weight(
            name="mask", shape=(channels,), initializer="ones", trainable=False,
            dtype=self.dtype)
        self._stats_recorder = None

    def _masked_output(self, outputs):
        fused = _FUSED.get(self.activation)
        if fused is None:
            outputs, fused = self.activation(outputs), "linear"
        recorder = getattr(self, "_stats_recorder", None)
        result = fp_ops.masked_activation(
            outputs, ops.cast(self._mask, outputs.dtype), activation=fused,
            compute_stats=recorder is not None)
        if recorder is not None:
            recorder.add(result, outputs)
        return result.y

    @property
    def channels(self) -> int:
        """Number of output channels (conv filters or dense units)."""
        return int(self._mask.shape[0])

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
                f"{self.channels} channels")
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
        indices = np.asarray(list(channels) if isinstance(channels, Iterable) else channels,
                             dtype=np.int64).reshape(-1)
        bad = indices[(indices < 0) | (indices >= self.channels)]
        if bad.size:
            raise ValueError(
                f"{self.name}: channel indices {bad.tolist()} are outside [0, {self.channels})")
        return indices

    def prune(self, channels) -> None:
        """Zeroes the given output channels (an index or an iterable of indices)."""
        mask = self.mask
        mask[self._channel_indices(channels)] = 0.0
        self.set_mask(mask)

    def restore(self, channels=None) -> None:
        """Re-activates the given channels (all channels when ``channels`` is None)."""
        mask = self.mask
        mask[slice(None) if channels is None else self._channel_indices(channels)] = 1.0
        self.set_mask(mask)

    # Keras' Conv/Dense save only (kernel, bias); the mask is saved after them.
    def save_own_variables(self, store) -> None:
        if not self.built:
            return
        for index, variable in enumerate(self._masked_variables()):
            store[str(index)] = variable

    def load_own_variables(self, store) -> None:
        variables = self._masked_variables()
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"Layer {self.name!r} expected {len(variables)} variables "
                f"(kernel, bias, mask), but the file has {len(store.keys())}")
        for index, variable in enumerate(variables):
            variable.assign(store[str(index)])

    def _masked_variables(self) -> list:
        variables = [self._kernel]
        if self.use_bias:
            variables.append(self.bias)
        return [*variables, self._mask]

    def _check_supported(self) -> None:
        if getattr(self, "lora_rank", None):
            raise ValueError(f"{type(self).__name__} does not support LoRA (lora_rank)")


@keras.saving.register_keras_serializable(package="fineprune_tf")
class MaskedConv2D(MaskedLayerMixin, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` with prunable output channels and fused activation statistics.

    Takes every ``Conv2D`` argument. Input ``[N, H, W, C_in]`` (channels_last only: the fused op
    is NHWC), output ``[N, H', W', filters]``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.data_format != "channels_last":
            raise ValueError(
                f"MaskedConv2D supports data_format='channels_last' only, got "
                f"{self.data_format!r}")
        self._check_supported()

    def build(self, input_shape):
        super().build(input_shape)
        self._build_mask(self.filters)

    def call(self, inputs):
        outputs = self.convolution_op(inputs, self.kernel)
        if self.use_bias:
            outputs = ops.add(outputs, ops.reshape(self.bias, (1, 1, 1, self.filters)))
        return self._masked_output(outputs)


@keras.saving.register_keras_serializable(package="fineprune_tf")
class MaskedDense(MaskedLayerMixin, keras.layers.Dense):
    """``keras.layers.Dense`` with prunable units (neurons); input ``[N, D]``, output
    ``[N, units]``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_supported()

    def build(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(
                f"MaskedDense expects a rank-2 input [N, D]; got shape {tuple(input_shape)}")
        super().build(input_shape)
        self._build_mask(self.units)

    def call(self, inputs, training=None):
        outputs = ops.matmul(inputs, self.kernel)
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        return self._masked_output(outputs)


def masked_layers(model: keras.Model) -> list[MaskedLayerMixin]:
    """All masked layers of ``model`` (nested models included), in ``model.layers`` order."""
    found = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, MaskedLayerMixin):
            found.append(layer)
    return found
