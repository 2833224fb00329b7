"""The defender-realistic protocol: pick a defense from the defender's clean data only.

A defender cannot measure the attack success rate (she has no triggered data), so no rule that
reads only clean data can rank defenses by how much backdoor they remove.  What clean data can
measure is how much a defense *changed* the model and how much clean accuracy that cost.  The
rule therefore prefers change, bounded by clean accuracy -- the same principle as the
fine-tuning learning-rate rule (``fine_tuning.choose_learning_rate``):

    run the candidate defenses (each chooses its own hyper-parameters from DefenderData);
    a defense qualifies when its clean holdout accuracy is at most ``tolerance`` points below
    the undefended model's; among the qualifying ones choose the one that moved the model
    furthest from the attacker's weights (relative L2 distance of the effective weights, a
    pruned channel counting as zeroed: :func:`weight_change`); ties within ``1e-3`` go to the
    a-priori order ``PRIORITY``; if none qualifies, the one that loses the least holdout
    accuracy.

Why not "first qualifying defense in a fixed order" (the previous rule): a defense that prunes
nothing, or a fine-tuning that kept its starting weights, qualifies trivially -- it costs no
accuracy because it changed nothing -- and the fixed order then keeps a model that still holds
the backdoor whenever that defense comes first.  The weight distance reads no data at all, so
it cannot leak test data; it cannot see the backdoor either -- it is a preference, not a
measurement of removal.

History (reported honestly): the first version of this rule measured the change of the clean
*outputs* (:func:`output_change`, mean total variation).  On seed 0 of mnist and speech it
preferred RNP, whose lowered confidences move the outputs most while keeping ASR .80-.88
(results/defense_eval.md reports both measures).  The switch to the weight distance -- the
fine-tuning rate rule's own principle ("moved furthest from the attacker's weights") -- was
made after seeing those seed-0 test numbers, so seed 0 is not an independent check of it;
the other seeds and the third-party models (scripts.third_party_eval) are.

``PRIORITY`` was fixed before any measurement (fine-pruning first, the paper's defense, then
BackdoorBench's leaderboard by mean DER: ANP > CLP > fine-tuning, with RNP and FMP after ANP).
FST (feature shift tuning, a fine-tuning variant not on that leaderboard) was added later, after
fine-tuning; order only breaks ties of the weight change within ``CHANGE_TIE``.

:func:`choose` reads only clean holdout accuracies and clean-input output changes, and runs
inside ``guard.selecting()``, so any attempt to read report-only data while choosing raises.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import keras
import numpy as np

from fineprune_tf.defenses.guard import DefenderData, ReportOnly, selecting
from fineprune_tf.defenses.registry import REGISTRY, DefenseContext, run_defense
from fineprune_tf.defenses.result import DefenseResult, NotApplicable, finish, holdout_accuracy
from fineprune_tf.layers import MaskedLayerMixin

__all__ = ["PRIORITY", "Choice", "choose", "auto_defend", "output_change", "weight_change"]

PRIORITY = ("fine_pruning", "anp", "rnp", "fmp", "clp", "fine_tuning", "fst", "pruning")
CHANGE_TIE = 1e-3


def _probabilities(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities ``[N, classes]``: the outputs when they already are (rows >= 0
    summing to 1), else their softmax (a model ending in logits)."""
    outputs = np.concatenate(
        [
            np.asarray(model(x[i : i + batch_size], training=False), dtype=np.float64)
            for i in range(0, len(x), batch_size)
        ]
    )
    outputs = outputs.reshape(len(x), -1)
    if outputs.min() >= 0 and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3):
        return outputs
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _effective_weights(model: keras.Model) -> list[np.ndarray]:
    """Every trainable array as the network uses it: a masked layer's per-channel arrays (last
    axis = its channels) multiplied by its mask, so a pruned channel counts as zeroed."""
    arrays = []
    for layer in model.layers:
        mask = None
        if isinstance(layer, MaskedLayerMixin):
            mask = keras.ops.convert_to_numpy(layer.mask).astype(np.float64)
        for variable in layer.trainable_weights:
            value = keras.ops.convert_to_numpy(variable).astype(np.float64)
            if mask is not None and value.shape[-1:] == mask.shape:
                value = value * mask
            arrays.append(value)
    return arrays


def weight_change(before: keras.Model, after: keras.Model) -> float:
    """Relative distance ``||w' - w|| / ||w||`` over every trainable array (pruned channels
    counted as zero, :func:`_effective_weights`): how far a defense moved the model from the
    attacker's weights.  Needs no data.  The two models must have the same layers."""
    old, new = _effective_weights(before), _effective_weights(after)
    if [a.shape for a in old] != [b.shape for b in new]:
        raise ValueError(
            "weight_change compares two models with the same layers (a defense's "
            "input and output); received different weight shapes"
        )
    squared = sum(float(np.sum((b - a) ** 2)) for a, b in zip(old, new, strict=True))
    return float(np.sqrt(squared / max(sum(float(np.sum(a**2)) for a in old), 1e-30)))


def output_change(before: keras.Model, after: keras.Model, x: np.ndarray) -> float:
    """Mean total-variation distance in [0, 1] between two models' class probabilities on
    clean inputs ``x`` ``[N, ...]`` (0: same function on these inputs)."""
    x = np.asarray(x)
    difference = np.abs(_probabilities(before, x) - _probabilities(after, x))
    return float(0.5 * difference.sum(axis=1).mean())


@dataclasses.dataclass
class Choice:
    """What the protocol chose and why.

    Attributes:
      name: the chosen defense; result: its DefenseResult (report filled when evaluation given).
      why: one sentence; table: ``{defense: {"holdout_acc", "holdout_drop_points",
      "qualifies", "change"}}`` for every candidate run.
    """

    name: str
    result: DefenseResult
    why: str
    base_holdout_acc: float
    table: dict


def choose(
    results: Mapping[str, DefenseResult],
    base_holdout_acc: float,
    *,
    priority: Sequence[str] = PRIORITY,
    tolerance: float = 2.0,
    changes: Mapping[str, float] | None = None,
) -> tuple[str, str, dict]:
    """Picks a defense from clean data only; returns ``(name, why, table)``.

    ``results[name].holdout_acc`` is the clean holdout accuracy; ``changes[name]`` how far the
    defense moved the model (:func:`weight_change` in :func:`auto_defend`).  Without
    ``changes`` the choice is the first qualifying defense in ``priority`` (the previous rule,
    kept for callers that only have holdout accuracies).
    """
    with selecting():
        table = {}
        for name, result in results.items():
            drop = (base_holdout_acc - result.holdout_acc) * 100.0
            table[name] = {
                "holdout_acc": result.holdout_acc,
                "holdout_drop_points": drop,
                "qualifies": drop <= tolerance + 1e-9,
                "change": None if changes is None else float(changes[name]),
            }
        ordered = [n for n in priority if n in results] + [n for n in results if n not in priority]
        qualifying = [n for n in ordered if table[n]["qualifies"]]
        if qualifying and changes is not None:
            most = max(table[n]["change"] for n in qualifying)
            name = next(n for n in qualifying if table[n]["change"] >= most - CHANGE_TIE)
            return (
                name,
                (
                    f"{name} moved the model furthest from the attacker's weights "
                    f"(change {table[name]['change']:.3f}) among {qualifying}, the "
                    f"defenses whose clean holdout accuracy stayed within {tolerance} "
                    f"points of the undefended model's ({base_holdout_acc:.3f})"
                ),
                table,
            )
        if qualifying:
            name = qualifying[0]
            return (
                name,
                (
                    f"{name} is the first of {ordered} whose clean holdout accuracy "
                    f"({table[name]['holdout_acc']:.3f}) is within {tolerance} points "
                    f"of the undefended model's ({base_holdout_acc:.3f})"
                ),
                table,
            )
        name = min(ordered, key=lambda n: table[n]["holdout_drop_points"])
        return (
            name,
            (
                f"no defense stayed within {tolerance} points on the clean holdout; "
                f"{name} lost the least ({table[name]['holdout_drop_points']:.1f})"
            ),
            table,
        )


def auto_defend(
    model: keras.Model,
    defender: DefenderData,
    *,
    candidates: Sequence[str] = PRIORITY,
    priority: Sequence[str] = PRIORITY,
    tolerance: float = 2.0,
    seed: int = 0,
    evaluation: ReportOnly | tuple | None = None,
    context: DefenseContext | None = None,
) -> Choice:
    """Runs ``candidates`` on the defender's clean data, chooses by :func:`choose`, and only
    then reports the chosen model on ``evaluation`` (report-only).  ``context`` (seed and
    tolerance taken from the arguments) passes work already done, e.g. a pruning outcome.

    A candidate that does not apply to the model (:class:`NotApplicable`, e.g. FST without a
    final Dense classifier) is skipped; its table entry says why.

    Raises:
      TypeError: ``defender`` is not a DefenderData (raw arrays could be the test set).
    """
    if not isinstance(defender, DefenderData):
        raise TypeError(
            f"auto_defend takes a DefenderData built from clean validation data, "
            f"got {type(defender).__name__}"
        )
    unknown = [c for c in candidates if c not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown defenses {unknown}; expected some of {list(REGISTRY)}")
    with selecting():
        base = holdout_accuracy(model, defender.holdout)
        context = dataclasses.replace(context or DefenseContext(), seed=seed, tolerance=tolerance)
        results, skipped = {}, {}
        for name in candidates:
            try:
                results[name] = run_defense(name, model, defender, context=context)
            except NotApplicable as error:
                skipped[name] = str(error)
        if not results:
            raise NotApplicable(f"no candidate defense applies to this model: {skipped}")
        changes = {name: weight_change(model, result.model) for name, result in results.items()}
    name, why, table = choose(
        results, base, priority=priority, tolerance=tolerance, changes=changes
    )
    for skipped_name, reason in skipped.items():
        table[skipped_name] = {"qualifies": False, "not_applicable": reason}
    chosen = finish(results[name], evaluation)
    return Choice(name, chosen, why, base, table)
