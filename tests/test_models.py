"""Architectures of fineprune_tf.models checked against hand-computed tables."""

import keras
import numpy as np
import pytest

from fineprune_tf import models
from fineprune_tf.layers import MaskedConv2D, MaskedDense


def conv(kh, kw, cin, cout):
    return kh * kw * cin * cout + cout


def dense(din, dout):
    return din * dout + dout


# Per-layer trainable parameters of the paper presets, from the published tables.  Spatial sizes
# are worked out by hand in the comments (valid: floor((n - k) / s) + 1; same: ceil(n / s)).
PAPER_TABLES = {
    # DeepID, 55x47x3: conv1 4x4 -> 52x44, pool1 -> 26x22, conv2 3x3 -> 24x20, pool2 -> 12x10,
    # conv3 3x3 -> 10x8, pool3 -> 5x4, conv4 2x2 -> 4x3.  deepid sees flatten(pool3) (5*4*60)
    # concatenated with flatten(conv4) (4*3*80) = 1200 + 960 = 2160 features.
    "face": {
        "conv1": conv(4, 4, 3, 20),
        "conv2": conv(3, 3, 20, 40),
        "conv3": conv(3, 3, 40, 60),
        "conv4": conv(2, 2, 60, 80),
        "deepid": dense(5 * 4 * 60 + 4 * 3 * 80, 160),
        "softmax": dense(160, 1283),
    },
    # AlexNet, 227x227x1: conv1 11x11/4 -> 55, pool1 3/2 -> 27, conv2 (same) 27, pool2 -> 13,
    # conv3-5 (same) 13, pool5 -> 6; fc6 sees 6*6*256.
    "speech": {
        "conv1": conv(11, 11, 1, 96),
        "conv2": conv(5, 5, 96, 256),
        "conv3": conv(3, 3, 256, 384),
        "conv4": conv(3, 3, 384, 384),
        "conv5": conv(3, 3, 384, 256),
        "fc6": dense(6 * 6 * 256, 4096),
        "fc7": dense(4096, 4096),
        "fc8": dense(4096, 10),
    },
    # ZF (F-RCNN), 224x224x3: conv1 7x7/2 -> 112, pool1 -> 56, conv2 5x5/2 -> 28, pool2 -> 14,
    # conv3-5 14, pool5 3/2 valid -> 6 (= F-RCNN's 6x6 RoI pooling); fc6 sees 6*6*256.
    "traffic": {
        "conv1": conv(7, 7, 3, 96),
        "conv2": conv(5, 5, 96, 256),
        "conv3": conv(3, 3, 256, 384),
        "conv4": conv(3, 3, 384, 384),
        "conv5": conv(3, 3, 384, 256),
        "fc6": dense(6 * 6 * 256, 4096),
        "fc7": dense(4096, 4096),
        "fc8": dense(4096, 3),
    },
    # BadNets MNIST, 28x28x1: conv1 5x5 -> 24, pool -> 12, conv2 5x5 -> 8, pool -> 4.
    "mnist": {
        "conv1": conv(5, 5, 1, 16),
        "conv2": conv(5, 5, 16, 32),
        "fc1": dense(4 * 4 * 32, 512),
        "fc2": dense(512, 10),
    },
}

PAPER_TOTALS = {"face": 601_483, "speech": 58_299_082, "traffic": 58_272_899, "mnist": 281_034}

LAYER_NAMES = {
    "face": [
        "input",
        "conv1",
        "pool1",
        "conv2",
        "pool2",
        "conv3",
        "pool3",
        "conv4",
        "flatten_pool3",
        "flatten_conv4",
        "concat",
        "deepid",
        "softmax",
    ],
    "speech": [
        "input",
        "conv1",
        "pool1",
        "conv2",
        "pool2",
        "conv3",
        "conv4",
        "conv5",
        "pool5",
        "flatten",
        "fc6",
        "drop6",
        "fc7",
        "drop7",
        "fc8",
    ],
    "traffic": [
        "input",
        "conv1",
        "pool1",
        "conv2",
        "pool2",
        "conv3",
        "conv4",
        "conv5",
        "pool5",
        "flatten",
        "fc6",
        "drop6",
        "fc7",
        "drop7",
        "fc8",
    ],
    "mnist": ["input", "conv1", "pool1", "conv2", "pool2", "flatten", "fc1", "fc2"],
}

CPU_DEFAULTS = {
    "face": ((55, 47, 3), 40),
    "speech": ((32, 13, 1), 10),
    "traffic": ((32, 32, 3), 3),
    "mnist": ((28, 28, 1), 10),
}


def trainable_count(layer) -> int:
    return int(sum(np.prod(w.shape) for w in layer.trainable_weights))


@pytest.fixture(scope="module")
def paper_models():
    built = {task: models.build(task, "paper", seed=0) for task in models.TASKS}
    yield built
    keras.backend.clear_session()


@pytest.mark.parametrize("task", models.TASKS)
def test_paper_parameter_counts_match_hand_computed_tables(paper_models, task):
    model = paper_models[task]
    table = PAPER_TABLES[task]
    assert sum(table.values()) == PAPER_TOTALS[task]
    counted = {
        layer.name: trainable_count(layer) for layer in model.layers if layer.trainable_weights
    }
    assert counted == table
    masks = sum(
        layer.channels for layer in model.layers if isinstance(layer, (MaskedConv2D, MaskedDense))
    )
    assert model.count_params() == PAPER_TOTALS[task] + masks


@pytest.mark.parametrize("preset", models.PRESETS)
@pytest.mark.parametrize("task", models.TASKS)
def test_layer_names_and_types(paper_models, task, preset):
    model = paper_models[task] if preset == "paper" else models.build(task, preset)
    assert [layer.name for layer in model.layers] == LAYER_NAMES[task]
    assert model.name == f"{task}_{preset}"
    classifier = model.get_layer(models.CLASSIFIER_LAYER[task])
    assert model.layers[-1] is classifier
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            assert isinstance(layer, MaskedConv2D), layer.name
            assert layer.activation is keras.activations.relu, layer.name
        elif isinstance(layer, keras.layers.Dense) and layer is not classifier:
            assert isinstance(layer, MaskedDense), layer.name
            assert layer.activation is keras.activations.relu, layer.name
    assert type(classifier) is keras.layers.Dense
    assert classifier.activation is keras.activations.softmax


def _consumers(model, name):
    return sorted(
        layer.name
        for layer in model.layers
        if any(
            t._keras_history.operation.name == name
            for node in layer._inbound_nodes
            for t in keras.tree.flatten(node.input_tensors)
        )
    )


@pytest.mark.parametrize("preset", models.PRESETS)
def test_deepid_pool3_feeds_conv4_and_the_deepid_layer(paper_models, preset):
    model = paper_models["face"] if preset == "paper" else models.build("face", preset)
    assert _consumers(model, "pool3") == ["conv4", "flatten_pool3"]
    assert _consumers(model, "conv4") == ["flatten_conv4"]
    assert _consumers(model, "concat") == ["deepid"]
    assert model.get_layer("deepid").kernel.shape == (5 * 4 * 60 + 4 * 3 * 80, 160)


@pytest.mark.parametrize("preset", models.PRESETS)
@pytest.mark.parametrize("task", models.TASKS)
def test_pruned_layer_is_the_last_shared_conv(paper_models, task, preset):
    model = paper_models[task] if preset == "paper" else models.build(task, preset)
    layer = models.pruned_layer(model)
    assert layer.name == models.PRUNED_LAYER[task]
    assert isinstance(layer, MaskedConv2D)
    assert models.last_conv_layer(model) == models.PRUNED_LAYER[task]
    assert models.pruned_layer(model, task) is layer


def test_last_conv_layer_on_a_plain_sequential_model():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(2, 3, name="a"),
            keras.layers.Conv2D(2, 3, name="b"),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    assert models.last_conv_layer(model) == "b"
    dense_only = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no convolution layer"):
        models.last_conv_layer(dense_only)


@pytest.mark.parametrize("task", models.TASKS)
def test_cpu_presets_build_on_default_shapes(task):
    shape, classes = CPU_DEFAULTS[task]
    model = models.build(task, "cpu", seed=0)
    assert model.input_shape == (None, *shape)
    assert model.output_shape == (None, classes)
    x = np.random.default_rng(0).random((3, *shape), dtype=np.float32)
    probabilities = keras.ops.convert_to_numpy(model(x))
    assert probabilities.shape == (3, classes)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert 32 <= models.pruned_layer(model).channels <= 96


def test_cpu_speech_and_traffic_are_smaller_than_paper():
    for task in ("speech", "traffic"):
        assert models.build(task, "cpu").count_params() < 1_000_000


def test_overrides():
    model = models.build("traffic", "cpu", num_classes=7, input_shape=(40, 36, 1))
    assert model.input_shape == (None, 40, 36, 1)
    assert model.output_shape == (None, 7)
    face = models.build("face", "paper", num_classes=40)
    assert face.output_shape == (None, 40)


@pytest.mark.parametrize("task", models.TASKS)
def test_determinism_for_a_seed(task):
    def weights(seed):
        return [w.copy() for w in models.build(task, "cpu", seed=seed).get_weights()]

    first, again, other = weights(3), weights(3), weights(4)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_layers_get_distinct_seeds():
    model = models.build("speech", "cpu", seed=0)
    # An integer-seeded initializer draws the same uniform stream whatever the shape, so under
    # one shared seed every kernel would be a rescaled prefix of the same numbers.
    a = model.get_layer("conv4").kernel.numpy().ravel()[:100]
    b = model.get_layer("conv3").kernel.numpy().ravel()[:100]
    assert not np.allclose(a / np.abs(a).max(), b / np.abs(b).max(), atol=1e-3)


def test_unseeded_builds_follow_the_global_seed():
    keras.utils.set_random_seed(5)
    a = models.build("mnist", "cpu").get_weights()
    keras.utils.set_random_seed(5)
    b = models.build("mnist", "cpu").get_weights()
    for wa, wb in zip(a, b, strict=True):
        np.testing.assert_array_equal(wa, wb)


def test_errors():
    with pytest.raises(ValueError, match="unknown task 'cifar'"):
        models.build("cifar")
    with pytest.raises(ValueError, match="unknown preset 'gpu'"):
        models.build("face", "gpu")
    with pytest.raises(ValueError, match="num_classes"):
        models.build("mnist", num_classes=1)
    with pytest.raises(ValueError, match="input_shape"):
        models.build("mnist", input_shape=(28, 28))
    with pytest.raises(ValueError, match="input_shape"):
        models.build("mnist", input_shape=(28, 0, 1))
    # DeepID needs >= 31 pixels per side: at 30, conv4 gets a 1x1 map from pool3.
    with pytest.raises(ValueError, match="'conv4'"):
        models.build("face", input_shape=(30, 40, 3))
    with pytest.raises(ValueError, match="'conv1'.*too small|too small.*'conv1'"):
        models.build("speech", "paper", input_shape=(10, 227, 1))
    with pytest.raises(ValueError, match="'conv2'"):
        models.build("mnist", input_shape=(12, 28, 1))
    with pytest.raises(ValueError, match="unknown task"):
        models.default_training("cifar")
    with pytest.raises(ValueError, match="unknown optimizer"):
        models.make_optimizer("lbfgs", 0.1)
    with pytest.raises(ValueError, match="infer the task"):
        models.pruned_layer(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))


def test_smallest_valid_inputs_build():
    assert models.build("face", input_shape=(31, 31, 3)).get_layer("conv4").output.shape[1:3] == (
        1,
        1,
    )
    # "same" padding keeps every cpu speech/traffic layer non-empty down to a 1x1 input ...
    models.build("speech", "cpu", input_shape=(1, 1, 1))
    models.build("traffic", "cpu", input_shape=(1, 1, 3))
    # ... whereas the paper's ZF net on a 32x32 crop leaves a 2x2 conv5 map, too small for its
    # unpadded 3x3 pool5 (48x48 gives 3x3 -> 1x1).
    with pytest.raises(ValueError, match="'pool5'"):
        models.build("traffic", "paper", input_shape=(32, 32, 3))
    assert models.build("traffic", "paper", input_shape=(48, 48, 3)).get_layer(
        "pool5"
    ).output.shape[1:3] == (1, 1)


@pytest.mark.parametrize("task", models.TASKS)
def test_default_training(task):
    config = models.default_training(task)
    assert set(config) == {"epochs", "batch_size", "learning_rate", "optimizer", "schedule"}
    config["epochs"] = -1
    assert models.default_training(task)["epochs"] > 0
    model = models.compile_model(models.build(task), task, train_size=1000)
    assert isinstance(model.optimizer, keras.optimizers.Optimizer)


def test_optimizers_and_schedules():
    adam = models.make_optimizer("adam", 0.01, decay_steps=10)
    assert float(adam.learning_rate) == pytest.approx(0.01)
    adam.iterations.assign(10)
    assert float(adam.learning_rate) == pytest.approx(0.0, abs=1e-7)
    sgd = models.make_optimizer("sgd", 0.1)
    assert float(sgd.learning_rate) == pytest.approx(0.1) and sgd.momentum == 0.9
    model = models.build("mnist")
    models.compile_model(model, "mnist", schedule="constant", learning_rate=0.5)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="train_size"):
        models.compile_model(model, "mnist")
    with pytest.raises(TypeError, match="unknown training settings"):
        models.compile_model(model, "mnist", train_size=10, momentum=0.9)
    with pytest.raises(ValueError, match="unknown schedule"):
        models.compile_model(model, "mnist", train_size=10, schedule="step")
    with pytest.raises(ValueError, match="decay_steps"):
        models.make_optimizer("adam", 0.1, decay_steps=0)


@pytest.mark.parametrize("task", models.TASKS)
def test_cpu_preset_has_the_paper_graph(paper_models, task):
    cpu = models.build(task, "cpu")
    paper = paper_models[task]
    assert [type(layer) for layer in cpu.layers] == [type(layer) for layer in paper.layers]
    assert [_consumers(cpu, layer.name) for layer in cpu.layers] == [
        _consumers(paper, layer.name) for layer in paper.layers
    ]


def test_saved_model_round_trip(tmp_path):
    model = models.build("face", "cpu", seed=1)
    models.pruned_layer(model).prune([0, 5])
    path = tmp_path / "face.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [layer.name for layer in loaded.layers] == LAYER_NAMES["face"]
    np.testing.assert_array_equal(models.pruned_layer(loaded).pruned_channels, [0, 5])
    x = np.random.default_rng(1).random((2, 55, 47, 3), dtype=np.float32)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)),
        keras.ops.convert_to_numpy(model(x)),
        rtol=1e-5,
        atol=1e-6,
    )
