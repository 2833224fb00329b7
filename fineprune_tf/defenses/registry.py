"""Every defense under one calling convention, by name.

A defense registers itself with :func:`register`; ``REGISTRY[name].run(model, defender,
context, evaluation)`` returns a :class:`~fineprune_tf.defenses.result.DefenseResult`:

* ``defender`` is a :class:`~fineprune_tf.defenses.guard.DefenderData` (clean data only);
  every hyper-parameter the defense needs and is not given is chosen from it;
* ``context`` is a :class:`DefenseContext`: the seed, the clean holdout accuracy a choice may
  cost (``tolerance``), the settings the caller fixed (None: the defense's own default) and
  work already done on this model (``pruned``: a pruning outcome, so the curve is computed
  once per model and layer);
* ``evaluation`` (report-only) is read after the defense has chosen, never before.

:func:`run_defense` is the keyword front door (the protocol and the scripts use it).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import keras

from fineprune_tf.defenses.anp import anp
from fineprune_tf.defenses.clp import clp
from fineprune_tf.defenses.fine_tuning import FineTuneSettings, fine_prune, fine_tune
from fineprune_tf.defenses.fmp import FmpSettings, fmp
from fineprune_tf.defenses.fst import FstSettings, fst
from fineprune_tf.defenses.guard import DefenderData
from fineprune_tf.defenses.pruning import PruningOutcome, PruningSettings, prune
from fineprune_tf.defenses.result import DefenseResult, finish, holdout_accuracy
from fineprune_tf.defenses.rnp import rnp

__all__ = ["REGISTRY", "DefenseContext", "DefenseSpec", "register", "run_defense", "no_defense"]


@dataclasses.dataclass(frozen=True)
class DefenseContext:
    """What a caller gives every defense besides the model and the defender's data.

    Attributes:
      seed: seeds the defense's randomness.
      tolerance: clean holdout accuracy (points) a defense's own choice may cost.
      pruning, fine_tune, fmp, fst: settings fixed by the caller; None lets the defense use its
        default (pruning alone then stops at ``tolerance``; fine-pruning at the paper's
        threshold).
      pruned: a :class:`PruningOutcome` already computed for this model (reused by pruning and
        fine-pruning); backdoor_validation: triggered validation inputs, reported in the
        pruning curve only.
      anp_iterations, rnp_epochs: cost knobs (None: the defense's own default): ANP's mask
        optimisation steps; RNP's unlearning-epoch cap and recovering epochs (the
        leaderboard's budget profile, ``fineprune_tf.leaderboard_profiles``).
    """

    seed: int = 0
    tolerance: float = 2.0
    pruning: PruningSettings | None = None
    fine_tune: FineTuneSettings | None = None
    fmp: FmpSettings | None = None
    fst: FstSettings | None = None
    pruned: PruningOutcome | None = None
    backdoor_validation: Any = None
    anp_iterations: int | None = None
    rnp_epochs: int | None = None

    def fine_tune_settings(self) -> FineTuneSettings:
        return self.fine_tune or FineTuneSettings(seed=self.seed)


DefenseFn = Callable[[keras.Model, DefenderData, DefenseContext, Any], DefenseResult]


@dataclasses.dataclass(frozen=True)
class DefenseSpec:
    """A registered defense: its callable and a one-line description."""

    name: str
    run: DefenseFn
    description: str


REGISTRY: dict[str, DefenseSpec] = {}


def register(name: str, description: str) -> Callable[[DefenseFn], DefenseFn]:
    """Decorator: registers ``fn(model, defender, context, evaluation)`` as defense ``name``."""

    def decorate(fn: DefenseFn) -> DefenseFn:
        if name in REGISTRY:
            raise ValueError(f"defense {name!r} is already registered")
        REGISTRY[name] = DefenseSpec(name, fn, description)
        return fn

    return decorate


@register("none", "no defense")
def no_defense(
    model: keras.Model, defender: DefenderData, context: DefenseContext, evaluation: Any = None
) -> DefenseResult:
    """The undefended model (the reference every defense is compared with)."""
    del context
    start = time.perf_counter()
    result = DefenseResult(
        "none",
        model,
        0.0,
        holdout_acc=holdout_accuracy(model, defender.holdout),
        forward_passes=len(defender.holdout[0]),
    )
    result.seconds = time.perf_counter() - start
    return finish(result, evaluation)


@register("pruning", "§3.1 pruning of the last conv layer by clean activation")
def _pruning(model, defender, context, evaluation=None):
    # The paper's 4-point threshold is the pruning step of fine-pruning; alone, and unless the
    # caller fixed it, pruning keeps the protocol's tolerance.
    settings = context.pruning or PruningSettings(threshold=context.tolerance)
    result = prune(
        model,
        defender,
        settings=settings,
        backdoor_validation=context.backdoor_validation,
        outcome=context.pruned,
    )
    result.holdout_acc = holdout_accuracy(result.model, defender.holdout)
    return finish(result, evaluation)


@register("fine_tuning", "fine-tuning to convergence on clean data")
def _fine_tuning(model, defender, context, evaluation=None):
    return fine_tune(model, defender, settings=context.fine_tune_settings(), evaluation=evaluation)


@register("fine_pruning", "§3.3 pruning then fine-tuning")
def _fine_pruning(model, defender, context, evaluation=None):
    # §3.3 prunes to the paper's threshold, then fine-tuning recovers accuracy.
    return fine_prune(
        model,
        defender,
        settings=context.fine_tune_settings(),
        pruning=context.pruning,
        backdoor_validation=context.backdoor_validation,
        evaluation=evaluation,
        pruned=context.pruned,
    )


@register("fmp", "adversarial feature map pruning + fine-tuning (ICLR 2024)")
def _fmp(model, defender, context, evaluation=None):
    settings = context.fmp or FmpSettings()
    settings.validate()
    return fmp(
        model,
        defender,
        prune_fraction=settings.prune_fraction,
        epsilon=settings.epsilon,
        alpha=settings.alpha,
        probe_samples=settings.probe_samples,
        memory_budget_mb=settings.memory_budget_mb,
        settings=context.fine_tune_settings(),
        evaluation=evaluation,
    )


@register("fst", "feature shift tuning, classifier pushed off the attacker's (NeurIPS 2023)")
def _fst(model, defender, context, evaluation=None):
    return fst(model, defender, settings=context.fst, seed=context.seed, evaluation=evaluation)


@register("anp", "adversarial neuron pruning (NeurIPS 2021)")
def _anp(model, defender, context, evaluation=None):
    costs = {} if context.anp_iterations is None else {"iterations": context.anp_iterations}
    return anp(
        model,
        defender,
        tolerance=context.tolerance,
        seed=context.seed,
        evaluation=evaluation,
        **costs,
    )


@register("rnp", "reconstructive neuron pruning (ICML 2023)")
def _rnp(model, defender, context, evaluation=None):
    epochs = context.rnp_epochs
    costs = {} if epochs is None else {"unlearning_epochs": epochs, "recovering_epochs": epochs}
    return rnp(
        model,
        defender,
        tolerance=context.tolerance,
        seed=context.seed,
        evaluation=evaluation,
        **costs,
    )


@register("clp", "channel Lipschitzness-based pruning (ECCV 2022)")
def _clp(model, defender, context, evaluation=None):
    return clp(
        model,
        defender,
        u=None,
        tolerance=context.tolerance,
        seed=context.seed,
        evaluation=evaluation,
    )


def run_defense(
    name: str,
    model: keras.Model,
    defender: DefenderData,
    *,
    seed: int = 0,
    tolerance: float = 2.0,
    evaluation=None,
    context: DefenseContext | None = None,
) -> DefenseResult:
    """Runs ``REGISTRY[name]``; unknown names raise ValueError listing the known ones.

    ``context`` (a :class:`DefenseContext`) replaces ``seed`` and ``tolerance`` when given.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown defense {name!r}; expected one of {', '.join(REGISTRY)}")
    if not isinstance(defender, DefenderData):
        raise TypeError(
            f"defenses take a DefenderData (clean data only), got {type(defender).__name__}"
        )
    context = context or DefenseContext(seed=seed, tolerance=tolerance)
    return REGISTRY[name].run(model, defender, context, evaluation)
