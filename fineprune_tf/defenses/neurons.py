"""Neurons (output channels) of any converted model, and a forward pass with per-neuron
multipliers: the machinery ANP, RNP and CLP share.

A *neuron group* is one masked layer's output channels together with the variables that scale
them.  Every masked convolution kind is one (Conv1D/2D/3D, grouped, SeparableConv1D/2D: the
pointwise outputs, DepthwiseConv1D/2D: its ``C_in * depth_multiplier`` outputs), and
``MaskedDense`` when asked.  When the layer feeds only a ``BatchNormalization`` with a scale
(or carries it fused), the neuron is the BN's output channel, as in the authors' code (ANP's
``NoisyBatchNorm2d``, RNP's ``MaskBatchNorm2d`` and CLP all act on the BN after a conv): the
scale variable is BN's ``gamma`` and the shift ``beta``.  Otherwise the scale is the layer's
kernel (the pointwise kernel of a separable conv; last axis = channel, except a depthwise
kernel ``[..., C_in, depth_multiplier]``, whose output channel ``c * m + k`` is entry
``[..., c, k]``) and the shift its bias.  The pairing is read from the functional
graph (:func:`fineprune_tf.graph.batchnorm_after`), so no architecture needs its own code; a
BN fused into its conv by :func:`fineprune_tf.convert` (``layer.batch_normalization``) is that
BN too.

Pruning is always applied through the masked layer's mask, so shrink, export and the curve
engine see an ordinary masked model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import keras
import tensorflow as tf

from fineprune_tf.graph import batchnorm_after
from fineprune_tf.layers import (
    MASKED_CONVOLUTIONS,
    MaskedDense,
    MaskedDepthwiseConv1D,
    MaskedDepthwiseConv2D,
    MaskedLayerMixin,
    MaskedSeparableConv1D,
    MaskedSeparableConv2D,
    masked_layers,
)

__all__ = ["NeuronGroup", "neuron_groups", "forward_with_multipliers"]

_DEPTHWISE = (MaskedDepthwiseConv1D, MaskedDepthwiseConv2D)
_SEPARABLE = (MaskedSeparableConv1D, MaskedSeparableConv2D)


@dataclasses.dataclass(eq=False)
class NeuronGroup:
    """One layer's neurons and the variables a per-neuron multiplier scales.

    Attributes:
      layer: the masked layer whose mask prunes these neurons.
      scale: variable whose last axis is the channel (BN gamma, or the layer kernel).
      shift: the matching shift variable (BN beta, or the layer bias), or None.
      batchnorm: the paired BatchNormalization, or None.
    """

    layer: MaskedLayerMixin
    scale: keras.Variable
    shift: keras.Variable | None
    batchnorm: keras.layers.BatchNormalization | None = None

    @property
    def channels(self) -> int:
        return self.layer.channels

    def scaled(self, value: tf.Tensor, multiplier: tf.Tensor) -> tf.Tensor:
        """``value`` (the scale variable's value) with channel ``j`` multiplied by
        ``multiplier[j]`` (``[C]``): a depthwise kernel ``[..., C_in, m]`` takes the multiplier
        reshaped to ``[C_in, m]``; every other scale variable has the channel last."""
        multiplier = tf.cast(multiplier, value.dtype)
        if self.batchnorm is None and isinstance(self.layer, _DEPTHWISE):
            multiplier = tf.reshape(multiplier, value.shape[-2:])
        return value * multiplier


def neuron_groups(model: keras.Model, *, dense: bool = False) -> list[NeuronGroup]:
    """Every masked convolution of ``model`` (each kind, depthwise included; and MaskedDense
    when ``dense``) as a neuron group, in ``masked_layers`` order."""
    pairs = batchnorm_after(model)
    groups = []
    for layer in masked_layers(model):
        if isinstance(layer, MaskedDense) and not dense:
            continue
        if not isinstance(layer, (*MASKED_CONVOLUTIONS, MaskedDense)):
            continue
        bn = pairs.get(layer.name)
        if bn is not None and bn.scale:
            groups.append(NeuronGroup(layer, bn.gamma, bn.beta if bn.center else None, bn))
        else:
            kernel = layer.pointwise_kernel if isinstance(layer, _SEPARABLE) else layer.kernel
            groups.append(NeuronGroup(layer, kernel, layer.bias if layer.use_bias else None))
    if not groups:
        raise ValueError(
            f"model {model.name!r} has no masked conv layer: convert it first "
            "(fineprune_tf.convert)"
        )
    return groups


def _variable_index(model: keras.Model) -> dict[int, int]:
    return {id(v): i for i, v in enumerate(model.trainable_variables)}


def forward_with_multipliers(
    model: keras.Model,
    groups: Sequence[NeuronGroup],
    x: tf.Tensor,
    scale_multipliers: Sequence[tf.Tensor],
    shift_multipliers: Sequence[tf.Tensor | None],
) -> tf.Tensor:
    """The model's output (probabilities ``[N, classes]``) with group ``g``'s scale variable
    multiplied by ``scale_multipliers[g]`` ``[C_g]`` and its shift by ``shift_multipliers[g]``
    (None: unchanged), in inference mode.  Differentiable in the multipliers.

    Uses ``keras.Model.stateless_call`` (public), so the model's variables are not modified.
    """
    index = _variable_index(model)
    values = [v.value for v in model.trainable_variables]
    for group, scale, shift in zip(groups, scale_multipliers, shift_multipliers, strict=True):
        position = index[id(group.scale)]
        values[position] = group.scaled(values[position], scale)
        if shift is not None and group.shift is not None:
            position = index[id(group.shift)]
            values[position] = values[position] * tf.cast(shift, values[position].dtype)
    non_trainable = [v.value for v in model.non_trainable_variables]
    outputs, _ = model.stateless_call(values, non_trainable, x, training=False)
    return outputs


def apply_pruned(model: keras.Model, pruned: dict[str, list[int]]) -> dict[str, list[int]]:
    """Prunes ``{layer name: channels}`` through the masks of ``model``; returns it sorted."""
    for name, channels in pruned.items():
        if channels:
            model.get_layer(name).prune(channels)
    return {name: sorted(int(c) for c in channels) for name, channels in pruned.items()}
