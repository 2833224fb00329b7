"""MaskedConv2D/MaskedDense inside XLA clusters (TensorFlow backend).

The compiled op has no XLA kernel; inside ``jit_compile`` the layers switch to the composite,
which must give the same zeros, gradients and statistics.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import fineprune_tf as fp
from fineprune_tf import ops

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="XLA clusters are a TensorFlow notion; JAX always jits",
)


def small_model():
    inputs = keras.Input((8, 8, 3))
    x = fp.MaskedConv2D(6, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    x = fp.MaskedDense(5, activation="relu", name="dense")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(x)
    return keras.Model(inputs, outputs)


def data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8, 8, 3)).astype("float32"), rng.integers(0, 3, n)


@pytest.fixture
def xla_calls(monkeypatch):
    """Counts the masked-activation calls traced inside an XLA cluster."""
    calls = []
    original = ops.in_xla_context

    def spy():
        inside = original()
        calls.append(inside)
        return inside

    monkeypatch.setattr(ops, "in_xla_context", spy)
    return calls


def test_in_xla_context_sees_jit_compile_and_nested_functions():
    seen = {}

    @tf.function
    def inner(x):
        seen["inner"] = ops.in_xla_context()
        return x

    @tf.function(jit_compile=True)
    def compiled(x):
        seen["compiled"] = ops.in_xla_context()
        return inner(x)

    @tf.function
    def plain(x):
        seen["plain"] = ops.in_xla_context()
        return x

    compiled(tf.constant(1.0))
    plain(tf.constant(1.0))
    assert seen == {"compiled": True, "inner": True, "plain": False}
    assert not ops.in_xla_context()  # Eager.


def test_fit_and_predict_with_jit_compile_keep_pruned_channels_dead(xla_calls):
    model = small_model()
    x, y = data()
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy", jit_compile=True)
    assert model.jit_compile is True  # Keras did not refuse: supports_jit holds.
    conv = model.get_layer("conv")
    conv.prune([1, 4])
    kernel_before = keras.ops.convert_to_numpy(conv.kernel).copy()
    model.fit(x, y, epochs=3, batch_size=16, verbose=0)
    assert any(xla_calls)  # The layers were traced inside the XLA cluster.
    kernel = keras.ops.convert_to_numpy(conv.kernel)
    np.testing.assert_array_equal(kernel[..., [1, 4]], kernel_before[..., [1, 4]])
    assert not np.allclose(kernel[..., 0], kernel_before[..., 0])

    probe = keras.Model(model.input, conv.output)
    probe.compile(jit_compile=True)
    activations = probe.predict(x, verbose=0)
    assert np.all(activations[..., [1, 4]] == 0.0)
    np.testing.assert_allclose(activations, probe(x).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.predict(x, verbose=0), model(x).numpy(), rtol=1e-5, atol=1e-6)


def test_gradients_inside_xla_equal_the_compiled_op_and_are_zero_when_pruned():
    model = small_model()
    x, y = data()
    model.get_layer("conv").prune([0, 3])
    model.get_layer("dense").prune([2])

    def gradients(x, y):
        with tf.GradientTape() as tape:
            loss = keras.ops.mean(
                keras.losses.sparse_categorical_crossentropy(y, model(x, training=True))
            )
        return tape.gradient(loss, model.trainable_variables)

    eager = [g.numpy() for g in gradients(x, y)]
    compiled = [g.numpy() for g in tf.function(gradients, jit_compile=True)(x, y)]
    for a, b in zip(eager, compiled, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    conv_kernel, conv_bias, _, dense_bias = compiled[:4]
    assert np.all(conv_kernel[..., [0, 3]] == 0.0) and np.all(conv_bias[[0, 3]] == 0.0)
    assert dense_bias[2] == 0.0


def test_stats_collect_with_jit_compile_equals_the_compiled_op(xla_calls):
    model = small_model()
    x, _ = data(n=70)
    model.get_layer("conv").prune([2])
    plain = fp.stats.collect(model, x, batch_size=32, jit_compile=False)
    assert not any(xla_calls)
    compiled = fp.stats.collect(model, x, batch_size=32, jit_compile=True)
    assert xla_calls and all(xla_calls[-2:])
    for name in ("conv", "dense"):
        assert compiled[name].count == plain[name].count
        np.testing.assert_allclose(compiled[name].mean, plain[name].mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(compiled[name].std, plain[name].std, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(compiled[name].dormant_fraction, plain[name].dormant_fraction)


def test_stats_collect_follows_the_models_jit_compile_choice(xla_calls):
    model = small_model()
    model.compile("adam", "sparse_categorical_crossentropy", jit_compile=True)
    assert fp.stats.StatsCollector(model).jit_compile is True
    model.compile("adam", "sparse_categorical_crossentropy", jit_compile=False)
    assert fp.stats.StatsCollector(model).jit_compile is False
    assert fp.stats.StatsCollector(small_model()).jit_compile is False  # Not compiled.


def test_auto_jit_compile_on_a_gpu_machine_chooses_xla_and_trains(monkeypatch, xla_calls):
    # Keras resolves "auto" to XLA when a non-CPU device is visible and every layer reports
    # supports_jit; pretend one is, so the GPU user's default path runs here on the CPU.
    visible = tf.config.list_physical_devices()
    fake_gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
    model = small_model()
    with monkeypatch.context() as patch:
        patch.setattr(
            tf.config, "list_physical_devices", lambda device_type=None: [*visible, fake_gpu]
        )
        model.compile("adam", "sparse_categorical_crossentropy")  # jit_compile="auto"
    assert model.jit_compile is True
    model.get_layer("conv").prune([5])
    x, y = data()
    history = model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"][0]) and any(xla_calls)


def test_auto_jit_compile_on_this_cpu_machine_keeps_the_compiled_op(xla_calls):
    model = small_model()
    model.compile("adam", "sparse_categorical_crossentropy")
    assert model.jit_compile is False
    x, y = data()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert xla_calls and not any(xla_calls)
