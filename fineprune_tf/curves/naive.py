"""The reference loop: set the mask, ``model.predict`` every input, per step."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from fineprune_tf.curves.inputs import backdoor_data, check_order, clean_arrays, masked_layer
from fineprune_tf.curves.result import PruningCurve, make_curve

__all__ = ["naive_pruning_curve"]


def naive_pruning_curve(
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
    """The reference loop: for each step set the mask and ``model.predict`` every input.

    Same signature and result as :func:`pruning_curve` (``memory_budget_mb`` is accepted and
    ignored).  Costs ``K + 1`` full forward passes over clean and backdoored data.
    """
    del memory_budget_mb
    start = time.perf_counter()
    layer = masked_layer(model, layer_name)
    order = check_order(order, layer.channels, layer_name)
    x, y = clean_arrays(clean)
    bd = backdoor_data(backdoor)
    mask0 = layer.mask
    steps = len(order) + 1
    pred_clean = np.empty((steps, len(x)), np.int64)
    pred_bd = np.empty((steps, len(bd.x)), np.int64) if bd is not None else None

    def predict(inputs: np.ndarray) -> np.ndarray:
        return np.argmax(model.predict(inputs, batch_size=batch_size, verbose=0), axis=-1)

    try:
        mask = mask0.copy()
        for k in range(steps):
            if k:
                mask[order[k - 1]] = 0.0
                layer.set_mask(mask)
            pred_clean[k] = predict(x)
            if bd is not None:
                pred_bd[k] = predict(bd.x)
    finally:
        layer.set_mask(mask0)
    info = {
        "engine": "naive",
        "seconds": time.perf_counter() - start,
        "evaluated_rows": steps * (len(x) + (len(bd.x) if bd is not None else 0)),
    }
    return make_curve(
        layer, mask0, order, y, pred_clean, bd, pred_bd, return_backdoor_predictions, info
    )
