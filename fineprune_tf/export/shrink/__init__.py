"""Shrinking: remove pruned channels for real (:func:`shrink`) or keep them as zero weights
(:func:`to_plain`); the rules are in :mod:`fineprune_tf.export`'s docstring."""

from __future__ import annotations

import keras
import numpy as np
from absl import logging

from fineprune_tf import _keras_compat as compat
from fineprune_tf.conversion import (
    ConversionError,
    check_layers,
    check_not_quantized,
    not_prunable_reason,
    to_numpy,
)
from fineprune_tf.export.shrink.build import _Builder
from fineprune_tf.export.shrink.plan import UNKNOWN_DIM, _plan
from fineprune_tf.graph import Graph
from fineprune_tf.layers import MaskedLayerMixin

__all__ = ["VERIFY_RTOL", "rebuild_plain", "shrink", "to_plain", "verify_tolerance"]


def _check_shrinkable(graph: Graph) -> None:
    check_layers(graph, "shrink/export")
    for layer in graph.layers():
        if isinstance(layer, keras.layers.Layer):
            check_not_quantized(layer)
            policy = getattr(layer, "dtype_policy", None)
            if policy is not None and policy.compute_dtype not in ("float32",) and layer.weights:
                raise ConversionError(
                    f"layer {layer.name!r} computes in {policy.compute_dtype}; only float32 "
                    "models are supported"
                )
        reason = not_prunable_reason(layer)
        if reason and isinstance(layer, MaskedLayerMixin) and layer.pruned_channels.size:
            # Not an internal error: such a layer cannot be pruned at all (convert() never
            # makes one masked; this one was built or loaded masked and then pruned).
            raise ConversionError(
                f"cannot shrink/export: {reason}, yet "
                f"{layer.pruned_channels.size} of them are pruned"
            )


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


#: Relative tolerance of the self-check: an output may differ from the reference by at most
#: ``VERIFY_RTOL * max(1, max |reference output|)``.  Shrinking folds constants into biases and
#: removes terms from float32 sums, so the rounding error grows with the output's magnitude: a
#: ResNet50 with logits ~158 differs by ~3e-4 between batch sizes 1 and 4 of the *same* masked
#: model (2e-6 of the scale).  At scales up to 1 (probabilities) this is the former absolute
#: 1e-4; a real mistake (a live channel dropped, a wrong bias) moves outputs by a sizeable
#: fraction of their scale (a pruned softmax conv: 0.136 on probabilities).
VERIFY_RTOL = 1e-4


def verify_tolerance(reference_output: np.ndarray, rtol: float = VERIFY_RTOL) -> float:
    """The largest acceptable ``max |reference - candidate|`` for one output:
    ``rtol * max(1, max |reference_output|)`` (absolute ``rtol`` below scale 1)."""
    scale = float(np.max(np.abs(reference_output))) if reference_output.size else 0.0
    return rtol * max(1.0, scale)


def _verify(reference: keras.Model, candidate: keras.Model, rtol: float = VERIFY_RTOL) -> None:
    """Raises when ``candidate`` does not reproduce ``reference`` on a few random inputs, to
    :func:`verify_tolerance` of each output's scale."""
    x = _random_inputs(reference, 4, seed=0)
    if x is None:
        return
    want = keras.tree.flatten(reference(x, training=False))
    got = keras.tree.flatten(candidate(x, training=False))
    for a, b in zip(want, got, strict=True):
        a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        tolerance = verify_tolerance(a, rtol)
        if not diff <= tolerance:
            raise ConversionError(
                f"internal error: the rebuilt model differs from {reference.name!r} by {diff:g} "
                f"on random inputs (tolerance {tolerance:g} = {rtol:g} x max(1, output scale "
                f"{float(np.max(np.abs(a))):g}))"
            )


def shrink(model: keras.Model, verify: bool = True) -> keras.Model:
    """Removes pruned channels for real and returns a smaller plain Keras model.

    Args:
      model: a functional / built Sequential model of built-in Keras layers and
        ``fineprune_tf`` masked layers (float32, channels_last).  Not modified.
      verify: compare the result with ``model`` on 4 random normal inputs and raise if any
        output differs by more than :func:`verify_tolerance`: ``VERIFY_RTOL`` (1e-4) times
        ``max(1, max |output|)`` (a self-check relative to the output's scale, so large logits
        are not a false alarm; costs two small forward passes).

    Returns:
      A functional model with the same name, layer names (the masked layers become their
      stock classes, :data:`fineprune_tf.layers.PLAIN_OF`, of the same names), inputs and
      output shapes, and the same predictions as ``model`` up to float32 rounding.  It
      contains no ``fineprune_tf`` layer or op: its ``.keras`` file loads with stock Keras.
      See the module docstring for which channels can be removed.

    Raises:
      ConversionError: subclassed/unbuilt model, custom / code-carrying / quantized / nested
        layers (named), non-float32 layers.
    """
    return rebuild_plain(model, remove=True, verify=verify)


def to_plain(model: keras.Model, verify: bool = True) -> keras.Model:
    """Like :func:`shrink` but keeps every channel: masked layers become plain ``Conv2D`` /
    ``Dense`` with the pruned kernel slices and biases set to 0 (plus a ``Rescaling`` mask
    when ``act(0) != 0``).  Same shapes and parameter count as ``model``."""
    return rebuild_plain(model, remove=False, verify=verify)
