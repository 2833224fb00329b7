"""Defenses on models with several inputs or outputs.

Every public defense (``fineprune_tf.defenses.prune``, ``fine_prune``, ``fine_tune``, ``fmp``,
``anp``, ``rnp``, ``clp``, ``pruning_outcome``, ``auto_defend``, ``run_defense``) accepts such
a model through :func:`accepts_multi_io`: the defense runs unchanged on the model's
:class:`~fineprune_tf.model_io.PackedView` (one packed input, the one output it reads) with
the data packed the same way, and the defended view's weights and masks are copied back into a
copy of the whole model, which the result carries.

The output read is the caller's ``output=`` (a name or an index), else the only
classification head; the labels are that output's (or a dict ``{output name: labels}``).
Fine-tuning trains through that output only: a second head's own layers keep their weights,
but the layers it shares with the output read change, and nothing here measures that head.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import keras

from fineprune_tf import metrics, model_io
from fineprune_tf.defenses.guard import DefenderData, ReportOnly

__all__ = ["accepts_multi_io"]


def _pack_backdoor(view: model_io.PackedView, backdoor: Any) -> Any:
    if backdoor is None:
        return None
    return {
        "x": view.pack(metrics.backdoor_field(backdoor, "x")),
        "y_true": metrics.backdoor_field(backdoor, "y_true"),
        "y_attacker": metrics.backdoor_field(backdoor, "y_attacker", None),
        "targeted": metrics.backdoor_field(backdoor, "targeted", True),
    }


def _pack_defender(view: model_io.PackedView, data: Any) -> DefenderData:
    if isinstance(data, DefenderData):
        return DefenderData(
            view.pack(data.x), data.y, holdout_fraction=data.holdout_fraction, seed=data.seed
        )
    try:
        x, y = data
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"expected DefenderData or an (x, y) pair, got {type(data).__name__}"
        ) from error
    labels, _ = model_io.select_labels(view.model, y, view.output)
    return DefenderData(view.pack(x), labels)


def _pack_evaluation(view: model_io.PackedView, evaluation: Any) -> ReportOnly | None:
    if evaluation is None:
        return None
    if not isinstance(evaluation, ReportOnly):
        evaluation = ReportOnly(*evaluation)
    (x, y), backdoor = evaluation.open()
    labels, _ = model_io.select_labels(view.model, y, view.output)
    return ReportOnly((view.pack(x), labels), _pack_backdoor(view, backdoor))


def _output_of(model: keras.Model, output: Any, data: Any) -> int:
    """The output read: ``output``, else the one a dict of labels names, else the only head."""
    labels = data.y if isinstance(data, DefenderData) else None
    if labels is None and isinstance(data, (tuple, list)) and len(data) == 2:
        labels = data[1]
    if isinstance(labels, Mapping):
        return model_io.select_labels(model, labels, output)[1]
    return model_io.output_index(model, output)


def _restored(view: model_io.PackedView, outcome: Any) -> Any:
    """The defense's outcome with its model(s) mapped back to the whole model."""
    result = getattr(outcome, "result", None)  # auto_defend's Choice
    if result is not None:
        result.model = view.restore(result.model)
    elif isinstance(getattr(outcome, "model", None), keras.Model):
        outcome.model = view.restore(outcome.model)
    return outcome


def accepts_multi_io(fn: Callable, model_position: int = 0) -> Callable:
    """``fn(model, validation, ...)`` that also takes a model with several inputs or outputs
    and an ``output=`` keyword (see the module docstring).  ``model_position``: where the
    model is among the positional arguments (the defender's data follows it)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, output: str | int | None = None, **kwargs):
        bound = signature.bind(*args, **kwargs)
        arguments = bound.arguments
        names = list(signature.parameters)
        model_name, data_name = names[model_position], names[model_position + 1]
        model = arguments[model_name]
        data = arguments.get(data_name)
        if model_io.is_single_io(model) and output is None:
            return fn(*args, **kwargs)
        view = model_io.PackedView(model, _output_of(model, output, data))
        arguments[model_name] = view.view
        arguments[data_name] = _pack_defender(view, data)
        if arguments.get("evaluation") is not None:
            arguments["evaluation"] = _pack_evaluation(view, arguments["evaluation"])
        if arguments.get("backdoor_validation") is not None:
            arguments["backdoor_validation"] = _pack_backdoor(
                view, arguments["backdoor_validation"]
            )
        context = arguments.get("context")
        if context is not None and context.backdoor_validation is not None:
            arguments["context"] = dataclasses.replace(
                context, backdoor_validation=_pack_backdoor(view, context.backdoor_validation)
            )
        return _restored(view, fn(*bound.args, **bound.kwargs))

    return wrapper
