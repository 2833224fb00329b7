"""Per-channel activation statistics of masked layers over a data set, in one pass.

Each masked layer reduces a batch to three ``[C]`` vectors as it runs (see
:meth:`fineprune_tf.layers.MaskedLayerMixin.recording_stats`); only those are accumulated, so no
activation tensor is ever kept.  TensorFlow accumulates in float64 on-read variables (summed
over ``tf.distribute`` replicas); JAX and PyTorch return each batch's sums from a compiled
forward and accumulate them in float64 on the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from fineprune_tf import model_io
from fineprune_tf.layers import MaskedLayerMixin, masked_layers

__all__ = ["BatchStats", "ChannelStats", "StatsCollector", "StatsRecorder", "as_dataset", "collect"]


class StatsRecorder:
    """TensorFlow accumulators of one layer's statistics, a sink for ``recording_stats``.

    Plain ``tf.Variable``s in float64 (not Keras weights: they are scratch state and must not be
    saved with the model).  Shapes ``[C]``; ``entries`` counts entries per channel (N*H*W summed
    over batches).  They are on-read SUM variables, as Keras metrics are: under a
    ``tf.distribute`` strategy each replica accumulates its own share and reading sums them.
    """

    def __init__(self, channels: int):
        def zeros(shape):
            return tf.Variable(
                tf.zeros(shape, tf.float64),
                trainable=False,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,
            )

        self.sum, self.sum_sq, self.positive = (zeros([channels]) for _ in range(3))
        self.entries = zeros([])

    def variables(self) -> list[tf.Variable]:
        return [self.sum, self.sum_sq, self.positive, self.entries]

    def reset(self) -> None:
        for variable in self.variables():
            variable.assign(tf.zeros_like(variable))

    def add(self, channel_sum, channel_sum_sq, positive_count, entries) -> None:
        for variable, value in zip(
            self.variables(), (channel_sum, channel_sum_sq, positive_count, entries), strict=True
        ):
            variable.assign_add(tf.cast(value, tf.float64))


class BatchStats:
    """A sink that keeps the sums of the calls traced while it records, as backend tensors.

    A forward function returns :meth:`totals` as its output (JAX and PyTorch), so nothing is
    stored between calls.  A layer called twice in one forward (shared) adds both calls.
    """

    def __init__(self):
        self._totals = None

    def add(self, channel_sum, channel_sum_sq, positive_count, entries) -> None:
        values = (channel_sum, channel_sum_sq, positive_count, entries)
        self._totals = (
            values
            if self._totals is None
            else tuple(keras.ops.add(a, b) for a, b in zip(self._totals, values, strict=True))
        )

    def totals(self) -> tuple:
        """``(sum, sum_sq, positive, entries)`` of this forward; raises if the layer never ran."""
        if self._totals is None:
            raise ValueError("the layer was not called while its statistics were recorded")
        return self._totals


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


def as_dataset(data, batch_size: int = 128, model: keras.Model | None = None) -> tf.data.Dataset:
    """Wraps a ``tf.data.Dataset``, the inputs, or a tuple ``(x, y)`` as batches of inputs.

    The inputs are an array, or for a model with several inputs a dict ``{input name: array}``
    or a list / tuple of arrays in ``model.inputs`` order.  A list or tuple is read as the
    inputs when ``model`` is given and its arrays fit the model's inputs, else as ``(x, y[,
    w])`` whose ``x`` is kept; likewise datasets yielding ``(x, y)`` or ``(x, y, w)`` tuples
    are reduced to ``x``.
    """
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        if not isinstance(spec, tuple) or (model is not None and _spec_matches(model, spec)):
            return data
        return data.map(lambda *e: e[0])
    if not (model is not None and model_io.matches_inputs(model, data)) and isinstance(
        data, (tuple, list)
    ):
        data = data[0]
    if model is not None:
        data = model_io.arrange_inputs(model, data)
    elif isinstance(data, Mapping):
        data = {key: np.asarray(value) for key, value in data.items()}
    else:
        data = np.asarray(data)
    leaves = keras.tree.flatten(data)
    if any(leaf.ndim < 2 for leaf in leaves) or model_io.num_examples(leaves) == 0:
        raise ValueError(
            "expected a non-empty batch of inputs, got arrays of shape "
            f"{[leaf.shape for leaf in leaves]}"
        )
    # tf.data reads a list as one tensor to stack: several inputs go in as a tuple.
    data = tuple(data) if isinstance(data, list) else data
    return tf.data.Dataset.from_tensor_slices(data).batch(batch_size)


def _spec_matches(model: keras.Model, spec: tuple) -> bool:
    """Whether a dataset's tuple of specs is a model's several inputs rather than ``(x, y)``."""
    if len(model.inputs) < 2 or len(spec) != len(model.inputs):
        return False
    return all(
        isinstance(s, tf.TensorSpec)
        and len(s.shape) == len(t.shape)
        and all(
            a is None or b is None or a == b for a, b in zip(s.shape[1:], t.shape[1:], strict=True)
        )
        for s, t in zip(spec, model.inputs, strict=True)
    )


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
            f"{sorted(by_name)}"
        )
    return [by_name[name] for name in layer_names]


@contextlib.contextmanager
def _recording(layers: list[MaskedLayerMixin], sinks: dict):
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(layer.recording_stats(sinks[layer.name]))
        yield


def default_jit_compile(model) -> bool:
    """The statistics pass's XLA choice for ``model``: its own ``compile(jit_compile=...)``,
    False when it is not compiled."""
    return bool(getattr(model, "compiled", False) and model.jit_compile)


class StatsCollector:
    """Collects channel statistics of some masked layers of one model, as often as asked.

    Builds (traces, compiles) its forward pass once; keep the object to reuse it across
    :meth:`collect` calls.  Nothing is stored on the model.

    Args:
      model: a Keras model containing MaskedConv2D / MaskedDense layers.
      layer_names: layers to measure (default: every masked layer).
      jit_compile: compile the pass with XLA (TensorFlow; JAX always does).  Default: the
        model's own ``compile(jit_compile=...)`` choice, False when it is not compiled.
    """

    def __init__(
        self,
        model: keras.Model,
        layer_names: Sequence[str] | None = None,
        jit_compile: bool | None = None,
    ):
        self.model = model
        self.layers = _select(model, layer_names)
        self.jit_compile = default_jit_compile(model) if jit_compile is None else jit_compile
        self._backend = keras.backend.backend()
        if self._backend == "tensorflow":
            self._strategy = tf.distribute.get_strategy()
            with self._strategy.scope():
                self._recorders = {
                    layer.name: StatsRecorder(layer.channels) for layer in self.layers
                }
            self._step = self._tensorflow_step()
            self._traced: dict[str, Callable] = {}
        else:
            self._step = self._backend_step()

    def _tensorflow_step(self):
        """A ``tf.function`` running the model on every replica with the recorders attached.

        The recorders are attached only while the function traces, so the graph it builds (and
        no other, e.g. ``model.predict``'s) updates them.
        """

        def replica_step(x):
            with _recording(self.layers, self._recorders):
                self.model(_call_structure(self.model, x), training=False)

        if self.jit_compile:
            replica_step = tf.function(replica_step, jit_compile=True)

        def step(x):
            self._strategy.run(replica_step, args=(x,))

        return step

    def _traced_step(self, dataset: tf.data.Dataset):
        """The step traced once for every batch size: without a strategy, an input signature
        with an unknown batch dimension (the short last batch would otherwise trace a second
        graph, and TensorFlow warns about retracing when one-shot collectors are built in a
        loop); under a strategy the per-replica values carry their own specs."""
        if tf.distribute.has_strategy():
            key, signature = "replicas", None
        else:
            signature = tf.nest.map_structure(
                lambda spec: tf.TensorSpec([None, *spec.shape[1:]], spec.dtype),
                dataset.element_spec,
            )
            key = str(signature)
        if key not in self._traced:
            self._traced[key] = (
                tf.function(self._step, reduce_retracing=True)
                if signature is None
                else tf.function(self._step, input_signature=[signature])
            )
        return self._traced[key]

    def _backend_step(self):
        """JAX / PyTorch: a forward returning ``{name: (sum, sum_sq, positive, entries)}``."""
        model, layers = self.model, self.layers

        def forward(trainable, non_trainable, x):
            sinks = {layer.name: BatchStats() for layer in layers}
            with _recording(layers, sinks):
                model.stateless_call(
                    trainable, non_trainable, _call_structure(model, x), training=False
                )
            return {name: sink.totals() for name, sink in sinks.items()}

        if self._backend == "jax":
            import jax

            forward = jax.jit(forward)
        return lambda x: forward(
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            x,
        )

    def collect(self, data, batch_size: int = 128) -> dict[str, ChannelStats]:
        """Runs the model once over ``data`` and returns ``{layer name: ChannelStats}``.

        ``data``: a ``tf.data.Dataset`` (of inputs or ``(x, y)`` batches), the inputs (an
        array; a dict by input name or a list for several inputs) or ``(x, y)``; see
        :func:`as_dataset`.  ``batch_size`` applies to arrays.  Memory: one batch of
        activations per layer at a time plus four ``[C]`` accumulators; ``data`` may stream.
        """
        dataset = as_dataset(data, batch_size, self.model)
        if self._backend == "tensorflow":
            totals = self._collect_tensorflow(dataset)
        else:
            totals = self._collect_backend(dataset)
        return {name: _channel_stats(*values) for name, values in totals.items()}

    def _collect_tensorflow(self, dataset: tf.data.Dataset) -> dict[str, list[np.ndarray]]:
        strategy = tf.distribute.get_strategy()
        if strategy is not self._strategy:
            raise ValueError(
                "this StatsCollector was built under another tf.distribute strategy; build a new "
                "one inside the current strategy's scope"
            )
        for recorder in self._recorders.values():
            recorder.reset()
        if tf.distribute.has_strategy():
            # Each replica gets its slice of every global batch; the recorders sum on read.
            dataset = strategy.experimental_distribute_dataset(dataset)
        step = self._traced_step(dataset)
        for x in dataset:
            step(x)
        return {
            name: _replica_sum(strategy, recorder.variables())
            for name, recorder in self._recorders.items()
        }

    def _collect_backend(self, dataset: tf.data.Dataset) -> dict[str, list[np.ndarray]]:
        totals = {layer.name: [0.0, 0.0, 0.0, 0.0] for layer in self.layers}
        for x in dataset.as_numpy_iterator():
            for name, values in self._step(x).items():
                for index, value in enumerate(values):
                    totals[name][index] = totals[name][index] + np.asarray(
                        keras.ops.convert_to_numpy(value), np.float64
                    )
        return totals


def _call_structure(model: keras.Model, x):
    """Several inputs arrive from tf.data as a tuple: given in the structure the model was
    built on (a list, or a dict by input name)."""
    return keras.tree.pack_sequence_as(model.input, list(x)) if isinstance(x, tuple) else x


def _channel_stats(total, total_sq, positive, entries) -> ChannelStats:
    count = float(entries)
    if count == 0:
        raise ValueError("the data set is empty: no statistics were collected")
    mean = np.asarray(total, np.float64) / count
    variance = np.maximum(np.asarray(total_sq, np.float64) / count - mean**2, 0.0)
    return ChannelStats(
        mean=mean,
        std=np.sqrt(variance),
        dormant_fraction=1.0 - np.asarray(positive, np.float64) / count,
        count=int(count),
    )


def collect(
    model: keras.Model,
    data,
    layer_names: Sequence[str] | None = None,
    batch_size: int = 128,
    jit_compile: bool | None = None,
) -> dict[str, ChannelStats]:
    """Runs ``model`` once over ``data`` and returns each masked layer's channel statistics.

    A one-shot :class:`StatsCollector` (keep one yourself to collect repeatedly without
    re-tracing).  Inside a ``tf.distribute`` strategy's scope (the model built under it) the
    pass runs on every replica and the statistics are summed across replicas.

    Args:
      model: a Keras model containing MaskedConv2D / MaskedDense layers.
      data: a ``tf.data.Dataset`` (of inputs or ``(x, y)`` batches), the inputs (an array; a
        dict by input name or a list for several inputs) or ``(x, y)``.
      layer_names: layers to measure (default: every masked layer).
      batch_size: batch size when ``data`` is an array.
      jit_compile: see :class:`StatsCollector`.

    Returns:
      ``{layer name: ChannelStats}``.
    """
    return StatsCollector(model, layer_names, jit_compile=jit_compile).collect(data, batch_size)


def _replica_sum(strategy: tf.distribute.Strategy, variables: list) -> list[np.ndarray]:
    """Sums on-read variables over every replica of every worker.

    A cross-replica read sums the local replicas only; with several workers the partial sums
    are all-reduced inside a replica context, which every worker joins.
    """
    if strategy.extended._in_multi_worker_mode():  # noqa: SLF001 - no public equivalent
        context = tf.distribute.get_replica_context

        @tf.function
        def all_reduce():
            return strategy.run(
                lambda: [
                    context().all_reduce(tf.distribute.ReduceOp.SUM, variable.read_value())
                    for variable in variables
                ]
            )

        values = [strategy.experimental_local_results(v)[0] for v in all_reduce()]
    else:
        values = [v.read_value() for v in variables]
    return [np.asarray(v.numpy()) for v in values]
