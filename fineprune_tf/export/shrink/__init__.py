"""Shrinking: remove pruned channels for real (:func:`shrink`) or keep them as zero weights
(:func:`to_plain`); the rules are in :mod:`fineprune_tf.export`'s docstring."""

from __future__ import annotations

import keras
import numpy as np
from absl import logging

from fineprune_tf.conversion import ConversionError, check_layers, check_not_quantized, to_numpy
from fineprune_tf.export.shrink.build import _Builder
from fineprune_tf.export.shrink.plan import UNKNOWN_DIM, _plan
from fineprune_tf.graph import Graph
from fineprune_tf.graph import _keras_compat as compat
from fineprune_tf.layers import MaskedLayerMixin

__all__ = ["rebuild_plain", "shrink", "to_plain"]


def _check_shrinkable(graph: Graph) -> None:
    check_layers(graph, "shrink/export")
    for layer in graph.layers():
        if isinstance(layer, keras.layers.Layer):
            check_not_quantized(layer)
            policy = getattr(layer, "dtype_policy", None)
            if policy is not None and policy.compute_dtype not in ("float32",) and layer.weights:
                raise ConversionError(
                    f"layer {layer.name!r} computes in {policy.compute_dtype}; only float32 "
                    "models are supported")


def rebuild_plain(model: keras.Model, remove: bool, verify: bool) -> keras.Model:
    graph = Graph(model)
    _check_shrinkable(graph)
    plan = _plan(graph, remove=remove)
    builder = _Builder(plan)
    plain = graph.rebuild(builder.call)
    builder.finish()
    if any(isinstance(layer, MaskedLayerMixin) for layer in plain.layers):
        raise ConversionError("internal error: a masked layer survived")
    if verify:
        _verify(model, plain)
    for name, (before, after) in builder.summary.items():
        if after != before:
            logging.info("fineprune_tf.export: %s keeps %d of %d channels", name, after, before)
    return plain


def _random_inputs(model: keras.Model, n: int, seed: int):
    """Standard-normal float32 inputs in the model's input structure (None when an input is
    not floating point)."""
    rng = np.random.default_rng(seed)
    struct = compat.input_struct(model)
    flat = keras.tree.flatten(struct if struct is not None else model.inputs)
    arrays = []
    for t in flat:
        if not str(t.dtype).startswith("float"):
            return None
        shape = [n] + [UNKNOWN_DIM if d is None else int(d) for d in t.shape[1:]]
        arrays.append(rng.standard_normal(shape).astype(np.float32))
    if len(arrays) == 1:
        return arrays[0]
    return keras.tree.pack_sequence_as(struct, arrays) if struct is not None else arrays


def _verify(reference: keras.Model, candidate: keras.Model, atol: float = 1e-4) -> None:
    """Raises when ``candidate`` does not reproduce ``reference`` on a few random inputs."""
    x = _random_inputs(reference, 4, seed=0)
    if x is None:
        return
    want = keras.tree.flatten(reference(x, training=False))
    got = keras.tree.flatten(candidate(x, training=False))
    for a, b in zip(want, got, strict=True):
        diff = float(np.max(np.abs(to_numpy(a)
                                   - to_numpy(b))))
        if not diff <= atol:
            raise ConversionError(
                f"internal error: the rebuilt model differs from {reference.name!r} by {diff:g} "
                "on random inputs")


def shrink(model: keras.Model, verify: bool = True) -> keras.Model:
    """Removes pruned channels for real and returns a smaller plain Keras model.

    Args:
      model: a functional / built Sequential model of built-in Keras layers and
        ``fineprune_tf`` masked layers (float32, channels_last).  Not modified.
      verify: compare the result with ``model`` on 4 random normal inputs and raise if any
        output differs by more than 1e-4 (a self-check; costs two small forward passes).

    Returns:
      A functional model with the same name, layer names (the masked layers become
      ``keras.layers.Conv2D`` / ``Dense`` of the same names), inputs and output shapes, and the
      same predictions as ``model`` up to float32 rounding.  It contains no ``fineprune_tf``
      layer or op: its ``.keras`` file loads with stock Keras.  See the module docstring for
      which channels can be removed.

    Raises:
      ConversionError: subclassed/unbuilt model, custom / code-carrying / quantized / nested
        layers (named), non-float32 layers, grouped MaskedConv2D.
    """
    return rebuild_plain(model, remove=True, verify=verify)


def to_plain(model: keras.Model, verify: bool = True) -> keras.Model:
    """Like :func:`shrink` but keeps every channel: masked layers become plain ``Conv2D`` /
    ``Dense`` with the pruned kernel slices and biases set to 0 (plus a ``Rescaling`` mask
    when ``act(0) != 0``).  Same shapes and parameter count as ``model``."""
    return rebuild_plain(model, remove=False, verify=verify)

