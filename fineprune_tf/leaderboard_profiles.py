"""The leaderboard's cost knob: named defense profiles built from the defenses' own settings.

``full`` runs every defense at its defaults (``defenses.registry``). ``budget`` (the
leaderboard's default) shortens the *iterative* parts only, so the default grid fits its time
budget; every choice a defense makes (thresholds, learning-rate rule, stopping rule) is still
taken from the defender's clean data, as under ``full``:

=================  ==========================  =========================================
knob               full (defense default)      budget
=================  ==========================  =========================================
fine-tuning        ``max_epochs=30``           ``max_epochs=10`` (FT, FP and FMP's tuning;
                                               cosine decay over the 10; both candidate
                                               rates and the converge rule kept)
ANP                ``iterations=100``          ``iterations=50`` (batches of 128)
RNP                20 unlearning (cap) +       10 + 10
                   20 recovering epochs
FMP probe          ``probe_samples=64``        ``probe_samples=32``
=================  ==========================  =========================================

The measured seconds these buy, and the budget arithmetic, are in ``scripts/leaderboard.py``'s
docstring and in ``leaderboard.md``'s header. The profile is part of the leaderboard's
settings (hashed into every cell key and written into ``leaderboard.json``), so numbers from
the two profiles never mix.
"""

from __future__ import annotations

import dataclasses
import inspect

from fineprune_tf.defenses.anp import anp
from fineprune_tf.defenses.fine_tuning import FineTuneSettings
from fineprune_tf.defenses.fmp import FmpSettings
from fineprune_tf.defenses.fst import FstSettings
from fineprune_tf.defenses.registry import DefenseContext
from fineprune_tf.defenses.rnp import rnp

__all__ = ["PROFILES", "DefenseProfile", "profile"]


@dataclasses.dataclass(frozen=True)
class DefenseProfile:
    """Cost settings of the iterative defenses; ``None`` keeps the defense's default.

    Attributes:
      name: the profile's name (``PROFILES`` key).
      fine_tune_max_epochs: epoch cap of every clean fine-tuning (fine-tuning, fine-pruning,
        FMP, FST); ``FineTuneSettings.max_epochs``.
      anp_iterations: ANP's mask-optimisation steps.
      rnp_epochs: RNP's unlearning-epoch cap and recovering epochs.
      fmp_probe_samples: clean examples FMP scores each channel on.
    """

    name: str
    fine_tune_max_epochs: int | None = None
    anp_iterations: int | None = None
    rnp_epochs: int | None = None
    fmp_probe_samples: int | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self)[1:]:
            value = getattr(self, field.name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"{field.name} must be None or an integer >= 1. Received: {value!r}"
                )

    def context(self, seed: int, tolerance: float) -> DefenseContext:
        """The ``DefenseContext`` that runs a defense under this profile."""
        fine_tune = fst = None
        if self.fine_tune_max_epochs is not None:
            fine_tune = FineTuneSettings(seed=seed, max_epochs=self.fine_tune_max_epochs)
            fst = FstSettings(max_epochs=self.fine_tune_max_epochs)
        fmp = None
        if self.fmp_probe_samples is not None:
            fmp = FmpSettings(probe_samples=self.fmp_probe_samples)
        return DefenseContext(
            seed=seed,
            tolerance=tolerance,
            fine_tune=fine_tune,
            fmp=fmp,
            fst=fst,
            anp_iterations=self.anp_iterations,
            rnp_epochs=self.rnp_epochs,
        )

    def to_dict(self) -> dict:
        """Every knob with the value a defense runs with (defaults filled in)."""
        return {
            "name": self.name,
            "fine_tune_max_epochs": self.fine_tune_max_epochs or FineTuneSettings.max_epochs,
            "anp_iterations": self.anp_iterations or _default(anp, "iterations"),
            "rnp_epochs": self.rnp_epochs or _default(rnp, "recovering_epochs"),
            "fmp_probe_samples": self.fmp_probe_samples or FmpSettings.probe_samples,
        }


#: The budget, measured (scripts/leaderboard.py), repeated in leaderboard.md.
BUDGET_NOTE = (
    "Budget, measured: the default grid of 8 defenses (3 tasks x 4 attacks x 3 seeds = 36 "
    "attacked models, 288 cells, each followed by the retuning attack) ran end to end in 38.9 "
    "minutes of wall and 69.9 CPU-minutes with this profile and `--workers=2` (two shard "
    "processes) on an otherwise idle 2-core AMD EPYC (results/leaderboard/); FST's 36 cells, "
    "added by resuming, took 8.7 minutes with other processes running: 47.6 minutes summed, "
    "over the 45-minute budget. Per attacked model, "
    "`python -m scripts.leaderboard_speed` measured 75 (mnist), 134 (traffic), 90 (speech) CPU "
    "seconds with one compiled training step reused per model structure "
    "(fineprune_tf.step_cache), 116, 185, 150 with a fresh trace per fit; one worker would "
    "put the 70 CPU-minutes on one core (not measured). `--budget_minutes` cuts a run and the "
    "same command continues it (scripts/leaderboard.py)."
)


def _default(function, argument: str):
    return inspect.signature(function).parameters[argument].default


PROFILES: dict[str, DefenseProfile] = {
    "full": DefenseProfile("full"),
    "budget": DefenseProfile(
        "budget",
        fine_tune_max_epochs=10,
        anp_iterations=50,
        rnp_epochs=10,
        fmp_probe_samples=32,
    ),
}


def profile(name: str) -> DefenseProfile:
    """``PROFILES[name]``; an unknown name raises ValueError listing the known ones."""
    if name not in PROFILES:
        raise ValueError(f"profile must be one of {list(PROFILES)}. Received: profile={name!r}")
    return PROFILES[name]
