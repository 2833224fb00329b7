"""Per-channel activation statistics of masked layers over a data set, in one pass.

The compiled op reduces each batch to three ``[C]`` vectors inside the layer; only those are
accumulated, so no activation tensor is ever kept.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from fineprune_tf.layers import MaskedLayerMixin, StatsRecorder, masked_layers

__all__ = ["ChannelStats", "collect", "as_dataset"]


@dataclass(frozen=True)
class ChannelStats:
    """Statistics of one layer's activations ``a = act(z)`` (before the mask), per channel.

    Attributes:
      mean: float64 ``[C]``, mean of ``a`` over all images and spatial positions.
      std: float64 ``[C]``, population standard deviation of ``a``.
      dormant_fraction: float64 ``[C]``, fraction of entries with ``a <= 0`` (dormant, §2.1).
      count: number of entries per channel (images x H x W).
    """

    mean: np.ndarray
    std: np.ndarray
    dormant_fraction: np.ndarray
    count: int


def as_dataset(data, batch_size: int = 128) -> tf.data.Dataset:
    """Wraps a ``tf.data.Dataset``, an array ``x`` or a tuple ``(x, y)`` as batches of inputs.

    Datasets that yield ``(x, y)`` or ``(x, y, w)`` tuples are reduced to ``x``.
    """
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        return data.map(lambda *e: e[0]) if isinstance(spec, tuple) else data
    if isinstance(data, (tuple, list)):
        data = data[0]
    x = np.asarray(data)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch of inputs, got an array of shape {x.shape}")
    return tf.data.Dataset.from_tensor_slices(x).batch(batch_size)


def _select(model: keras.Model, layer_names: Sequence[str] | None) -> list[MaskedLayerMixin]:
    layers = masked_layers(model)
    if not layers:
        raise ValueError(f"model {model.name!r} has no MaskedConv2D or MaskedDense layer")
    if layer_names is None:
        return layers
    by_name = {layer.name: layer for layer in layers}
    missing = [name for name in layer_names if name not in by_name]
    if missing:
        raise ValueError(
            f"no masked layer named {missing} in model {model.name!r}; masked layers: "
            f"{sorted(by_name)}")
    return [by_name[name] for name in layer_names]


# One traced step per (model, layers): re-tracing per call would cost more than small passes.
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _recording_step(model: keras.Model, layers: list[MaskedLayerMixin]):
    """A ``tf.function`` running ``model`` with recorders attached to ``layers``.

    The recorders are attached only while the function traces, so the graph it builds (and no
    other, e.g. ``model.predict``'s) updates them.
    """
    strategy = tf.distribute.get_strategy()
    key = (tuple(layer.name for layer in layers), id(strategy))
    cached = _STEPS.setdefault(model, {})
    if key not in cached:
        with strategy.scope():
            recorders = {layer.name: StatsRecorder(layer.channels) for layer in layers}

        def replica_step(x):
            for layer in layers:
                layer._stats_recorder = recorders[layer.name]
            try:
                model(x, training=False)
            finally:
                for layer in layers:
                    layer._stats_recorder = None

        @tf.function(reduce_retracing=True)
        def step(x):
            strategy.run(replica_step, args=(x,))

        cached[key] = (step, recorders)
    return cached[key]


def collect(model: keras.Model, data, layer_names: Sequence[str] | None = None,
            batch_size: int = 128) -> dict[str, ChannelStats]:
    """Runs ``model`` once over ``data`` and returns each masked layer's channel statistics.

    Inside a ``tf.distribute`` strategy's scope (the model built under it) the pass runs on
    every replica and the statistics are summed across replicas.  Memory: one batch of
    activations per layer at a time plus four ``[C]`` accumulators; ``data`` may stream.

    Args:
      model: a Keras model containing MaskedConv2D / MaskedDense layers.
      data: a ``tf.data.Dataset`` (of inputs or ``(x, y)`` batches), an array or ``(x, y)``.
      layer_names: layers to measure (default: every masked layer).
      batch_size: batch size when ``data`` is an array.

    Returns:
      ``{layer name: ChannelStats}``.
    """
    layers = _select(model, layer_names)
    step, recorders = _recording_step(model, layers)
    for recorder in recorders.values():
        recorder.reset()
    dataset = as_dataset(data, batch_size)
    strategy = tf.distribute.get_strategy()
    if tf.distribute.has_strategy():
        # Each replica gets its slice of every global batch; the recorders sum on read.
        dataset = strategy.experimental_distribute_dataset(dataset)
    for x in dataset:
        step(x)

    result = {}
    for name, recorder in recorders.items():
        total, total_sq, positive, elements = _replica_sum(
            strategy, [recorder.sum, recorder.sum_sq, recorder.positive, recorder.elements])
        count = float(elements)
        if count == 0:
            raise ValueError("the data set is empty: no statistics were collected")
        mean = total / count
        variance = np.maximum(total_sq / count - mean**2, 0.0)
        result[name] = ChannelStats(
            mean=mean, std=np.sqrt(variance),
            dormant_fraction=1.0 - positive / count, count=int(count))
    return result


def _replica_sum(strategy: tf.distribute.Strategy, variables: list) -> list[np.ndarray]:
    """Sums on-read variables over every replica of every worker.

    A cross-replica read sums the local replicas only; with several workers the partial sums
    are all-reduced inside a replica context, which every worker joins.
    """
    if strategy.extended._in_multi_worker_mode():  # noqa: SLF001 - no public equivalent
        context = tf.distribute.get_replica_context

        @tf.function
        def all_reduce():
            return strategy.run(lambda: [context().all_reduce(
                tf.distribute.ReduceOp.SUM, variable.read_value()) for variable in variables])

        values = [strategy.experimental_local_results(v)[0] for v in all_reduce()]
    else:
        values = [v.read_value() for v in variables]
    return [np.asarray(v.numpy()) for v in values]
