"""ANP, RNP, CLP and FMP act on every masked layer kind (depthwise and separable included) and
prune whole dependency groups, so shrink removes exactly what they pruned; on the paper's task
networks (single-layer groups) they prune what the per-layer rules prune."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

import fineprune_tf as fp
from fineprune_tf import defenses, export, models
from fineprune_tf.defenses import coupling
from fineprune_tf.defenses.clp import clp_prune_sets
from fineprune_tf.defenses.fmp import fmp_ranking
from fineprune_tf.layers import masked_layers

PLANTED_INPUT, PLANTED_K = 5, 1  # depthwise output channel 5 * 2 + 1 = 11


def depthwise_model(plant: str | None) -> keras.Model:
    """16-channel expansion conv -> depthwise 3x3 (depth_multiplier 2) [-> BN] -> ReLU -> 1x1
    projection -> classifier, converted.  ``plant="kernel"``: depthwise output channel 11 gets
    a 10x larger kernel; ``plant="batchnorm"``: a BN after the depthwise (fused by convert)
    gives it a 10x larger gamma."""
    rng = np.random.default_rng(0)
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(16, 1, activation="relu", name="expand")(inputs)
    depthwise = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")
    x = depthwise(x)
    if plant == "batchnorm":
        x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.ReLU(name="dw_relu")(x)
    x = keras.layers.Conv2D(6, 1, activation="relu", name="project")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="probs")(x)
    model = keras.Model(inputs, outputs)
    kernel = rng.normal(0.5, 0.05, (3, 3, 16, 2)).astype(np.float32)  # similar norms
    if plant == "kernel":
        kernel[:, :, PLANTED_INPUT, PLANTED_K] *= 10.0
    depthwise.kernel.assign(kernel)
    if plant == "batchnorm":
        gamma = np.ones(32, np.float32)
        gamma[PLANTED_INPUT * 2 + PLANTED_K] = 10.0
        model.get_layer("dw_bn").gamma.assign(gamma)
    return fp.convert(model)


@pytest.mark.parametrize("plant", ["kernel", "batchnorm"])
def test_clp_finds_a_planted_outlier_depthwise_channel_and_prunes_its_group(plant):
    model = depthwise_model(plant)
    planted = PLANTED_INPUT * 2 + PLANTED_K
    bounds = defenses.channel_lipschitz(model)
    assert set(bounds) == {"expand", "dw", "project"}
    kernel = keras.ops.convert_to_numpy(model.get_layer("dw").kernel)
    expected = np.linalg.norm(kernel[:, :, PLANTED_INPUT, PLANTED_K])
    if plant == "batchnorm":
        bn = model.get_layer("dw").batch_normalization
        expected *= 10.0 / np.sqrt(float(bn.moving_variance[planted]) + bn.epsilon)
    assert bounds["dw"][planted] == pytest.approx(expected, rel=1e-5)
    assert int(np.argmax(bounds["dw"])) == planted
    result = defenses.clp(model, u=3.0)
    # The outlier's coupled channel: both depthwise outputs of input 5 and its producer.
    assert result.details["pruned"] == {"expand": [PLANTED_INPUT], "dw": [10, 11], "project": []}
    shrunk = export.shrink(result.model)
    assert shrunk.get_layer("expand").output.shape[-1] == 15
    assert shrunk.get_layer("dw").output.shape[-1] == 30


def test_pruning_units_of_a_network_without_coupling_are_its_layers():
    model = models.build("face", preset="cpu", seed=0)
    names = [layer.name for layer in masked_layers(model)]
    units = coupling.pruning_units(model, names)
    assert [list(u.members) for u in units] == [[name] for name in names]
    for unit, name in zip(units, names, strict=True):
        np.testing.assert_array_equal(
            unit.members[name][:, 0], np.arange(model.get_layer(name).channels)
        )
        assert defenses.pruning.coupled_group(model, name) is None  # pruned on its own


def test_a_separable_channel_is_bounded_by_its_composed_kernel():
    rng = np.random.default_rng(1)
    inputs = keras.Input((7, 7, 3))
    separable = keras.layers.SeparableConv2D(5, 3, depth_multiplier=2, padding="same")
    model = fp.convert(keras.Model(inputs, separable(inputs)))
    layer = masked_layers(model)[0]
    depthwise = keras.ops.convert_to_numpy(layer.depthwise_kernel)
    pointwise = keras.ops.convert_to_numpy(layer.pointwise_kernel)[0, 0]  # [3 * 2, 5]
    composed = np.einsum("hwck,ckf->hwcf", depthwise, pointwise.reshape(3, 2, 5))
    plain = keras.layers.Conv2D(5, 3, padding="same", use_bias=False)
    plain_model = keras.Model(inputs, plain(inputs))
    plain.kernel.assign(composed)
    x = rng.standard_normal((2, 7, 7, 3)).astype(np.float32)
    layer.bias.assign(np.zeros(5, np.float32))
    np.testing.assert_allclose(model(x), plain_model(x), atol=1e-5)  # the composition is exact
    expected = [
        np.linalg.svd(composed[..., f].reshape(9, 3).T, compute_uv=False)[0] for f in range(5)
    ]
    np.testing.assert_allclose(defenses.channel_lipschitz(model)[layer.name], expected, rtol=1e-6)


def _residual_model() -> keras.Model:
    """A stem, a residual block added onto it, a depthwise conv (+BN) on the sum, a projection:
    dependency groups {stem, b, dw} (8 coupled channels, 2 depthwise outputs each), {a},
    {project}.  Converted."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((10, 10, 3))
    stem = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    a = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="a")(stem)
    b = keras.layers.Conv2D(8, 3, padding="same", name="b")(a)
    b = keras.layers.BatchNormalization(name="b_bn")(b)
    x = keras.layers.ReLU(name="relu")(keras.layers.Add(name="add")([stem, b]))
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.ReLU(name="dw_relu")(x)
    x = keras.layers.Conv2D(6, 1, activation="relu", name="project")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="probs")(x)
    return fp.convert(keras.Model(inputs, outputs))


def _residual_data(n: int = 160, seed: int = 5):
    """Inputs whose label is the brightest of the 3 input channels."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, 10, 10, 3)) * rng.uniform(0.2, 1.0, (n, 1, 1, 3))
    return x.astype(np.float32), np.argmax(x.mean(axis=(1, 2)), axis=-1)


@pytest.fixture(scope="module")
def residual():
    """The residual model trained briefly on its task, and the defender's clean data."""
    model = _residual_model()
    x, y = _residual_data()
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=15, batch_size=32, verbose=0)
    return model, (x, y)


def assert_group_consistent_and_shrinkable(model: keras.Model) -> int:
    """Every coupled channel is pruned in all its members or in none, and shrink removes
    exactly the pruned channels of every removable group.  Returns the coupled channels
    pruned."""
    pruned_rows, widths = 0, {}
    for group in fp.graph.channel_groups(model):
        masks = {name: model.get_layer(name).mask for name in group.members}
        all_zero = np.stack([(masks[n][r] == 0).all(axis=1) for n, r in group.members.items()])
        any_zero = np.stack([(masks[n][r] == 0).any(axis=1) for n, r in group.members.items()])
        whole = all_zero.all(axis=0)
        np.testing.assert_array_equal(any_zero.any(axis=0), whole, err_msg=str(group.members))
        pruned_rows += int(whole.sum())
        if group.removable:
            # A layer with every channel pruned keeps one zero channel (shrink's plan: a
            # zero-width tensor would break most layers).
            widths.update({n: max(1, int((masks[n] != 0).sum())) for n in masks})
    shrunk = export.shrink(model)
    for name, width in widths.items():
        assert shrunk.get_layer(name).output.shape[-1] == width, name
    return pruned_rows


RESIDUAL_DEFENSES = {
    "clp": lambda model, data: defenses.clp(model, u=0.5),
    # A tolerance of 99 points lets the holdout rule prune up to half of the coupled channels:
    # what is checked here is how they are pruned, not how many.
    "anp": lambda model, data: defenses.anp(
        model, data, iterations=20, batch_size=32, tolerance=99.0
    ),
    "rnp": lambda model, data: defenses.rnp(
        model, data, unlearning_epochs=2, recovering_epochs=3, batch_size=32, tolerance=99.0
    ),
    "fmp": lambda model, data: defenses.fmp(
        model,
        data,
        prune_fraction=0.3,
        probe_samples=8,
        settings=defenses.FineTuneSettings(learning_rate=1e-3, max_epochs=1),
    ),
}


@pytest.mark.parametrize("name", list(RESIDUAL_DEFENSES))
def test_each_defense_prunes_whole_groups_of_a_residual_model_and_shrink_removes_them(
    name, residual
):
    model, data = residual
    groups = fp.graph.channel_groups(model)
    assert [sorted(g.members) for g in groups] == [["b", "dw", "stem"], ["a"], ["project"]]
    assert all(g.removable for g in groups)
    result = RESIDUAL_DEFENSES[name](model, data)
    scored = {"clp": "uclc", "anp": "mask_values", "rnp": "mask_values", "fmp": "sensitivity"}
    scored = scored[name]
    assert set(result.details[scored]) == {"stem", "a", "b", "dw", "project"}  # dw scored too
    assert set(result.details["pruned"]) == {"stem", "a", "b", "dw", "project"}
    rows = assert_group_consistent_and_shrinkable(result.model)
    assert rows > 0
    stem_rows = result.model.get_layer("stem").pruned_channels
    np.testing.assert_array_equal(result.model.get_layer("b").pruned_channels, stem_rows)
    np.testing.assert_array_equal(
        result.model.get_layer("dw").pruned_channels,
        np.sort(np.concatenate([2 * stem_rows, 2 * stem_rows + 1])),
    )


def test_the_pruning_defense_prunes_a_coupled_layer_with_its_group(residual):
    model, (x, y) = residual
    assert np.mean(np.argmax(model.predict(x, verbose=0), axis=-1) == y) > 0.6
    result = defenses.prune(model, (x, y), layer_name="b", threshold=30.0)
    details = result.details
    assert details["coupled_layers"] == ["stem", "dw"] and details["pruned_count"] > 0
    pruned = sorted(details["pruned"])
    np.testing.assert_array_equal(result.model.get_layer("stem").pruned_channels, pruned)
    assert assert_group_consistent_and_shrinkable(result.model) == len(pruned)
    # The curve pruned whole coupled channels: replaying it on the model reproduces its end.
    replay = defenses.clone(model)
    defenses.pruning.prune_coupled(replay, "b", details["pruned"])
    accuracy = float(np.mean(np.argmax(replay.predict(x, verbose=0), axis=-1) == y))
    assert accuracy == pytest.approx(result.outcome.curve["clean_acc"][len(pruned)])
    # Ranked by the members' mean activation (the group mean).
    means = np.asarray(details["mean_activation"])
    assert np.all(np.diff(means[details["order"]]) >= 0)


def _lowest_masks_per_layer(mask_values: dict[str, list[float]], count: int) -> dict:
    """The per-layer rule the task networks had before groups: the ``count`` neurons of lowest
    mask over the whole network, ties by layer order then channel."""
    flat = sorted(
        (value, position, channel)
        for position, values in enumerate(mask_values.values())
        for channel, value in enumerate(values)
    )
    names = list(mask_values)
    pruned = {name: [] for name in names}
    for _, position, channel in flat[:count]:
        pruned[names[position]].append(channel)
    return {name: sorted(channels) for name, channels in pruned.items()}


@pytest.fixture(scope="module")
def face_task():
    model = models.build("face", preset="cpu", seed=0)
    x = np.random.default_rng(2).uniform(0, 1, (120, *model.input_shape[1:])).astype(np.float32)
    return model, (x, np.argmax(model.predict(x, verbose=0), axis=-1))


def test_clp_on_a_task_network_is_the_per_layer_rule(face_task):
    model, _ = face_task
    result = defenses.clp(model, u=1.0)
    bounds = {name: np.asarray(values) for name, values in result.details["uclc"].items()}
    assert result.details["pruned_count"] > 0
    assert result.details["pruned"] == clp_prune_sets(bounds, 1.0)


@pytest.mark.parametrize("name", ["anp", "rnp"])
def test_anp_and_rnp_on_a_task_network_prune_the_lowest_masks_per_layer(face_task, name):
    model, data = face_task
    if name == "anp":
        result = defenses.anp(model, data, iterations=10, batch_size=32, tolerance=99.0)
    else:
        result = defenses.rnp(
            model, data, unlearning_epochs=2, recovering_epochs=2, batch_size=32, tolerance=99.0
        )
    count = result.details["pruned_count"]
    assert count > 0 and result.details["pruned_groups"] == count
    expected = _lowest_masks_per_layer(result.details["mask_values"], count)
    assert result.details["pruned"] == expected


def test_fmp_on_a_task_network_is_the_per_layer_rule(face_task):
    model, data = face_task
    settings = defenses.FineTuneSettings(learning_rate=1e-3, max_epochs=1)
    result = defenses.fmp(model, data, prune_fraction=0.2, probe_samples=4, settings=settings)
    assert set(result.details["pruned"]) == set(result.details["sensitivity"])
    for name, channels in result.details["pruned"].items():
        sensitivity = result.details["sensitivity"][name]
        ranked = fmp_ranking(np.array(sensitivity["score"]), np.array(sensitivity["deviation"]))
        count = math.ceil(0.2 * len(ranked) - 1e-9)
        assert channels == ranked[:count].tolist()
