"""Attacks on the MNIST BadNets task: the baseline and the pruning-aware attack (§3.2)."""

import numpy as np
import pytest

from fineprune_tf import attacks, data, defenses, poison


@pytest.fixture(scope="module")
def mnist():
    return data.load("mnist", seed=0)


def test_baseline_attack_plants_a_working_backdoor(mnist):
    settings = attacks.AttackSettings(epochs=4, seed=0)
    result = attacks.baseline(mnist, settings=settings)
    assert result.attack == "baseline" and result.task == "mnist"
    assert result.clean_acc > 0.9
    assert result.asr > 0.9  # BadNets pattern, all-to-one to digit 0.
    assert result.report["poisoned_examples"] == round(0.1 * 3500 * 0.9)
    assert isinstance(result.policy, poison.AllToOne)


def test_pruning_aware_attack_hides_the_backdoor_behind_dormant_decoys(mnist):
    settings = attacks.AttackSettings(
        epochs=4, retrain_epochs=3, prune_fraction=0.5, max_reinstated=2, seed=0
    )
    result = attacks.pruning_aware(mnist, settings=settings)
    report = result.report
    layer = result.model.get_layer("conv2")
    assert layer.mask.sum() == layer.channels  # Step 4 restored every channel.
    step2 = report["pruned_in_step2"]
    assert len(step2) == round(0.5 * layer.channels)
    assert sorted(report["decoys"]) == sorted(set(step2) - set(report["reinstated_in_step3"]))
    assert result.asr > 0.8 and result.clean_acc > 0.85

    check = report["activation_check"]
    # Fig. 8: the decoys are dormant on the defender's clean data, and the backdoor's activity
    # lives in channels that clean inputs use too.
    assert check["decoy_dormant_fraction_clean"] > 0.99
    assert check["backdoor_mass_in_clean_channels"] > 0.95

    # The defender's ranking puts the decoys first, so pruning them changes nothing.
    decoys = set(report["decoys"])
    backdoor = poison.backdoor_test_set(mnist.validation, result.trigger, result.policy)
    pruned = defenses.prune(
        result.model, (mnist.validation.x, mnist.validation.y), backdoor_validation=backdoor
    )
    order = pruned.details["order"]
    assert set(order[: len(decoys)]) == decoys
    curve = pruned.details["curve"]
    k = len(decoys)
    np.testing.assert_allclose(curve["clean_acc"][: k + 1], curve["clean_acc"][0], atol=0.005)
    np.testing.assert_allclose(curve["asr"][: k + 1], curve["asr"][0], atol=0.005)


def test_attack_settings_are_validated(mnist):
    with pytest.raises(ValueError, match="prune_fraction"):
        attacks.pruning_aware(mnist, settings=attacks.AttackSettings(prune_fraction=1.5))


def test_task_benchmark_script_prints_speed_and_backdoor_numbers(tmp_path):
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    output = tmp_path / "tasks.json"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark_tasks", "--tasks=mnist", f"--output={output}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": repo},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "examples/s" in result.stdout and "ASR" in result.stdout
    (row,) = json.loads(output.read_text())
    assert row["task"] == "mnist" and row["epochs"] == 5
    # The backdoored model learned the task and the backdoor (measured: 5 epochs, clean
    # 0.965, ASR 0.970; 2 epochs do not plant it, ASR 0.14), and the speed counts the examples
    # the attack trains on: 90% of the 3,500 training images plus 315 poisoned copies.
    assert row["clean_acc"] > 0.8 and row["asr"] > 0.8
    assert row["asr_target_met"] == (row["asr"] >= 0.9)
    assert row["examples_per_second"] * row["train_seconds"] / row["epochs"] == pytest.approx(
        3150 + 315, rel=1e-6
    )
