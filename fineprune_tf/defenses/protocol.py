"""The defender-realistic protocol: pick a defense from the defender's clean data only.

A defender cannot measure the attack success rate (she has no triggered data), so no rule that
reads only clean data can rank defenses by how much backdoor they remove.  What clean data can
measure is how much a defense *changed* the model and how much clean accuracy that cost.  The
rule therefore prefers change, bounded by clean accuracy -- the same principle as the
fine-tuning learning-rate rule (``fine_tuning.choose_learning_rate``):

    run the candidate defenses (each chooses its own hyper-parameters from DefenderData);
    a defense qualifies when its clean holdout accuracy is at most ``tolerance`` points below
    the undefended model's; among the qualifying ones choose the one whose outputs moved
    furthest from the undefended model's on the defender's clean inputs (mean total-variation
    distance between the two models' class probabilities, :func:`output_change`); ties within
    ``1e-3`` go to the a-priori order ``PRIORITY``; if none qualifies, the one that loses the
    least holdout accuracy.

Why not "first qualifying defense in a fixed order" (the previous rule): a defense that prunes
nothing, or a fine-tuning that kept its starting weights, qualifies trivially -- it costs no
accuracy because it changed nothing -- and the fixed order then keeps a model that still holds
the backdoor whenever that defense comes first.  The output change is computed from clean
inputs only (no labels, no triggers); it cannot see the backdoor either, but a defense that
left the model's function unchanged has, in particular, left the backdoor's trigger response
unchanged unless it touched only trigger-specific units (dormant on clean data) -- which is
why the pruning defenses are kept in ``PRIORITY`` for ties.

``PRIORITY`` was fixed before any measurement (fine-pruning first, the paper's defense, then
BackdoorBench's leaderboard by mean DER: ANP > CLP > fine-tuning, with RNP and FMP after ANP).

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
from fineprune_tf.defenses.result import DefenseResult, finish, holdout_accuracy

__all__ = ["PRIORITY", "Choice", "choose", "auto_defend", "output_change"]

PRIORITY = ("fine_pruning", "anp", "rnp", "fmp", "clp", "fine_tuning", "pruning")
CHANGE_TIE = 1e-3


def _probabilities(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities ``[N, classes]``: the outputs when they already are (rows >= 0
    summing to 1), else their softmax (a model ending in logits)."""
    outputs = np.concatenate([np.asarray(model(x[i:i + batch_size], training=False),
                                         dtype=np.float64)
                              for i in range(0, len(x), batch_size)])
    outputs = outputs.reshape(len(x), -1)
    if outputs.min() >= 0 and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3):
        return outputs
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


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
      "qualifies"}}`` for every candidate run.
    """

    name: str
    result: DefenseResult
    why: str
    base_holdout_acc: float
    table: dict


def choose(results: Mapping[str, DefenseResult], base_holdout_acc: float, *,
           priority: Sequence[str] = PRIORITY, tolerance: float = 2.0,
           changes: Mapping[str, float] | None = None) -> tuple[str, str, dict]:
    """Picks a defense from clean data only; returns ``(name, why, table)``.

    ``results[name].holdout_acc`` is the clean holdout accuracy; ``changes[name]`` the
    :func:`output_change` on clean inputs.  Without ``changes`` the choice is the first
    qualifying defense in ``priority`` (the previous rule, kept for callers that cannot
    compute outputs).
    """
    with selecting():
        table = {}
        for name, result in results.items():
            drop = (base_holdout_acc - result.holdout_acc) * 100.0
            table[name] = {"holdout_acc": result.holdout_acc, "holdout_drop_points": drop,
                           "qualifies": drop <= tolerance + 1e-9,
                           "output_change": None if changes is None else float(changes[name])}
        ordered = [n for n in priority if n in results] + [n for n in results
                                                           if n not in priority]
        qualifying = [n for n in ordered if table[n]["qualifies"]]
        if qualifying and changes is not None:
            most = max(table[n]["output_change"] for n in qualifying)
            name = next(n for n in qualifying
                        if table[n]["output_change"] >= most - CHANGE_TIE)
            return name, (f"{name} changed the model's clean outputs most (total variation "
                          f"{table[name]['output_change']:.3f}) among {qualifying}, the "
                          f"defenses whose clean holdout accuracy stayed within {tolerance} "
                          f"points of the undefended model's ({base_holdout_acc:.3f})"), table
        if qualifying:
            name = qualifying[0]
            return name, (f"{name} is the first of {ordered} whose clean holdout accuracy "
                          f"({table[name]['holdout_acc']:.3f}) is within {tolerance} points "
                          f"of the undefended model's ({base_holdout_acc:.3f})"), table
        name = min(ordered, key=lambda n: table[n]["holdout_drop_points"])
        return name, (f"no defense stayed within {tolerance} points on the clean holdout; "
                      f"{name} lost the least ({table[name]['holdout_drop_points']:.1f})"), table


def auto_defend(model: keras.Model, defender: DefenderData, *,
                candidates: Sequence[str] = PRIORITY, priority: Sequence[str] = PRIORITY,
                tolerance: float = 2.0, seed: int = 0,
                evaluation: ReportOnly | tuple | None = None,
                context: DefenseContext | None = None) -> Choice:
    """Runs ``candidates`` on the defender's clean data, chooses by :func:`choose`, and only
    then reports the chosen model on ``evaluation`` (report-only).  ``context`` (seed and
    tolerance taken from the arguments) passes work already done, e.g. a pruning outcome.

    Raises:
      TypeError: ``defender`` is not a DefenderData (raw arrays could be the test set).
    """
    if not isinstance(defender, DefenderData):
        raise TypeError(f"auto_defend takes a DefenderData built from clean validation data, "
                        f"got {type(defender).__name__}")
    unknown = [c for c in candidates if c not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown defenses {unknown}; expected some of {list(REGISTRY)}")
    with selecting():
        base = holdout_accuracy(model, defender.holdout)
        context = dataclasses.replace(context or DefenseContext(), seed=seed,
                                      tolerance=tolerance)
        results = {name: run_defense(name, model, defender, context=context)
                   for name in candidates}
        clean_x = np.concatenate([defender.fit[0], defender.holdout[0]])
        changes = {name: output_change(model, result.model, clean_x)
                   for name, result in results.items()}
    name, why, table = choose(results, base, priority=priority, tolerance=tolerance,
                              changes=changes)
    chosen = finish(results[name], evaluation)
    return Choice(name, chosen, why, base, table)
