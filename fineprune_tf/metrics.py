"""Evaluation metrics of Fine-Pruning (§2.3, §3.3) on predicted labels.

All label arguments are 1-D integer arrays ``[N]`` (anything ``np.asarray`` accepts); rates are
Python floats in ``[0, 1]``.

* clean accuracy: fraction of clean inputs classified as their true label;
* attack success rate (ASR), targeted (footnote 2): fraction of backdoored inputs classified as
  the attacker's label;
* ASR, untargeted (footnote 4): ``1 - A_backdoor / A_clean``, with ``A_backdoor`` the accuracy
  of backdoored inputs with respect to their *true* labels, clipped to ``[0, 1]``;
* robust accuracy: accuracy of backdoored inputs with respect to their true labels;
* defender's utility (Table 2): clean accuracy minus ASR.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from fineprune_tf import model_io

__all__ = [
    "accuracy",
    "attack_success_rate",
    "defender_utility",
    "evaluate",
    "predict_labels",
    "robust_accuracy",
]


def _labels(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of labels, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: a rate over no inputs is undefined")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.bool_)):
        if not np.issubdtype(array.dtype, np.floating) or np.any(array != np.round(array)):
            raise ValueError(f"{name} must hold integer class labels, got dtype {array.dtype}")
    return array.astype(np.int64)


def _pair(a: Any, b: Any, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = _labels(a, name_a), _labels(b, name_b)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has {a.shape[0]} labels but {name_b} has {b.shape[0]}")
    return a, b


def accuracy(pred: Any, y: Any) -> float:
    """Fraction of ``pred`` ``[N]`` equal to ``y`` ``[N]``."""
    pred, y = _pair(pred, y, "pred", "y")
    return float(np.mean(pred == y))


def robust_accuracy(pred_backdoor: Any, y_true: Any) -> float:
    """Accuracy of predictions on backdoored inputs ``[N]`` w.r.t. their true labels ``[N]``."""
    pred_backdoor, y_true = _pair(pred_backdoor, y_true, "pred_backdoor", "y_true")
    return float(np.mean(pred_backdoor == y_true))


def attack_success_rate(
    pred_backdoor: Any,
    y_attacker: Any = None,
    targeted: bool = True,
    pred_clean: Any = None,
    y_true: Any = None,
    clean_acc: float | None = None,
) -> float:
    """Backdoor attack success rate.

    Args:
      pred_backdoor: ``[N]`` predicted labels of the backdoored inputs.
      y_attacker: ``[N]`` the attacker's labels (required when ``targeted``).
      targeted: targeted ASR (footnote 2) = fraction of ``pred_backdoor == y_attacker``, over
        the inputs whose ``y_true`` differs from ``y_attacker`` when ``y_true`` is given (an
        input already of the target class says nothing about the backdoor).  Untargeted ASR
        (footnote 4) = ``clip(1 - A_backdoor / A_clean, 0, 1)`` with ``A_backdoor =
        accuracy(pred_backdoor, y_true)``.
      pred_clean: untargeted only: ``[N]`` predictions on the clean counterparts of the
        backdoored inputs, whose labels are ``y_true``; gives ``A_clean`` when ``clean_acc`` is
        not passed.
      y_true: ``[N]`` true labels of the backdoored inputs (required when untargeted).
      clean_acc: untargeted only: ``A_clean`` measured on a clean test set.

    Returns:
      The ASR in ``[0, 1]``.  Untargeted with ``A_clean == 0`` returns 0: the attack has nothing
      left to degrade (and the defender's utility is then 0).
    """
    if targeted:
        if y_attacker is None:
            raise ValueError("targeted attack_success_rate needs y_attacker")
        pred_backdoor, y_attacker = _pair(pred_backdoor, y_attacker, "pred_backdoor", "y_attacker")
        if y_true is not None:
            _, y_true = _pair(pred_backdoor, y_true, "pred_backdoor", "y_true")
            keep = y_true != y_attacker
            if not np.any(keep):
                raise ValueError(
                    "every backdoored input's true label equals the attacker's label; the "
                    "targeted ASR is undefined"
                )
            pred_backdoor, y_attacker = pred_backdoor[keep], y_attacker[keep]
        return float(np.mean(pred_backdoor == y_attacker))

    if y_true is None:
        raise ValueError(
            "untargeted attack_success_rate needs y_true (A_backdoor uses the "
            "backdoored inputs' true labels)"
        )
    a_backdoor = robust_accuracy(pred_backdoor, y_true)
    if clean_acc is None:
        if pred_clean is None:
            raise ValueError("untargeted attack_success_rate needs clean_acc or pred_clean")
        a_clean = accuracy(pred_clean, y_true)
    else:
        a_clean = float(clean_acc)
        if not 0.0 <= a_clean <= 1.0:
            raise ValueError(f"clean_acc must be in [0, 1], got {clean_acc}")
    if a_clean == 0.0:
        return 0.0
    return float(np.clip(1.0 - a_backdoor / a_clean, 0.0, 1.0))


def defender_utility(clean_acc: Any, asr: Any) -> Any:
    """Defender's utility of Table 2: ``clean_acc - asr`` (scalars or equal-shape arrays,
    e.g. whole pruning curves)."""
    result = np.asarray(clean_acc, dtype=np.float64) - np.asarray(asr, dtype=np.float64)
    return float(result) if result.ndim == 0 else result


def predict_labels(
    model: keras.Model, x: Any, batch_size: int = 256, output: str | int | None = None
) -> np.ndarray:
    """int64 ``[N]`` arg-max predictions of ``model`` on inputs ``x`` ``[N, ...]``.

    A model with several inputs takes ``x`` as a dict by input name or a list; with several
    outputs, ``output`` (a name or index) says which one is read, default the only
    classification head (:func:`fineprune_tf.model_io.output_index`).
    """
    if model_io.is_single_io(model) and output is None:
        x = np.asarray(x)
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(
                f"expected a non-empty batch of inputs, got an array of shape {x.shape}"
            )
        index = 0
    else:
        x = model_io.arrange_inputs(model, x)
        index = model_io.output_index(model, output)
    count = model_io.num_examples(keras.tree.flatten(x))
    # Eager batches, not model.predict: predict builds a new tf.function for every freshly
    # compiled model and traces it twice (full and short last batch), which is what filled the
    # logs with "triggered tf.function retracing"; eager calls give the same numbers and are
    # faster on these small evaluation sets (0.67 s vs 1.71 s for 750 MNIST digits).
    labels = []
    for i in range(0, count, batch_size):
        scores = model(model_io.take(x, slice(i, i + batch_size)), training=False)
        scores = keras.tree.flatten(scores)[index]
        labels.append(np.argmax(np.asarray(scores), axis=-1))
    return np.concatenate(labels).astype(np.int64)


def backdoor_field(obj: Any, name: str, default: Any = ...) -> Any:
    """Field ``name`` of a backdoor set given as an object or a mapping (``x``, ``y_true``,
    ``y_attacker``, ``targeted``); ``default`` when absent, else TypeError."""
    if isinstance(obj, Mapping):
        if name in obj:
            return obj[name]
    elif hasattr(obj, name):
        return getattr(obj, name)
    if default is ...:
        raise TypeError(
            f"backdoor set {type(obj).__name__} has no field {name!r} (expected "
            ".x, .y_true, .y_attacker, .targeted)"
        )
    return default


def evaluate(
    model: keras.Model, clean: tuple[Any, Any], backdoor: Any = None, batch_size: int = 256
) -> dict[str, float]:
    """Clean accuracy, attack success rate and robust accuracy of ``model``.

    Args:
      model: a classifier returning scores ``[N, classes]``.
      clean: ``(x, y)``: clean inputs ``[N, H, W, C]`` and labels ``[N]``.
      backdoor: an object or mapping with ``x`` ``[M, H, W, C]``, ``y_true`` ``[M]``,
        ``y_attacker`` ``[M]`` (may be None when untargeted) and ``targeted`` (bool); or None.

    Returns:
      ``dict(clean_acc, asr, robust_acc)``; ``asr`` and ``robust_acc`` are NaN without a
      backdoor set.  The untargeted ASR uses ``clean_acc`` as ``A_clean``.
    """
    x_clean, y_clean = clean
    clean_acc = accuracy(predict_labels(model, x_clean, batch_size), y_clean)
    if backdoor is None:
        return dict(clean_acc=clean_acc, asr=float("nan"), robust_acc=float("nan"))
    targeted = bool(backdoor_field(backdoor, "targeted"))
    y_true = backdoor_field(backdoor, "y_true")
    y_attacker = backdoor_field(backdoor, "y_attacker", None)
    pred = predict_labels(model, backdoor_field(backdoor, "x"), batch_size)
    asr = attack_success_rate(
        pred, y_attacker, targeted=targeted, y_true=y_true, clean_acc=clean_acc
    )
    return dict(clean_acc=clean_acc, asr=asr, robust_acc=robust_accuracy(pred, y_true))
