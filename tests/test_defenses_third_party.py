"""The third-party BadNets script is independent of fineprune_tf and does what it says."""

import ast
import pathlib

import numpy as np

from scripts import third_party_badnets as badnets


def test_the_third_party_attack_imports_nothing_from_this_project():
    tree = ast.parse(pathlib.Path(badnets.__file__).read_text())
    modules = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules <= {"__future__", "argparse", "sys", "keras", "numpy"}, modules


def test_badnets_poisons_the_stated_fraction_with_the_corner_square():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 0.5, (200, 12, 12, 3)).astype(np.float32)
    y = np.arange(200) % 4
    px, py = badnets.poison(x, y, seed=0)
    changed = np.flatnonzero(np.any(px != x, axis=(1, 2, 3)))
    assert len(changed) == int(badnets.POISON_RATE * 200)
    assert np.all(py[changed] == badnets.TARGET) and np.all(y[changed] != badnets.TARGET)
    unchanged = np.setdiff1d(np.arange(200), changed)
    np.testing.assert_array_equal(py[unchanged], y[unchanged])
    square = px[changed][:, -badnets.PATCH - 1 : -1, -badnets.PATCH - 1 : -1, :]
    assert np.all(square == 1.0)
    np.testing.assert_array_equal(px[changed][:, :6], x[changed][:, :6])  # Only the corner.
    assert x.max() <= 0.5  # The input was copied, not stamped in place.


def test_cli_inputs_write_what_a_user_holds_and_the_command_to_run(tmp_path):
    # The published --model CLI figure comes from these files: the cached model, the clean
    # validation + test splits, and the stamped non-target test images.
    import subprocess
    import sys

    import keras

    from fineprune_tf import data

    inputs = keras.Input((32, 32, 3))
    flat = keras.layers.Flatten()(inputs)
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(flat)).save(
        tmp_path / "third_party_traffic_cnn_0.keras"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.third_party_eval",
            "--archs=cnn",
            "--seeds=0",
            f"--cache_dir={tmp_path}",
            f"--cli_inputs={tmp_path / 'cli'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=pathlib.Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    folder = tmp_path / "cli" / "cnn_0"
    assert f"fineprune clean --model={folder}/suspect.keras" in result.stdout
    assert "--defense=auto" in result.stdout
    task = data.load("traffic", seed=0)
    clean, triggered = np.load(folder / "clean.npz"), np.load(folder / "triggered.npz")
    assert len(clean["y"]) == len(task.validation.y) + len(task.test.y)
    assert np.all(triggered["y_attacker"] == badnets.TARGET)
    assert np.all(triggered["y"] != badnets.TARGET)
    patch = triggered["x"][:, -badnets.PATCH - 1 : -1, -badnets.PATCH - 1 : -1, :]
    assert patch.min() == 1.0
    assert keras.models.load_model(folder / "suspect.keras").count_params() == 3 * 32 * 32 * 3 + 3
