"""Models with several inputs or outputs (issue 12 point 6): stats.collect, the defenses and the
--model CLI take the inputs as a dict by name or a list, the labels of the output the defense
reads, and .npz files with one x_<input name> per input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import fineprune_tf as fp
from fineprune_tf import cleaning, model_io, stats
from fineprune_tf.data.user import load_user_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRIGGER_VALUE = 4.0


def planted_two_input_model(two_outputs: bool = False) -> keras.Model:
    """Image ``[4, 4, 1]`` + metadata ``[3]``.  Channel 2 of "conv" is a backdoor neuron dormant
    on clean images (the construction of tests/test_cleaning.py); the metadata branch adds a
    small push to the same head.  ``two_outputs`` adds an "aux" head of 3 classes on the same
    features."""
    image = keras.Input((4, 4, 1), name="image")
    meta = keras.Input((3,), name="meta")
    conv = keras.layers.Conv2D(4, 1, activation="relu", name="conv")
    features = keras.layers.GlobalAveragePooling2D(name="gap")(conv(image))
    side = keras.layers.Dense(2, activation="relu", name="meta_dense")
    joined = keras.layers.Concatenate(name="joined")([features, side(meta)])
    head = keras.layers.Dense(2, activation="softmax", name="label")
    outputs = {"label": head(joined)}
    if two_outputs:
        outputs["aux"] = keras.layers.Dense(3, activation="softmax", name="aux")(joined)
    model = keras.Model(
        {"image": image, "meta": meta}, outputs if two_outputs else outputs["label"]
    )
    conv.set_weights(
        [
            np.array([1.0, -1.0, 1.0, 0.5], np.float32).reshape(1, 1, 1, 4),
            np.array([0.0, 1.0, -2.0, 0.0], np.float32),
        ]
    )
    side.set_weights([np.full((3, 2), 0.05, np.float32), np.zeros(2, np.float32)])
    head.set_weights(
        [
            np.array([[0, 10], [10, 0], [100, 0], [0, 0], [0.1, 0], [0, 0.1]], np.float32),
            np.array([0.0, 0.01], np.float32),
        ]
    )
    return model


def clean_inputs(n: int, seed: int) -> tuple[dict, np.ndarray]:
    """Images away from the decision boundary, random metadata, and the clean labels."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(2 * n, 4, 4, 1)).astype(np.float32)
    x = x[np.abs(x.reshape(len(x), -1).mean(1) - 0.5) > 0.02][:n]
    meta = rng.uniform(0, 1, size=(n, 3)).astype(np.float32)
    return {"image": x, "meta": meta}, (x.reshape(n, -1).mean(1) > 0.5).astype(np.int64)


def triggered_inputs(n: int, seed: int) -> tuple[dict, np.ndarray]:
    x, y = clean_inputs(n, seed)
    keep = y == 1
    x = {name: array[keep] for name, array in x.items()}
    x["image"][:, 0, 0, 0] = TRIGGER_VALUE
    return x, y[keep]


# -- stats


@pytest.fixture(scope="module")
def masked_two_input():
    return fp.convert(planted_two_input_model())


def test_stats_take_a_dict_a_list_a_tuple_and_x_y_pairs(masked_two_input):
    x, y = clean_inputs(60, seed=0)
    probe = keras.Model(masked_two_input.inputs, masked_two_input.get_layer("conv").output)
    want = np.asarray(probe(x), np.float64).reshape(-1, 4).mean(axis=0)
    listed = [x["image"], x["meta"]]
    given = {
        "dict": x,
        "list": listed,
        "tuple": tuple(listed),
        "(dict, y)": (x, y),
        "(list, y)": (listed, y),
        "dataset of (inputs, y)": tf.data.Dataset.from_tensor_slices((tuple(listed), y)).batch(7),
        "dataset of inputs": tf.data.Dataset.from_tensor_slices(x).batch(7),
    }
    for what, data in given.items():
        measured = stats.collect(masked_two_input, data, layer_names=["conv"], batch_size=16)
        np.testing.assert_allclose(measured["conv"].mean, want, rtol=1e-6, err_msg=what)
        assert measured["conv"].count == 60 * 16, what


def test_stats_still_read_a_single_input_x_y_tuple_as_x_and_y():
    inputs = keras.Input((4, 4, 1))
    model = fp.convert(keras.Model(inputs, keras.layers.Conv2D(3, 1, name="c")(inputs)))
    x = np.random.default_rng(0).uniform(size=(10, 4, 4, 1)).astype(np.float32)
    y = np.zeros(10, np.int64)
    assert stats.collect(model, (x, y))["c"].count == 10 * 16
    assert stats.collect(model, [x, y])["c"].count == 10 * 16


def test_inputs_that_do_not_fit_are_refused_naming_the_inputs(masked_two_input):
    x, _ = clean_inputs(8, seed=0)
    with pytest.raises(ValueError, match=r"keyed by the model's input names \['image', 'meta'\]"):
        stats.collect(masked_two_input, {"image": x["image"], "metadata": x["meta"]})
    with pytest.raises(ValueError, match=r"input 'meta' takes examples of shape \(3,\)"):
        stats.collect(masked_two_input, {"image": x["image"], "meta": x["meta"][:, :2]})


# -- defenses


def test_prune_and_fine_prune_a_two_input_model_remove_the_planted_backdoor(masked_two_input):
    x, y = clean_inputs(200, seed=0)
    bx, by = triggered_inputs(200, seed=1)
    backdoor = {"x": bx, "y_true": by, "y_attacker": np.zeros_like(by), "targeted": True}
    assert fp.metrics.accuracy(np.argmax(masked_two_input(bx), -1), np.zeros_like(by)) == 1.0
    result = fp.defenses.prune(masked_two_input, (x, y), evaluation=((x, y), backdoor))
    assert result.details["pruned"][0] == 2  # the dormant backdoor channel goes first
    assert result.asr == 0.0 and result.clean_acc >= 0.95
    assert [t.name for t in result.model.inputs] == ["image", "meta"]
    settings = fp.defenses.FineTuneSettings(learning_rate=1e-3, max_epochs=2)
    tuned = fp.defenses.fine_prune(
        masked_two_input, fp.defenses.DefenderData(x, y), settings=settings
    )
    assert 2 in tuned.model.get_layer("conv").pruned_channels.tolist()
    assert masked_two_input.get_layer("conv").pruned_channels.size == 0  # the input is untouched


def test_a_two_output_model_reads_the_named_output_and_refuses_ambiguity():
    model = fp.convert(planted_two_input_model(two_outputs=True))
    x, y = clean_inputs(200, seed=0)
    with pytest.raises(ValueError, match=r"2 classification heads \['aux', 'label'\]: name the"):
        fp.defenses.prune(model, (x, y))
    with pytest.raises(ValueError, match=r"no output 'probs'; its outputs are \['aux', 'label'\]"):
        fp.defenses.prune(model, (x, y), output="probs")
    named = fp.defenses.prune(model, (x, y), output="label", evaluation=((x, y), None))
    by_labels = fp.defenses.prune(model, (x, {"label": y}), evaluation=((x, {"label": y}), None))
    assert named.details["pruned"] == by_labels.details["pruned"]
    assert named.details["pruned"][0] == 2
    assert named.clean_acc == by_labels.clean_acc >= 0.95
    outputs = named.model(x)
    assert sorted(outputs) == ["aux", "label"]  # the whole model comes back, both heads
    # The head the defense does not read keeps its weights.
    for before, after in zip(
        model.get_layer("aux").get_weights(),
        named.model.get_layer("aux").get_weights(),
        strict=True,
    ):
        np.testing.assert_array_equal(before, after)


def test_a_packed_view_computes_the_models_output():
    model = fp.convert(planted_two_input_model(two_outputs=True))
    x, _ = clean_inputs(20, seed=3)
    view = model_io.PackedView(model, "aux")
    assert [layer.name for layer in view.view.layers if layer.weights] == [
        "conv",
        "meta_dense",
        "aux",
    ]
    np.testing.assert_array_equal(np.asarray(view.view(view.pack(x))), np.asarray(model(x)["aux"]))


# -- the --model CLI


@pytest.fixture()
def two_input_files(tmp_path):
    planted_two_input_model(two_outputs=True).save(tmp_path / "suspect.keras")
    x, y = clean_inputs(300, seed=0)
    np.savez(tmp_path / "clean.npz", x_image=x["image"], x_meta=x["meta"], y_label=y)
    bx, by = triggered_inputs(200, seed=1)
    np.savez(
        tmp_path / "backdoor.npz",
        x_image=bx["image"],
        x_meta=bx["meta"],
        y_label=by,
        y_attacker=np.zeros_like(by),
    )
    return tmp_path


def test_clean_model_cleans_a_two_input_two_output_model(
    two_input_files, monkeypatch, trusted_loads
):
    folder = two_input_files
    figures = {}
    monkeypatch.setattr(
        fp.reporting, "_save_figure", lambda figure, path: figures.setdefault(path.name, figure)
    )
    settings = fp.defenses.FineTuneSettings(learning_rate=1e-3, max_epochs=2)
    report = cleaning.clean_model(
        folder / "suspect.keras",
        folder / "clean.npz",
        folder / "out",
        backdoor_data=folder / "backdoor.npz",
        settings=settings,
    )
    assert report["layer"] == "conv"  # the default layer, found in the view
    assert report["original"]["asr"] == 1.0
    assert report["pruning"]["pruned"][0] == 2 and report["pruning"]["asr"] == 0.0
    saved = keras.models.load_model(folder / "out" / "fine_pruned.keras")
    assert sorted(saved.output_names) == ["aux", "label"]
    assert 2 in saved.get_layer("conv").pruned_channels.tolist()
    served = tf.saved_model.load(str(folder / "out" / "saved_model"))
    x, _ = clean_inputs(5, seed=9)
    outputs = served.signatures["serving_default"](**{k: tf.constant(v) for k, v in x.items()})
    np.testing.assert_allclose(outputs["label"].numpy(), saved(x)["label"], atol=1e-5)
    titles = [axis.get_title() for axis in figures["activations.png"].axes if axis.get_title()]
    assert titles == ["(a) Clean Activations", "(b) Backdoor Activations"]

    # Without backdoor data, activations.png has the clean panel only.
    figures.clear()
    cleaning.clean_model(
        folder / "suspect.keras",
        folder / "clean.npz",
        folder / "out2",
        defense="pruning",
        output="label",
    )
    titles = [axis.get_title() for axis in figures["activations.png"].axes if axis.get_title()]
    assert titles == ["(a) Clean Activations"]


@pytest.mark.parametrize(
    "labels, output, message",
    [
        (["y"], None, r"2 classification heads \['aux', 'label'\]: name the one the defense"),
        (["y_label", "y_aux"], None, r"labels the outputs \['aux', 'label'\]: name the one"),
        (["y_label"], "probs", r"--model_output 'probs' is not an output"),
    ],
)
def test_an_ambiguous_output_is_refused_in_one_line(tmp_path, labels, output, message):
    model = planted_two_input_model(two_outputs=True)
    np.savez(tmp_path / "clean.npz", **{key: np.zeros(3, np.int64) for key in labels})
    with pytest.raises(cleaning.CleaningError, match=message):
        cleaning.choose_output(model, output, tmp_path / "clean.npz")
    np.savez(tmp_path / "one.npz", y_label=np.zeros(3, np.int64))
    assert cleaning.choose_output(model, None, tmp_path / "one.npz") == "label"


def test_npz_needs_one_x_per_input_and_the_labels_of_the_output_read(tmp_path):
    x, y = clean_inputs(20, seed=0)
    shapes = {"image": (4, 4, 1), "meta": (3,)}
    np.savez(tmp_path / "short.npz", x_image=x["image"], y_label=y)
    with pytest.raises(ValueError, match=r"no \['x_meta'\] array\(s\); it needs one 'x_<input"):
        load_user_data(tmp_path / "short.npz", shapes, 2, output="label")
    np.savez(tmp_path / "wrong.npz", x_image=x["image"], x_meta=x["meta"][:, :2], y_label=y)
    with pytest.raises(ValueError, match=r"x_meta: examples have shape \(2,\) but the model"):
        load_user_data(tmp_path / "wrong.npz", shapes, 2, output="label")
    np.savez(tmp_path / "good.npz", x_image=x["image"], x_meta=x["meta"], y_label=y)
    with pytest.raises(ValueError, match=r"no \['y_aux'\] array"):
        load_user_data(tmp_path / "good.npz", shapes, 3, output="aux")
    data = load_user_data(tmp_path / "good.npz", shapes, 2, output="label")
    assert sorted(data.x) == ["image", "meta"] and data.x["meta"].dtype == np.float32
    np.testing.assert_array_equal(data.y, y)


@pytest.mark.slow  # a child process: ~80 s on 2 loaded cores
@pytest.mark.subprocess
def test_command_line_cleans_a_two_input_model_with_model_output(two_input_files):
    folder = two_input_files
    np.savez(
        folder / "both.npz",
        **dict(np.load(folder / "clean.npz")),
        y=np.load(folder / "clean.npz")["y_label"],
    )
    command = [
        sys.executable,
        "-m",
        "scripts.fine_prune",
        f"--model={folder / 'suspect.keras'}",
        f"--clean_data={folder / 'both.npz'}",
        f"--output_dir={folder / 'cli'}",
        "--model_output=label",
        "--defense=pruning",
    ]
    env = {**os.environ, "PYTHONPATH": REPO}
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the defense reads output 'label'" in done.stdout
    report = json.loads((folder / "cli" / "report.json").read_text())
    assert report["pruning"]["pruned"][0] == 2


def test_metrics_read_the_named_output_of_a_two_input_model():
    model = planted_two_input_model(two_outputs=True)
    x, y = clean_inputs(30, seed=4)
    want = np.argmax(np.asarray(model(x)["label"]), axis=-1)
    got = fp.metrics.predict_labels(model, [x["image"], x["meta"]], batch_size=7, output="label")
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"2 classification heads"):
        fp.metrics.predict_labels(model, x)


def test_fmp_clp_and_the_registry_run_on_a_two_input_two_output_model():
    # FMP perturbs the packed input and compares feature maps of another rank (it used the
    # input's rank for both before).
    model = fp.convert(planted_two_input_model(two_outputs=True))
    x, y = clean_inputs(120, seed=0)
    settings = fp.defenses.FineTuneSettings(learning_rate=1e-3, max_epochs=1)
    results = {
        "fmp": fp.defenses.fmp(model, (x, y), output="label", settings=settings, probe_samples=8),
        "clp": fp.defenses.clp(model, (x, {"label": y})),
        "pruning": fp.defenses.run_defense(
            "pruning", model, fp.defenses.DefenderData(x, y), output="label"
        ),
    }
    for name, result in results.items():
        assert sorted(result.model(x)) == ["aux", "label"], name
        assert 0.0 <= result.holdout_acc <= 1.0 or np.isnan(result.holdout_acc), name
    sensitivity = results["fmp"].details["sensitivity"]["conv"]
    assert len(sensitivity["score"]) == 4 and np.all(np.isfinite(sensitivity["score"]))
    pruned = results["fmp"].model.get_layer("conv").pruned_channels
    assert pruned.size == len(results["fmp"].details["pruned"]["conv"]) >= 1
