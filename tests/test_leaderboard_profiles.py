"""The leaderboard's defense cost profiles: what each knob reaches, and that they are recorded."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fineprune_tf import leaderboard, leaderboard_profiles
from fineprune_tf.defenses import DefenderData, DefenseResult
from fineprune_tf.defenses import registry as registry_module
from fineprune_tf.defenses.fine_tuning import FineTuneSettings
from fineprune_tf.defenses.fmp import FmpSettings


def _spy(calls: list):
    def fake(model, defender, **kwargs):
        calls.append(kwargs)
        return DefenseResult("spy", model, 0.0)

    return fake


@pytest.fixture
def recorded(monkeypatch):
    calls = {"anp": [], "rnp": [], "fmp": [], "fine_tune": []}
    for name in ("anp", "rnp", "fmp", "fine_tune"):
        monkeypatch.setattr(registry_module, name, _spy(calls[name]))
    return calls


def _run_all(profile: leaderboard_profiles.DefenseProfile) -> None:
    defender = DefenderData(np.zeros((10, 4, 4, 1), np.float32), np.arange(10) % 2, seed=0)
    context = profile.context(seed=3, tolerance=2.0)
    for name in ("anp", "rnp", "fmp", "fine_tuning"):
        registry_module.run_defense(name, object(), defender, context=context)


def test_budget_profile_reaches_every_iterative_defense(recorded):
    budget = leaderboard_profiles.profile("budget")
    _run_all(budget)
    assert recorded["anp"][0]["iterations"] == budget.anp_iterations
    assert recorded["rnp"][0]["unlearning_epochs"] == budget.rnp_epochs
    assert recorded["rnp"][0]["recovering_epochs"] == budget.rnp_epochs
    assert recorded["fmp"][0]["probe_samples"] == budget.fmp_probe_samples
    assert recorded["fmp"][0]["settings"].max_epochs == budget.fine_tune_max_epochs
    tune = recorded["fine_tune"][0]["settings"]
    assert tune.max_epochs == budget.fine_tune_max_epochs and tune.seed == 3
    # Only the iteration counts change: every clean-data rule is the default one.
    defaults = FineTuneSettings(seed=3)
    assert dataclasses.replace(tune, max_epochs=defaults.max_epochs) == defaults


def test_full_profile_leaves_every_defense_at_its_defaults(recorded):
    _run_all(leaderboard_profiles.profile("full"))
    assert "iterations" not in recorded["anp"][0]
    assert "recovering_epochs" not in recorded["rnp"][0]
    assert recorded["fmp"][0]["probe_samples"] == FmpSettings().probe_samples
    assert recorded["fine_tune"][0]["settings"] == FineTuneSettings(seed=3)
    assert leaderboard_profiles.profile("full").to_dict() == {
        "name": "full",
        "fine_tune_max_epochs": 30,
        "anp_iterations": 100,
        "rnp_epochs": 20,
        "fmp_probe_samples": 64,
    }


def test_profile_is_part_of_the_settings_and_their_hash():
    budget, full = leaderboard.Settings.default(), leaderboard.Settings.default("full")
    assert budget.profile == "budget"
    assert budget.to_dict()["defense_costs"] == leaderboard_profiles.profile("budget").to_dict()
    assert budget.digest() != full.digest()  # cells and cached numbers never mix
    with pytest.raises(ValueError, match="Received: profile='fast'"):
        leaderboard.Settings(profile="fast")
    with pytest.raises(ValueError, match="anp_iterations must be None or an integer >= 1"):
        leaderboard_profiles.DefenseProfile("x", anp_iterations=0)


def test_attacked_models_are_shared_by_profiles_but_not_by_training_settings(tmp_path):
    cache = leaderboard.ModelCache(tmp_path)
    budget, full = leaderboard.Settings.default(), leaderboard.Settings.default("full")
    assert cache._paths("mnist", "sig", 0, budget) == cache._paths("mnist", "sig", 0, full)
    shorter = dataclasses.replace(budget, epochs={"mnist": 2})
    assert cache._paths("mnist", "sig", 0, shorter) != cache._paths("mnist", "sig", 0, budget)
