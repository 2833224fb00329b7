"""The default layer a defense prunes when none is given (``--layer`` left out).

:func:`default_layer` reads the model's graph (:class:`fineprune_tf.graph.Graph`) and picks the
last prunable convolution before the classifier head: any masked convolution kind
(:data:`fineprune_tf.layers.MASKED_CONVOLUTIONS`) or the stock Keras convolution it extends
(Conv1D/2D/3D, SeparableConv1D/2D, DepthwiseConv1D/2D), or a pointwise Dense (a Dense on a
rank-3+ tensor, ConvNeXt's blocks).  ``fineprune_tf.models`` re-exports
every public name here, so ``models.default_layer`` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from fineprune_tf.graph import (
    Graph,
    Role,
    cross_channel_activation,
    flatten_nested,
    has_nested,
    node_role,
)
from fineprune_tf.layers import MASKED_CONVOLUTIONS, PLAIN_OF, MaskedDense

__all__ = ["CONVOLUTIONS", "LayerChoice", "default_layer", "last_conv_layer"]

#: Every convolution kind the default-layer choice considers: the masked ones and the stock
#: Keras classes they extend (a stock model is read before :func:`fineprune_tf.convert`).
CONVOLUTIONS: tuple[type, ...] = MASKED_CONVOLUTIONS + tuple(
    PLAIN_OF[kind] for kind in MASKED_CONVOLUTIONS
)

#: Layer roles counted as one step of distance to the outputs: a layer whose output channels
#: are its own learned mixtures of its inputs (dense, convolution, grouped convolution).
_WEIGHTED_ROLES = (Role.MIXES, Role.GROUPED)


@dataclass(frozen=True)
class LayerChoice:
    """The default pruned layer and why it was chosen (for the CLI to print)."""

    name: str
    reason: str


def _channels(layer: keras.layers.Layer) -> int:
    """Output channels of a convolution called once; depthwise layers have no ``filters``
    (their width is ``C_in * depth_multiplier``), so the output shape is read instead."""
    filters = getattr(layer, "filters", None)
    return int(filters) if filters is not None else int(layer.output.shape[-1])


def _is_pointwise_dense(graph: Graph, layer: keras.layers.Layer) -> bool:
    """A Dense (masked or not) applied to a rank-3+ tensor: a 1x1 convolution on the last axis
    (ConvNeXt's ``pointwise_conv_1/2``), which :func:`fineprune_tf.convert` masks like a conv."""
    if not isinstance(layer, (keras.layers.Dense, MaskedDense)):
        return False
    calls = graph.nodes_of(layer)
    return len(calls) == 1 and len(calls[0].inputs[0].shape) >= 3


def _is_convolution(graph: Graph, layer: keras.layers.Layer) -> bool:
    return isinstance(layer, CONVOLUTIONS) or _is_pointwise_dense(graph, layer)


def _candidate_convs(graph: Graph) -> list:
    """Convolutions of any kind (:data:`CONVOLUTIONS`, and pointwise Dense layers) whose
    channels can be pruned one by one: called once, channels_last, not grouped, no
    cross-channel activation (softmax, ...)."""
    found = []
    for layer in graph.layers():
        if (
            _is_convolution(graph, layer)
            and graph.calls_per_layer[id(layer)] == 1
            and getattr(layer, "data_format", "channels_last") == "channels_last"
            and getattr(layer, "groups", 1) == 1  # depthwise and separable layers have none
            and not cross_channel_activation(layer)
        ):
            found.append(layer)
    return found


def default_layer(model: keras.Model) -> LayerChoice:
    """The layer a defense prunes when none is given: the last prunable convolution before the
    classifier head, by graph distance from the output.

    Every convolution kind counts (:data:`CONVOLUTIONS`: Conv1D/2D/3D, separable, depthwise,
    masked or not).  Distance is the number of weighted layers (``Role.MIXES``: conv, dense;
    ``Role.GROUPED``: grouped conv) after the conv on the shortest path to a model output.
    Convolutions at distance 0 reach the output through parameter-free layers only: they *are*
    the classifier (MobileNetV3's 1x1 ``logits`` conv, whose width is the class count) and are
    never chosen.  Among the closest of the others, a conv that every input-to-output path goes
    through *and* whose channels reach the output without being summed into others (no
    Add/Multiply/... on some path) is preferred: the paper's "last convolutional layer of the
    shared trunk", ``conv3`` of DeepID, whose ``conv4`` branch ``pool3`` bypasses into a
    concatenation (§3.1).  Otherwise the last in execution order: in a ResNet the stem is on
    every path too, but identity skips sum it into every later block, so the last block's last
    conv is chosen.  For models from :func:`fineprune_tf.models.build` the choice is
    ``models.PRUNED_LAYER[task]``.  A model with nested models is read flattened
    (:func:`fineprune_tf.graph.flatten_nested`): the name is then the one
    :func:`fineprune_tf.convert` gives, e.g. ``backbone.Conv_1``.

    Raises:
      ValueError: no convolution, or none that can be pruned (the message says why).
    """
    graph = Graph(model)
    if has_nested(graph):  # names then refer to the flat model convert() makes
        graph = Graph(flatten_nested(model))
    convs = _candidate_convs(graph)
    if not any(_is_convolution(graph, layer) for layer in graph.layers()):
        raise ValueError(
            f"model {model.name!r} has no convolution layer (Conv1D/2D/3D, separable or depthwise)"
        )
    weighted = graph.distances_to_outputs(lambda g: int(node_role(g) in _WEIGHTED_ROLES))
    distance = {id(g.layer): weighted[g.index] for g in graph.nodes if g.index in weighted}
    # Distance 0 covers "a conv whose width is the class count and that feeds the output".
    heads = [c for c in convs if distance.get(id(c)) == 0]
    usable = [c for c in convs if distance.get(id(c), 0) > 0]
    if not usable:
        raise ValueError(
            f"model {model.name!r} has no prunable convolution layer before its classifier"
            + (
                f" (the classifier convs {[c.name for c in heads]} are not pruned)"
                if heads
                else " (grouped, shared, channels_first or softmax convs only)"
            )
        )
    nearest = min(distance[id(c)] for c in usable)
    closest = [c for c in usable if distance[id(c)] == nearest]
    merges = graph.distances_to_outputs(
        lambda g: int(node_role(g) is Role.ELEMENTWISE and len(g.inputs) > 1)
    )
    unsummed = {id(g.layer) for g in graph.nodes if merges.get(g.index) == 0}
    trunk = [c for c in closest if id(c) in unsummed and graph.on_every_path(c)]
    chosen = (trunk or closest)[-1]
    reason = (
        f"{chosen.name!r} ({_channels(chosen)} channels) is the last prunable conv before "
        f"the classifier: {nearest} weighted layer{'s' if nearest != 1 else ''} from "
        "the output"
    )
    if trunk:
        reason += ", on every input-to-output path"
    elif len(closest) > 1:
        reason += f", the last of {len(closest)} at that distance"
    if heads:
        reason += f"; not the classifier conv{'s' if len(heads) > 1 else ''} " + ", ".join(
            f"{c.name!r} ({_channels(c)} channels)" for c in heads
        )
    return LayerChoice(chosen.name, reason)


def last_conv_layer(model: keras.Model) -> str:
    """Name of :func:`default_layer` (the choice without its reason), for
    ``model.get_layer`` and ``fineprune_tf.stats.collect(layer_names=...)``."""
    return default_layer(model).name
