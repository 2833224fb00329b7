"""The one table of how each Keras layer class treats channels (the last axis).

Like tfmot's ``PruneRegistry`` (tensorflow/model-optimization,
``sparsity/keras/prune_registry.py``), it is an allowlist keyed by the **exact** layer class: a
subclass may override ``call``, so it is :attr:`Role.OPAQUE` until registered.  Unlike
Torch-Pruning's DepGraph (``torch_pruning/dependency``), which treats an unknown operation as
element-wise by default, an unknown layer here is a barrier: every consumer keeps all of its
channels.  Curves, shrink/export, conversion and the defenses all read this table.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import keras

from fineprune_tf import _keras_compat as compat
from fineprune_tf.activations import (
    CROSS_CHANNEL_ACTIVATIONS,
    activation_name,
    cross_channel_activation,
)
from fineprune_tf.layers import (
    MaskedConv1D,
    MaskedConv2D,
    MaskedConv3D,
    MaskedDense,
    MaskedDepthwiseConv1D,
    MaskedDepthwiseConv2D,
    MaskedSeparableConv1D,
    MaskedSeparableConv2D,
)

__all__ = [
    "CROSS_CHANNEL_ACTIVATIONS",
    "Role",
    "activation_name",
    "cross_channel_activation",
    "channel_multiplier",
    "register",
    "registered",
    "role_of",
]


class Role(enum.Enum):
    """How a layer's output channels relate to its input channels."""

    #: Output channel ``c`` is a function of input channel ``c`` at the same position only
    #: (same shape); with several inputs (Add, Multiply, ...), of channel ``c`` of each.
    ELEMENTWISE = "elementwise"
    #: Output channel ``c`` is a function of input channel ``c`` over a spatial window
    #: (pooling, padding, cropping, up-sampling, depthwise convolution: ``depth_multiplier``
    #: output channels per input channel, :func:`channel_multiplier`; a convolution with
    #: ``groups`` equal to its input channels is one).
    SPATIAL = "spatial"
    #: Every output channel is a learned linear combination of all input channels (conv,
    #: dense): the output channels are the layer's own, and the ones pruning removes.
    MIXES = "mixes"
    #: A grouped convolution (``groups > 1``): output channel ``o`` mixes the input channels of
    #: its group only (``C_in / groups`` of them, group ``o // (C_out / groups)``).  Channels
    #: can be removed only consistently across groups, so readers that need MIXES' "all inputs
    #: to all outputs" treat it as a barrier.
    GROUPED = "grouped"
    #: Each output depends non-linearly on all channels (softmax, LayerNormalization): its
    #: channels cannot be pruned or removed independently.
    CROSS_CHANNEL = "cross_channel"
    #: Moves elements in row-major order, keeping each element's channel (Flatten, Reshape).
    RESHAPE = "reshape"
    #: Places its inputs' channels side by side (Concatenate on the last axis).
    CONCAT = "concat"
    #: Not understood here: treat as a barrier that needs every channel.
    OPAQUE = "opaque"


def _activation_role(layer: Any) -> Role:
    return Role.CROSS_CHANNEL if cross_channel_activation(layer) else Role.ELEMENTWISE


def _batch_norm_role(layer: Any) -> Role:
    # Per-feature on its axis; whether that axis is the last one depends on the input's rank,
    # checked per call by :func:`fineprune_tf.graph.node_role`.
    return Role.ELEMENTWISE if isinstance(layer.axis, int) else Role.OPAQUE


def _softmax_role(layer: Any) -> Role:
    return Role.CROSS_CHANNEL


def _concat_role(layer: Any) -> Role:
    return Role.CONCAT


def _is_grouped_depthwise(layer: Any) -> bool:
    """A built convolution with ``groups > 1`` and one input channel per group
    (``groups == C_in``, ConvNeXt's ``Conv2D(groups=C)``): output channel ``o`` reads input
    channel ``o // (filters / groups)`` only, exactly a depthwise convolution with
    ``depth_multiplier = filters / groups``.  The kernel ``[k..., C_in / groups, filters]``
    says so (an unbuilt layer does not know ``C_in``: it stays GROUPED)."""
    if getattr(layer, "groups", 1) <= 1 or not layer.built:
        return False
    return int(layer.kernel.shape[-2]) == 1


def _convolution_role(layer: Any) -> Role:
    if getattr(layer, "groups", 1) <= 1:
        return Role.MIXES
    return Role.SPATIAL if _is_grouped_depthwise(layer) else Role.GROUPED


def channel_multiplier(layer: Any) -> int:
    """Output channels per input channel of a SPATIAL layer: ``depth_multiplier`` of a
    depthwise convolution, ``filters / groups`` of a grouped one with ``groups == C_in``, 1 for
    pooling, padding and the like (output ``c * m + k`` comes from input ``c``)."""
    if _is_grouped_depthwise(layer):
        return int(layer.filters) // int(layer.groups)
    return int(getattr(layer, "depth_multiplier", 1))


L = keras.layers
_ELEMENTWISE = (
    L.Dropout,
    L.SpatialDropout1D,
    L.SpatialDropout2D,
    L.SpatialDropout3D,  # inference: identity
    L.GaussianNoise,
    L.GaussianDropout,
    L.AlphaDropout,
    L.ActivityRegularization,
    L.Identity,
    L.ReLU,
    L.LeakyReLU,
    L.ELU,
    L.PReLU,
    L.Add,
    L.Subtract,
    L.Multiply,
    L.Average,
    L.Maximum,
    L.Minimum,
)
_SPATIAL = (
    L.MaxPooling1D,
    L.MaxPooling2D,
    L.MaxPooling3D,
    L.AveragePooling1D,
    L.AveragePooling2D,
    L.AveragePooling3D,
    L.GlobalAveragePooling1D,
    L.GlobalAveragePooling2D,
    L.GlobalAveragePooling3D,
    L.GlobalMaxPooling1D,
    L.GlobalMaxPooling2D,
    L.GlobalMaxPooling3D,
    L.ZeroPadding1D,
    L.ZeroPadding2D,
    L.ZeroPadding3D,
    L.Cropping1D,
    L.Cropping2D,
    L.Cropping3D,
    L.UpSampling1D,
    L.UpSampling2D,
    L.UpSampling3D,
    L.DepthwiseConv1D,
    L.DepthwiseConv2D,
    MaskedDepthwiseConv1D,
    MaskedDepthwiseConv2D,
)
_MIXES = (
    L.SeparableConv1D,
    L.SeparableConv2D,
    MaskedSeparableConv1D,
    MaskedSeparableConv2D,
    L.Conv1DTranspose,
    L.Conv2DTranspose,
    L.Conv3DTranspose,
    L.Dense,
    L.EinsumDense,
    MaskedDense,
)
# Their role depends on ``groups``.
_CONVOLUTIONS = (L.Conv1D, L.Conv2D, L.Conv3D, MaskedConv1D, MaskedConv2D, MaskedConv3D)

# keras.applications' ConvNeXt helpers, read in keras/src/applications/convnext.py (3.15):
# LayerScale.call is ``x * self.gamma`` with gamma of shape [projection_dim] (channel c scaled
# by gamma[c]: 0 stays 0, a constant stays constant); StochasticDepth.call is the identity at
# inference and ``x / keep_prob * r`` with one r per sample in training.  Both act per channel.
_APPLICATIONS_ELEMENTWISE = tuple(compat.applications_channel_layers().values())

_REGISTRY: dict[type, Role | Callable[[Any], Role]] = {
    **{cls: Role.ELEMENTWISE for cls in _ELEMENTWISE + _APPLICATIONS_ELEMENTWISE},
    **{cls: Role.SPATIAL for cls in _SPATIAL},
    **{cls: Role.MIXES for cls in _MIXES},
    **{cls: _convolution_role for cls in _CONVOLUTIONS},
    L.Activation: _activation_role,
    L.BatchNormalization: _batch_norm_role,
    L.Softmax: _softmax_role,
    L.LayerNormalization: Role.CROSS_CHANNEL,
    L.UnitNormalization: Role.CROSS_CHANNEL,
    L.Flatten: Role.RESHAPE,
    L.Reshape: Role.RESHAPE,
    L.Concatenate: _concat_role,
}
del L


def register(cls: type, role: Role | Callable[[Any], Role]) -> None:
    """Registers (or overrides) the role of an exact layer class: a :class:`Role`, or a
    function of the layer instance returning one (for roles that depend on configuration)."""
    if not isinstance(cls, type):
        raise TypeError(f"register expects a layer class; Received: cls={cls!r}")
    if not isinstance(role, Role) and not callable(role):
        raise TypeError(f"register expects a Role or a callable; Received: role={role!r}")
    _REGISTRY[cls] = role


def registered() -> dict[type, Role | Callable[[Any], Role]]:
    """A copy of the registry (exact class -> role or role function)."""
    return dict(_REGISTRY)


def role_of(layer: Any) -> Role:
    """The :class:`Role` of a layer instance.

    Exact-class lookup; channels_first layers are :attr:`Role.OPAQUE` (the channel axis is the
    last one everywhere in fineprune_tf).  Checks that depend on a call's shapes (the axis of a
    BatchNormalization or Concatenate) are made by :func:`fineprune_tf.graph.node_role`.
    """
    entry = _REGISTRY.get(type(layer))
    if entry is None:
        return Role.OPAQUE
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return Role.OPAQUE
    return entry if isinstance(entry, Role) else entry(layer)
