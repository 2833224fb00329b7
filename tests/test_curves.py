"""The incremental pruning-curve engine gives the naive loop's predictions, never leaves the
model modified, and rejects bad arguments clearly."""

from __future__ import annotations

import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from fineprune_tf import curves, models
from fineprune_tf.layers import MaskedConv2D, MaskedDense

# A prediction may differ from the naive loop only where the float summation order decides a
# tie: the top-2 logit margin there must be below this.
TIE_MARGIN = 1e-4


@dataclasses.dataclass
class Backdoor:
    x: np.ndarray
    y_true: np.ndarray
    y_attacker: np.ndarray | None
    targeted: bool


def _perturb(model: keras.Model, layer_name: str, seed: int) -> None:
    """Random biases, so channels differ, and dormant channels in the pruned layer: a quarter
    dead on every input, a quarter only on some (both exercise the skipping of unchanged
    samples)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        bias = getattr(layer, "bias", None)
        if bias is not None:
            bias.assign(rng.normal(0.0, 0.1, bias.shape).astype("float32"))
    layer = model.get_layer(layer_name)
    bias = keras.ops.convert_to_numpy(layer.bias).copy()
    channels = rng.permutation(layer.channels)
    quarter = layer.channels // 4
    bias[channels[:quarter]] = -1e3
    bias[channels[quarter : 2 * quarter]] -= 1.0
    layer.bias.assign(bias)


def _data(model: keras.Model, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (count, *model.input_shape[1:])).astype("float32")
    y = rng.integers(0, model.output_shape[-1], count).astype(np.int64)
    return x, y


def _calibrate_classifier(model: keras.Model, x: np.ndarray, name: str | None = None) -> None:
    """Sets the bias of the classifier (layer ``name``, default the last) so every class has
    the same mean logit over ``x``.  Random networks on random inputs otherwise can give one
    class a large constant lead (traffic's cpu model predicted class 2 for every input at every
    step), and an equality test on predictions that never change cannot fail."""
    classifier = model.get_layer(name) if name else model.layers[-1]
    features = np.asarray(keras.Model(model.inputs, classifier.input)(x, training=False))
    logits = features @ keras.ops.convert_to_numpy(classifier.kernel)
    classifier.bias.assign((-logits.mean(axis=0)).astype("float32"))


def _changes(curve: curves.PruningCurve) -> int:
    """(step, sample) pairs whose prediction differs from the previous step's."""
    sets = [curve.predictions_clean, curve.predictions_backdoor]
    return sum(int(np.sum(p[1:] != p[:-1])) for p in sets if p is not None)


def _assert_predictions_change(reference: curves.PruningCurve, what: str) -> None:
    """An engine that ignored the mask would match a reference whose predictions never change:
    every comparison must be one that could fail."""
    assert _changes(reference) > 0, (
        f"the {what} predicts the same labels at every step: this case cannot tell an engine "
        "that ignores the mask from a correct one"
    )


def _logit_margin(model: keras.Model, layer, mask: np.ndarray, x: np.ndarray) -> float:
    """Top-2 logit margin of ``model`` on one input under ``mask`` (log-probabilities differ
    by the logits' difference)."""
    saved = layer.mask
    try:
        layer.set_mask(mask)
        scores = np.asarray(model(x[None], training=False))[0].astype(np.float64)
    finally:
        layer.set_mask(saved)
    top = np.sort(np.log(np.maximum(scores, 1e-300)))
    return float(top[-1] - top[-2])


def _assert_same(
    model: keras.Model,
    layer_name: str,
    fast: curves.PruningCurve,
    naive: curves.PruningCurve,
    x_sets: list[np.ndarray],
) -> None:
    layer = model.get_layer(layer_name)
    pairs = [(fast.predictions_clean, naive.predictions_clean)]
    if naive.predictions_backdoor is not None:
        pairs.append((fast.predictions_backdoor, naive.predictions_backdoor))
    start = layer.mask
    for (got, want), x in zip(pairs, x_sets, strict=True):
        assert got.shape == want.shape
        for k, i in np.argwhere(got != want):
            mask = start.copy()
            mask[fast.pruned[1 : k + 1]] = 0.0
            margin = _logit_margin(model, layer, mask, x[i])
            assert margin < TIE_MARGIN, (
                f"step {k} sample {i}: engine says {got[k, i]}, naive {want[k, i]}, but the "
                f"logit margin is {margin:.3g}: not a rounding tie"
            )
    np.testing.assert_array_equal(fast.pruned, naive.pruned)
    if all(np.array_equal(got, want) for got, want in pairs):
        np.testing.assert_array_equal(fast.clean_acc, naive.clean_acc)
        np.testing.assert_array_equal(fast.asr, naive.asr)
        np.testing.assert_array_equal(fast.robust_acc, naive.robust_acc)


def _direct_predictions(model: keras.Model, layer_name: str, order, xs: list) -> list:
    """The naive loop without ``model.predict``'s per-call overhead: per step, set the mask
    and run a traced forward pass (it reads the mask variable) on each input set.  int64
    ``[K+1, N]`` per set."""
    layer = model.get_layer(layer_name)
    forward = tf.function(lambda x: model(x, training=False))
    saved = layer.mask
    out = [np.empty((len(order) + 1, len(x)), np.int64) for x in xs]
    try:
        mask = saved.copy()
        for k in range(len(order) + 1):
            if k:
                mask[order[k - 1]] = 0.0
                layer.set_mask(mask)
            for labels, x in zip(out, xs, strict=True):
                labels[k] = np.argmax(forward(x).numpy(), axis=-1)
    finally:
        layer.set_mask(saved)
    return out


def _check(
    model: keras.Model,
    layer_name: str,
    order,
    x,
    y,
    backdoor=None,
    naive_steps: int | None = None,
    **kwargs,
) -> curves.PruningCurve:
    """Engine vs ``naive_pruning_curve`` on ``order[:naive_steps]`` (all by default) and, when
    that is a prefix, vs the same loop with direct model calls on the whole order."""
    layer = model.get_layer(layer_name)
    mask_before = layer.mask.copy()
    fast = curves.pruning_curve(model, layer_name, order, (x, y), backdoor, **kwargs)
    np.testing.assert_array_equal(layer.mask, mask_before)
    xs = [x] + ([backdoor.x] if backdoor is not None else [])
    prefix = list(order)[:naive_steps]
    naive = curves.naive_pruning_curve(model, layer_name, prefix, (x, y), backdoor)
    np.testing.assert_array_equal(layer.mask, mask_before)
    k = len(prefix) + 1
    head = dataclasses.replace(
        fast,
        pruned=fast.pruned[:k],
        clean_acc=fast.clean_acc[:k],
        asr=fast.asr[:k],
        robust_acc=fast.robust_acc[:k],
        predictions_clean=fast.predictions_clean[:k],
        predictions_backdoor=(
            None if fast.predictions_backdoor is None else fast.predictions_backdoor[:k]
        ),
    )
    _assert_predictions_change(naive, "naive loop")
    _assert_same(model, layer_name, head, naive, xs)
    if k < len(order) + 1:
        direct = _direct_predictions(model, layer_name, order, xs)
        reference = dataclasses.replace(
            fast,
            predictions_clean=direct[0],
            predictions_backdoor=direct[1] if backdoor is not None else None,
        )
        _assert_predictions_change(reference, "direct loop over the whole order")
        _assert_same(model, layer_name, fast, reference, xs)
    return fast


@pytest.mark.parametrize("task", models.TASKS)
def test_matches_naive_on_task_models(task):
    model = models.build(task, preset="cpu", seed=3)
    name = models.PRUNED_LAYER[task]
    _perturb(model, name, seed=4)
    x, y = _data(model, 40, seed=5)
    xb, yb = _data(model, 24, seed=6)
    _calibrate_classifier(model, x, models.CLASSIFIER_LAYER[task])
    targeted = task != "traffic"
    backdoor = Backdoor(
        xb + 0.5, yb, (yb + 1) % model.output_shape[-1] if targeted else None, targeted
    )
    layer = model.get_layer(name)
    order = np.random.default_rng(7).permutation(layer.channels)
    # model.predict costs ~10x a direct call on 40 inputs: the reference function on the first
    # 12 steps, the same loop with direct calls on all of them.
    curve = _check(model, name, order, x, y, backdoor, naive_steps=12)
    assert curve.predictions_clean.shape == (layer.channels + 1, 40)
    assert curve.predictions_backdoor.shape == (layer.channels + 1, 24)
    assert curve.info["mode"] == "incremental"
    # Dead channels leave every prediction as it was: those steps are skipped, not evaluated.
    assert curve.info["evaluated_rows"] < curve.info["all_rows"]
    if task == "face":
        # DeepID: pool3 feeds conv4 and, through flatten/concat, the deepid layer.
        assert curve.info["frontier"] == ["conv4", "deepid"]
    assert not np.isnan(curve.asr).any()


def _bn_model() -> keras.Model:
    inputs = keras.Input((10, 10, 3))
    x = MaskedConv2D(8, 3, activation=None, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="relu")(x)
    outputs = keras.layers.Dense(5, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    bn = model.get_layer("bn")
    # Non-trivial inference statistics: a zeroed channel maps to a non-zero shift.
    bn.gamma.assign(rng.uniform(0.5, 2.0, 8).astype("float32"))
    bn.beta.assign(rng.normal(0.0, 1.0, 8).astype("float32"))
    bn.moving_mean.assign(rng.normal(0.0, 0.5, 8).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, 8).astype("float32"))
    return model


def test_batchnorm_after_linear_pruned_conv():
    model = _bn_model()
    x, y = _data(model, 64, seed=1)
    info = curves.describe(model, "conv")
    assert info.mode == "incremental"
    assert info.frontier == (model.layers[-2].name,)
    curve = _check(model, "conv", [5, 0, 7, 2, 1, 3, 6, 4], x, y)
    # Pruning a channel after BN is not a no-op: BN's shift reaches the next layer.
    assert not np.all(curve.predictions_clean == curve.predictions_clean[0])


def test_starts_from_current_mask():
    model = models.build("mnist", preset="cpu", seed=1)
    _perturb(model, "conv2", seed=2)
    layer = model.get_layer("conv2")
    layer.prune([3, 17])
    x, y = _data(model, 48, seed=3)
    order = [c for c in np.random.default_rng(4).permutation(layer.channels) if c not in (3, 17)]
    curve = _check(model, "conv2", order, x, y)
    assert curve.already_pruned == 2
    assert curve.steps == layer.channels - 2
    np.testing.assert_array_equal(layer.pruned_channels, [3, 17])
    # An already-pruned channel in the order is a step that changes nothing.
    again = curves.pruning_curve(model, "conv2", [17, *order[:3]], (x, y))
    np.testing.assert_array_equal(again.predictions_clean[1], again.predictions_clean[0])
    np.testing.assert_array_equal(again.predictions_clean[2:], curve.predictions_clean[1:4])


def test_fallback_when_suffix_is_not_per_channel():
    inputs = keras.Input((9, 9, 2))
    x = MaskedConv2D(6, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.LayerNormalization()(x)  # mixes channels: no per-channel shortcut
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(4, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    _perturb(model, "conv", seed=0)
    x, y = _data(model, 32, seed=1)
    assert curves.describe(model, "conv").mode == "batched-masks"
    curve = _check(model, "conv", [4, 1, 0, 5, 2], x, y)
    assert curve.info["mode"] == "batched-masks"


def test_conv_frontier_with_strides_padding_and_skip_connection():
    inputs = keras.Input((12, 12, 3))
    early = keras.layers.Conv2D(4, 3, padding="same", name="early")(inputs)
    x = MaskedConv2D(8, 3, padding="same", activation="relu", name="conv")(early)
    x = keras.layers.ZeroPadding2D(1)(x)
    x = keras.layers.Conv2D(5, 3, strides=2, padding="same", activation="relu", name="next")(x)
    # A mask-independent tensor joins the suffix: the prefix provides it once.
    skip = keras.layers.Conv2D(5, 1, strides=2, padding="same")(
        keras.layers.ZeroPadding2D(1)(early)
    )
    x = keras.layers.Add()([x, skip])
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    _perturb(model, "conv", seed=5)
    x, y = _data(model, 40, seed=6)
    assert curves.describe(model, "conv").frontier == ("next",)
    _check(model, "conv", np.random.default_rng(0).permutation(8), x, y)


def test_masked_dense_layer_and_global_pooling_frontier():
    inputs = keras.Input((8, 8, 2))
    x = MaskedConv2D(6, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = MaskedDense(12, activation="relu", name="hidden")(x)
    x = keras.layers.Dropout(0.5)(x)
    outputs = keras.layers.Dense(4, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    _perturb(model, "conv", seed=1)
    x, y = _data(model, 40, seed=2)
    _calibrate_classifier(model, x)
    _check(model, "conv", [2, 0, 5], x, y)
    # The pruned layer may be a MaskedDense too.
    model.get_layer("hidden").bias.assign(np.linspace(-0.2, 0.2, 12).astype("float32"))
    _check(model, "hidden", np.random.default_rng(3).permutation(12), x, y)


def test_tiny_memory_budget_and_dataset_input_give_the_same_curve():
    model = models.build("speech", preset="cpu", seed=2)
    _perturb(model, "conv5", seed=3)
    x, y = _data(model, 50, seed=4)
    xb, yb = _data(model, 30, seed=5)
    backdoor = Backdoor(xb, yb, (yb + 1) % 10, True)
    order = np.random.default_rng(6).permutation(64)[:40]
    reference = curves.pruning_curve(model, "conv5", order, (x, y), backdoor)
    _assert_predictions_change(reference, "reference engine run")
    # A few KiB: chunks of a few samples, each with its own run over all steps.
    tiny = curves.pruning_curve(
        model, "conv5", order, (x, y), backdoor, batch_size=7, memory_budget_mb=0.05
    )
    assert tiny.info["chunk_samples"] < 10 and tiny.info["chunks"] > 8
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    streamed = curves.pruning_curve(model, "conv5", order, dataset, backdoor)
    for other in (tiny, streamed):
        np.testing.assert_array_equal(other.predictions_clean, reference.predictions_clean)
        np.testing.assert_array_equal(other.predictions_backdoor, reference.predictions_backdoor)
        np.testing.assert_array_equal(other.clean_acc, reference.clean_acc)
    no_bd = curves.pruning_curve(
        model, "conv5", order, (x, y), backdoor, return_backdoor_predictions=False
    )
    assert no_bd.predictions_backdoor is None
    np.testing.assert_array_equal(no_bd.asr, reference.asr)


def test_curve_fields_and_json():
    model = models.build("mnist", preset="cpu", seed=0)
    _perturb(model, "conv2", seed=1)
    x, y = _data(model, 20, seed=2)
    curve = curves.pruning_curve(model, "conv2", [4, 9], (x, y))
    assert curve.pruned.tolist() == [-1, 4, 9]
    assert curve.steps == 2 and curve.channels == 32 and curve.already_pruned == 0
    assert np.isnan(curve.asr).all() and np.isnan(curve.robust_acc).all()
    assert curve.targeted is None and curve.predictions_backdoor is None
    summary = json.loads(json.dumps(curve.as_dict()))
    assert summary["asr"] == [None, None, None]
    assert summary["clean_acc"] == curve.clean_acc.tolist()
    empty = curves.pruning_curve(model, "conv2", [], (x, y))
    assert empty.steps == 0
    np.testing.assert_array_equal(empty.predictions_clean, curve.predictions_clean[:1])
    # float64 inputs and list labels are accepted (cast to the model's input dtype).
    again = curves.pruning_curve(
        model, "conv2", np.array([4, 9]), (x.astype(np.float64), y.tolist())
    )
    np.testing.assert_array_equal(again.predictions_clean, curve.predictions_clean)


def test_model_still_saves_and_copies(tmp_path):
    """The engine cache is not Keras state: saving and cloning are unaffected."""
    model = models.build("mnist", preset="cpu", seed=0)
    x, y = _data(model, 8, seed=0)
    first = curves.pruning_curve(model, "conv2", [1, 2], (x, y))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    copy = keras.models.clone_model(loaded)
    copy.set_weights(loaded.get_weights())
    for other in (loaded, copy):
        curve = curves.pruning_curve(other, "conv2", [1, 2], (x, y))
        np.testing.assert_array_equal(curve.predictions_clean, first.predictions_clean)


def test_engine_cache_neither_leaks_nor_goes_stale():
    """The engine is cached beside the model (weakly keyed), not on it: a dropped model frees
    its engine, and a cached engine follows later changes of weights and mask."""
    import gc
    import weakref

    from fineprune_tf.curves import engine

    model = models.build("mnist", preset="cpu", seed=0)
    _perturb(model, "conv2", seed=1)
    x, y = _data(model, 48, seed=2)
    _calibrate_classifier(model, x)
    order = list(np.random.default_rng(3).permutation(model.get_layer("conv2").channels))
    curves.pruning_curve(model, "conv2", order, (x, y))
    assert engine.cached_engines(model) == 1
    assert not any("engine" in name for name in vars(model))  # nothing stashed on the model
    # Stale? New weights and a new starting mask, same cached engine: still the naive loop's.
    _perturb(model, "conv2", seed=4)
    _calibrate_classifier(model, x)
    model.get_layer("conv2").prune(order[:2])
    _check(model, "conv2", order[2:], x, y)
    assert engine.cached_engines(model) == 1
    # Leak? The cache must not keep a dropped model (or its engine) alive.
    alive = weakref.ref(model)
    gc.collect()  # other tests' dropped models leave the cache first
    entries = len(engine._ENGINES)
    del model
    gc.collect()
    assert alive() is None
    assert len(engine._ENGINES) == entries - 1


def test_describe_costs():
    model = models.build("speech", preset="cpu", seed=0)
    info = curves.describe(model, "conv5")
    assert info.frontier == ("fc6",)
    assert info.prefix_flops + info.frontier_flops + info.rest_flops == pytest.approx(
        info.forward_flops
    )
    assert info.rest_flops < 0.05 * info.forward_flops
    assert info.bound_flops(10, 20) == pytest.approx(
        10 * (info.prefix_flops + info.frontier_flops) + 20 * info.rest_flops
    )


def test_errors():
    model = models.build("mnist", preset="cpu", seed=0)
    x, y = _data(model, 8, seed=0)
    layer = model.get_layer("conv2")
    layer.prune(5)
    before = layer.mask.copy()
    for fn in (curves.pruning_curve, curves.naive_pruning_curve):
        with pytest.raises(ValueError, match="no layer named 'conv9'"):
            fn(model, "conv9", [0], (x, y))
        with pytest.raises(ValueError, match="not a masked layer"):
            fn(model, "pool2", [0], (x, y))
        with pytest.raises(ValueError, match="not a masked layer"):
            fn(model, "fc2", [0], (x, y))
        with pytest.raises(ValueError, match="repeats channels"):
            fn(model, "conv2", [1, 2, 1], (x, y))
        with pytest.raises(ValueError, match="outside"):
            fn(model, "conv2", [0, 32], (x, y))
        with pytest.raises(ValueError, match="outside"):
            fn(model, "conv2", [-1], (x, y))
        with pytest.raises(ValueError, match="1-D"):
            fn(model, "conv2", [[0, 1]], (x, y))
        with pytest.raises(ValueError, match="8 inputs but y has 7 labels"):
            fn(model, "conv2", [0], (x, y[:7]))
        with pytest.raises(ValueError, match="backdoor x has 8 inputs but y_true has 3"):
            fn(model, "conv2", [0], (x, y), Backdoor(x, y[:3], y[:3], True))
        with pytest.raises(ValueError, match="targeted backdoor needs y_attacker"):
            fn(model, "conv2", [0], (x, y), Backdoor(x, y, None, True))
        with pytest.raises(ValueError, match="empty"):
            fn(model, "conv2", [0], (x[:0], y[:0]))
    np.testing.assert_array_equal(layer.mask, before)


def test_mask_restored_when_interrupted():
    model = models.build("mnist", preset="cpu", seed=0)
    x, y = _data(model, 8, seed=0)
    layer = model.get_layer("conv2")
    layer.prune([1, 2])
    before = layer.mask.copy()

    class Exploding:
        targeted = False
        y_attacker = None

        def __init__(self):
            self.x = np.zeros((8, 28, 28, 2), np.float32)  # wrong channel count
            self.y_true = y

    with pytest.raises(Exception):  # noqa: B017 - whichever error TF raises for the shape
        curves.pruning_curve(model, "conv2", [0, 3], (x, y), Exploding())
    np.testing.assert_array_equal(layer.mask, before)


def test_sequential_model():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            MaskedConv2D(6, 3, activation="relu", name="conv"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    _perturb(model, "conv", seed=0)
    x, y = _data(model, 24, seed=1)
    curve = _check(model, "conv", [3, 1, 5, 0], x, y)
    assert curve.info["mode"] == "incremental"
