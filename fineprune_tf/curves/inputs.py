"""Validation of a curve's arguments: the layer, the order, the clean and backdoor data."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from fineprune_tf import metrics
from fineprune_tf.curves.result import Backdoor
from fineprune_tf.layers import MaskedLayerMixin

__all__ = ["CleanStream", "backdoor_data", "check_order", "clean_arrays", "masked_layer"]


def masked_layer(model: keras.Model, layer_name: str) -> MaskedLayerMixin:
    try:
        layer = model.get_layer(layer_name)
    except ValueError as error:
        masked = [layer.name for layer in model.layers if isinstance(layer, MaskedLayerMixin)]
        raise ValueError(
            f"model {model.name!r} has no layer named {layer_name!r}; its masked layers are "
            f"{masked}"
        ) from error
    if not isinstance(layer, MaskedLayerMixin):
        raise ValueError(
            f"layer {layer_name!r} of model {model.name!r} is a {type(layer).__name__}, not a "
            "masked layer (MaskedConv2D / MaskedDense): it has no channel mask to prune"
        )
    if not layer.built:
        raise ValueError(f"layer {layer_name!r} is not built; call the model once first")
    return layer


def check_order(order: Any, channels: int, layer_name: str) -> np.ndarray:
    values = np.asarray(order)
    if values.ndim != 1:
        raise ValueError(
            f"order must be a 1-D sequence of channel indices, got shape {values.shape}"
        )
    if values.size and not np.issubdtype(values.dtype, np.integer):
        if not np.issubdtype(values.dtype, np.floating) or np.any(values != np.round(values)):
            raise ValueError(f"order must hold integer channel indices, got dtype {values.dtype}")
    values = values.astype(np.int64)
    bad = values[(values < 0) | (values >= channels)]
    if bad.size:
        raise ValueError(
            f"order has channel indices {sorted(set(bad.tolist()))} outside "
            f"[0, {channels}) of layer {layer_name!r}"
        )
    unique, counts = np.unique(values, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"order repeats channels {unique[counts > 1].tolist()}")
    return values


def backdoor_data(backdoor: Any) -> Backdoor | None:
    if backdoor is None:
        return None
    x = np.asarray(metrics.backdoor_field(backdoor, "x"))
    y_true = np.asarray(metrics.backdoor_field(backdoor, "y_true")).reshape(-1)
    y_attacker = metrics.backdoor_field(backdoor, "y_attacker", None)
    targeted = bool(metrics.backdoor_field(backdoor, "targeted"))
    if len(x) == 0:
        raise ValueError("the backdoor data is empty")
    if len(y_true) != len(x):
        raise ValueError(f"backdoor x has {len(x)} inputs but y_true has {len(y_true)} labels")
    if y_attacker is not None:
        y_attacker = np.asarray(y_attacker).reshape(-1)
        if len(y_attacker) != len(x):
            raise ValueError(
                f"backdoor x has {len(x)} inputs but y_attacker has {len(y_attacker)} labels"
            )
    elif targeted:
        raise ValueError("a targeted backdoor needs y_attacker")
    return Backdoor(x, y_true, y_attacker, targeted)


def clean_arrays(clean: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` arrays from a tuple or a dataset of ``(x, y)`` batches."""
    if isinstance(clean, tf.data.Dataset):
        xs, ys = [], []
        for element in clean.as_numpy_iterator():
            if not isinstance(element, tuple) or len(element) < 2:
                raise ValueError("a clean dataset must yield (x, y) batches")
            xs.append(np.asarray(element[0]))
            ys.append(np.asarray(element[1]).reshape(-1))
        if not xs:
            raise ValueError("the clean dataset is empty")
        x, y = np.concatenate(xs), np.concatenate(ys)
    else:
        if not isinstance(clean, (tuple, list)) or len(clean) != 2:
            raise ValueError(
                "clean must be an (x, y) pair of arrays or a tf.data.Dataset of (x, y) batches"
            )
        x, y = np.asarray(clean[0]), np.asarray(clean[1]).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"clean x has {len(x)} inputs but y has {len(y)} labels")
    if len(x) == 0:
        raise ValueError("the clean data is empty")
    return x, y


class CleanStream:
    """Clean inputs batch by batch, from arrays or streamed from a dataset of ``(x, y)``
    batches (never held whole); ``y`` is complete once :meth:`batches` is exhausted."""

    def __init__(self, clean: Any):
        self.dataset = clean if isinstance(clean, tf.data.Dataset) else None
        self._y: list[np.ndarray] = []
        if self.dataset is None:
            self.x, y = clean_arrays(clean)
            self._y = [y]

    def batches(self) -> Iterator[np.ndarray]:
        if self.dataset is None:
            yield self.x
            return
        seen = 0
        for element in self.dataset.as_numpy_iterator():
            if not isinstance(element, tuple) or len(element) < 2:
                raise ValueError("a clean dataset must yield (x, y) batches")
            x, y = np.asarray(element[0]), np.asarray(element[1]).reshape(-1)
            if len(x) != len(y):
                raise ValueError(f"a clean dataset batch has {len(x)} inputs but {len(y)} labels")
            seen += len(x)
            self._y.append(y)
            yield x
        if seen == 0:
            raise ValueError("the clean data is empty")

    @property
    def y(self) -> np.ndarray:
        return np.concatenate(self._y)
