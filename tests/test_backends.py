"""A masked model's ``.keras`` file moves between Keras backends with its weights and masks.

The other backend runs in a subprocess (the backend is fixed when keras is imported).  JAX is
installed by CI; PyTorch's PyPI wheel brings ~3 GB of CUDA libraries, so its case runs only
where torch is installed.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import fineprune_tf as fp

REPO = pathlib.Path(__file__).resolve().parents[1]
OTHER_BACKENDS = [b for b in ("tensorflow", "jax", "torch") if b != keras.backend.backend()]

# Runs under the other backend: loads in.keras, checks masks and outputs, prunes one more
# channel and saves out.keras.
OTHER_SIDE = textwrap.dedent("""
    import sys
    import keras, numpy as np
    import fineprune_tf as fp
    assert keras.backend.backend() == sys.argv[1], keras.backend.backend()
    folder = sys.argv[2]
    model = keras.models.load_model(folder + "/in.keras")
    io = np.load(folder + "/io.npz")
    np.testing.assert_array_equal(model.get_layer("conv").mask, io["conv_mask"])
    np.testing.assert_array_equal(model.get_layer("dense").mask, io["dense_mask"])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(io["x"])), io["y"],
                               rtol=1e-5, atol=1e-6)
    model.get_layer("conv").prune([0])
    model.save(folder + "/out.keras")
    print("other-side-ok")
""")


def small_model():
    inputs = keras.Input((8, 8, 3))
    x = fp.MaskedConv2D(6, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    x = fp.MaskedDense(5, activation="relu", name="dense")(x)
    outputs = keras.layers.Dense(3, name="out")(x)
    return keras.Model(inputs, outputs)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("other", OTHER_BACKENDS)
def test_keras_file_round_trips_through_another_backend(tmp_path, other):
    if importlib.util.find_spec(other) is None:
        pytest.skip(f"{other} is not installed")
    model = small_model()
    model.get_layer("conv").prune([2, 5])
    model.get_layer("dense").prune([1])
    x = np.random.default_rng(0).normal(size=(6, 8, 8, 3)).astype("float32")
    model.save(tmp_path / "in.keras")
    np.savez(
        tmp_path / "io.npz",
        x=x,
        y=keras.ops.convert_to_numpy(model(x)),
        conv_mask=model.get_layer("conv").mask,
        dense_mask=model.get_layer("dense").mask,
    )

    result = subprocess.run(
        [sys.executable, "-c", OTHER_SIDE, other, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "KERAS_BACKEND": other, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "other-side-ok" in result.stdout

    back = keras.models.load_model(tmp_path / "out.keras")
    np.testing.assert_array_equal(back.get_layer("conv").mask, [0, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(back.get_layer("dense").mask, [1, 0, 1, 1, 1])
    model.get_layer("conv").prune([0])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(back(x)),
        keras.ops.convert_to_numpy(model(x)),
        rtol=1e-5,
        atol=1e-6,
    )
