"""Defenses against backdoors: pruning (§3.1), fine-tuning and fine-pruning (§3.3), FMP, FST,
ANP, RNP and CLP, a registry that runs each by name, and the protocol that picks one from the
defender's clean data only.

Every defense works on a copy of the model it is given (the user's model is never modified),
chooses everything from the defender's clean data (:class:`DefenderData`), holds its pruning
in the MaskedConv2D / MaskedDense masks, and returns a :class:`DefenseResult`.  Report-only
data (test set, triggered inputs) is read after the choices, never during them
(:mod:`fineprune_tf.defenses.guard`).

Modules: ``guard`` (DefenderData, ReportOnly), ``result``, ``pruning``, ``fine_tuning``,
``fmp``, ``fst`` (feature shift tuning), ``neurons`` (neuron groups shared by ANP/RNP/CLP),
``anp``, ``rnp``, ``clp``,
``thresholds`` (holdout choice of thresholds), ``registry``, ``protocol``, ``multi_io``
(models with several inputs or outputs).
"""

from fineprune_tf.defenses.anp import anp
from fineprune_tf.defenses.clp import channel_lipschitz, clp
from fineprune_tf.defenses.fine_tuning import (
    ConvergenceSelection,
    FineTuneSettings,
    GradualChannelPruning,
    add_weight_noise,
    fine_prune,
    fine_tune,
)
from fineprune_tf.defenses.fmp import FmpSettings, fmp, fmp_sensitivity
from fineprune_tf.defenses.fst import FstSettings, fst
from fineprune_tf.defenses.guard import DefenderData, ReportOnly, SelectionLeakError
from fineprune_tf.defenses.multi_io import accepts_multi_io
from fineprune_tf.defenses.protocol import PRIORITY, Choice, auto_defend, choose
from fineprune_tf.defenses.pruning import (
    PruningOutcome,
    PruningSettings,
    prune,
    pruning_outcome,
    rank_channels,
    stopping_point,
)
from fineprune_tf.defenses.registry import REGISTRY, DefenseContext, register, run_defense
from fineprune_tf.defenses.result import DefenseResult, clone, der, finish
from fineprune_tf.defenses.rnp import rnp

# Models with several inputs or outputs: every public defense runs on a one-input, one-output
# view of them (defenses.multi_io); the registry and the protocol call the plain functions.
anp, clp, fine_prune, fine_tune, fmp, fst, prune, pruning_outcome, rnp, auto_defend = (
    accepts_multi_io(fn)
    for fn in (anp, clp, fine_prune, fine_tune, fmp, fst, prune, pruning_outcome, rnp, auto_defend)
)
run_defense = accepts_multi_io(run_defense, model_position=1)

#: The defenses ``fineprune_tf.experiment`` runs by name (REGISTRY holds them all).
DEFENSES = ("none", "pruning", "fine_tuning", "fine_pruning", "fmp")

__all__ = [
    "DEFENSES",
    "PRIORITY",
    "REGISTRY",
    "Choice",
    "ConvergenceSelection",
    "DefenderData",
    "DefenseContext",
    "DefenseResult",
    "FineTuneSettings",
    "FmpSettings",
    "FstSettings",
    "PruningOutcome",
    "PruningSettings",
    "pruning_outcome",
    "register",
    "GradualChannelPruning",
    "ReportOnly",
    "SelectionLeakError",
    "add_weight_noise",
    "anp",
    "auto_defend",
    "channel_lipschitz",
    "choose",
    "clone",
    "clp",
    "der",
    "fine_prune",
    "fine_tune",
    "finish",
    "fmp",
    "fmp_sensitivity",
    "fst",
    "prune",
    "rank_channels",
    "rnp",
    "run_defense",
    "stopping_point",
]
