"""The one cost counter: parameters and **multiply-adds** (MACs) of a model's graph.

Unit: a multiply-add is one multiplication and one addition; ``FLOPs = 2 x multiply-adds``
(what :mod:`fineprune_tf.curves` reports).  Counted for a batch of one, per call (a shared
layer counts once per call), for the layers that dominate inference: convolutions of every kind
and dense layers.  Element-wise work, pooling, normalisation and the masked activations are
left out (memory-bound and small next to them).

Per call, with ``P_out`` / ``P_in`` the output / input spatial positions (1 for rank 2):

* Conv1D/2D/3D: ``P_out * prod(kernel) * C_in / groups * C_out``
* DepthwiseConv1D/2D: ``P_out * prod(kernel) * C_out``
* SeparableConv1D/2D: ``P_out * (prod(kernel) * C_mid + C_mid * C_out)``, ``C_mid = C_in *
  depth_multiplier``
* Conv1D/2D/3DTranspose: ``P_in * prod(kernel) * C_in * C_out / groups``
* Dense: ``P_in * D_in * units`` (a Dense on a rank-3+ tensor runs at every position)

Pruned channels of a masked layer still count (the masked layer computes them); shrink first
(:func:`fineprune_tf.export.shrink`) to measure savings.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from fineprune_tf import _keras_compat as compat
from fineprune_tf.graph.errors import ConversionError
from fineprune_tf.graph.walker import Graph, GraphNode
from fineprune_tf.layers import MaskedLayerMixin

__all__ = ["UNIT", "Cost", "count", "multiply_adds", "node_multiply_adds", "parameters"]

#: The unit of every count in this module.
UNIT = "multiply-adds"

L = keras.layers
_TRANSPOSED = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
_DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)
_SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D)
_CONV = (L.Conv1D, L.Conv2D, L.Conv3D)
del L


@dataclasses.dataclass(frozen=True)
class Cost:
    """Parameters and multiply-adds of a model (batch of one)."""

    params: int
    multiply_adds: int

    @property
    def flops(self) -> int:
        """``2 * multiply_adds``."""
        return 2 * self.multiply_adds


def _positions(shape, what: str, layer) -> int:
    dims = shape[1:-1]
    if any(d is None for d in dims):
        raise ConversionError(
            f"layer {layer.name!r}: unknown {what} size {tuple(shape)}; FLOPs need a fixed "
            "input shape"
        )
    return int(np.prod(dims)) if dims else 1


def node_multiply_adds(gnode: GraphNode) -> int:
    """Multiply-adds of one call (0 for layers not counted; see the module docstring).

    Raises:
      ConversionError: a counted layer whose spatial size is unknown.
    """
    layer = gnode.layer
    if not isinstance(layer, keras.layers.Layer) or not gnode.inputs:
        return 0
    in_shape, out_shape = gnode.inputs[0].shape, gnode.outputs[0].shape
    if isinstance(layer, keras.layers.Dense):
        return _positions(in_shape, "input", layer) * int(in_shape[-1]) * int(layer.units)
    if not isinstance(layer, _TRANSPOSED + _DEPTHWISE + _SEPARABLE + _CONV):
        return 0
    k = int(np.prod(layer.kernel_size))
    if isinstance(layer, _TRANSPOSED):
        groups = getattr(layer, "groups", 1) or 1
        return (
            _positions(in_shape, "input", layer)
            * k
            * int(in_shape[-1])
            * int(out_shape[-1])
            // groups
        )
    if isinstance(layer, _DEPTHWISE):
        return _positions(out_shape, "output", layer) * k * int(out_shape[-1])
    if isinstance(layer, _SEPARABLE):
        mid = int(in_shape[-1]) * layer.depth_multiplier
        return _positions(out_shape, "output", layer) * (k * mid + mid * int(out_shape[-1]))
    return (
        _positions(out_shape, "output", layer)
        * k
        * int(in_shape[-1])
        // layer.groups
        * int(out_shape[-1])
    )


def multiply_adds(graph: Graph) -> int:
    """Sum of :func:`node_multiply_adds` over every call of the graph."""
    return sum(node_multiply_adds(gnode) for gnode in graph.nodes)


def parameters(graph: Graph) -> int:
    """Scalars in every weight of every distinct layer (trainable or not, BN statistics
    included) except the pruning masks of masked layers (not parameters of the served
    network)."""
    total = 0
    for layer in graph.layers():
        if not isinstance(layer, keras.layers.Layer):
            continue
        masks = {id(compat.mask_variable(layer))} if isinstance(layer, MaskedLayerMixin) else set()
        total += sum(int(np.prod(w.shape)) for w in layer.weights if id(w) not in masks)
    return total


def count(model: keras.Model) -> Cost:
    """:class:`Cost` of a functional / built Sequential model."""
    graph = Graph(model)
    return Cost(parameters(graph), multiply_adds(graph))
