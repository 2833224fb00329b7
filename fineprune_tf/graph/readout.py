"""Where a channel's activation is read: the end of its per-channel chain."""

from __future__ import annotations

from typing import Any

import keras

from fineprune_tf import _keras_compat as compat
from fineprune_tf.graph.errors import ConversionError
from fineprune_tf.graph.fusion import batchnorm_chains
from fineprune_tf.graph.registry import Role
from fineprune_tf.graph.walker import Graph, GraphNode, node_role
from fineprune_tf.layers import MaskedLayerMixin

__all__ = ["activation_tensor", "batchnorm_after"]

# Element-wise layers that are not a ReLU-like read-out: the chain stops before them (ConvNeXt's
# LayerScale multiplies each channel by a learned gamma, ~1e-6 at initialisation: a scale of the
# residual branch, not the neuron's activation).
_NOT_RELU_LIKE = (
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.PReLU,
    *(cls for name, cls in compat.applications_channel_layers().items() if name == "LayerScale"),
)


def _reads_through(gnode: GraphNode) -> bool:
    layer = gnode.layer
    if not isinstance(layer, keras.layers.Layer):
        return False  # bare arithmetic (x + 3.0) is not an activation read-out
    if node_role(gnode) is not Role.ELEMENTWISE or isinstance(layer, _NOT_RELU_LIKE):
        return False
    if isinstance(layer, keras.layers.Activation):
        return layer.activation in (keras.activations.relu, keras.activations.linear)
    return True


def activation_tensor(model: keras.Model | Graph, layer: keras.layers.Layer) -> Any:
    """The symbolic tensor a channel's "activation" is read from (Fine-Pruning §2.1: the
    neuron's ReLU output).

    A layer with a fused ReLU is its own answer.  A conv -> BatchNormalization -> activation
    chain that :func:`fineprune_tf.convert` fuses is read after its activation (any per-element
    one: the fused layer's channel ends there).  A linear layer followed by a chain of
    per-channel layers (BatchNormalization, ReLU, ``Activation("relu"|"linear")``, and layers
    that are the identity at inference, such as Dropout) is read at the end of that chain, so
    the ranking sees what the next layer sees.  The chain follows single consumers only; it
    stops before any other activation (sigmoid, LeakyReLU, ...) and before a branch.

    Args:
      model: the model (or its :class:`Graph`) in which ``layer`` is called once.
      layer: the layer whose channels are ranked.

    Raises:
      ConversionError: ``layer`` is not called in ``model``.
    """
    graph = model if isinstance(model, Graph) else Graph(model)
    calls = graph.nodes_of(layer)
    if not calls:
        raise ConversionError(f"layer {layer.name!r} is not called in model {graph.model.name!r}")
    # A conv -> BN -> activation chain that convert fuses is read where the fused layer's
    # channel ends, whatever the activation (swish, gelu, ...): the masked layer's statistics
    # are measured there, so the stock and the converted model rank the same values.
    chain = batchnorm_chains(graph, {id(layer)}).get(id(layer))
    start = calls[0] if chain is None else (chain.activation or chain.batchnorm)
    return graph.chain_end(start.outputs[0], _reads_through)


def batchnorm_after(model: keras.Model) -> dict[str, keras.layers.BatchNormalization]:
    """Masked layer name -> its BatchNormalization: the fused one it carries
    (``layer.batch_normalization``, :func:`fineprune_tf.convert`'s default), or the one that is
    its only consumer.

    Read from the model's functional graph (:class:`Graph`): a layer qualifies when it is
    called once and its output tensor feeds exactly one node, a ``BatchNormalization`` over the
    last axis.  This is the universal version of the
    check CLP's authors found "difficult to write" (they assume each BN follows the previous
    conv in module order).
    """
    graph = Graph(model)
    pairs = {}
    for gnode in graph.nodes:
        layer = gnode.layer
        if not isinstance(layer, MaskedLayerMixin) or graph.calls_per_layer[id(layer)] != 1:
            continue
        if layer.batch_normalization is not None:
            pairs[layer.name] = layer.batch_normalization
            continue
        consumers = graph.consumers.get(id(gnode.outputs[0]), [])
        if len(consumers) != 1 or id(gnode.outputs[0]) in graph.output_ids:
            continue
        follower = consumers[0].layer
        if isinstance(follower, keras.layers.BatchNormalization) and follower.axis in (
            -1,
            len(gnode.outputs[0].shape) - 1,
            [-1],
            [len(gnode.outputs[0].shape) - 1],
        ):
            pairs[layer.name] = follower
    return pairs
