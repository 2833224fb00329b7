"""Every defense under one signature, by name.

``REGISTRY[name](model, defender, *, seed=0, tolerance=2.0, evaluation=None)`` returns a
:class:`~fineprune_tf.defenses.result.DefenseResult`; ``defender`` is a
:class:`~fineprune_tf.defenses.guard.DefenderData` (clean data only) and every hyper-parameter
the defense needs is chosen from it (``tolerance``: clean holdout accuracy points a choice may
cost).  ``evaluation`` (report-only) is read after the defense has chosen, never before.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import keras

from fineprune_tf.defenses.anp import anp
from fineprune_tf.defenses.clp import clp
from fineprune_tf.defenses.fine_tuning import FineTuneSettings, fine_prune, fine_tune
from fineprune_tf.defenses.fmp import fmp
from fineprune_tf.defenses.guard import DefenderData
from fineprune_tf.defenses.pruning import prune
from fineprune_tf.defenses.result import DefenseResult, finish, holdout_accuracy
from fineprune_tf.defenses.rnp import rnp

__all__ = ["REGISTRY", "DefenseSpec", "run_defense", "no_defense"]


def no_defense(model: keras.Model, defender: DefenderData, *, seed: int = 0,
               tolerance: float = 2.0, evaluation=None) -> DefenseResult:
    """The undefended model (the reference every defense is compared with)."""
    del seed, tolerance
    start = time.perf_counter()
    result = DefenseResult("none", model, 0.0,
                           holdout_acc=holdout_accuracy(model, defender.holdout),
                           forward_passes=len(defender.holdout[0]))
    result.seconds = time.perf_counter() - start
    return finish(result, evaluation)


def _pruning(model, defender, *, seed=0, tolerance=2.0, evaluation=None):
    # The paper's 4-point threshold is the pruning step of fine-pruning; alone, pruning keeps
    # the protocol's tolerance.
    del seed
    result = prune(model, defender, threshold=tolerance, evaluation=None)
    result.holdout_acc = holdout_accuracy(result.model, defender.holdout)
    return finish(result, evaluation)


def _fine_tuning(model, defender, *, seed=0, tolerance=2.0, evaluation=None):
    del tolerance
    return fine_tune(model, defender, settings=FineTuneSettings(seed=seed),
                     evaluation=evaluation)


def _fine_pruning(model, defender, *, seed=0, tolerance=2.0, evaluation=None):
    del tolerance  # §3.3 prunes to the paper's 4 points, then fine-tuning recovers accuracy.
    return fine_prune(model, defender, settings=FineTuneSettings(seed=seed),
                      evaluation=evaluation)


def _fmp(model, defender, *, seed=0, tolerance=2.0, evaluation=None):
    del tolerance
    return fmp(model, defender, settings=FineTuneSettings(seed=seed), evaluation=evaluation)


def _anp(model, defender, *, seed=0, tolerance=2.0, evaluation=None):
    return anp(model, defender, tolerance=tolerance, seed=seed, evaluation=evaluation)


def _rnp(model, defender, *, seed=0, tolerance=2.0, evaluation=None):
    return rnp(model, defender, tolerance=tolerance, seed=seed, evaluation=evaluation)


def _clp(model, defender, *, seed=0, tolerance=2.0, evaluation=None):
    return clp(model, defender, u=None, tolerance=tolerance, seed=seed, evaluation=evaluation)


@dataclasses.dataclass(frozen=True)
class DefenseSpec:
    """A registered defense: its callable and a one-line description."""

    name: str
    run: Callable[..., DefenseResult]
    description: str


REGISTRY: dict[str, DefenseSpec] = {spec.name: spec for spec in (
    DefenseSpec("none", no_defense, "no defense"),
    DefenseSpec("pruning", _pruning, "§3.1 pruning of the last conv layer by clean activation"),
    DefenseSpec("fine_tuning", _fine_tuning, "fine-tuning to convergence on clean data"),
    DefenseSpec("fine_pruning", _fine_pruning, "§3.3 pruning then fine-tuning"),
    DefenseSpec("fmp", _fmp, "adversarial feature map pruning + fine-tuning (ICLR 2024)"),
    DefenseSpec("anp", _anp, "adversarial neuron pruning (NeurIPS 2021)"),
    DefenseSpec("rnp", _rnp, "reconstructive neuron pruning (ICML 2023)"),
    DefenseSpec("clp", _clp, "channel Lipschitzness-based pruning (ECCV 2022)"),
)}


def run_defense(name: str, model: keras.Model, defender: DefenderData, *, seed: int = 0,
                tolerance: float = 2.0, evaluation=None) -> DefenseResult:
    """Runs ``REGISTRY[name]``; unknown names raise ValueError listing the known ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown defense {name!r}; expected one of {', '.join(REGISTRY)}")
    if not isinstance(defender, DefenderData):
        raise TypeError(f"defenses take a DefenderData (clean data only), got "
                        f"{type(defender).__name__}")
    return REGISTRY[name].run(model, defender, seed=seed, tolerance=tolerance,
                              evaluation=evaluation)
