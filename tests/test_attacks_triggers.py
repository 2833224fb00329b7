"""The field's triggers (Blended, SIG, WaNet), the clean-label policy and the attack registry:
transforms on known inputs, JSON round trips, determinism, SIG's clean-label property and
WaNet's small, smooth, invertible warp with its noise mode."""

from __future__ import annotations

import numpy as np
import pytest

from fineprune_tf import attack_zoo, poison, triggers
from fineprune_tf.data import Split, TaskData
from fineprune_tf.triggers import warp

NEW_TRIGGERS = [
    triggers.Blended(),
    triggers.Blended(alpha=0.3, seed=4, pattern_range=(-2.0, 2.0), clip=None),
    triggers.SIG(),
    triggers.SIG(delta=1.0, frequency=4.0, axis="rows", clip=None),
    triggers.WaNet(),
    triggers.WaNet(k=6, s=0.75, grid_rescale=0.98, cross_ratio=1.0, seed=9),
]


def _images(n=3, h=28, w=28, c=1, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 0.8, (n, h, w, c)).astype(np.float32)


@pytest.mark.parametrize("trigger", NEW_TRIGGERS, ids=lambda t: type(t).__name__)
def test_json_round_trip_and_determinism(trigger, tmp_path):
    path = tmp_path / "trigger.json"
    triggers.save(trigger, path)
    loaded = triggers.load(path)
    assert loaded == trigger
    x = _images(h=32, w=13)
    np.testing.assert_array_equal(loaded.apply(x), trigger.apply(x))
    np.testing.assert_array_equal(trigger.apply(x), trigger.apply(x))
    assert x.min() >= 0.2  # the input is never modified
    assert trigger.apply(x).dtype == np.float32 and trigger.apply(x).shape == x.shape


def test_blended_is_the_alpha_blend_of_a_fixed_seeded_key():
    x = np.full((2, 6, 5, 3), 0.5, np.float32)
    blended = triggers.Blended(alpha=0.2, seed=1)
    key = blended.key((6, 5, 3))
    assert key.min() >= 0.0 and key.max() <= 1.0 and key.std() > 0.2
    np.testing.assert_allclose(
        blended.apply(x), np.broadcast_to(0.4 + 0.2 * key, x.shape), atol=1e-6
    )
    np.testing.assert_allclose(
        triggers.Blended(alpha=1.0).apply(x)[0], triggers.Blended().key((6, 5, 3)), atol=1e-7
    )
    np.testing.assert_array_equal(triggers.Blended(alpha=0.0).apply(x), x)
    assert not np.array_equal(blended.key((6, 5, 3)), triggers.Blended(seed=2).key((6, 5, 3)))
    with pytest.raises(ValueError, match="alpha"):
        triggers.Blended(alpha=1.5)


def test_sig_adds_the_horizontal_sinusoid_and_clips():
    x = np.full((1, 2, 12, 1), 0.5, np.float32)
    # delta sin(2 pi j f / m) with m = 12, f = 3: 0, +d, 0, -d, ... (a quarter period a column)
    signal = triggers.SIG(delta=0.5, frequency=3.0, clip=None).apply(x)[0, 0, :, 0]
    np.testing.assert_allclose(signal, 0.5 + 0.5 * np.array([0, 1, 0, -1] * 3), atol=1e-6)
    clipped = triggers.SIG(delta=0.75, frequency=3.0).apply(x)[0, 1, :4, 0]
    np.testing.assert_allclose(clipped, [0.5, 1.0, 0.5, 0.0], atol=1e-6)
    rows = triggers.SIG(delta=0.5, frequency=3.0, axis="rows", clip=None).apply(
        np.zeros((1, 12, 2, 1), np.float32)
    )
    np.testing.assert_allclose(rows[0, :4, 1, 0], [0, 0.5, 0, -0.5], atol=1e-6)
    with pytest.raises(ValueError, match="axis"):
        triggers.SIG(axis="diagonal")


def _task(n=400, classes=4, seed=0) -> TaskData:
    rng = np.random.default_rng(seed)

    def split(k):
        return Split(_images(k, 16, 16, 1, seed + k), rng.integers(0, classes, k))

    return TaskData("mnist", split(n), split(100), split(100), [str(i) for i in range(classes)])


def test_sig_is_clean_label_it_poisons_only_the_target_class_keeping_labels():
    task = _task()
    sig, policy = triggers.SIG(), poison.CleanLabel(target=2)
    poisoned = poison.poison_training_set(task.train, sig, policy, count=40, seed=0)
    # Clean-label poison replaces its originals: same size, same labels, 40 of class 2 signed.
    assert len(poisoned.y) == len(task.train.y)
    np.testing.assert_array_equal(np.sort(poisoned.y), np.sort(task.train.y))
    signed = sig.apply(task.train.x)
    is_signed = np.array(
        [np.any(np.all(np.isclose(signed, row), axis=(1, 2, 3))) for row in poisoned.x]
    )
    assert is_signed.sum() == 40 and np.all(poisoned.y[is_signed] == 2)
    with pytest.raises(ValueError, match="eligible"):
        poison.poison_training_set(
            task.train, sig, policy, count=int((task.train.y == 2).sum()) + 1
        )
    # At test time every *other* class is triggered towards the target.
    backdoor = poison.backdoor_test_set(task.test, sig, policy)
    assert np.all(backdoor.y_true != 2) and np.all(backdoor.y_attacker == 2)
    assert poison.policy_from_dict(poison.policy_to_dict(policy)) == policy


def test_cubic_kernel_matches_pytorchs_a_minus_three_quarters():
    np.testing.assert_allclose(warp._cubic_weights(np.array(0.0)), [0, 1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(
        warp._cubic_weights(np.array(0.5)), [-0.09375, 0.59375, 0.59375, -0.09375], atol=1e-12
    )
    matrix = warp.bicubic_matrix(4, 10)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)
    # align_corners: every third output of 10 sits on one of the 4 control points.
    np.testing.assert_allclose(matrix[::3], np.eye(4), atol=1e-12)


def test_wanet_field_passes_through_its_normalised_control_grid():
    wanet = triggers.WaNet(seed=3)
    control = wanet.control_grid()
    assert control.shape == (2, 4, 4)
    np.testing.assert_allclose(np.mean(np.abs(control)), 1.0, atol=1e-12)
    field = wanet.field(10, 10)  # (10 - 1) / (4 - 1) = 3: nodes land on pixels
    np.testing.assert_allclose(field[::3, ::3, 0], control[0], atol=1e-12)
    np.testing.assert_allclose(field[::3, ::3, 1], control[1], atol=1e-12)


def test_bilinear_sampling_identity_and_one_pixel_shift_with_zero_padding():
    x = _images(2, 6, 5, 2)
    rows = np.linspace(-1, 1, 6)[:, None] * np.ones((1, 5))
    cols = np.ones((6, 1)) * np.linspace(-1, 1, 5)[None, :]
    identity = np.stack([cols, rows], -1)
    np.testing.assert_allclose(warp._bilinear(x, identity), x, atol=1e-6)
    shifted = identity.copy()
    shifted[..., 0] += 2 / (5 - 1)  # one pixel to the right
    out = warp._bilinear(x, shifted)
    np.testing.assert_allclose(out[:, :, :-1], x[:, :, 1:], atol=1e-6)
    np.testing.assert_allclose(out[:, :, -1], 0.0, atol=1e-6)


@pytest.mark.parametrize("shape", [(28, 28), (32, 32), (55, 47), (32, 13)])
def test_wanet_warp_is_a_small_smooth_bijection(shape):
    h, w = shape
    wanet = triggers.WaNet()
    disp = wanet.displacement_pixels(h, w)
    field = wanet.field(h, w)
    # |d| = s |field| (size - 1) / (2 size) pixels: about s / 2 = 0.25 px on average, and
    # bounded by the control grid times the cubic kernel's overshoot (1.375 per axis).
    bound = wanet.s * 1.375**2 * np.abs(wanet.control_grid()).max() / 2
    assert np.abs(disp).max() <= min(bound, wanet.s * np.abs(field).max() / 2) + 1e-9
    assert 0.1 < np.abs(disp).mean() < 0.5
    # The warp p -> p + d(p) has a Jacobian close to the identity (no fold): a bijection.
    d_rows = np.gradient(disp, axis=0)
    d_cols = np.gradient(disp, axis=1)
    det = (1 + d_cols[..., 0]) * (1 + d_rows[..., 1]) - d_rows[..., 0] * d_cols[..., 1]
    assert det.min() > 0.5 and max(np.abs(d_rows).max(), np.abs(d_cols).max()) < 0.5
    # It moves pixels of a textured image (it is a trigger) but changes them only a little.
    x = _images(2, h, w, 1)
    out = wanet.apply(x)
    assert 0.0 < np.abs(out - x)[:, 2:-2, 2:-2].mean() < 0.15


def test_wanet_noise_mode_differs_from_the_trigger_and_keeps_true_labels():
    wanet = triggers.WaNet()
    x = _images(4, 28, 28, 1)
    warped = wanet.apply(x)
    first = wanet.apply_noise(x, np.random.default_rng(0))
    again = wanet.apply_noise(x, np.random.default_rng(0))
    other = wanet.apply_noise(x, np.random.default_rng(1))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - warped).mean() > 1e-3 and np.abs(first - other).mean() > 1e-3
    task = _task()
    extras_x, extras_y = wanet.training_extras(
        task.train.x, task.train.y, 10, np.random.default_rng(0)
    )
    assert extras_x.shape == (20, 16, 16, 1) and extras_y.shape == (20,)
    poisoned = poison.poison_training_set(task.train, wanet, poison.AllToOne(0), count=10)
    assert len(poisoned.y) == len(task.train.y) + 10 + 20  # poison plus cross_ratio x noise


def test_attack_registry_makes_every_attack_and_round_trips(tmp_path):
    task = _task(n=400, classes=10)
    for name in attack_zoo.NAMES:
        poisoning = attack_zoo.make(name, task, poison_rate=0.05, seed=1)
        assert poisoning.name == name and poisoning.count == 20
        assert attack_zoo.from_dict(poisoning.to_dict()) == poisoning
    sig = attack_zoo.make("sig", task, poison_rate=0.5)
    assert sig.count == int((task.train.y == 0).sum()) and sig.effective_rate < 0.5
    with pytest.raises(ValueError, match="unknown attack"):
        attack_zoo.make("trojannn", task)
    with pytest.raises(ValueError, match="poison_rate"):
        attack_zoo.make("blended", task, poison_rate=0.0)
