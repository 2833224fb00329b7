"""The one place that knows Keras graphs.

* :class:`Graph` / :class:`GraphNode` (:mod:`.walker`): a functional model's calls in order,
  each tensor's producer and consumers, the model's inputs and outputs, symbolic rebuilding.
* :func:`role_of` / :func:`node_role` / :class:`Role` (:mod:`.registry`): how each layer class
  treats channels (passes them through, per-channel over space, mixes them, cross-channel,
  reshape, concat, opaque), an exact-class allowlist.
* :mod:`.cost`: parameters and multiply-adds, the one cost counter (unit stated there).
* :func:`activation_tensor` (:mod:`.readout`): where a channel's activation is read;
  :func:`batchnorm_after`: each masked layer's BatchNormalization (CLP's conv->BN pairs).
* :func:`batchnorm_chains` (:mod:`.fusion`): conv -> BN (-> activation) chains a masked
  convolution absorbs (BN-aware masks).
* :func:`channel_groups` (:mod:`.groups`): dependency groups, the masked layers' output
  channels tied by residual adds, SE gates, concatenations and depthwise layers (DepGraph).
* :func:`flatten_nested` (:mod:`.flatten`): nested Functional / Sequential models inlined
  into one functional graph (``backbone.<layer>`` names).
* :mod:`._keras_compat`: every private Keras access of the library, with the Keras versions
  it was checked against.
"""

from fineprune_tf.graph import cost
from fineprune_tf.graph.errors import ConversionError
from fineprune_tf.graph.flatten import flatten_nested, has_nested
from fineprune_tf.graph.fusion import BatchNormChain, batchnorm_chains
from fineprune_tf.graph.groups import ChannelGroup, channel_groups
from fineprune_tf.graph.readout import activation_tensor, batchnorm_after
from fineprune_tf.graph.registry import (
    CROSS_CHANNEL_ACTIVATIONS,
    Role,
    activation_name,
    channel_multiplier,
    cross_channel_activation,
    register,
    registered,
    role_of,
)
from fineprune_tf.graph.walker import Graph, GraphNode, node_role, static_shape

__all__ = [
    "BatchNormChain",
    "CROSS_CHANNEL_ACTIVATIONS",
    "ChannelGroup",
    "ConversionError",
    "Graph",
    "GraphNode",
    "Role",
    "activation_name",
    "activation_tensor",
    "batchnorm_after",
    "batchnorm_chains",
    "channel_groups",
    "channel_multiplier",
    "cost",
    "cross_channel_activation",
    "flatten_nested",
    "has_nested",
    "node_role",
    "register",
    "registered",
    "role_of",
    "static_shape",
]
