"""Conv -> BatchNormalization (-> activation) chains that a masked convolution can absorb.

:func:`fineprune_tf.convert` folds each chain found here into one masked layer that computes
``act(BN(conv(x))) * mask`` (:mod:`fineprune_tf.layers`), so a pruned channel is exactly 0 at
the end of the chain.  A chain is fused only when that is the same computation: every link is
called once, feeds only the next link, and is not a model output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

from fineprune_tf.graph.registry import Role, cross_channel_activation
from fineprune_tf.graph.walker import Graph, GraphNode, node_role

__all__ = ["BatchNormChain", "batchnorm_chains"]


@dataclasses.dataclass(frozen=True, eq=False)
class BatchNormChain:
    """One fusable chain.

    Attributes:
      conv: the convolution's call (linear activation).
      batchnorm: the BatchNormalization's call (over the last axis).
      activation: the activation layer's call after the BN, or None when it stays separate.
      activation_config: what the fused layer's ``activation=`` becomes (``"linear"`` when
        ``activation`` is None).
    """

    conv: GraphNode
    batchnorm: GraphNode
    activation: GraphNode | None
    activation_config: Any


def _only_consumer(graph: Graph, gnode: GraphNode) -> GraphNode | None:
    """The single node consuming ``gnode``'s single output, when nothing else reads it."""
    if len(gnode.outputs) != 1 or id(gnode.outputs[0]) in graph.output_ids:
        return None
    consumers = graph.consumers.get(id(gnode.outputs[0]), [])
    if len(consumers) != 1 or graph.calls_per_layer.get(id(consumers[0].layer)) != 1:
        return None
    return consumers[0] if consumers[0].is_single_tensor_call() else None


def _activation_config(gnode: GraphNode) -> Any:
    """The ``activation=`` a conv can take for this activation layer, or None."""
    layer = gnode.layer
    if type(layer) is keras.layers.ReLU:
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            return None
        if layer.max_value is None:
            return "relu"
        return "relu6" if float(layer.max_value) == 6.0 else None
    if type(layer) is keras.layers.Activation and not cross_channel_activation(layer):
        return layer.get_config()["activation"]
    return None


def batchnorm_chains(graph: Graph, convolutions: set[int]) -> dict[int, BatchNormChain]:
    """``id(conv layer) -> chain`` for every convolution in ``convolutions`` (layer ids) whose
    output goes, through single consumers, into a last-axis ``BatchNormalization`` (and then
    into ReLU / ReLU6 / a per-element ``Activation``, fused too when present).

    The convolution must be called once with a linear activation (a non-linear one before BN
    would leave BN's affine map unfoldable on export).  The BN's call may pin ``training`` only
    as the conv's call does (:func:`fineprune_tf.graph.flatten_nested` pins ``training=False``
    on every call of a frozen backbone; Keras 3 lets a model call's own ``training`` override
    such a pin, for the fused layer as for the original).
    """
    chains: dict[int, BatchNormChain] = {}
    for gnode in graph.nodes:
        layer = gnode.layer
        if id(layer) not in convolutions or graph.calls_per_layer[id(layer)] != 1:
            continue
        if layer.activation is not keras.activations.linear:
            continue
        bn = _only_consumer(graph, gnode)
        if (
            bn is None
            or type(bn.layer) is not keras.layers.BatchNormalization
            or node_role(bn) is not Role.ELEMENTWISE
        ):
            continue
        training = bn.arguments()[1].get("training")
        if training != gnode.arguments()[1].get("training"):
            continue
        act = _only_consumer(graph, bn)
        config = None if act is None else _activation_config(act)
        chains[id(layer)] = BatchNormChain(
            conv=gnode,
            batchnorm=bn,
            activation=act if config is not None else None,
            activation_config="linear" if config is None else config,
        )
    return chains
