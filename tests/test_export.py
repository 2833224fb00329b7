"""shrink() / to_plain() / export_saved_model(): pruned channels removed for real, plain Keras
and stock-TensorFlow artefacts with the masked model's predictions."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from tensorflow.core.protobuf import saved_model_pb2

import fineprune_tf as fp
from fineprune_tf import export, io, models
from fineprune_tf.conversion import ConversionError, convert

ATOL = 1e-5


def _x(model, n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *model.input_shape[1:])).astype("float32")


def _max_diff(a, b, x):
    # Eager calls: predict() would trace a tf.function per model (~1 s each).
    return float(
        np.max(np.abs(np.asarray(a(x, training=False)) - np.asarray(b(x, training=False))))
    )


def _weighted(model):
    return {layer.name: layer for layer in model.layers if layer.weights}


def _prune_fraction(layer, fraction, seed=0):
    rng = np.random.default_rng(seed)
    layer.prune(rng.choice(layer.channels, int(round(fraction * layer.channels)), replace=False))


def _randomize_bn(model, seed=0, beta=None):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            b = rng.normal(0, 0.5, c) if beta is None else np.asarray(beta, "float32")
            layer.set_weights(
                [rng.uniform(0.5, 1.5, c), b, rng.normal(0, 0.5, c), rng.uniform(0.5, 1.5, c)]
            )


@pytest.mark.parametrize("task", models.TASKS)
def test_shrink_task_models_same_predictions_fewer_params(task):
    model = models.build(task, preset="cpu", seed=1)
    pruned = models.pruned_layer(model)
    _prune_fraction(pruned, 0.7)
    hidden = [
        layer for layer in fp.layers.masked_layers(model) if isinstance(layer, fp.MaskedDense)
    ]
    _prune_fraction(hidden[0], 0.25, seed=1)
    small = export.shrink(model)
    assert _max_diff(model, small, _x(model)) <= ATOL
    assert not fp.layers.masked_layers(small)
    assert [layer.name for layer in small.layers] == [layer.name for layer in model.layers]
    assert small.get_layer(pruned.name).filters == pruned.active_channels.size
    assert small.get_layer(hidden[0].name).units == hidden[0].active_channels.size
    report = export.shrink_report(model, small)
    assert report.params_after < report.params_before
    assert report.flops_after < report.flops_before
    assert 0 < report.flop_reduction < report.param_reduction < 1


def test_deepid_pool3_feeds_conv4_and_the_deepid_layer():
    model = models.build("face", preset="cpu", seed=2)
    conv3 = model.get_layer("conv3")
    conv3.prune(np.arange(0, 60, 2))  # 30 of 60 channels
    small = export.shrink(model)
    assert _max_diff(model, small, _x(model)) <= ATOL
    active = conv3.active_channels
    # conv4 (valid 2x2 conv on pool3) loses the pruned input channels ...
    assert small.get_layer("conv4").kernel.shape == (2, 2, active.size, 80)
    # ... and so do the flattened pool3 rows of the DeepID layer, in NHWC flatten order.
    h, w = model.get_layer("pool3").output.shape[1:3]
    conv4_features = int(np.prod(model.get_layer("conv4").output.shape[1:]))
    assert small.get_layer("deepid").kernel.shape[0] == h * w * active.size + conv4_features
    rows = ((np.arange(h * w)[:, None] * 60) + active[None, :]).reshape(-1)
    np.testing.assert_array_equal(
        small.get_layer("deepid").kernel.numpy()[: h * w * active.size],
        model.get_layer("deepid").kernel.numpy()[rows],
    )


def _bn_chain(consumer_padding, beta, kernel=3):
    """conv(linear) -> BN -> ReLU -> conv(consumer_padding, kernel) -> GAP -> Dense."""
    inputs = keras.Input((9, 9, 2), name="image")
    x = fp.MaskedConv2D(4, 3, activation=None, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Conv2D(5, kernel, padding=consumer_padding, name="next")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(x))
    _randomize_bn(model, beta=beta)
    return model


@pytest.mark.parametrize("padding, kernel, kept", [("valid", 3, 2), ("same", 3, 3), ("same", 1, 2)])
def test_bn_shift_of_a_pruned_channel_is_folded_or_kept(padding, kernel, kept):
    # Channel 0 pruned with BN shift > 0 (relu(shift) > 0: a non-zero constant), channel 1
    # pruned with a strongly negative shift (relu(shift) == 0), channels 2, 3 live.
    model = _bn_chain(padding, beta=[3.0, -30.0, 0.1, 0.1], kernel=kernel)
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.zeros(4, "float32"))
    model.get_layer("conv").prune([0, 1])
    small = export.shrink(model)
    assert _max_diff(model, small, _x(model)) <= ATOL
    # 'valid' (or a 1x1 'same' conv, which pads nothing): the constant is folded into next's
    # bias and both pruned channels go; 3x3 'same': the border sees fewer taps, so the non-zero
    # constant channel stays (computed exactly by a zeroed conv channel + BN + ReLU).
    assert small.get_layer("conv").filters == kept
    assert small.get_layer("next").kernel.shape[2] == kept


def test_add_keeps_the_union_of_branch_channels():
    inputs = keras.Input((8, 8, 3), name="image")
    a = fp.MaskedConv2D(6, 3, padding="same", activation="relu", name="a")(inputs)
    b = fp.MaskedConv2D(6, 1, activation=None, name="b")(inputs)
    b = keras.layers.BatchNormalization(name="b_bn")(b)
    x = keras.layers.Add(name="add")([a, b])
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Flatten(name="flat")(x)
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax", name="out")(x))
    _randomize_bn(model, seed=3)
    model.get_layer("b_bn").set_weights([np.ones(6), np.zeros(6), np.zeros(6), np.ones(6)])
    model.get_layer("a").prune([0, 1, 2])
    model.get_layer("b").prune([1, 2, 3])  # channels 1, 2 pruned on both branches
    small = export.shrink(model)
    assert _max_diff(model, small, _x(model)) <= ATOL
    assert small.get_layer("a").filters == 4 and small.get_layer("b").filters == 4
    assert small.get_layer("b_bn").gamma.shape == (4,)
    # Channel 0 survives in "a" (live in "b") and contributes exactly 0 there.
    np.testing.assert_array_equal(small.get_layer("a").kernel.numpy()[..., 0], 0.0)


def test_add_with_a_bn_constant_branch_keeps_it():
    # Pruned on both branches, but BN's shift makes branch b's channel a non-zero constant:
    # the Add output is a constant, removed downstream (Flatten -> Dense folds it).
    inputs = keras.Input((6, 6, 2), name="image")
    a = fp.MaskedConv2D(3, 3, activation="relu", name="a")(inputs)
    b = fp.MaskedConv2D(3, 3, activation=None, name="b")(inputs)
    b = keras.layers.BatchNormalization(name="b_bn")(b)
    x = keras.layers.Flatten(name="flat")(keras.layers.Add(name="add")([a, b]))
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(x))
    _randomize_bn(model, seed=4, beta=[1.5, -0.5, 0.2])
    model.get_layer("a").prune([0])
    model.get_layer("b").prune([0, 1])
    small = export.shrink(model)
    assert _max_diff(model, small, _x(model)) <= ATOL
    assert small.get_layer("a").filters == 2 and small.get_layer("b").filters == 2


def test_concat_depthwise_gap_dense():
    inputs = keras.Input((10, 10, 3), name="image")
    a = fp.MaskedConv2D(4, 3, padding="same", activation="relu", name="a")(inputs)
    b = fp.MaskedConv2D(5, 3, padding="same", activation="relu", name="b")(inputs)
    x = keras.layers.Concatenate(name="cat")([a, b])
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.ReLU(name="dw_relu")(x)
    g = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(g))
    _randomize_bn(model, seed=5)
    model.get_layer("a").prune([1, 3])
    model.get_layer("b").prune([0])
    small = export.shrink(model)
    assert _max_diff(model, small, _x(model)) <= ATOL
    # Depthwise on a constant 0 channel gives a spatially constant act(bias): removable.
    assert small.get_layer("dw").kernel.shape == (3, 3, 6, 2)
    assert small.get_layer("dw_bn").gamma.shape == (12,)
    assert small.get_layer("out").kernel.shape == (12, 3)


def test_non_zero_activation_gets_an_exact_rescaling_mask():
    inputs = keras.Input((6, 6, 2), name="image")
    a = fp.MaskedConv2D(3, 3, activation="sigmoid", name="a")(inputs)
    b = fp.MaskedConv2D(3, 3, activation="relu", name="b")(inputs)
    x = keras.layers.Flatten()(keras.layers.Add(name="add")([a, b]))
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(x))
    model.get_layer("a").prune([1])  # sigmoid(0) = 0.5, but a masked channel is 0
    small = export.shrink(model)
    assert _max_diff(model, small, _x(model)) <= ATOL
    assert isinstance(small.get_layer("a_mask"), keras.layers.Rescaling)


def test_fully_pruned_layer_keeps_one_zero_channel():
    model = models.build("mnist", preset="cpu", seed=6)
    model.get_layer("conv2").prune(np.arange(32))
    small = export.shrink(model)
    assert small.get_layer("conv2").filters == 1 and small.get_layer("fc1").kernel.shape[0] == 16
    assert _max_diff(model, small, _x(model)) <= ATOL


def test_to_plain_keeps_shapes_and_zeroes_pruned_weights():
    model = models.build("mnist", preset="cpu", seed=4)
    model.get_layer("conv2").prune([0, 5, 7])
    plain = export.to_plain(model)
    assert _max_diff(model, plain, _x(model)) <= ATOL
    assert plain.get_layer("conv2").filters == 32
    np.testing.assert_array_equal(plain.get_layer("conv2").kernel.numpy()[..., [0, 5, 7]], 0)
    assert export.count_params_and_flops(plain) == export.count_params_and_flops(model)


def test_count_params_and_flops_by_hand():
    inputs = keras.Input((8, 8, 3))
    x = fp.MaskedConv2D(4, 3, name="c")(inputs)  # 6x6 out
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(x)  # 4x4x8
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(5, name="d")(x))
    params, flops = export.count_params_and_flops(model)
    assert params == (3 * 3 * 3 * 4 + 4) + (3 * 3 * 4 * 2 + 8) + 4 * 8 + (128 * 5 + 5)
    assert flops == 36 * 27 * 4 + 16 * 9 * 8 + 128 * 5


def test_shrink_refuses_custom_layers_and_shrinks_converted_stock_models():
    class Custom(keras.layers.Layer):
        def call(self, x):
            return x

    inputs = keras.Input((6, 6, 2))
    bad = keras.Model(inputs, fp.MaskedConv2D(2, 3)(Custom(name="odd")(inputs)))
    with pytest.raises(ValueError, match="'odd'"):
        export.shrink(bad)
    stock = keras.Sequential(
        [
            keras.Input((8, 8, 1), name="pixels"),
            keras.layers.Conv2D(6, 3, activation="relu", name="c"),
            keras.layers.Flatten(name="f"),
            keras.layers.Dense(3, name="d"),
        ]
    )
    masked = convert(stock)
    masked.get_layer("c").prune([2, 4])
    small = export.shrink(masked)
    assert small.get_layer("d").kernel.shape == (36 * 4, 3)
    assert _max_diff(masked, small, _x(masked)) <= ATOL


# ----------------------------------------------------------------------------------------------
# SavedModel export.

_CLEAN_RUNNER = textwrap.dedent("""
    import importlib.abc, json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

    class Block(importlib.abc.MetaPathFinder):
        # fineprune_tf may be installed (pip install -e): make sure serving never imports it.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "fineprune_tf":
                raise ImportError("fineprune_tf is blocked in this process")

    sys.meta_path.insert(0, Block())
    try:
        import fineprune_tf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("fineprune_tf is importable")

    import numpy as np
    import tensorflow as tf
    import keras

    export_dir, x_path = sys.argv[1], sys.argv[2]
    x = np.load(x_path)
    loaded = tf.saved_model.load(export_dir)
    serve = loaded.signatures["serving_default"]
    y = serve(input=tf.constant(x))["probabilities"].numpy()
    model = keras.models.load_model(os.path.join(export_dir, "model.keras"), safe_mode=True)
    y_keras = model(x, training=False).numpy()
    assert not any(m.split(".")[0] == "fineprune_tf" for m in sys.modules)
    _, specs = serve.structured_input_signature
    print(json.dumps({"y": y.tolist(), "y_keras": y_keras.tolist(),
                      "shape": [d for d in specs["input"].shape.as_list()],
                      "layers": sorted({type(l).__name__ for l in model.layers})}))
""")


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def _saved_ops(path):
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "saved_model.pb").read_bytes())
    ops = set()
    for meta_graph in proto.meta_graphs:
        ops.update(n.op for n in meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            ops.update(n.op for n in function.node_def)
    return ops


@pytest.fixture(scope="module")
def exported_speech(tmp_path_factory):
    """The speech cpu model with 70% of conv5 pruned, exported; plus the outputs of three
    subprocesses run concurrently (each pays TensorFlow's import time): the clean runner,
    ``saved_model_cli show --all`` and ``saved_model_cli run``."""
    keras.utils.set_random_seed(7)
    model = models.build("speech", preset="cpu", seed=7)
    _prune_fraction(model.get_layer("conv5"), 0.7, seed=7)
    work = tmp_path_factory.mktemp("export")
    path = work / "speech_sm"
    plain = export.export_saved_model(model, path)
    x = _x(model, n=5, seed=3)
    np.save(work / "x.npy", x)
    (work / "runner.py").write_text(_CLEAN_RUNNER)
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    literal = str(np.ones((2, 32, 13, 1)).tolist())  # --input_exprs takes literals only
    commands = {
        "runner": [sys.executable, "runner.py", str(path), "x.npy"],
        "show": [cli, "show", "--dir", str(path), "--all"],
        "run": [
            cli,
            "run",
            "--dir",
            str(path),
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--input_exprs",
            f"input={literal}",
        ],
    }
    running = {
        name: subprocess.Popen(
            cmd,
            cwd=work,
            env=_clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, cmd in commands.items()
    }
    results = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=300)
        results[name] = (process.returncode, out, err)
    return model, plain, path, x, results


def test_export_runs_in_stock_tensorflow_without_fineprune(exported_speech):
    model, plain, path, x, results = exported_speech
    code, out, err = results["runner"]
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    want = np.asarray(model(x, training=False))
    np.testing.assert_allclose(result["y"], want, atol=ATOL)
    np.testing.assert_allclose(result["y_keras"], want, atol=ATOL)
    assert result["shape"] == [None, 32, 13, 1]
    assert "MaskedConv2D" not in result["layers"] and "Conv2D" in result["layers"]
    assert plain.get_layer("conv5").filters == model.get_layer("conv5").active_channels.size
    assert not any(op.startswith("Fineprune") for op in _saved_ops(path))
    assert io.inspect_saved_model(path) == []


def test_saved_model_cli_show_and_run(exported_speech):
    model, _, _, _, results = exported_speech
    code, shown, err = results["show"]
    assert code == 0, err[-3000:]
    assert "signature_def['serving_default']" in shown
    assert "inputs['input']" in shown and "(-1, 32, 13, 1)" in shown
    assert "outputs['probabilities']" in shown
    code, ran, err = results["run"]
    assert code == 0, err[-3000:]
    assert "Result for output key probabilities" in ran
    printed = ran.split("Result for output key probabilities:", 1)[1]
    values = np.array([float(v) for v in printed.replace("[", " ").replace("]", " ").split()])
    want = np.asarray(model(np.ones((2, 32, 13, 1), "float32"), training=False)).reshape(-1)
    np.testing.assert_allclose(values, want, atol=1e-4)  # printed with limited precision


def test_export_without_shrinking_folds_masks(tmp_path):
    model = models.build("mnist", preset="cpu", seed=5)
    model.get_layer("conv2").prune(np.arange(10))
    plain = export.export_saved_model(model, tmp_path / "sm", shrink=False)
    assert plain.get_layer("conv2").filters == 32
    ops = _saved_ops(tmp_path / "sm")
    assert "Conv2D" in ops and not any(op.startswith("Fineprune") for op in ops)
    loaded = io.load_model(tmp_path / "sm", prefer_keras=False)
    x = _x(model, n=3)
    np.testing.assert_allclose(loaded.predict(x), np.asarray(model(x)), atol=ATOL)
    with pytest.raises(FileExistsError):
        export.export_saved_model(model, tmp_path / "sm")


def _large_logit_model():
    """conv -> BN -> ReLU x2 -> GAP -> linear Dense: logits of order 100+ (ResNet50-like)."""
    inputs = keras.Input((12, 12, 3))
    x = inputs
    for i, width in enumerate((16, 16)):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"c{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"r{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    logits = keras.layers.Dense(10, name="logits")(x)
    model = keras.Model(inputs, logits)
    _randomize_bn(model, seed=3, beta=np.full(16, 2.0))
    dense = model.get_layer("logits")
    dense.set_weights([dense.get_weights()[0] * 20.0, dense.get_weights()[1] + 150.0])
    return model


def test_self_check_tolerance_is_relative_to_the_output_scale():
    from fineprune_tf.export.shrink import VERIFY_RTOL, _verify, verify_tolerance

    assert verify_tolerance(np.array([158.0, -3.0])) == pytest.approx(VERIFY_RTOL * 158.0)
    assert verify_tolerance(np.array([0.2, 0.8])) == VERIFY_RTOL  # floor: scale 1
    model = _large_logit_model()
    scale = float(np.max(np.abs(model(_x(model, 4), training=False))))
    assert 100.0 < scale < 1000.0

    def shifted(offset):
        return keras.Model(model.inputs, keras.layers.Rescaling(1.0, offset)(model.outputs[0]))

    _verify(model, shifted(3.5e-4))  # the ResNet50 rounding: not an error at this scale
    with pytest.raises(ConversionError, match=r"differs .* by 0\.2.*output scale"):
        _verify(model, shifted(0.2))
    probabilities = keras.Model(model.inputs, keras.layers.Softmax()(model.outputs[0]))
    on_probabilities = keras.Model(
        model.inputs, keras.layers.Rescaling(1.0, 3.5e-4)(probabilities.outputs[0])
    )
    with pytest.raises(ConversionError, match="internal error"):  # same diff, scale 1
        _verify(probabilities, on_probabilities)


def test_large_logit_model_shrinks_and_exports_without_a_false_alarm(tmp_path):
    masked = convert(_large_logit_model())
    _prune_fraction(masked.get_layer("c0"), 0.5)
    _prune_fraction(masked.get_layer("c1"), 0.5, seed=1)
    small = export.shrink(masked)  # verify=True
    x = _x(masked, 4)
    reference = np.asarray(masked(x, training=False))
    assert np.max(np.abs(reference)) > 100.0
    assert _max_diff(masked, small, x) <= 1e-4 * np.max(np.abs(reference))
    assert small.get_layer("c1").filters < 16
    export.export_saved_model(masked, tmp_path / "served")


def test_softmax_conv_is_never_prunable():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="body")(inputs)
    x = keras.layers.Conv2D(5, 1, activation="softmax", name="soft")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(
        keras.layers.Flatten(name="flat")(x)
    )
    model = keras.Model(inputs, outputs)
    converted = convert(model, dense=True)
    assert isinstance(converted.get_layer("body"), fp.MaskedConv2D)
    assert type(converted.get_layer("soft")) is keras.layers.Conv2D  # left plain
    with pytest.raises(ConversionError, match=r"'soft'.*softmax.*independently"):
        convert(model, layer_names=["soft"])
    softmax_dense = keras.Model(
        inputs, keras.layers.Dense(4, activation="softmax", name="sd")(keras.layers.Flatten()(x))
    )
    with pytest.raises(ConversionError, match=r"'sd'.*softmax"):
        convert(softmax_dense, dense=True, layer_names=["sd"])
    # A masked layer built directly with softmax: refused at prune(), and at export if its mask
    # was set by hand.
    masked = fp.MaskedConv2D(4, 1, activation="softmax", name="masked_soft")
    direct = keras.Model(inputs, masked(inputs))
    with pytest.raises(ValueError, match=r"masked_soft.*softmax.*independently"):
        masked.prune([0])
    assert masked.pruned_channels.size == 0
    masked.set_mask([0, 1, 1, 1])
    with pytest.raises(ConversionError, match=r"cannot shrink/export.*'masked_soft'.*softmax"):
        export.shrink(direct)


def _fused_chains_model():
    """Every fusable chain kind: conv -> BN -> ReLU6, depthwise -> BN -> ReLU, separable -> BN
    -> swish, and a conv -> BN feeding a residual Add."""
    inputs = keras.Input((10, 10, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(6.0, name="stem_relu")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    y = keras.layers.BatchNormalization(name="dw_bn")(y)
    y = keras.layers.ReLU(name="dw_relu")(y)
    y = keras.layers.Conv2D(8, 1, name="project")(y)
    y = keras.layers.BatchNormalization(name="project_bn")(y)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.SeparableConv2D(6, 3, name="sep")(x)
    x = keras.layers.BatchNormalization(name="sep_bn")(x)
    x = keras.layers.Activation("swish", name="sep_act")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="logits")(x))
    _randomize_bn(model, seed=5)
    return model


def test_fused_batchnorm_is_folded_into_the_conv_on_export(tmp_path):
    """BN-aware masks: a pruned channel is exactly 0 after BN, so shrink removes it even
    where BN shifts it; the fused BN is folded into the exported conv (no BatchNormalization
    left) and the SavedModel equals the masked model to a relative 1e-5."""
    stock = _fused_chains_model()
    masked = convert(stock)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in masked.layers)
    assert masked.get_layer("sep").batch_normalization.name == "sep_bn"
    x = _x(masked, 4)
    assert _max_diff(stock, masked, x) <= 1e-6
    for name, channels in (("stem", [0, 3]), ("project", [0, 3]), ("dw", [1, 5]), ("sep", [2])):
        masked.get_layer(name).prune(channels)
    reference = np.asarray(masked(x, training=False))
    scale = float(np.max(np.abs(reference)))
    for plain in (export.shrink(masked), export.to_plain(masked)):
        assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in plain.layers)
        assert not any(isinstance(layer, fp.layers.MaskedLayerMixin) for layer in plain.layers)
        assert _max_diff(masked, plain, x) <= 1e-5 * scale
    small = export.shrink(masked)
    # stem's and project's channels 0, 3 meet in the Add (a dependency group): both go; dw
    # follows stem's 6 (its pruned outputs 1, 5 stay as zeros: stem's 1, 5 feed the Add too);
    # sep drops channel 2.
    assert small.get_layer("stem").filters == 6 and small.get_layer("project").filters == 6
    assert small.get_layer("dw").kernel.shape[-2] == 6 and small.get_layer("sep").filters == 5
    exported = export.export_saved_model(masked, tmp_path / "served")
    import tensorflow as tf

    serve = tf.saved_model.load(str(tmp_path / "served")).signatures["serving_default"]
    served = next(iter(serve(image=tf.constant(x)).values())).numpy()
    assert np.max(np.abs(served - reference)) <= 1e-5 * scale
    assert exported.count_params() < stock.count_params()


def test_fuse_batchnorm_false_still_exports_exactly():
    stock = _fused_chains_model()
    masked = convert(stock, fuse_batchnorm=False)
    assert isinstance(masked.get_layer("stem_bn"), keras.layers.BatchNormalization)
    masked.get_layer("stem").prune([0, 3])
    small = export.shrink(masked)
    x = _x(masked, 4)
    assert _max_diff(masked, small, x) <= 1e-5 * float(np.max(np.abs(masked(x))))
