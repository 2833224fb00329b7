"""Inference-only wrapper of a SavedModel signature, callable like a Keras model."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import tensorflow as tf

from .errors import ModelFormatError

__all__ = ["SavedModelPredictor"]


class SavedModelPredictor:
    """Inference-only wrapper of a SavedModel signature, callable like a Keras model.

    ``predictor(x)`` runs one batch and returns a tensor (a dict when the signature has
    several outputs); ``predictor.predict(x, batch_size=256)`` runs numpy batches and returns
    numpy.  ``x`` is an array for a single-input signature, else a dict keyed by input name or
    a list in ``input_names`` order.
    """

    def __init__(self, loaded: Any, path: pathlib.Path, signature: str = "serving_default"):
        if signature not in loaded.signatures:
            raise ModelFormatError(
                f"{path}: no {signature!r} signature (has: {sorted(loaded.signatures)})"
            )
        self._loaded = loaded  # keeps the restored variables alive
        self.path = path
        self.name = path.name
        self.signature = loaded.signatures[signature]
        _, specs = self.signature.structured_input_signature
        self.input_specs: dict[str, tf.TensorSpec] = dict(specs)
        self.input_names: list[str] = list(self.signature._arg_keywords or sorted(specs))
        self.output_names: list[str] = sorted(self.signature.structured_outputs)

    def __repr__(self) -> str:
        return (
            f"SavedModelPredictor({os.fspath(self.path)!r}, inputs={self.input_names}, "
            f"outputs={self.output_names})"
        )

    def _feeds(self, x) -> dict[str, tf.Tensor]:
        if isinstance(x, dict):
            values = x
        elif isinstance(x, (list, tuple)) and len(self.input_names) > 1:
            values = dict(zip(self.input_names, x, strict=True))
        else:
            if len(self.input_names) != 1:
                raise ValueError(f"the signature has inputs {self.input_names}; pass a dict")
            values = {self.input_names[0]: x}
        return {
            k: tf.convert_to_tensor(v, dtype=self.input_specs[k].dtype) for k, v in values.items()
        }

    def __call__(self, x, training: bool = False):
        outputs = self.signature(**self._feeds(x))
        if len(outputs) == 1:
            return next(iter(outputs.values()))
        return outputs

    def predict(self, x, batch_size: int = 256, verbose: int = 0):
        """numpy outputs for numpy inputs (``[N, ...]``), in batches of ``batch_size``."""
        del verbose
        feeds = self._feeds(x)
        n = int(next(iter(feeds.values())).shape[0])
        chunks: list = []
        for start in range(0, n, batch_size):
            part = self({k: v[start : start + batch_size] for k, v in feeds.items()})
            chunks.append(part)
        if not chunks:
            raise ValueError("empty input")
        if isinstance(chunks[0], dict):
            return {k: np.concatenate([c[k].numpy() for c in chunks]) for k in chunks[0]}
        return np.concatenate([c.numpy() for c in chunks])
