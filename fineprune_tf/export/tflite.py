"""TFLite export of a (masked) model, checked against the Keras model on sample inputs.

The compiled op has no TFLite kernel, so the model is first rewritten by
:func:`fineprune_tf.export.shrink` into plain Keras layers with the pruned channels removed; the
converter then sees only builtin ops.  TensorFlow backend only.
"""

from __future__ import annotations

import os
import pathlib
import warnings
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from fineprune_tf.export.shrink import shrink

__all__ = ["TFLiteExport", "to_tflite"]


@dataclass(frozen=True)
class TFLiteExport:
    """What :func:`to_tflite` wrote and how closely it matches the Keras model.

    Attributes:
      path: the ``.tflite`` file.
      size_bytes: its size.
      max_abs_difference: largest ``|tflite - keras|`` over the sample inputs' outputs.
      samples: number of sample inputs checked.
    """

    path: pathlib.Path
    size_bytes: int
    max_abs_difference: float
    samples: int


def _sample_inputs(model: keras.Model, sample_inputs, samples: int, seed: int) -> list:
    """The model's inputs as a list of float arrays, one per model input."""
    if sample_inputs is None:
        rng = np.random.default_rng(seed)
        return [
            rng.normal(size=(samples, *spec.shape[1:])).astype(np.float32) for spec in model.inputs
        ]
    arrays = sample_inputs if isinstance(sample_inputs, (list, tuple)) else [sample_inputs]
    arrays = [np.asarray(a) for a in arrays]
    if len(arrays) != len(model.inputs):
        raise ValueError(
            f"the model has {len(model.inputs)} inputs. Received: {len(arrays)} sample arrays"
        )
    return arrays


def _run_interpreter(content: bytes, inputs: list[np.ndarray]) -> np.ndarray:
    """Runs the TFLite flatbuffer's default signature on ``inputs`` (one batch)."""
    try:  # The maintained interpreter, when installed.
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = None
    with warnings.catch_warnings():
        # tf.lite.Interpreter warns that it moved to ai_edge_litert; it still runs in TF 2.21.
        warnings.simplefilter("ignore", UserWarning)
        interpreter = (Interpreter or tf.lite.Interpreter)(model_content=content)
    runner = interpreter.get_signature_runner()
    names = sorted(runner.get_input_details(), key=lambda n: runner.get_input_details()[n]["index"])
    outputs = runner(
        **{
            name: x.astype(runner.get_input_details()[name]["dtype"])
            for name, x in zip(names, inputs, strict=True)
        }
    )
    if len(outputs) != 1:
        raise ValueError(f"expected one output, the TFLite model has {sorted(outputs)}")
    return next(iter(outputs.values()))


def to_tflite(
    model: keras.Model,
    path: str | os.PathLike,
    sample_inputs=None,
    atol: float = 1e-4,
    overwrite: bool = False,
    samples: int = 8,
    seed: int = 0,
) -> TFLiteExport:
    """Shrinks ``model``, converts it to TFLite, writes ``path`` and checks the interpreter.

    Args:
      model: a Keras functional model (masked layers or not) with one output.
      path: the ``.tflite`` file to write.
      sample_inputs: an array (or a list, one per model input) of inputs to check the TFLite
        outputs on; default ``samples`` standard-normal inputs drawn with ``seed``.
      atol: largest allowed ``|tflite - keras|`` on any output entry.
      overwrite: replace an existing ``path``; otherwise an existing path is an error.

    Returns:
      A :class:`TFLiteExport`.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      ValueError: the TFLite outputs differ from the Keras model's by more than ``atol``
        (nothing is written then).
    """
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if len(model.outputs) != 1:
        raise ValueError(
            f"to_tflite supports one-output models. Received: {len(model.outputs)} outputs"
        )
    inputs = _sample_inputs(model, sample_inputs, samples, seed)
    expected = keras.ops.convert_to_numpy(model(inputs if len(inputs) > 1 else inputs[0]))
    content = tf.lite.TFLiteConverter.from_keras_model(shrink(model)).convert()
    got = _run_interpreter(content, inputs)
    if got.shape != expected.shape:
        raise ValueError(
            f"TFLite output shape {got.shape} differs from the Keras model's {expected.shape}"
        )
    difference = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.size else 0.0
    if not difference <= atol:
        raise ValueError(
            f"TFLite outputs differ from the Keras model's by {difference:.3g} "
            f"(> atol={atol:g}); nothing was written to {path}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return TFLiteExport(
        path=path,
        size_bytes=len(content),
        max_abs_difference=difference,
        samples=int(inputs[0].shape[0]),
    )
