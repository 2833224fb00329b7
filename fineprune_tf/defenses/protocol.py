"""The defender-realistic protocol: pick a defense from the defender's clean data only.

A defender cannot measure the attack success rate (she has no triggered data), so no rule that
reads only clean data can rank defenses by how much backdoor they remove.  The protocol
therefore fixes an *a priori* order of preference, and uses the clean holdout only to rule
out defenses that cost too much clean accuracy:

    run the candidate defenses (each chooses its own hyper-parameters from DefenderData);
    choose the first defense in ``priority`` whose clean holdout accuracy is at most
    ``tolerance`` points below the undefended model's; if none qualifies, the one that loses
    the least.

The default ``PRIORITY`` was fixed before any measurement of this round: fine-pruning first
(the paper's defense, the one this toolkit reproduces), then the published ranking of the
others (BackdoorBench's leaderboard, mean DER: ANP 92.3 > CLP 69.4 > fine-tuning 65.0; RNP and
FMP after ANP, each reporting gains over it).  ``results/defense_eval.md`` measures how that
order fares on this project's tasks; changing it from those numbers would be tuning on our
benchmark's test sets, and is a design decision to make across tasks, not per user model.

:func:`choose` reads only ``DefenseResult.holdout_acc`` (clean holdout) and runs inside
``guard.selecting()``, so any attempt to read report-only data while choosing raises.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import keras

from fineprune_tf.defenses.guard import DefenderData, ReportOnly, selecting
from fineprune_tf.defenses.registry import REGISTRY, DefenseContext, run_defense
from fineprune_tf.defenses.result import DefenseResult, finish, holdout_accuracy

__all__ = ["PRIORITY", "Choice", "choose", "auto_defend"]

PRIORITY = ("fine_pruning", "anp", "rnp", "fmp", "clp", "fine_tuning", "pruning")


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
           priority: Sequence[str] = PRIORITY, tolerance: float = 2.0) -> tuple[str, str, dict]:
    """Picks a defense from clean holdout accuracies only; returns ``(name, why, table)``."""
    with selecting():
        table = {}
        for name, result in results.items():
            drop = (base_holdout_acc - result.holdout_acc) * 100.0
            table[name] = {"holdout_acc": result.holdout_acc, "holdout_drop_points": drop,
                           "qualifies": drop <= tolerance + 1e-9}
        ordered = [n for n in priority if n in results] + [n for n in results
                                                           if n not in priority]
        for name in ordered:
            if table[name]["qualifies"]:
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
    name, why, table = choose(results, base, priority=priority, tolerance=tolerance)
    chosen = finish(results[name], evaluation)
    return Choice(name, chosen, why, base, table)
