"""fineprune_tf.metrics on hand-made predictions."""

from types import SimpleNamespace

import keras
import numpy as np
import pytest

from fineprune_tf import metrics


def test_accuracy_and_robust_accuracy():
    assert metrics.accuracy([0, 1, 2, 3], [0, 1, 0, 0]) == 0.5
    assert metrics.accuracy(np.array([1.0, 2.0]), np.array([1, 2])) == 1.0
    assert metrics.robust_accuracy([4, 4, 1, 2], [3, 4, 1, 0]) == 0.5


def test_targeted_asr():
    pred = [7, 7, 7, 1]
    assert metrics.attack_success_rate(pred, [7, 7, 7, 7]) == 0.75
    # Speech's all-to-all policy (i + 1) % 10: each input has its own target.
    y_true = np.array([0, 1, 2, 3])
    assert metrics.attack_success_rate([1, 2, 0, 3], (y_true + 1) % 10) == 0.5


def test_targeted_asr_excludes_inputs_already_of_the_target_class():
    pred = [7, 7, 2, 7]
    y_attacker = [7, 7, 7, 7]
    # Input 3 is a 7 already: without it 2 of 3 succeed.
    assert metrics.attack_success_rate(pred, y_attacker, y_true=[0, 1, 2, 7]) == pytest.approx(
        2 / 3
    )
    with pytest.raises(ValueError, match="every backdoored input"):
        metrics.attack_success_rate([7, 7], [7, 7], y_true=[7, 7])


def test_untargeted_asr_formula():
    y_true = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    pred_clean = y_true.copy()
    pred_clean[0] = 1  # A_clean = 0.9
    pred_backdoor = y_true.copy()
    pred_backdoor[:7] = (y_true[:7] + 1) % 3  # A_backdoor = 0.3
    expected = 1 - 0.3 / 0.9
    assert metrics.attack_success_rate(
        pred_backdoor, None, targeted=False, pred_clean=pred_clean, y_true=y_true
    ) == pytest.approx(expected)
    assert metrics.attack_success_rate(
        pred_backdoor, None, targeted=False, y_true=y_true, clean_acc=0.6
    ) == pytest.approx(0.5)


def test_untargeted_asr_is_clipped_and_defined_at_zero_clean_accuracy():
    y_true = [0, 1, 2, 0]
    # Backdoored inputs classified better than clean ones: 1 - 1.0 / 0.5 < 0 -> 0.
    assert (
        metrics.attack_success_rate(y_true, None, targeted=False, y_true=y_true, clean_acc=0.5)
        == 0.0
    )
    assert (
        metrics.attack_success_rate(
            [1, 2, 0, 1], None, targeted=False, y_true=y_true, clean_acc=0.8
        )
        == 1.0
    )
    assert (
        metrics.attack_success_rate(
            [1, 2, 0, 1], None, targeted=False, y_true=y_true, clean_acc=0.0
        )
        == 0.0
    )


def test_defender_utility_matches_table_2():
    # Table 1/2, speech, fine-pruning vs. baseline attack: 0.988 - 0.020 = 0.968.
    assert metrics.defender_utility(0.988, 0.020) == pytest.approx(0.968)
    curve = metrics.defender_utility(np.array([0.99, 0.98]), np.array([0.77, 0.1]))
    np.testing.assert_allclose(curve, [0.22, 0.88])


def test_errors():
    with pytest.raises(ValueError, match="empty"):
        metrics.accuracy([], [])
    with pytest.raises(ValueError, match="3 labels but y has 2"):
        metrics.accuracy([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="1-D"):
        metrics.accuracy(np.zeros((2, 2), int), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="integer class labels"):
        metrics.accuracy([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="y_attacker"):
        metrics.attack_success_rate([0, 1])
    with pytest.raises(ValueError, match="pred_backdoor has 2 labels but y_attacker has 1"):
        metrics.attack_success_rate([0, 1], [1])
    with pytest.raises(ValueError, match="needs y_true"):
        metrics.attack_success_rate([0, 1], None, targeted=False, clean_acc=0.5)
    with pytest.raises(ValueError, match="clean_acc or pred_clean"):
        metrics.attack_success_rate([0, 1], None, targeted=False, y_true=[0, 1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.attack_success_rate([0, 1], None, targeted=False, y_true=[0, 1], clean_acc=2)


class Lookup(keras.Model):
    """Predicts the class stored in pixel [0, 0, 0] of each input."""

    def __init__(self, classes):
        super().__init__()
        self.classes = classes

    def call(self, x):
        return keras.ops.one_hot(keras.ops.cast(x[:, 0, 0, 0], "int32"), self.classes)


def images(labels):
    x = np.zeros((len(labels), 2, 2, 1), np.float32)
    x[:, 0, 0, 0] = labels
    return x


def test_evaluate_targeted_and_untargeted():
    model = Lookup(4)
    clean = (images([0, 1, 2, 3]), np.array([0, 1, 2, 0]))  # clean acc 0.75
    targeted = SimpleNamespace(
        x=images([3, 3, 1]),
        y_true=np.array([0, 1, 2]),
        y_attacker=np.array([3, 3, 3]),
        targeted=True,
    )
    result = metrics.evaluate(model, clean, targeted, batch_size=2)
    assert result == pytest.approx(dict(clean_acc=0.75, asr=2 / 3, robust_acc=0.0))

    untargeted = dict(
        x=images([1, 1, 2, 3]), y_true=np.array([1, 0, 2, 0]), y_attacker=None, targeted=False
    )  # A_backdoor = 0.5
    result = metrics.evaluate(model, clean, untargeted)
    assert result == pytest.approx(dict(clean_acc=0.75, asr=1 - 0.5 / 0.75, robust_acc=0.5))

    clean_only = metrics.evaluate(model, clean)
    assert clean_only["clean_acc"] == 0.75 and np.isnan(clean_only["asr"])


def test_evaluate_errors():
    model = Lookup(2)
    with pytest.raises(TypeError, match="no field 'targeted'"):
        metrics.evaluate(
            model, (images([0]), [0]), SimpleNamespace(x=images([0]), y_true=[0], y_attacker=[1])
        )
    with pytest.raises(ValueError, match="non-empty"):
        metrics.evaluate(model, (np.zeros((0, 2, 2, 1), np.float32), []))
    with pytest.raises(ValueError, match="pred has 1 labels but y has 2"):
        metrics.evaluate(model, (images([0]), [0, 1]))
