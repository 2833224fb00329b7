"""Cleaning a user's own model from files: the library call and the command line."""

import json

import keras
import numpy as np
import pytest
from PIL import Image
from script_runs import run_script_several_times

from fineprune_tf import cleaning
from fineprune_tf.data.user import load_user_data

TRIGGER_VALUE = 4.0


def plain_backdoored_model() -> keras.Model:
    """Stock Keras layers only; channel 2 of "conv" is a backdoor neuron dormant on clean data
    (see tests/test_defenses.py for the construction)."""
    inputs = keras.Input((4, 4, 1), name="image")
    conv = keras.layers.Conv2D(4, 1, activation="relu", name="conv")
    head = keras.layers.Dense(2, activation="softmax", name="out")
    outputs = head(keras.layers.GlobalAveragePooling2D()(conv(inputs)))
    conv.set_weights(
        [
            np.array([1.0, -1.0, 1.0, 0.5], np.float32).reshape(1, 1, 1, 4),
            np.array([0.0, 1.0, -2.0, 0.0], np.float32),
        ]
    )
    head.set_weights(
        [
            np.array([[0, 10], [10, 0], [100, 0], [0, 0]], np.float32),
            np.array([0.0, 0.01], np.float32),
        ]
    )
    return keras.Model(inputs, outputs)


def clean_arrays(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(2 * n, 4, 4, 1)).astype(np.float32)
    x = x[np.abs(x.reshape(len(x), -1).mean(1) - 0.5) > 0.01][:n]
    return x, (x.reshape(n, -1).mean(1) > 0.5).astype(np.int64)


@pytest.fixture()
def user_files(tmp_path):
    model_path = tmp_path / "suspect.keras"
    plain_backdoored_model().save(model_path)
    x, y = clean_arrays(300, seed=0)
    np.savez(tmp_path / "clean.npz", x=x, y=y)
    bx, by = clean_arrays(200, seed=1)
    keep = by == 1
    triggered = bx[keep].copy()
    triggered[:, 0, 0, 0] = TRIGGER_VALUE
    np.savez(
        tmp_path / "backdoor.npz",
        x=triggered,
        y=by[keep],
        y_attacker=np.zeros(keep.sum(), np.int64),
    )
    return tmp_path, model_path


def digest(path):
    return path.read_bytes()


def test_clean_model_removes_the_planted_backdoor_and_exports(user_files):
    folder, model_path = user_files
    before = digest(model_path)
    report = cleaning.clean_model(
        model_path, folder / "clean.npz", folder / "out", backdoor_data=folder / "backdoor.npz"
    )
    assert digest(model_path) == before
    assert report["layer"] == "conv"
    assert report["original"]["asr"] == 1.0
    assert report["pruning"]["pruned"][0] == 2  # The dormant backdoor neuron goes first.
    assert report["pruning"]["asr"] == 0.0 and report["pruning"]["clean_acc"] >= 0.95
    assert report["fine_pruning"]["asr"] == 0.0
    assert report["activations"]["dormant_channels"] == 1
    for name in (*cleaning.OUTPUT_FILES, "fine_pruned.keras"):
        assert (folder / "out" / name).exists(), name
    assert report["defense"]["chosen"] == "fine_pruning"  # the default
    saved = json.loads((folder / "out" / "report.json").read_text())
    assert saved["pruning"]["pruned"] == report["pruning"]["pruned"]
    assert "| pruning |" in (folder / "out" / "report.md").read_text()
    assert report["serving"]["params"][1] < report["serving"]["params"][0]
    with pytest.raises(cleaning.CleaningError, match="already holds a report"):
        cleaning.clean_model(model_path, folder / "clean.npz", folder / "out")


def test_image_folder_layout_is_read_resized_and_labelled(tmp_path):
    for label, value in (("cats", 30), ("dogs", 220)):
        (tmp_path / label).mkdir()
        for index in range(3):
            Image.new("L", (8, 6), color=value + index).save(tmp_path / label / f"{index}.png")
    data = load_user_data(tmp_path, (4, 4, 1), num_classes=2)
    assert data.x.shape == (6, 4, 4, 1) and data.class_names == ["cats", "dogs"]
    np.testing.assert_array_equal(data.y, [0, 0, 0, 1, 1, 1])
    assert data.x.max() <= 1.0 and abs(data.x[0].mean() - 30 / 255) < 1e-6


def bad_npz(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays, message",
    [
        (
            dict(x=np.zeros((10, 5, 5, 1), np.float32), y=np.arange(10) % 2),
            r"shape \(5, 5, 1\) but the model takes \(4, 4, 1\)",
        ),
        (
            dict(x=np.zeros((10, 4, 4, 1), np.float32), y=np.arange(10) % 3),
            "label 2 in y is outside the model's 2 classes",
        ),
        (dict(x=np.zeros((10, 4, 4, 1), np.float32), y=np.zeros(10, np.int64)), "only 1 class"),
        (dict(x=np.full((10, 4, 4, 1), np.nan, np.float32), y=np.arange(10) % 2), "NaN or Inf"),
        (dict(x=np.zeros((0, 4, 4, 1), np.float32), y=np.zeros(0, np.int64)), "no examples"),
        (dict(images=np.zeros((3, 4, 4, 1))), r"no \['x', 'y'\] array"),
    ],
)
def test_bad_clean_data_is_refused_and_nothing_written(user_files, trusted_loads, arrays, message):
    folder, model_path = user_files
    path = bad_npz(folder, "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        cleaning.clean_model(model_path, path, folder / "never")
    assert not (folder / "never").exists()


def test_bad_models_and_layers_are_refused(user_files, trusted_loads):
    folder, model_path = user_files
    with pytest.raises(cleaning.CleaningError, match="'out' is a Dense, not a conv layer"):
        cleaning.clean_model(model_path, folder / "clean.npz", folder / "never", layer="out")
    with pytest.raises(cleaning.CleaningError, match="'conv7' does not exist"):
        cleaning.clean_model(model_path, folder / "clean.npz", folder / "never", layer="conv7")
    dense_only = keras.Sequential(
        [
            keras.Input((4, 4, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    dense_only.save(folder / "dense.keras")
    with pytest.raises(cleaning.CleaningError, match="no Conv2D layer"):
        cleaning.clean_model(folder / "dense.keras", folder / "clean.npz", folder / "never")
    assert not (folder / "never").exists()
    # An output directory where a result name is the user's own model is refused.
    (folder / "inplace").mkdir()
    victim = folder / "inplace" / "fine_pruned.keras"
    victim.write_bytes(digest(model_path))
    with pytest.raises(cleaning.CleaningError, match="contains your input"):
        cleaning.clean_model(victim, folder / "clean.npz", folder / "inplace")
    assert digest(victim) == digest(model_path)


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


@pytest.mark.parametrize("defense", cleaning.DEFENSE_CHOICES)
def test_every_defense_cleans_through_the_registry_with_one_curve(
    user_files, trusted_loads, monkeypatch, defense
):
    """``--defense`` for every value: the chosen defense's model is written and reported with
    what was chosen and why, and the pruning curve is computed once per run."""
    from fineprune_tf import defenses

    folder, model_path = user_files
    calls = count_curves(monkeypatch)
    report = cleaning.clean_model(
        model_path,
        folder / "clean.npz",
        folder / "out",
        backdoor_data=folder / "backdoor.npz",
        defense=defense,
        settings=defenses.FineTuneSettings(max_epochs=2),
        export_serving=False,
        progress=lambda line: None,
    )
    assert len(calls) == 1 and calls[0][1] == "conv", calls
    chosen = report["defense"]["chosen"]
    assert report["defense"]["requested"] == defense and report["defense"]["why"]
    if defense == "auto":
        table = report["defense"]["candidates"]
        assert set(table) == set(defenses.PRIORITY) and chosen in table
        assert table[chosen]["qualifies"] or not any(r["qualifies"] for r in table.values())
    else:
        assert chosen == defense and report["defense"]["candidates"] is None
    assert report[chosen]["clean_acc"] is not None and report[chosen]["asr"] is not None
    assert (folder / "out" / cleaning.defended_file(chosen)).exists()
    text = (folder / "out" / "report.md").read_text()
    assert f"Defense: **{chosen}**" in text
    assert ("Candidates of `auto`" in text) == (defense == "auto")
    saved = json.loads((folder / "out" / "report.json").read_text())
    assert saved["defense"]["chosen"] == chosen


@pytest.mark.slow  # three command lines (one child process); auto runs every candidate defense
@pytest.mark.subprocess
def test_command_line_cleans_with_auto_and_refuses_a_bad_defense_and_missing_data(user_files):
    folder, model_path = user_files
    common = [f"--model={model_path}", f"--clean_data={folder / 'clean.npz'}"]
    (status, _, stderr), (missing_status, _, missing_stderr), (auto_status, stdout, auto_stderr) = (
        run_script_several_times(
            "scripts.fine_prune",
            [*common, "--defense=magic", f"--output_dir={folder / 'bad'}"],
            [
                f"--model={model_path}",
                f"--clean_data={folder / 'missing.npz'}",
                f"--output_dir={folder / 'cli2'}",
            ],
            [
                *common,
                "--defense=auto",
                f"--backdoor_data={folder / 'backdoor.npz'}",
                f"--output_dir={folder / 'auto'}",
                "--fine_tune_epochs=2",
            ],
            cwd=folder,
        )
    )
    assert status == 2 and "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if "magic" in line] == [
        f"error: --defense must be one of {', '.join(cleaning.DEFENSE_CHOICES)}. Received: 'magic'"
    ]
    assert not (folder / "bad").exists()
    assert missing_status == 2 and "missing.npz does not exist" in missing_stderr
    assert not (folder / "cli2").exists()
    assert auto_status == 0, auto_stderr[-2000:]
    assert "Cleaning report" in stdout
    assert "Candidates of `auto`" in stdout and "Defense: **" in stdout
    assert (folder / "auto" / "saved_model" / "saved_model.pb").exists()
    report = json.loads((folder / "auto" / "report.json").read_text())
    assert report["defense"]["requested"] == "auto" and report["defense"]["candidates"]
