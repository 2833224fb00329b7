"""Cleaning your own model holds out 20% of your clean data to report on (README, "Clean your
own model"), and the defenses never see it (issue 16, point 6)."""

import hashlib

import keras
import numpy as np

from fineprune_tf import cleaning, defenses, metrics


def _rows(x: np.ndarray) -> list[bytes]:
    return [hashlib.sha1(np.ascontiguousarray(row).tobytes()).digest() for row in x]


def test_the_default_holdout_is_a_fifth_of_the_clean_data_and_the_defenses_never_see_it(
    tmp_path, monkeypatch
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

    def spy_on(name):
        original = getattr(defenses, name)

        def spy(model, validation, *args, **kwargs):
            if kwargs.get("evaluation") is not None:  # cleaning's call, not fine_prune's own
                seen.setdefault(name, (np.asarray(validation[0]), kwargs["evaluation"][0]))
            return original(model, validation, *args, **kwargs)

        monkeypatch.setattr(defenses, name, spy)

    spy_on("prune")
    spy_on("fine_prune")

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
    for name in ("prune", "fine_prune"):
        defense_x, (held_x, held_y) = seen[name]
        defense_rows, held_rows = set(_rows(defense_x)), set(_rows(held_x))
        assert len(defense_rows) == 48 and len(held_rows) == 12
        assert not defense_rows & held_rows  # Held out from the defense ...
        assert defense_rows | held_rows == all_rows  # ... and nothing dropped.
    # The same 12 examples for both defenses, and the report's numbers are measured on them.
    assert set(_rows(seen["prune"][1][0])) == set(_rows(seen["fine_prune"][1][0]))
    held_x, held_y = seen["prune"][1]
    original = keras.models.load_model(tmp_path / "model.keras")
    assert report["original"]["clean_acc"] == metrics.accuracy(
        metrics.predict_labels(original, held_x), held_y
    )
    pruned = keras.models.load_model(tmp_path / "out" / "pruned.keras")
    assert report["pruning"]["clean_acc"] == metrics.accuracy(
        metrics.predict_labels(pruned, held_x), held_y
    )
