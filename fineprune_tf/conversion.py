"""Turn a stock Keras model into a prunable one: every convolution (Conv1D/2D/3D, grouped ones
included, SeparableConv1D/2D, DepthwiseConv1D/2D) becomes its masked twin
(:data:`fineprune_tf.layers.PLAIN_OF`; e.g. :class:`~fineprune_tf.layers.MaskedConv2D`), and so
does every pointwise ``Dense`` (one on a rank-3+ input, a 1x1 convolution over the last axis);
optionally every hidden ``Dense`` on ``[N, D]`` becomes a
:class:`~fineprune_tf.layers.MaskedDense` too.  Same weights, names and graph.

The model usually comes from an untrusted party (it is the model the defense cleans), so
conversion only accepts graphs made of built-in Keras layers: a custom layer or a ``Lambda``
would carry the supplier's code into the cleaned model, and is refused by name.

Mask placement (``fuse_batchnorm=True``, the default): a convolution with a linear activation
followed by a ``BatchNormalization`` (and by ReLU, ReLU6 or a per-element ``Activation``) becomes
*one* masked layer carrying that BN as a sub-layer (:func:`fineprune_tf.graph.batchnorm_chains`
finds the chains): it computes ``act(BN(conv(x))) * mask``, so a pruned channel is exactly 0 at
the end of the chain, physically removable by :func:`fineprune_tf.export.shrink`, and the
statistics rank the post-BN, post-ReLU activation as the paper does.  The masked layer keeps
the conv's name; its BN sub-layer keeps the BN's name (``layer.batch_normalization.name``); the
activation layer is absorbed (its function is the masked layer's ``activation``).

``fuse_batchnorm=False`` keeps the graph layer for layer (the former placement): the mask
multiplies the conv's own output, and a pruned channel then carries BN's shift, the constant
``act(beta - gamma * mean / sqrt(var + eps))``, which shrink keeps or folds exactly.  It is
there for code that addresses the BN / ReLU layers by name, and to reproduce results obtained
with that placement; ``.keras`` files written that way load and behave unchanged.

The model's graph is read through :class:`fineprune_tf.graph.Graph` (``FunctionalGraph`` here is
the same class under its former name).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from absl import logging

from fineprune_tf import _keras_compat as compat
from fineprune_tf.graph import (
    ConversionError,
    Graph,
    GraphNode,
    Role,
    activation_name,
    batchnorm_chains,
    cross_channel_activation,
    flatten_nested,
    has_nested,
    node_role,
)
from fineprune_tf.graph.flatten import copy_layer_weights
from fineprune_tf.graph.fusion import BatchNormChain

# Layers built into Keras that run code or load artefacts chosen by the model's author.
from fineprune_tf.io.op_allowlist import KERAS_CODE_CARRYING_LAYERS as _CODE_CARRYING
from fineprune_tf.layers import MASKED_LAYERS, PLAIN_OF, MaskedDense, MaskedLayerMixin

__all__ = [
    "ConversionError",
    "FunctionalGraph",
    "GraphNode",
    "check_layers",
    "convert",
    "is_builtin_keras",
    "not_prunable_reason",
    "to_numpy",
]

#: The graph walker, under its former name (it moved to :class:`fineprune_tf.graph.Graph`).
FunctionalGraph = Graph

#: Stock convolution class -> its masked twin (exact classes: a subclass may override ``call``).
MASKED_TWIN: dict[type, type] = {
    plain: masked for masked, plain in PLAIN_OF.items() if masked is not MaskedDense
}
_CONV_KINDS = "Conv1D/2D/3D, SeparableConv1D/2D or DepthwiseConv1D/2D"


def is_builtin_keras(operation: Any) -> bool:
    """True for layers / operations defined by Keras itself or by :mod:`fineprune_tf.layers`."""
    cls = type(operation)
    if cls in MASKED_LAYERS:
        return True
    return cls.__module__.split(".")[0] == "keras"


def check_layers(graph: Graph, what: str) -> None:
    """Refuses nested models, custom layers and code-carrying layers, naming them."""
    nested, custom, code = [], [], []
    for layer in graph.layers():
        if isinstance(layer, keras.Model):
            nested.append(f"{layer.name!r} ({type(layer).__name__})")
        elif type(layer).__name__ in _CODE_CARRYING and is_builtin_keras(layer):
            code.append(f"{layer.name!r} ({type(layer).__name__})")
        elif not is_builtin_keras(layer):
            custom.append(f"{layer.name!r} ({type(layer).__module__}.{type(layer).__qualname__})")
    problems = []
    if nested:
        problems.append(
            "nested models are not supported (flatten them into one functional graph): "
            + ", ".join(nested)
        )
    if code:
        problems.append(
            "layers that run the model author's code or load external artefacts are "
            "refused: " + ", ".join(code)
        )
    if custom:
        problems.append("unknown custom layers (not built into Keras): " + ", ".join(custom))
    if problems:
        raise ConversionError(f"cannot {what} model {graph.model.name!r}: " + "; ".join(problems))


def to_numpy(x: Any) -> np.ndarray:
    """A numpy copy of a tensor or Keras variable (through a tensor: numpy 2 warns when it
    converts a variable directly)."""
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.convert_to_tensor(x)))


def clone_layer(
    layer: keras.layers.Layer, cls: type | None = None, **overrides: Any
) -> keras.layers.Layer:
    """A fresh, unbuilt layer of class ``cls`` (default: the same class) from ``layer``'s config,
    with ``overrides`` applied.  When the class changes LoRA settings are dropped: the callers
    then copy the *effective* kernel (LoRA folded in); a plain class drops a fused
    ``batch_normalization`` (the callers fold it into kernel and bias)."""
    config = layer.get_config()
    if cls is not None and cls is not type(layer):
        config.pop("lora_rank", None)
        config.pop("lora_alpha", None)
    if cls is not None and not issubclass(cls, MaskedLayerMixin):
        config.pop("batch_normalization", None)  # the caller folds a fused BN into the weights
    config.update(overrides)
    return (cls or type(layer)).from_config(config)


def check_not_quantized(layer: Any) -> None:
    """Refuses int8/float8-quantized layers: their kernels are not plain float tensors to copy
    or slice."""
    mode = getattr(getattr(layer, "dtype_policy", None), "quantization_mode", None)
    if mode:
        raise ConversionError(
            f"layer {layer.name!r} is quantized ({mode}); quantized layers are not supported"
        )


def _passes_to_output(gnode: GraphNode) -> bool:
    """A parameter-free, single-input layer that keeps channels where they are (an
    activation, Softmax, Dropout, ...): it may sit between a classifier and the output."""
    return (
        node_role(gnode) in (Role.ELEMENTWISE, Role.CROSS_CHANNEL)
        and len(gnode.inputs) == 1
        and not getattr(gnode.layer, "weights", ())  # bare keras.ops calls have none
    )


def _is_classifier(graph: Graph, gnode: GraphNode) -> bool:
    """A Dense whose output reaches a model output through parameter-free layers only."""
    outputs = graph.output_ids
    stack, seen = [gnode.outputs[0]], set()
    while stack:
        t = stack.pop()
        if id(t) in outputs:
            return True
        if id(t) in seen:
            continue
        seen.add(id(t))
        for consumer in graph.consumers.get(id(t), []):
            if _passes_to_output(consumer):
                stack.extend(consumer.outputs)
    return False


def not_prunable_reason(layer: Any) -> str | None:
    """Why the output channels of a Conv2D / Dense ``layer`` cannot be pruned one by one, or
    None when they can.

    A cross-channel activation (``activation="softmax"``, ...; the graph registry's
    :data:`~fineprune_tf.graph.CROSS_CHANNEL_ACTIVATIONS`) normalises over the channels: zeroing
    one after the activation leaves the others summing to less than 1, and zeroing it before
    changes every other channel, so no mask of that layer removes a channel exactly.
    """
    if cross_channel_activation(layer):
        return (
            f"layer {layer.name!r} has activation={activation_name(layer.activation)!r}, "
            "which mixes its channels: they cannot be pruned independently"
        )
    return None


def _conv_problems(layer: keras.layers.Layer) -> list[str]:
    if layer.data_format != "channels_last":
        return [
            f"{layer.name!r}: data_format={layer.data_format!r} (only channels_last is "
            "supported: the masked op acts on the last axis)"
        ]
    return []


def _skip_not_prunable(layer: Any, wanted: set[str] | None, problems: list[str]) -> bool:
    """True when ``layer`` must stay a plain layer (see :func:`not_prunable_reason`); an error
    in ``problems`` when it was asked for by name, a log line otherwise."""
    reason = not_prunable_reason(layer)
    if reason is None:
        return False
    if wanted is not None:
        problems.append(reason)
    else:
        logging.info("fineprune_tf.convert: %s; it stays a plain %s", reason, type(layer).__name__)
    return True


def convert(
    model: keras.Model,
    dense: bool = False,
    classifier: bool = False,
    layer_names: Sequence[str] | None = None,
    fuse_batchnorm: bool = True,
) -> keras.Model:
    """Returns a copy of ``model`` in which every convolution is a masked one
    (``Conv2D`` -> ``MaskedConv2D``, ``Conv1D`` -> ``MaskedConv1D``, ... :data:`MASKED_TWIN`).

    Args:
      model: a functional or (built) Sequential Keras 3 model made of built-in Keras layers
        (Conv1D/2D/3D, SeparableConv1D/2D, DepthwiseConv1D/2D, BatchNormalization, Add,
        Concatenate, pooling, Flatten, GlobalAveragePooling2D, Dropout, Dense,
        Activation/ReLU, Reshape, ... and
        ``fineprune_tf`` masked layers, which are copied as they are, masks included).
      dense: also turn every *hidden* ``Dense`` with a rank-2 input ``[N, D]`` into a
        ``MaskedDense``.  A Dense applied to a rank-3 to 5 tensor ``[N, ..., D]`` is a pointwise
        (1x1) convolution over the last axis and is converted whatever ``dense`` says, as a
        convolution is (ConvNeXt's ``pointwise_conv_1`` / ``_2``).
      classifier: with ``dense=True``, also convert the classifier(s): Dense layers whose output
        reaches a model output through parameter-free layers only (Activation, Softmax,
        Dropout).  Off by default: pruning a class logit is never what the defense wants.
      layer_names: convert only these convolution / Dense layers (by name); default all
        eligible.
        A layer whose channels cannot be pruned independently (a cross-channel activation such
        as ``softmax``: :func:`not_prunable_reason`) is never converted, so it can never be
        pruned; it is an error when named here, and left plain (and logged) otherwise.
      fuse_batchnorm: fold each converted conv -> BatchNormalization (-> activation) chain
        into one masked layer, masked at the end of the chain (module docstring).

    Nested Functional / Sequential models (a backbone used as a layer), at any depth, are first
    inlined by :func:`fineprune_tf.graph.flatten_nested`: their layers are then named
    ``<nested model>.<layer>`` (e.g. ``backbone.block_1_expand``).

    Returns:
      A new, uncompiled functional model (a Sequential input gives a functional output) with the
      same name, layer names (nested ones prefixed as above; fused BN / activation layers
      live inside their conv), input names, topology (shared
      layers stay shared, multi-input layers keep their inputs) and weights; every mask is all
      ones, so its outputs equal the original's.  The original model is not modified and
      shares no variables with the result.

    Raises:
      ConversionError: subclassed or unbuilt model (or nested model); custom or code-carrying
        layers (``Lambda``, ``TFSMLayer``), named; channels_first convolutions; quantized
        layers; no convolution at all, or no prunable one; ``layer_names`` naming a missing /
        non-convertible / not prunable layer.
    """
    graph = Graph(model)
    if has_nested(graph):
        graph = Graph(flatten_nested(model))
    check_layers(graph, "convert")
    wanted = None if layer_names is None else set(layer_names)

    replace = _replacements(graph, model.name, dense, classifier, wanted)
    if not replace and not any(isinstance(x, MaskedLayerMixin) for x in graph.layers()):
        raise ConversionError(
            f"model {model.name!r} has no prunable layer: "
            + "; ".join(filter(None, map(not_prunable_reason, graph.layers())))
        )
    chains = (
        batchnorm_chains(graph, {i for i, cls in replace.items() if cls is not MaskedDense})
        if fuse_batchnorm
        else {}
    )
    absorbed = {c.batchnorm.index for c in chains.values()}
    absorbed |= {c.activation.index for c in chains.values() if c.activation is not None}
    clones: dict[int, Any] = {}

    def call(gnode: GraphNode, args: tuple, kwargs: dict) -> Any:
        layer = gnode.layer
        if gnode.index in absorbed:
            return args[0]  # runs inside the fused masked layer that produced args[0]
        if not isinstance(layer, keras.layers.Layer):
            return layer(*args, **kwargs)  # a stateless keras.ops operation: reuse it
        if id(layer) not in clones:  # shared layers stay shared
            clones[id(layer)] = clone_layer(
                layer, replace.get(id(layer)), **_fused_overrides(chains.get(id(layer)))
            )
        return clones[id(layer)](*args, **kwargs)

    converted = graph.rebuild(call)
    for layer in graph.layers():
        if id(layer) in clones:
            _copy_weights(layer, clones[id(layer)])
            if id(layer) in chains:
                source = chains[id(layer)].batchnorm.layer
                copy_layer_weights(source, clones[id(layer)].batch_normalization)
    return converted


def _is_pointwise(gnode: GraphNode) -> bool:
    """A Dense call on a rank-3 to 5 input ``[N, ..., D]``: a 1x1 convolution over the last
    axis (ConvNeXt's ``pointwise_conv_1``), converted like a convolution."""
    return all(3 <= len(t.shape) <= 5 for t in gnode.inputs)


def _replacements(
    graph: Graph, model_name: str, dense: bool, classifier: bool, wanted: set[str] | None
) -> dict[int, type]:
    """``id(layer) -> masked class`` for every layer :func:`convert` turns into its masked
    twin (the arguments are :func:`convert`'s).

    Raises:
      ConversionError: no convolution at all; a named layer missing, not convertible or not
        prunable; a convolution the masked twin cannot represent.
    """
    replace: dict[int, type] = {}
    problems: list[str] = []
    has_conv = False
    for gnode in graph.nodes:
        layer = gnode.layer
        if isinstance(layer, keras.layers.Layer):
            check_not_quantized(layer)
        if isinstance(layer, MaskedLayerMixin) and (
            not isinstance(layer, MaskedDense) or _is_pointwise(gnode)
        ):
            has_conv = True
        elif type(layer) in MASKED_TWIN:
            has_conv = True
            if wanted is None or layer.name in wanted:
                if _skip_not_prunable(layer, wanted, problems):
                    continue
                problems.extend(_conv_problems(layer))
                replace[id(layer)] = MASKED_TWIN[type(layer)]
        elif type(layer) is keras.layers.Dense:
            pointwise = _is_pointwise(gnode)
            has_conv |= pointwise
            if not (pointwise or dense) or (wanted is not None and layer.name not in wanted):
                continue
            if _skip_not_prunable(layer, wanted, problems):
                continue
            if not pointwise and not classifier and _is_classifier(graph, gnode):
                continue
            replace[id(layer)] = MaskedDense
    if not has_conv:
        raise ConversionError(
            f"model {model_name!r} has no Conv2D layer to convert (nor any "
            f"other convolution: {_CONV_KINDS}, nor a Dense on a rank-3+ input)"
        )
    if wanted is not None:
        found = {
            layer.name
            for layer in graph.layers()
            if id(layer) in replace
            or (type(layer) in (*MASKED_TWIN, keras.layers.Dense) and not_prunable_reason(layer))
        }
        missing = sorted(wanted - found)
        if missing:
            problems.append(
                f"layers {missing} are not convertible convolution ({_CONV_KINDS})"
                + (" or Dense" if dense else " or pointwise Dense (on a rank-3+ input)")
                + " layers of the model"
            )
    if problems:
        raise ConversionError(f"cannot convert model {model_name!r}: " + "; ".join(problems))

    return replace


def _fused_overrides(chain: BatchNormChain | None) -> dict[str, Any]:
    """``clone_layer`` overrides making a conv carry its chain's BN and activation."""
    if chain is None:
        return {}
    bn = chain.batchnorm.layer
    return {
        "batch_normalization": keras.layers.BatchNormalization.from_config(bn.get_config()),
        "activation": chain.activation_config,
    }


def _copy_weights(source: keras.layers.Layer, target: keras.layers.Layer) -> None:
    if isinstance(target, MaskedLayerMixin) and not isinstance(source, MaskedLayerMixin):
        if not hasattr(source, "lora_rank"):
            # Separable / depthwise -> masked twin: the same variables in the same order (no
            # LoRA on these classes); the mask, appended last, stays 1; a fused BN's variables
            # are copied by the caller.
            fused = {id(w) for w in getattr(target.batch_normalization, "weights", [])}
            own = [
                w for w in target.weights if w is not target.mask_variable and id(w) not in fused
            ]
            if [tuple(w.shape) for w in own] != [tuple(w.shape) for w in source.weights]:
                raise ConversionError(
                    f"internal error: {target.name!r} does not hold the "
                    f"variables of {type(source).__name__}"
                )
            for mine, theirs in zip(own, source.weights, strict=True):
                mine.assign(to_numpy(theirs))
            return
        # Conv/Dense -> masked twin: same kernel (LoRA folded in) and bias, mask stays 1.
        compat.assign_kernel(target, to_numpy(source.kernel))
        if source.use_bias:
            target.bias.assign(to_numpy(source.bias))
        return
    copy_layer_weights(source, target)
