"""The guard (selection never reads test or triggered data), the protocol's choice, the
fine-tuning stopping rule, DER and FMP's tie-free ranking."""

import keras
import numpy as np
import pytest

from fineprune_tf import defenses
from fineprune_tf.defenses import guard
from fineprune_tf.defenses.fine_tuning import ConvergenceSelection
from fineprune_tf.defenses.fmp import fmp_ranking
from tests.test_defenses import blob_data, planted_backdoor_model, planted_data, trainable_model


def test_report_only_data_cannot_be_read_while_choosing():
    (x, y), backdoor = planted_data(20, seed=0)
    report = defenses.ReportOnly((x, y), backdoor)
    assert report.open()[0][0] is x
    with guard.selecting(), pytest.raises(defenses.SelectionLeakError):
        report.open()
    with pytest.raises(defenses.SelectionLeakError):
        np.asarray(report)
    with pytest.raises(defenses.SelectionLeakError):
        defenses.DefenderData(report, y)
    with pytest.raises(defenses.SelectionLeakError):
        defenses.DefenderData.coerce(report)


def test_auto_defend_refuses_raw_arrays():
    (x, y), _ = planted_data(40, seed=0)
    with pytest.raises(TypeError, match="DefenderData"):
        defenses.auto_defend(planted_backdoor_model(), (x, y), candidates=("clp",))
    with pytest.raises(TypeError, match="DefenderData"):
        defenses.run_defense("clp", planted_backdoor_model(), (x, y))


class SpyReport(defenses.ReportOnly):
    """Records whether a selection was running each time the report was opened."""

    def __init__(self, *args):
        super().__init__(*args)
        self.opened_while_selecting: list[bool] = []

    def open(self):
        self.opened_while_selecting.append(guard.is_selecting())
        return super().open()


@pytest.mark.parametrize("name", ["none", "pruning", "clp", "anp", "fine_pruning"])
def test_selection_never_touches_test_data(name, monkeypatch):
    monkeypatch.setattr(defenses.FineTuneSettings, "max_epochs", 2)
    model = planted_backdoor_model()
    validation, _ = planted_data(200, seed=1)
    defender = defenses.DefenderData(*validation, seed=0)
    report = SpyReport(*planted_data(100, seed=2))
    result = defenses.run_defense(name, model, defender, evaluation=report)
    assert report.opened_while_selecting == [False]  # Read once, after every choice.
    assert result.clean_acc == pytest.approx(1.0, abs=0.05)


def test_the_choice_does_not_depend_on_the_test_data():
    model = planted_backdoor_model()
    defender = defenses.DefenderData(*planted_data(200, seed=3)[0], seed=0)
    real = defenses.ReportOnly(*planted_data(100, seed=4))
    (x, y), backdoor = planted_data(100, seed=5)
    garbage = defenses.ReportOnly((np.full_like(x, 7.0), 1 - y), backdoor)
    first = defenses.auto_defend(model, defender, candidates=("clp", "pruning"), evaluation=real)
    second = defenses.auto_defend(
        model, defender, candidates=("clp", "pruning"), evaluation=garbage
    )
    assert first.name == second.name and first.why == second.why
    np.testing.assert_array_equal(
        first.result.model.get_layer("conv").mask, second.result.model.get_layer("conv").mask
    )
    assert first.result.clean_acc != second.result.clean_acc  # The reports did differ.


class Fake:
    def __init__(self, holdout_acc):
        self.holdout_acc = holdout_acc


def test_choose_takes_the_first_defense_in_priority_within_tolerance():
    results = {"anp": Fake(0.90), "fine_pruning": Fake(0.97), "clp": Fake(0.99)}
    name, why, table = defenses.choose(
        results, 0.98, priority=("anp", "fine_pruning", "clp"), tolerance=2.0
    )
    assert name == "fine_pruning" and "first" in why
    assert table["anp"]["qualifies"] is False and table["clp"]["qualifies"] is True
    name, why, _ = defenses.choose(
        {"anp": Fake(0.5), "clp": Fake(0.7)}, 0.98, priority=("anp", "clp"), tolerance=2.0
    )
    assert name == "clp" and "lost the least" in why


def test_der_follows_the_corrected_definition():
    before = {"clean_acc": 0.9, "asr": 1.0}
    assert defenses.der(before, {"clean_acc": 0.9, "asr": 0.0}) == pytest.approx(1.0)
    assert defenses.der(before, {"clean_acc": 0.8, "asr": 0.0}) == pytest.approx(0.95)
    assert defenses.der(before, {"clean_acc": 0.95, "asr": 1.0}) == pytest.approx(0.5)


class _Holder:
    def __init__(self):
        self.weights = [np.zeros(1)]
        self.stop_training = False

    def get_weights(self):
        return [w.copy() for w in self.weights]

    def set_weights(self, weights):
        self.weights = weights


def test_convergence_rule_stops_on_a_plateau_and_prefers_the_later_checkpoint():
    rule = ConvergenceSelection(tolerance=1.0, plateau_patience=2, min_delta=0.02)
    holder = _Holder()
    rule.set_model(holder)
    logs = [(1.0, 0.90), (0.5, 0.96), (0.3, 0.955), (0.299, 0.952), (0.298, 0.94)]
    for epoch, (loss, accuracy) in enumerate(logs):
        holder.weights = [np.full(1, float(epoch))]
        rule.on_epoch_end(epoch, {"loss": loss, "val_accuracy": accuracy})
        if holder.stop_training:
            break
    assert holder.stop_training and epoch == 4  # Two epochs without a 2% improvement.
    rule.on_train_end()
    # Best holdout 0.96 (epoch 1); epochs 2 and 3 are within 1 point: the later one is kept.
    assert rule.chosen == 3 and holder.weights[0][0] == 3.0


def test_early_stopping_rule_and_converge_rule_differ_on_how_much_they_train():
    model = trainable_model(seed=4)
    x, y = blob_data(240, seed=8)
    converge = defenses.fine_tune(
        model,
        (x, y),
        settings=defenses.FineTuneSettings(learning_rate=3e-3, max_epochs=8, plateau_patience=8),
    )
    assert converge.details["epochs"] == 8
    assert converge.details["chosen_epoch"] >= 1
    assert converge.forward_passes > converge.backward_passes > 0


def test_fmp_ranking_is_a_strict_total_order_without_ties():
    model = trainable_model(seed=5)
    conv = model.get_layer("conv2")
    kernel = conv.kernel.numpy()
    kernel[..., 1] = kernel[..., 0]  # Channels 0 and 1 identical: an exact tie by design.
    conv.kernel.assign(kernel)
    bias = conv.bias.numpy()
    bias[[0, 1]] = bias[0]
    bias[2] = -1e3  # Channel 2 is dead: zero gradient, score exactly 0.
    conv.bias.assign(bias)
    x, y = blob_data(64, seed=9)
    scores = defenses.fmp_sensitivity(model, x, y, probe_samples=64)["conv2"]
    order = fmp_ranking(scores["score"], scores["deviation"])
    assert sorted(order.tolist()) == list(range(12))
    assert scores["score"][2] == 0.0
    ranks = order.tolist()
    assert all(ranks.index(2) > ranks.index(c) for c in range(12) if scores["score"][c] > 0)
    assert scores["score"][0] == scores["score"][1]
    assert order.tolist().index(0) < order.tolist().index(1)  # Exact ties go by index.
    live = [c for c in range(12) if c not in (1, 2)]
    assert len(np.unique(scores["score"][live])) == len(live)  # Continuous: no other ties.
    assert keras.ops.convert_to_numpy(conv.mask).sum() == 12


def test_convergence_rule_keeps_the_start_when_training_diverges():
    rule = ConvergenceSelection(tolerance=1.0, plateau_patience=5, start_accuracy=0.97)
    holder = _Holder()
    holder.weights = [np.full(1, -1.0)]
    rule.set_model(holder)
    rule.on_train_begin()
    for epoch, accuracy in enumerate([0.40, 0.10, 0.12]):
        holder.weights = [np.full(1, float(epoch))]
        rule.on_epoch_end(epoch, {"loss": 2.0 + epoch, "val_accuracy": accuracy})
    rule.on_train_end()
    assert rule.chosen == -1 and holder.weights[0][0] == -1.0
