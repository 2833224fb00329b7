"""The clean-data rules that must not reward "changed nothing": the fine-tuning learning-rate
rule (largest rate within the holdout budget, diverged runs excluded) and the protocol's choice
(most change of the clean outputs among the defenses within the budget)."""

import keras
import numpy as np
import pytest

from fineprune_tf import defenses
from fineprune_tf.defenses.fine_tuning import choose_learning_rate
from fineprune_tf.defenses.protocol import output_change, weight_change
from tests.test_defenses import blob_data, planted_backdoor_model, planted_data, trainable_model


def run(rate, holdout, diverged=False):
    return {"learning_rate": rate, "final_holdout_acc": holdout, "diverged": diverged}


def test_learning_rate_rule_keeps_the_largest_rate_within_the_budget():
    runs = [run(1e-3, 0.97), run(3e-3, 0.95), run(1e-2, 0.90)]
    index, why = choose_learning_rate(runs, 0.97, rate_tolerance=2.0)
    assert index == 1 and "largest" in why  # 2.0 points lost: within; 7.0: not.
    # The best holdout accuracy would keep the least-trained run; the rule does not.
    assert max(range(3), key=lambda i: runs[i]["final_holdout_acc"]) == 0


def test_learning_rate_rule_never_keeps_a_run_that_changed_nothing():
    # A diverged run restored its starting weights: 0 points lost, but nothing removed.
    runs = [run(1e-3, 0.96), run(1e-2, 0.97, diverged=True)]
    index, _ = choose_learning_rate(runs, 0.97, rate_tolerance=2.0)
    assert index == 0
    runs = [run(1e-3, 0.80), run(3e-3, 0.85), run(1e-2, 0.97, diverged=True)]
    index, why = choose_learning_rate(runs, 0.97, rate_tolerance=2.0)
    assert index == 1 and "lost the least" in why


def test_default_fine_tuning_tries_every_candidate_rate_from_the_same_start():
    model = trainable_model(seed=4)
    x, y = blob_data(240, seed=8)
    settings = defenses.FineTuneSettings(max_epochs=2, plateau_patience=5)
    assert settings.learning_rate is None and settings.candidate_rates() == (1e-3, 3e-3)
    result = defenses.fine_tune(model, (x, y), settings=settings)
    details = result.details
    assert [r["learning_rate"] for r in details["rate_runs"]] == [1e-3, 3e-3]
    index, _ = choose_learning_rate(details["rate_runs"], details["start_holdout_acc"], 2.0)
    assert details["learning_rate"] == [1e-3, 3e-3][index]
    assert details["why"].startswith(f"lr {details['learning_rate']:g}")
    assert result.holdout_acc == pytest.approx(details["rate_runs"][index]["final_holdout_acc"])
    single = defenses.fine_tune(
        model,
        (x, y),
        settings=defenses.FineTuneSettings(learning_rate=3e-3, max_epochs=2, plateau_patience=5),
    )
    assert "rate_runs" not in single.details and single.details["learning_rate"] == 3e-3
    assert details["backward_passes"] == 2 * single.details["backward_passes"]


class Fake:
    def __init__(self, holdout_acc):
        self.holdout_acc = holdout_acc


def test_protocol_prefers_the_defense_that_changed_most_within_the_budget():
    results = {
        "fine_pruning": Fake(0.97),
        "anp": Fake(0.97),
        "fine_tuning": Fake(0.96),
        "pruning": Fake(0.80),
    }
    changes = {"fine_pruning": 0.0, "anp": 0.02, "fine_tuning": 0.08, "pruning": 0.5}
    name, why, table = defenses.choose(results, 0.97, tolerance=2.0, changes=changes)
    # fine_pruning is first in PRIORITY and costs nothing, because it changed nothing;
    # pruning changed most but lost 17 points.
    assert name == "fine_tuning" and "furthest from the attacker" in why
    assert table["pruning"]["qualifies"] is False
    assert table["fine_tuning"]["change"] == pytest.approx(0.08)
    tied = dict(changes, anp=0.0805)
    name, _, _ = defenses.choose(results, 0.97, tolerance=2.0, changes=tied)
    assert name == "anp"  # Within 1e-3 of the most: PRIORITY decides (anp before fine_tuning).
    name, why, _ = defenses.choose(
        {"a": Fake(0.5), "b": Fake(0.7)}, 0.98, tolerance=2.0, changes={"a": 0.9, "b": 0.1}
    )
    assert name == "b" and "lost the least" in why


def test_output_change_is_zero_for_the_same_function_and_bounded():
    model = planted_backdoor_model()
    (x, _), _ = planted_data(50, seed=0)
    assert output_change(model, model, x) == pytest.approx(0.0, abs=1e-12)
    pruned = defenses.clone(model)
    pruned.get_layer("conv").prune([0, 1])
    # Two classes: the total variation is |p(class 0) - p'(class 0)|, averaged.
    expected = np.abs(np.asarray(model(x))[:, 0] - np.asarray(pruned(x))[:, 0]).mean()
    assert output_change(model, pruned, x) == pytest.approx(expected, rel=1e-5)
    assert expected > 0.1
    # The backdoor channel is dormant on clean inputs: pruning it changes nothing there.
    dormant = defenses.clone(model)
    dormant.get_layer("conv").prune([2])
    assert output_change(model, dormant, x) == pytest.approx(0.0, abs=1e-6)


def test_weight_change_counts_pruned_channels_as_zeroed_and_reads_no_data():
    model = planted_backdoor_model()
    assert weight_change(model, defenses.clone(model)) == 0.0
    pruned = defenses.clone(model)
    pruned.get_layer("conv").prune([2])  # The dormant backdoor channel: kernel 1, bias -2.
    kernel, bias = 1.0, -2.0
    dense = model.get_layer("out").get_weights()
    total = 1 + 1 + 1 + 0.25 + 0 + 1 + 4 + 0 + sum(float((w**2).sum()) for w in dense)
    assert weight_change(model, pruned) == pytest.approx(
        np.sqrt((kernel**2 + bias**2) / total), rel=1e-6
    )
    other = trainable_model(seed=0)
    with pytest.raises(ValueError, match="same layers"):
        weight_change(model, other)


def test_output_change_reads_logits_through_a_softmax():
    inputs = keras.Input((3,))
    logits = keras.Model(inputs, keras.layers.Dense(2, name="d")(inputs))
    probabilities = keras.Model(inputs, keras.layers.Softmax()(logits.output))
    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    assert output_change(logits, probabilities, x) == pytest.approx(0.0, abs=1e-6)


def test_auto_defend_records_the_change_it_chose_by():
    model = planted_backdoor_model()
    defender = defenses.DefenderData(*planted_data(200, seed=3)[0], seed=0)
    choice = defenses.auto_defend(model, defender, candidates=("clp", "pruning"))
    changes = {n: row["change"] for n, row in choice.table.items()}
    qualifying = [n for n, row in choice.table.items() if row["qualifies"]]
    assert choice.name in qualifying
    assert changes[choice.name] >= max(changes[n] for n in qualifying) - 1e-3
