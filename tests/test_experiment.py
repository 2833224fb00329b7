"""The one-command experiment: files, tables, figures, refusal to overwrite, resume."""

import json
import os

import keras
import numpy as np
import pytest
from script_runs import run_script_several_times

from fineprune_tf import attacks, data, defenses, experiment, metrics, poison, triggers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_config(**overrides):
    values = dict(
        task="mnist", attacks=("baseline",), defenses=("none", "pruning"), quick=True, seed=0
    )
    values.update(overrides)
    return experiment.ExperimentConfig(**values)


def op_determinism_enabled() -> bool:
    # TensorFlow has no public getter; determinism._swap_tf_state reads the same flag.
    from tensorflow.python.framework import config

    return bool(config.is_op_determinism_enabled())


def count_curves(monkeypatch) -> list:
    """Records every pruning-curve computation as (model name, layer name)."""
    from fineprune_tf import curves

    calls = []
    for name in ("pruning_curve", "naive_pruning_curve"):
        original = getattr(curves, name)

        def counted(model, layer_name, *args, _original=original, **kwargs):
            calls.append((model.name, layer_name))
            return _original(model, layer_name, *args, **kwargs)

        monkeypatch.setattr(curves, name, counted)
    return calls


def test_quick_run_writes_tables_figures_models_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    curve_calls = count_curves(monkeypatch)
    # The run is deterministic inside, and leaves the caller's process as it found it.
    assert not op_determinism_enabled()
    np.random.seed(99)
    expected_draw = np.random.random()
    np.random.seed(99)
    results = experiment.run(quick_config(), out)
    assert not op_determinism_enabled()
    assert np.random.random() == expected_draw
    for name in (
        "results.json",
        "table1.md",
        "table2.md",
        "defenses.md",
        "fig6_baseline.png",
        "fig4_baseline.png",
        "stages.json",
        "trigger.json",
        "models/baseline.keras",
        "models/baseline_pruning.keras",
    ):
        assert (out / name).exists(), name
    assert (out / "fig6_baseline.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "results.json").read_text())
    cell = saved["table1"]["baseline"]["pruning"]
    assert set(cell) == {
        "clean_acc",
        "asr",
        "robust_acc",
        "seconds",
        "holdout_acc",
        "forward_passes",
        "backward_passes",
        "der",
    }
    none = saved["table1"]["baseline"]["none"]
    assert cell["der"] == pytest.approx(
        (
            max(0.0, none["asr"] - cell["asr"])
            - max(0.0, none["clean_acc"] - cell["clean_acc"])
            + 1.0
        )
        / 2.0
    )
    assert (
        f"| Baseline Attack | pruning | {cell['clean_acc']:.3f} |"
        in (out / "defenses.md").read_text()
    )
    # The cell is the pruned model's on the test split: measure it again from the file.
    task_data = data.load("mnist", seed=0)
    _, policy, _ = poison.default_attack("mnist", task_data)
    backdoor = poison.backdoor_test_set(
        task_data.test, triggers.load(out / "trigger.json"), policy, seed=0
    )
    pruned = keras.models.load_model(out / "models/baseline_pruning.keras")
    measured = metrics.evaluate(pruned, (task_data.test.x, task_data.test.y), backdoor)
    for key in ("clean_acc", "asr", "robust_acc"):
        assert cell[key] == pytest.approx(measured[key], abs=1e-9), key
    # Pruning really removed channels, as many as the defense reports.
    details = saved["defenses"]["baseline/pruning"]
    mask = np.asarray(pruned.get_layer(details.get("layer", "conv2")).mask)
    assert details["pruned_count"] > 0 and int((mask == 0).sum()) == details["pruned_count"]
    assert cell["clean_acc"] >= saved["table1"]["baseline"]["none"]["clean_acc"] - 0.15
    curve = saved["curves"]["baseline"]["curve"]
    assert len(curve["clean_acc"]) == saved["curves"]["baseline"]["channels"] + 1
    assert results["table1"] == saved["table1"]
    # The analysis stage computed the curve; the pruning defense reused it.
    assert [layer for _, layer in curve_calls] == [details["layer"]]
    assert set(saved["peak_rss_mb"]) == {
        "data",
        "attack/baseline",
        "analysis/baseline",
        "defense/baseline/none",
        "defense/baseline/pruning",
    }
    assert all(peak > 0 for peak in saved["peak_rss_mb"].values())
    # The machine the numbers came from (fineprune_tf.machine), for reports to print.
    assert saved["machine"]["cores"] >= 1 and saved["machine"]["tensorflow"]
    assert {"cpu", "intra_op_threads", "keras", "platform"} <= set(saved["machine"])
    assert "cl: " in (out / "table1.md").read_text()

    # Another run into the same directory is refused, and nothing is touched.
    before = (out / "results.json").read_bytes()
    with pytest.raises(experiment.OutputDirError, match="already holds"):
        experiment.run(quick_config(), out)
    assert (out / "results.json").read_bytes() == before

    # Resuming with one more defense reuses the trained model and the finished stages.
    model_time = os.stat(out / "models/baseline.keras").st_mtime_ns
    resumed = experiment.run(
        quick_config(defenses=("none", "pruning", "fine_tuning", "fine_pruning")), out, resume=True
    )
    assert os.stat(out / "models/baseline.keras").st_mtime_ns == model_time
    assert resumed["table1"]["baseline"]["pruning"] == cell
    assert "fine_tuning" in resumed["table1"]["baseline"]
    # Fine-pruning pruned what the stored analysis says, without a second curve.
    assert len(curve_calls) == 1
    fine_pruning = resumed["defenses"]["baseline/fine_pruning"]["pruning"]
    assert fine_pruning["pruned"] == details["pruned"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(task="cifar"), "unknown task"),
        (dict(attacks=("trojannn",)), "unknown attack"),
        (dict(defenses=("magic",)), "unknown defense"),
        (dict(pruning=defenses.PruningSettings(threshold=0.0)), "threshold must be in"),
        (dict(pruning=defenses.PruningSettings(threshold=120.0)), "threshold must be in"),
        (dict(attack=attacks.AttackSettings(prune_fraction=1.5)), "prune_fraction must be in"),
        (dict(fine_tune=defenses.FineTuneSettings(rule="magic")), "rule must be one of"),
        (dict(fmp=defenses.FmpSettings(prune_fraction=0.0)), "fmp prune_fraction must be in"),
    ],
)
def test_bad_configurations_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        experiment.run(quick_config(**overrides), tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_script_refuses_bad_flags_and_existing_results(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "results.json").write_text('{"mine": true}')
    outcomes = run_script_several_times(
        "scripts.fine_prune",
        ["--task=speech", "--threshold=150", f"--output_dir={tmp_path / 'a'}"],
        ["--task=speech", "--defenses=pruning,voodoo", f"--output_dir={tmp_path / 'a'}"],
        ["--task=nosuchtask"],
        ["--task=speech", f"--output_dir={occupied}"],
        cwd=tmp_path,
    )
    expected = ["threshold must be in (0, 100)", "unknown defense", "nosuchtask", "already holds"]
    assert len(outcomes) == len(expected)
    for (status, _, stderr), message in zip(outcomes, expected, strict=True):
        assert status not in (0, None) and message in stderr, (message, status, stderr)
    assert (occupied / "results.json").read_text() == '{"mine": true}'
