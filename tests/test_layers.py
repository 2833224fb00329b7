"""MaskedConv2D / MaskedDense: pruning semantics, gradients, statistics and serialization.

Backend-agnostic: CI runs this file under KERAS_BACKEND=tensorflow and =jax.
"""

import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import fineprune_tf as fp

DATA = pathlib.Path(__file__).parent / "data"


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def loss_gradients(model, x, y) -> dict[str, np.ndarray]:
    """``{variable path: d loss / d variable}`` of the cross-entropy, on the current backend."""

    def loss_of(outputs):
        return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, outputs))

    backend = keras.backend.backend()
    if backend == "tensorflow":
        with tf.GradientTape() as tape:
            loss = loss_of(model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
    elif backend == "jax":
        import jax

        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss_from(trainable):
            outputs, _ = model.stateless_call(trainable, non_trainable, x, training=True)
            return loss_of(outputs)

        grads = jax.grad(loss_from)([v.value for v in model.trainable_variables])
    else:
        model.zero_grad()
        loss_of(model(x, training=True)).backward()
        grads = [v.value.grad for v in model.trainable_variables]
    return {v.path: to_numpy(g) for v, g in zip(model.trainable_variables, grads, strict=True)}


def small_model(conv_activation="relu"):
    inputs = keras.Input((8, 8, 3))
    x = fp.MaskedConv2D(6, 3, activation=conv_activation, name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    x = fp.MaskedDense(5, activation="relu", name="dense")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(x)
    return keras.Model(inputs, outputs)


def data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8, 8, 3)).astype("float32"), rng.integers(0, 3, n)


def test_conv_matches_keras_conv2d_when_unmasked():
    x, _ = data()
    masked = fp.MaskedConv2D(
        4,
        3,
        strides=2,
        padding="same",
        activation="relu",
        dilation_rate=1,
        kernel_initializer="he_normal",
    )
    plain = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")
    masked.build(x.shape)
    plain.build(x.shape)
    plain.set_weights([to_numpy(masked.kernel), to_numpy(masked.bias)])
    np.testing.assert_allclose(to_numpy(masked(x)), to_numpy(plain(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "linear", "tanh", None])
def test_pruned_channels_output_exactly_zero_even_with_bias(activation):
    x, _ = data()
    layer = fp.MaskedConv2D(4, 3, activation=activation, bias_initializer="ones")
    layer.build(x.shape)
    layer.prune([0, 2])
    y = to_numpy(layer(x))
    assert np.all(y[..., [0, 2]] == 0.0)
    assert np.any(y[..., [1, 3]] != 0.0)
    np.testing.assert_array_equal(layer.mask, [0, 1, 0, 1])
    np.testing.assert_array_equal(layer.active_channels, [1, 3])
    np.testing.assert_array_equal(layer.pruned_channels, [0, 2])
    layer.restore([2])
    np.testing.assert_array_equal(layer.active_channels, [1, 2, 3])
    layer.restore()
    assert layer.mask.sum() == 4


def test_pruned_channels_get_zero_gradient_and_stay_unchanged_after_training():
    model = small_model()
    x, y = data()
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    conv, dense = model.get_layer("conv"), model.get_layer("dense")
    conv.prune([1, 4])
    dense.prune(3)
    grads = loss_gradients(model, x, y)
    assert np.all(grads[conv.kernel.path][..., [1, 4]] == 0)
    assert np.all(grads[conv.bias.path][[1, 4]] == 0)
    assert np.any(grads[conv.kernel.path][..., [0, 2, 3, 5]] != 0)
    assert np.all(grads[dense.bias.path][3] == 0)

    kernel_before = to_numpy(conv.kernel).copy()
    model.fit(x, y, epochs=3, batch_size=16, verbose=0)
    np.testing.assert_array_equal(to_numpy(conv.kernel)[..., [1, 4]], kernel_before[..., [1, 4]])
    assert not np.allclose(to_numpy(conv.kernel)[..., 0], kernel_before[..., 0])
    np.testing.assert_array_equal(conv.mask, [1, 0, 1, 1, 0, 1])
    activations = to_numpy(keras.Model(model.input, conv.output)(x))
    assert np.all(activations[..., [1, 4]] == 0)


def test_bad_channel_indices_and_masks_are_refused():
    layer = fp.MaskedConv2D(4, 3)
    layer.build((None, 8, 8, 3))
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        layer.prune([4])
    with pytest.raises(ValueError, match="mask has 3 entries"):
        layer.set_mask([1, 1, 0])
    with pytest.raises(ValueError, match="channels_last"):
        fp.MaskedConv2D(4, 3, data_format="channels_first")
    with pytest.raises(ValueError, match="rank 2 to 5"):
        fp.MaskedDense(3).build((4,))


def test_save_and_load_round_trip_keeps_weights_and_masks(tmp_path):
    model = small_model()
    x, _ = data()
    model.get_layer("conv").prune([0, 5])
    model.get_layer("dense").prune([2])
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.get_layer("conv").mask, [0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(loaded.get_layer("dense").mask, [1, 1, 0, 1, 1])
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-7
    )
    assert isinstance(loaded.get_layer("conv"), fp.MaskedConv2D)
    config = loaded.get_layer("conv").get_config()
    assert config["filters"] == 6 and config["activation"] == "relu"


def reference_stats(model, x, layer_name):
    layer = model.get_layer(layer_name)
    saved = layer.mask
    layer.restore()
    activations = to_numpy(keras.Model(model.input, layer.output)(x))
    layer.set_mask(saved)
    flat = activations.reshape(-1, activations.shape[-1]).astype(np.float64)
    return flat.mean(0), flat.std(0), (flat <= 0).mean(0)


def test_stats_collect_equals_numpy_over_several_batches():
    model = small_model()
    x, y = data(n=100)
    model.get_layer("conv").prune([3])  # Statistics are of the unmasked activation.
    stats = fp.stats.collect(model, (x, y), batch_size=32)  # 4 batches, the last partial.
    assert set(stats) == {"conv", "dense"}
    for name in ("conv", "dense"):
        mean, std, dormant = reference_stats(model, x, name)
        np.testing.assert_allclose(stats[name].mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats[name].std, std, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats[name].dormant_fraction, dormant, atol=1e-12)
    assert stats["conv"].count == 100 * 6 * 6
    assert stats["dense"].count == 100
    np.testing.assert_array_equal(model.get_layer("conv").mask, [1, 1, 1, 0, 1, 1])


def test_stats_collect_accepts_datasets_and_selects_layers():
    model = small_model()
    x, y = data(n=40)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    stats = fp.stats.collect(model, dataset, layer_names=["conv"])
    assert list(stats) == ["conv"]
    mean, _, _ = reference_stats(model, x, "conv")
    np.testing.assert_allclose(stats["conv"].mean, mean, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no masked layer named"):
        fp.stats.collect(model, x, layer_names=["out"])
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="has no MaskedConv2D"):
        fp.stats.collect(plain, np.zeros((2, 4), "float32"))


def test_stats_recording_does_not_stay_on_after_collect():
    model = small_model()
    x, _ = data()
    fp.stats.collect(model, x)
    assert all(layer._stats_sink is None for layer in fp.layers.masked_layers(model))


def test_keras_file_written_before_the_save_format_change_still_loads():
    # tests/data/masked_v0.keras was written by the layer code of a035e0f (make_masked_v0.py).
    model = keras.models.load_model(DATA / "masked_v0.keras")
    np.testing.assert_array_equal(model.get_layer("conv").mask, [1, 0, 1, 1])
    np.testing.assert_array_equal(model.get_layer("conv_nobias").mask, [0, 1, 0])
    np.testing.assert_array_equal(model.get_layer("dense").mask, [1, 1, 1, 0, 1])
    recorded = np.load(DATA / "masked_v0_io.npz")
    np.testing.assert_allclose(to_numpy(model(recorded["x"])), recorded["y"], rtol=1e-5, atol=1e-6)


def test_keras_file_with_a_fused_batchnorm_loads_with_keras_and_the_safe_loader():
    # tests/data/masked_bn_v1.keras: make_masked_bn_v1.py (conv -> BN -> ReLU6, dw -> BN fused).
    recorded = np.load(DATA / "masked_bn_v1_io.npz")
    for model in (
        keras.models.load_model(DATA / "masked_bn_v1.keras"),
        fp.io.load_model(DATA / "masked_bn_v1.keras"),
    ):
        conv, dw = model.get_layer("conv"), model.get_layer("dw")
        assert conv.batch_normalization.name == "conv_bn"
        assert dw.batch_normalization.name == "dw_bn"
        assert keras.activations.serialize(conv.activation) == "relu6"
        np.testing.assert_array_equal(conv.mask, [1, 0, 1, 1])
        np.testing.assert_array_equal(dw.mask, [1, 0, 0, 1])
        assert float(np.abs(to_numpy(conv.batch_normalization.moving_mean)).min()) > 0
        np.testing.assert_allclose(
            to_numpy(model(recorded["x"])), recorded["y"], rtol=1e-5, atol=1e-6
        )


def test_fused_batchnorm_masks_after_bn_and_activation_and_records_post_bn_stats():
    """act(BN(conv(x))) * mask: a pruned channel is exactly 0 although BN shifts it, and the
    statistics are those of the post-BN, post-ReLU value."""
    bn = keras.layers.BatchNormalization(
        beta_initializer="ones", moving_mean_initializer=keras.initializers.Constant(0.5)
    )
    layer = fp.MaskedConv2D(
        3, 1, activation="relu", use_bias=False, kernel_initializer="ones", batch_normalization=bn
    )
    x = np.arange(2 * 2 * 2 * 1, dtype="float32").reshape(2, 2, 2, 1) - 3.0  # -3 .. 4
    layer.build(x.shape)
    layer.prune([2])
    sink = fp.stats.BatchStats()
    with layer.recording_stats(sink):
        y = to_numpy(layer(x))
    expected = np.maximum((x - 0.5) / np.sqrt(1.0 + 1e-3) + 1.0, 0.0)
    np.testing.assert_allclose(y[..., :2], np.repeat(expected, 2, axis=-1), rtol=1e-6)
    assert np.all(y[..., 2] == 0)
    np.testing.assert_allclose(to_numpy(sink.totals()[0]), [expected.sum()] * 3, rtol=1e-6)
    with pytest.raises(ValueError, match="BatchNormalization"):
        fp.MaskedConv2D(2, 1, batch_normalization=keras.layers.LayerNormalization())


def test_recording_stats_is_a_context_manager_that_feeds_a_sink():
    layer = fp.MaskedConv2D(3, 1, activation="relu", kernel_initializer="ones", use_bias=False)
    x = np.arange(2 * 2 * 2 * 1, dtype="float32").reshape(2, 2, 2, 1) - 3.0  # -3 .. 4
    layer.build(x.shape)
    layer.prune([2])  # Statistics are of the activation before the mask.
    sink = fp.stats.BatchStats()
    with layer.recording_stats(sink):
        with pytest.raises(RuntimeError, match="already being recorded"):
            with layer.recording_stats(fp.stats.BatchStats()):
                pass
        layer(x)
    channel_sum, channel_sum_sq, positive, entries = (to_numpy(v) for v in sink.totals())
    relu = np.maximum(x.reshape(-1), 0.0)  # 0 0 0 0 1 2 3 4
    np.testing.assert_array_equal(channel_sum, [10.0] * 3)
    np.testing.assert_array_equal(channel_sum_sq, [30.0] * 3)
    np.testing.assert_array_equal(positive, [4.0] * 3)
    assert float(entries) == relu.size
    layer(x)  # Outside the block nothing is recorded.
    np.testing.assert_array_equal(to_numpy(sink.totals()[0]), [10.0] * 3)


def test_stats_collector_reuses_its_pass_and_stores_nothing_on_the_model():
    model = small_model()
    x, _ = data(n=40)
    attributes = set(vars(model))
    collector = fp.stats.StatsCollector(model, ["conv"])
    first = collector.collect(x, batch_size=16)
    model.get_layer("conv").prune([0])  # The mask does not change the statistics ...
    second = collector.collect(x[:20], batch_size=16)  # ... the data does; reset between calls.
    mean, _, _ = reference_stats(model, x[:20], "conv")
    np.testing.assert_allclose(second["conv"].mean, mean, rtol=1e-5, atol=1e-6)
    assert first["conv"].count == 40 * 36 and second["conv"].count == 20 * 36
    assert set(vars(model)) == attributes
