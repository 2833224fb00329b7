"""Serving a masked model: fp.tflite.to_tflite, and Keras' own model.export without the op."""

import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import fineprune_tf as fp
from fineprune_tf import tflite

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="TFLite and SavedModel export are TensorFlow-only",
)
REPO = pathlib.Path(__file__).resolve().parents[1]


def pruned_model():
    inputs = keras.Input((8, 8, 3))
    x = fp.MaskedConv2D(6, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = fp.MaskedDense(5, activation="relu", name="dense")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("conv").prune([1, 4])
    model.get_layer("dense").prune([0])
    return model


def test_to_tflite_shrinks_converts_and_matches_the_keras_model(tmp_path):
    model = pruned_model()
    x = np.random.default_rng(3).normal(size=(5, 8, 8, 3)).astype("float32")
    result = tflite.to_tflite(model, tmp_path / "model.tflite", sample_inputs=x)
    assert result.path.read_bytes()[4:8] == b"TFL3"  # The flatbuffer's identifier.
    assert result.size_bytes == result.path.stat().st_size and result.samples == 5
    assert result.max_abs_difference <= 1e-4

    interpreter_output = tflite._run_interpreter(result.path.read_bytes(), [x])
    np.testing.assert_allclose(interpreter_output, model.predict(x, verbose=0), atol=1e-5)
    # Pruned channels are gone for real: the converted conv has 4 filters.
    content = result.path.read_bytes()
    assert len(content) < len(
        tflite.tf.lite.TFLiteConverter.from_keras_model(fp.export.to_plain(model)).convert()
    )


def test_to_tflite_refuses_to_overwrite_and_to_write_a_mismatch(tmp_path, monkeypatch):
    model = pruned_model()
    existing = tmp_path / "model.tflite"
    existing.write_bytes(b"user's file")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tflite.to_tflite(model, existing)
    assert existing.read_bytes() == b"user's file"

    original = tflite._run_interpreter
    monkeypatch.setattr(
        tflite, "_run_interpreter", lambda content, inputs: original(content, inputs) + 1e-2
    )
    with pytest.raises(ValueError, match="differ from the Keras model's by 0.01"):
        tflite.to_tflite(model, tmp_path / "other.tflite")
    assert not (tmp_path / "other.tflite").exists()


@pytest.mark.subprocess
def test_keras_model_export_serves_without_the_op_library(tmp_path):
    # The SavedModel is traced with the composite, so stock TensorFlow loads it.
    model = pruned_model()
    x = np.random.default_rng(4).normal(size=(4, 8, 8, 3)).astype("float32")
    model.export(tmp_path / "exported", verbose=False)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict(x, verbose=0))
    code = textwrap.dedent(f"""
        import sys, numpy as np, tensorflow as tf
        served = tf.saved_model.load({str(tmp_path / "exported")!r})
        y = served.serve(np.load({str(tmp_path / "x.npy")!r})).numpy()
        np.testing.assert_allclose(y, np.load({str(tmp_path / "y.npy")!r}), atol=1e-6)
        assert "fineprune_tf" not in sys.modules
        print("served-ok")
    """)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "served-ok" in result.stdout
