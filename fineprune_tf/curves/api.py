"""The fast pruning curve: :func:`pruning_curve` and :func:`describe`."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from fineprune_tf.curves.engine import _Engine, engine_for
from fineprune_tf.curves.inputs import CleanStream, backdoor_data, check_order, masked_layer
from fineprune_tf.curves.plan import _Plan
from fineprune_tf.curves.result import CurvePlanInfo, PruningCurve, make_curve
from fineprune_tf.graph import static_shape

__all__ = ["describe", "pruning_curve"]

_MB = 1024 * 1024
_MAX_GROUP = 16  # steps per loop iteration (unrolled in the trace)
_GROUP_ROWS = 4096  # rows per iteration beyond which larger batches gain nothing


def describe(model: keras.Model, layer_name: str) -> CurvePlanInfo:
    """How :func:`pruning_curve` decomposes ``model`` around ``layer_name``, with FLOP costs."""
    layer = masked_layer(model, layer_name)
    return engine_for(model, layer).plan.info()


def _concat(batches: list[list[tf.Tensor]]) -> list[tf.Tensor]:
    """Joins per-batch lists of tensors along the batch axis."""
    if len(batches) == 1:
        return list(batches[0])
    return [tf.concat(parts, 0) for parts in zip(*batches, strict=True)]


def _batches(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(x), size):
        yield x[start : start + size]


def _step_table(
    order: np.ndarray, mask0: np.ndarray, channels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Channel removed at each step (int32 ``[K+1]``, 0 at step 0), whether it was still
    active (bool ``[K+1]``) and the mask after it (float32 ``[K+1, C]``)."""
    steps = len(order) + 1
    removed = np.concatenate([[0], order]).astype(np.int32)
    live = np.zeros(steps, bool)
    active = np.empty((steps, channels), np.float32)
    current = (mask0 != 0).astype(np.float32)
    active[0] = current
    for k, c in enumerate(order, start=1):
        live[k] = current[c] != 0
        current = current.copy()
        current[c] = 0.0
        active[k] = current
    return removed, live, active


def _sizing(
    plan: _Plan, memory_budget_mb: float, batch_size: int, steps: int
) -> tuple[int, int, int]:
    """``(chunk, prefix_batch, group)``: samples per chunk within the budget, inputs per
    prefix batch, steps per loop iteration.

    With a frontier, one step per iteration: the per-step layers are small, and grouping steps
    measured no faster (the extra gathers and concatenations cost what larger matrix products
    save).  Without (the whole suffix per step): as many masked copies as the rest of the
    budget holds, up to ~4096 rows.
    """
    budget = float(memory_budget_mb) * _MB
    state_bytes, step_bytes = plan.bytes_per_sample()
    chunk = int(max(1, budget // (state_bytes + step_bytes)))
    prefix_batch = max(1, min(batch_size, chunk))
    largest = chunk + prefix_batch - 1
    group = (
        1
        if plan.frontier_list
        else int(
            max(
                1,
                min(
                    steps,
                    _MAX_GROUP,
                    _GROUP_ROWS // largest,
                    (budget - largest * state_bytes) // (largest * step_bytes),
                ),
            )
        )
    )
    return chunk, prefix_batch, group


def _prefix_chunks(
    engine: _Engine,
    sources: list,
    chunk: int,
    prefix_batch: int,
    active0: tf.Tensor,
    t0s: list,
    phases: dict,
) -> Iterator[list]:
    """Prefix outputs per batch, ``chunk`` samples (+ less than a batch) at a time."""
    pending, count = [], 0
    dtype = engine.plan.input.dtype
    for source in sources:
        for x in source:
            for xb in _batches(x, prefix_batch):
                tic = time.perf_counter()
                pending.append(engine.prefix(tf.constant(xb, dtype=dtype), active0, t0s))
                phases["prefix"] += time.perf_counter() - tic
                count += len(xb)
                if count >= chunk:
                    yield pending
                    pending, count = [], 0
    if pending:
        yield pending


def _run_chunk(
    engine: _Engine, group: int, outs: list, t0s: list, table: tuple, phases: dict
) -> tuple[np.ndarray, int]:
    """int64 labels ``[K+1, n]`` of one chunk's samples at every step, and the number of
    (step, sample) rows evaluated.

    A step changes sample ``i`` only if its channel is live and non-zero on ``i``; the others
    keep the previous step's prediction.  A step that changes no sample of the chunk (a channel
    dormant on all of it) leaves the pre-activations exactly as they were and is skipped.
    """
    removed, live, active = table
    steps = len(removed)
    dtype = engine.plan.dtype.as_numpy_dtype
    t1s, us, consts = (_concat([o[i] for o in outs]) for i in range(3))
    nonzero = np.concatenate([o[3].numpy() for o in outs], 0)  # [n, C]
    n = nonzero.shape[0]
    affected = nonzero[:, removed].T & live[:, None]
    affected[0] = True
    run_steps = np.flatnonzero(affected.any(axis=1))
    affected_run = affected[run_steps]
    row_steps, rows = (v.astype(np.int32) for v in np.nonzero(affected_run))
    step_splits = np.concatenate([[0], np.cumsum(affected_run.sum(axis=1))])
    # Pad to whole groups with no-op steps (not live, no rows).
    padded = np.concatenate([run_steps, np.full(-len(run_steps) % group, 0)])
    live_run = live[padded].astype(dtype)
    live_run[len(run_steps) :] = 0
    splits = np.concatenate([step_splits, np.full(len(padded) - len(run_steps), step_splits[-1])])
    tic = time.perf_counter()
    flat = engine.run(
        group,
        us,
        t1s,
        t0s,
        consts,
        tf.constant(removed[padded]),
        tf.constant(live_run),
        tf.constant(active[padded].astype(dtype)),
        tf.constant(splits.astype(np.int32)),
        tf.constant(rows),
        tf.constant(row_steps),
    ).numpy()
    phases["steps"] += time.perf_counter() - tic
    labels = np.empty((steps, n), np.int64)
    labels[0] = flat[:n]
    for j in range(1, len(run_steps) + 1):
        # Steps between two evaluated ones change nothing: carry the labels forward.
        end = run_steps[j] if j < len(run_steps) else steps
        k = run_steps[j - 1]
        if j > 1:
            labels[k] = labels[k - 1]
            changed = slice(step_splits[j - 1], step_splits[j])
            labels[k, rows[changed]] = flat[changed]
        labels[k + 1 : end] = labels[k]
    return labels, len(rows)


# pruning_curve is ~85 lines, 35 of them its docstring: the driver (checks, step table, chunk
# loop with the mask restored on any error, result) reads best in one place.
def pruning_curve(
    model: keras.Model,
    layer_name: str,
    order: Sequence[int],
    clean: Any,
    backdoor: Any = None,
    *,
    batch_size: int = 256,
    memory_budget_mb: float = 256,
    return_backdoor_predictions: bool = True,
) -> PruningCurve:
    """Clean accuracy and attack success after pruning each channel of ``order`` in turn.

    Gives the predictions of :func:`naive_pruning_curve` (see the package docstring for how,
    and for the rounding caveat) at the cost of one pass of the layers up to ``layer_name``,
    one pass of the linear layers fed by it, and, per step, only the layers after those -- and
    only for the samples the removed channel can change.

    Args:
      model: a functional (or built Sequential) Keras model with one input and one output of
        class scores ``[N, classes]``; predictions are their arg-max.
      layer_name: a MaskedConv2D / MaskedDense layer called once in the model.
      order: channel indices ``[K]`` in pruning order (all channels or a prefix); distinct.  A
        channel already pruned in the starting mask gives a step that changes nothing.
      clean: ``(x [N, ...], y [N])`` arrays, or a ``tf.data.Dataset`` of ``(x, y)`` batches
        (streamed once, never held whole).
      backdoor: None, or an object (or mapping) with ``x [M, ...]``, ``y_true [M]``,
        ``y_attacker [M]`` (may be None when untargeted) and ``targeted``.
      batch_size: inputs per prefix batch.
      memory_budget_mb: bound on the engine's working set in MiB.  The data is processed in
        chunks of ``n`` samples, ``n`` the largest number whose state (the per-channel tensors
        ``T1``, the frontier pre-activations and the constants the later layers need) plus one
        step's working set (the updated pre-activations and every tensor of the layers after
        the frontier) fit in the budget; ``n >= 1``.  Peak memory is therefore about
        ``memory_budget_mb`` + one prefix batch of activations (``min(batch_size, n)``
        samples) + the model's weights + the int64 predictions ``[K+1, N+M]``, independent of
        ``N`` otherwise and of ``K``; it exceeds the budget only when one sample alone does.
      return_backdoor_predictions: keep ``predictions_backdoor`` in the result.

    Returns:
      A :class:`PruningCurve`.  The model is left as it was: the layer's mask is restored, even
      on error.

    Raises:
      ValueError: unknown layer, a layer without mask, an ``order`` with repeated or
        out-of-range channels, inputs and labels of different lengths, empty data.
    """
    start = time.perf_counter()
    layer = masked_layer(model, layer_name)
    order = check_order(order, layer.channels, layer_name)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not memory_budget_mb > 0:
        raise ValueError(f"memory_budget_mb must be > 0, got {memory_budget_mb}")
    clean_stream = CleanStream(clean)
    bd = backdoor_data(backdoor)
    engine = engine_for(model, layer)
    plan = engine.plan
    mask0 = layer.mask
    table = _step_table(order, mask0, layer.channels)
    chunk, prefix_batch, group = _sizing(plan, memory_budget_mb, batch_size, len(order) + 1)
    sources = [clean_stream.batches()] + ([iter([bd.x])] if bd is not None else [])
    chunk_predictions: list[np.ndarray] = []
    evaluated = 0
    # Wall time per phase (TF runs CPU functions synchronously, so this is their cost).
    phases = {"prefix": 0.0, "steps": 0.0}
    try:
        layer.set_mask(np.ones(layer.channels, np.float32))
        t0s = engine.zeros(tf.zeros([1, *static_shape(plan.layer_node.outputs[0])], plan.dtype))
        active0 = tf.constant(table[2][0].astype(plan.dtype.as_numpy_dtype))
        for outs in _prefix_chunks(engine, sources, chunk, prefix_batch, active0, t0s, phases):
            labels, rows = _run_chunk(engine, group, outs, t0s, table, phases)
            del outs
            chunk_predictions.append(labels)
            evaluated += rows
    finally:
        layer.set_mask(mask0)

    predictions = np.concatenate(chunk_predictions, axis=1)
    y_clean = clean_stream.y
    n_clean = len(y_clean)
    info = {
        "engine": "fast",
        "mode": plan.mode,
        "seconds": time.perf_counter() - start,
        "chunk_samples": chunk,
        "chunks": len(chunk_predictions),
        "steps_per_iteration": group,
        "evaluated_rows": int(evaluated),
        "all_rows": int(len(table[0]) * predictions.shape[1]),
        "frontier": [f.layer.name for f in plan.frontier_list],
        "phase_seconds": phases,
    }
    return make_curve(
        layer,
        mask0,
        order,
        y_clean,
        predictions[:, :n_clean],
        bd,
        predictions[:, n_clean:] if bd is not None else None,
        return_backdoor_predictions,
        info,
    )
