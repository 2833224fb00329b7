"""Cleaning your own model holds out 20% of your clean data to report on (README, "Clean your
own model"), and the defenses never see it (issue 16, point 6)."""

import hashlib

import keras
import numpy as np

from fineprune_tf import cleaning, defenses, metrics


def _rows(x: np.ndarray) -> list[bytes]:
    return [hashlib.sha1(np.ascontiguousarray(row).tobytes()).digest() for row in x]


def test_the_default_holdout_is_a_fifth_of_the_clean_data_and_the_defenses_never_see_it(
    tmp_path, monkeypatch, trusted_loads
):
    rng = np.random.default_rng(0)
    x = rng.random((60, 12, 12, 1), dtype=np.float32)  # Every example distinct.
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    # A learnable labelling (brightness) and a briefly trained model: the defenses refuse a
    # model at chance on the clean data.
    y = np.arange(60) % 3
    x *= (0.3 + 0.7 * y)[:, None, None, None].astype(np.float32)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=60, batch_size=20, verbose=0)
    assert metrics.accuracy(metrics.predict_labels(model, x), y) > 0.8
    np.savez(tmp_path / "clean.npz", x=x, y=y)
    model.save(tmp_path / "model.keras")

    seen = {}

    def record(name, defender, evaluation):
        # What the defense was given (DefenderData) and what only reports (ReportOnly).
        if evaluation is not None:
            seen.setdefault(name, (np.asarray(defender.x), evaluation.open()[0]))

    original_prune, original_run = defenses.prune, defenses.run_defense

    def spy_prune(model, validation, *args, **kwargs):
        record("prune", validation, kwargs.get("evaluation"))
        return original_prune(model, validation, *args, **kwargs)

    def spy_run(name, model, defender, *args, **kwargs):
        record(name, defender, kwargs.get("evaluation"))
        return original_run(name, model, defender, *args, **kwargs)

    monkeypatch.setattr(defenses, "prune", spy_prune)
    monkeypatch.setattr(defenses, "run_defense", spy_run)

    report = cleaning.clean_model(
        tmp_path / "model.keras",
        tmp_path / "clean.npz",
        tmp_path / "out",
        settings=defenses.FineTuneSettings(max_epochs=1, seed=0),
        export_serving=False,
        progress=lambda message: None,
    )

    assert report["examples"]["defense"] == 48 and report["examples"]["evaluation"] == 12
    all_rows = set(_rows(x))
    for name in ("prune", "fine_pruning"):
        defense_x, (held_x, held_y) = seen[name]
        defense_rows, held_rows = set(_rows(defense_x)), set(_rows(held_x))
        assert len(defense_rows) == 48 and len(held_rows) == 12
        assert not defense_rows & held_rows  # Held out from the defense ...
        assert defense_rows | held_rows == all_rows  # ... and nothing dropped.
    # The same 12 examples for both defenses, and the report's numbers are measured on them.
    assert set(_rows(seen["prune"][1][0])) == set(_rows(seen["fine_pruning"][1][0]))
    held_x, held_y = seen["prune"][1]
    original = keras.models.load_model(tmp_path / "model.keras")
    assert report["original"]["clean_acc"] == metrics.accuracy(
        metrics.predict_labels(original, held_x), held_y
    )
    pruned = keras.models.load_model(tmp_path / "out" / "pruned.keras")
    assert report["pruning"]["clean_acc"] == metrics.accuracy(
        metrics.predict_labels(pruned, held_x), held_y
    )


def test_a_conv1d_model_is_cleaned_without_naming_a_layer(tmp_path, trusted_loads):
    """Your own Conv1D model (speech-like): the default layer is its last Conv1D."""
    rng = np.random.default_rng(1)
    y = np.arange(60) % 3
    x = rng.random((60, 20, 2), dtype=np.float32) * (0.3 + 0.7 * y)[:, None, None]
    x = x.astype(np.float32)
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((20, 2)),
            keras.layers.Conv1D(6, 3, activation="relu", name="conv_a"),
            keras.layers.Conv1D(8, 3, activation="relu", name="conv_b"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=60, batch_size=20, verbose=0)
    assert metrics.accuracy(metrics.predict_labels(model, x), y) > 0.8
    np.savez(tmp_path / "clean.npz", x=x, y=y)
    model.save(tmp_path / "model.keras")

    report = cleaning.clean_model(
        tmp_path / "model.keras",
        tmp_path / "clean.npz",
        tmp_path / "out",
        defense="pruning",
        export_serving=False,
        progress=lambda message: None,
    )

    assert report["layer"] == "conv_b"
    pruned = keras.models.load_model(tmp_path / "out" / "pruned.keras")
    assert type(pruned.get_layer("conv_b")).__name__ == "MaskedConv1D"
