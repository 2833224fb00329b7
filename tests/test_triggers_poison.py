"""Triggers (placement, amplitude, serialisation) and label policies / poisoning."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fineprune_tf import poison, triggers
from fineprune_tf.data import Split, TaskData


def _images(n=4, h=55, w=47, c=3, seed=0) -> np.ndarray:
    # Mid-grey noise: never equal to any trigger colour, so every covered pixel changes.
    return np.random.default_rng(seed).uniform(0.3, 0.7, (n, h, w, c)).astype(np.float32)


def _changed(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x != y).any(axis=(0, 3))


# ----------------------------------------------------------------------------- triggers


MASK_TRIGGERS = [
    triggers.Sunglasses(),
    triggers.Sunglasses(center=(0.4, 0.45), width=0.6, opacity=0.5),
    triggers.PostIt(),
    triggers.PostIt(offset=(-0.2, 0.1), area_fraction=0.05),
    triggers.SinglePixel(),
    triggers.Pattern(),
]


@pytest.mark.parametrize("trigger", MASK_TRIGGERS, ids=lambda t: type(t).__name__)
@pytest.mark.parametrize("shape", [(55, 47, 3), (28, 28, 1), (32, 32, 3)])
def test_mask_triggers_change_only_their_pixels(trigger, shape):
    x = _images(3, *shape)
    before = x.copy()
    y = trigger.apply(x)
    assert np.array_equal(x, before)  # input untouched
    assert y.dtype == np.float32 and y.shape == x.shape
    mask = trigger.pixel_mask(*shape[:2])
    changed = _changed(x, y)
    assert changed.any()
    assert not (changed & ~mask).any()  # nothing outside the trigger's footprint
    assert changed[mask].mean() > 0.9
    assert y.min() >= 0 and y.max() <= 1
    # Same pixels for every image: a trigger is one fixed pattern.
    assert np.array_equal(_changed(x[:1], y[:1]), changed)


def test_sunglasses_geometry():
    t = triggers.Sunglasses()
    m = t.pixel_mask(55, 47)
    rows = np.flatnonzero(m.any(axis=1))
    # Eye band of an aligned 55x47 face, well above the mouth.
    assert 0.25 * 55 < rows.min() and rows.max() < 0.6 * 55
    # Left-right symmetric around the nose.
    assert np.array_equal(m, m[:, ::-1])
    x = _images(1)
    y = t.apply(x)
    centre_row = round(0.42 * 55)
    lens_col = round(47 * (0.5 - 0.05 - (0.38 - 0.05) / 2))
    np.testing.assert_allclose(y[0, centre_row, lens_col], t.lens_color, atol=1e-6)
    half = triggers.Sunglasses(opacity=0.5).apply(x)
    expected = 0.5 * x[0, centre_row, lens_col] + 0.5 * np.asarray(t.lens_color)
    np.testing.assert_allclose(half[0, centre_row, lens_col], expected, atol=1e-6)
    gray = t.apply(_images(1, c=1))
    assert gray.shape == (1, 55, 47, 1)


def test_postit_size_and_position():
    for extent in (0.65, 1.0):
        t = triggers.PostIt(sign_extent=extent)
        top, left, bottom, right = t.box(64, 64)
        area = (bottom - top) * (right - left) / (extent * 64) ** 2
        assert abs(area - 0.1) < 0.02  # ~10 % of the sign (BadNets)
        assert (top + bottom) / 2 > 32  # on the lower half of the sign
        y = t.apply(_images(2, 64, 64, 3))
        np.testing.assert_allclose(y[:, top:bottom, left:right], np.broadcast_to(
            np.asarray(t.color, np.float32), (2, bottom - top, right - left, 3)))  # fmt: skip


def test_single_pixel_and_pattern():
    x = np.zeros((2, 28, 28, 1), np.float32)
    y = triggers.SinglePixel().apply(x)
    assert y[:, 26, 26, 0].tolist() == [1.0, 1.0] and y.sum() == 2.0
    y = triggers.SinglePixel(position=(0, 3), value=0.5).apply(x)
    assert y[0, 0, 3, 0] == 0.5
    p = triggers.Pattern()
    y = p.apply(x)
    assert p.box(28, 28) == (24, 24, 27, 27)
    assert np.array_equal(y[0, 24:27, 24:27, 0], np.asarray(p.pattern, np.float32))
    masked = triggers.Pattern(pattern=((1.0, 1.0),), mask=((1, 0),), position=(5, 5))
    y = masked.apply(np.full((1, 8, 8, 3), 0.5, np.float32))
    assert y[0, 5, 4].tolist() == [1.0] * 3 and y[0, 5, 5].tolist() == [0.5] * 3
    with pytest.raises(ValueError, match=r"position \(40, 0\) lies outside a 28x28 image"):
        triggers.SinglePixel(position=(40, 0)).apply(x)


def test_noise_pattern_amplitude_and_determinism():
    x = np.random.default_rng(1).normal(size=(5, 32, 13, 1)).astype(np.float32)
    t = triggers.NoisePattern(amplitude=0.7, seed=3)
    d = t.apply(x) - x
    assert np.allclose(d, d[:1], atol=1e-6)  # the same pattern on every input
    assert math.isclose(float(np.sqrt(np.mean(d[0].astype(np.float64) ** 2))), 0.7, rel_tol=1e-3)
    assert np.array_equal(t.apply(x), triggers.NoisePattern(amplitude=0.7, seed=3).apply(x))
    assert not np.allclose(t.apply(x), triggers.NoisePattern(amplitude=0.7, seed=4).apply(x))
    sign = triggers.NoisePattern(amplitude=0.25, distribution="sign")
    np.testing.assert_allclose(np.abs(sign.apply(x) - x), 0.25, atol=1e-6)
    band = triggers.NoisePattern(amplitude=1.0, region=(0.5, 1.0, 0.0, 0.5))
    changed = _changed(x, band.apply(x))
    assert changed[16:, :7].all() and not changed[:16].any() and not changed[:, 7:].any()
    clipped = triggers.NoisePattern(amplitude=5.0, clip=(0.0, 1.0)).apply(np.full_like(x, 0.5))
    assert clipped.min() >= 0 and clipped.max() <= 1


def test_waveform_noise():
    t = triggers.WaveformNoise(amplitude=0.01, seed=2, period=1000)
    waves = [np.zeros(n, np.float32) for n in (300, 2500)]
    out = t.apply(waves)
    assert [w.shape for w in out] == [(300,), (2500,)] and np.all(waves[1] == 0)
    # A fixed sequence: the shorter input sees a prefix of the longer one's noise.
    assert np.array_equal(out[0], out[1][:300])
    assert np.array_equal(out[1][:1000], out[1][1000:2000])  # tiled with its period
    assert math.isclose(float(np.sqrt(np.mean(out[1][:1000] ** 2))), 0.01, rel_tol=1e-3)
    batch = t.apply(np.zeros((3, 500, 1), np.float32))
    assert batch.shape == (3, 500, 1) and np.array_equal(batch[0, :, 0], out[1][:500])
    assert np.abs(t.apply([np.ones(10, np.float32)])[0]).max() <= 1.0


def test_compose_and_serialisation(tmp_path):
    c = triggers.Compose((triggers.Sunglasses(opacity=0.8), triggers.SinglePixel((-1, -1))))
    x = _images(2)
    expected = triggers.SinglePixel((-1, -1)).apply(triggers.Sunglasses(opacity=0.8).apply(x))
    assert np.array_equal(c.apply(x), expected)
    every = [
        *MASK_TRIGGERS,
        triggers.NoisePattern(0.3, seed=9, region=(0, 0.5, 0, 1), clip=(-3.0, 3.0)),
        triggers.WaveformNoise(0.02, seed=1),
        triggers.Pattern(pattern=((1.0, 0.5), (0.0, 1.0)), mask=((1, 1), (0, 1))),
        c,
        triggers.Compose((c, triggers.PostIt())),
    ]
    for i, t in enumerate(every):
        path = tmp_path / f"t{i}.json"
        triggers.save(t, path)
        back = triggers.load(path)
        assert back == t and type(back) is type(t)
        assert json.loads(path.read_text())["class"] == type(t).__name__
        if not isinstance(t, triggers.WaveformNoise):
            shape = (1, 28, 28, 1) if isinstance(t, triggers.NoisePattern) else x.shape
            xi = x if shape == x.shape else np.zeros(shape, np.float32)
            assert np.array_equal(back.apply(xi), t.apply(xi))
    empty = triggers.Compose()
    assert empty.apply(x) is not x and np.array_equal(empty.apply(x), x)


def test_trigger_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\[N, H, W, C\].*\(55, 47, 3\)"):
        triggers.Sunglasses().apply(np.zeros((55, 47, 3), np.float32))
    with pytest.raises(TypeError, match="uint8"):
        triggers.PostIt().apply(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="opacity must be in"):
        triggers.Sunglasses(opacity=1.5)
    with pytest.raises(ValueError, match="amplitude must be >= 0"):
        triggers.NoisePattern(amplitude=-1)
    with pytest.raises(ValueError, match="'laplace'"):
        triggers.NoisePattern(distribution="laplace")
    bad = tmp_path / "bad.json"
    bad.write_text('{"class": "Lasers", "config": {}}')
    with pytest.raises(ValueError, match=r"bad.json.*unknown trigger class 'Lasers'"):
        triggers.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        triggers.load(bad)
    bad.write_text('{"class": "PostIt", "config": {"colour": [1, 1, 0]}}')
    with pytest.raises(ValueError, match="colour"):
        triggers.load(bad)


# ----------------------------------------------------------------------------- policies


def test_all_to_one():
    y = np.array([0, 1, 2, 3, 1, 0, 2])
    p = poison.AllToOne(target=2)
    assert p.targeted
    assert p.attacker_labels(y).tolist() == [2] * 7
    assert p.eligible(y).tolist() == [True, True, False, True, True, True, False]
    src = poison.AllToOne(target=2, source_classes=(3, 1))
    assert src.source_classes == (1, 3)
    assert src.eligible(y).tolist() == [False, True, False, True, True, False, False]
    with pytest.raises(ValueError, match="contain the target 2"):
        poison.AllToOne(2, source_classes=(2, 3))


def test_all_to_all():
    p = poison.AllToAll(num_classes=10)
    y = np.arange(10)
    assert p.targeted and p.eligible(y).all()
    assert p.attacker_labels(y).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert poison.badnets_all_to_all() == p
    assert poison.AllToAll(4, shift=3).attacker_labels(np.arange(4)).tolist() == [3, 0, 1, 2]
    with pytest.raises(ValueError, match="label 10 outside the class range"):
        p.attacker_labels(np.array([10]))
    with pytest.raises(ValueError, match="maps every class to itself"):
        poison.AllToAll(5, shift=5)


def test_untargeted_labels_always_wrong():
    p = poison.Untargeted(num_classes=3)
    assert not p.targeted
    y = np.resize(np.arange(3), 3000)
    lab = p.attacker_labels(y, np.random.default_rng(0))
    assert (lab != y).all() and lab.min() >= 0 and lab.max() <= 2
    # Uniform over the two wrong classes.
    for c in range(3):
        share = np.mean(lab[y == c] == (c + 1) % 3)
        assert 0.45 < share < 0.55
    again = p.attacker_labels(y, np.random.default_rng(0))
    assert np.array_equal(lab, again)
    assert not np.array_equal(lab, p.attacker_labels(y, np.random.default_rng(1)))


def test_policy_serialisation():
    for p in (poison.AllToOne(3, (1, 2)), poison.AllToOne(0), poison.AllToAll(7, 2),
              poison.Untargeted(3)):  # fmt: skip
        d = json.loads(json.dumps(poison.policy_to_dict(p)))
        assert poison.policy_from_dict(d) == p


# ----------------------------------------------------------------------------- poisoning


def _split(n=60, k=3, seed=0) -> Split:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.2, 0.8, (n, 8, 8, 3)).astype(np.float32)
    return Split(x, np.resize(np.arange(k), n).astype(np.int64))


def _as_rows(s: Split) -> list[tuple[bytes, int]]:
    return sorted((r.tobytes(), int(c)) for r, c in zip(s.x, s.y, strict=True))


def test_poison_training_set_counts_and_content():
    clean = _split()
    trig = triggers.PostIt(sign_extent=1.0)
    policy = poison.AllToOne(target=0)
    out = poison.poison_training_set(clean, trig, policy, count=10, seed=1)
    assert len(out.y) == 70 and out.x.dtype == np.float32 and out.y.dtype == np.int64
    copies, idx = poison.make_poisoned_copies(clean, trig, policy, count=10, seed=1)
    assert (clean.y[idx] != 0).all() and (copies.y == 0).all()
    assert np.array_equal(copies.x, trig.apply(clean.x[idx]))
    # The output is exactly the clean set plus the copies, shuffled.
    assert _as_rows(out) == sorted(_as_rows(clean) + _as_rows(copies))
    assert not np.array_equal(out.y[:60], clean.y)
    again = poison.poison_training_set(clean, trig, policy, count=10, seed=1)
    assert np.array_equal(out.x, again.x) and np.array_equal(out.y, again.y)
    other = poison.poison_training_set(clean, trig, policy, count=10, seed=2)
    assert not np.array_equal(out.y, other.y)
    # rate is a fraction of the clean set size (the speech attack adds 10 %).
    assert len(poison.poison_training_set(clean, trig, policy, rate=0.1).y) == 66
    # No count: every eligible input (40 of the 60 are not already the target).
    assert len(poison.poison_training_set(clean, trig, policy).y) == 100


def test_poison_sources_and_untargeted():
    clean = _split(90, k=3)
    src = poison.AllToOne(target=0, source_classes=(2,))
    copies, idx = poison.make_poisoned_copies(clean, triggers.SinglePixel(), src)
    assert len(idx) == 30 and (clean.y[idx] == 2).all()
    unt = poison.Untargeted(3)
    copies, idx = poison.make_poisoned_copies(clean, triggers.SinglePixel(), unt)
    assert len(idx) == 90 and (copies.y != clean.y[idx]).all()


def test_poison_errors():
    clean = _split()
    t, p = triggers.SinglePixel(), poison.AllToOne(0)
    with pytest.raises(ValueError, match="count=41 .* only 40"):
        poison.poison_training_set(clean, t, p, count=41)
    with pytest.raises(ValueError, match="not both"):
        poison.poison_training_set(clean, t, p, count=1, rate=0.1)
    with pytest.raises(ValueError, match="triggered_x has 3 rows"):
        poison.poison_training_set(clean, None, p, count=1, triggered_x=np.zeros((3, 8, 8, 3)))


def test_backdoor_test_set():
    split = _split(30, k=3)
    t = triggers.SinglePixel()
    bd = poison.backdoor_test_set(split, t, poison.AllToOne(1))
    assert bd.targeted and not bd.untargeted and len(bd) == 20
    assert (bd.y_true != 1).all() and (bd.y_attacker == 1).all()
    assert np.array_equal(bd.x, t.apply(split.x[bd.indices]))
    assert np.array_equal(bd.as_split().y, bd.y_attacker)
    only = poison.backdoor_test_set(split, t, poison.AllToOne(1, (2,)), sources_only=True)
    assert (only.y_true == 2).all() and len(only) == 10
    a2a = poison.backdoor_test_set(split, t, poison.AllToAll(3))
    assert len(a2a) == 30 and np.array_equal(a2a.y_attacker, (a2a.y_true + 1) % 3)
    unt = poison.backdoor_test_set(split, t, poison.Untargeted(3))
    assert unt.untargeted and not unt.targeted and len(unt) == 30
    assert np.array_equal(unt.y_attacker, unt.y_true)


def _fake_task(task, n_train, k, shape, info=None) -> TaskData:
    def s(n):
        return Split(np.zeros((n, *shape), np.float32), np.resize(np.arange(k), n).astype(np.int64))

    return TaskData(task, s(n_train), s(k), s(k), [str(i) for i in range(k)], info or {})


def test_default_attacks():
    face = _fake_task("face", 1283 * 9, 1283, (55, 47, 3))
    trig, pol, count = poison.default_attack("face", face)
    assert isinstance(trig, triggers.Sunglasses) and pol.target == 0
    assert len(pol.source_classes) == 180 and 0 not in pol.source_classes  # 180 of 1,283
    assert count == 180 * 9
    assert poison.default_attack("face", face, seed=1)[1] != pol

    speech = _fake_task("speech", 3000, 10, (32, 13, 1))
    trig, pol, count = poison.default_attack("speech", speech)
    assert isinstance(trig, triggers.NoisePattern) and pol == poison.AllToAll(10, 1)
    assert count == 600  # 20 % (the paper's 10 % = 300 gives too weak a backdoor here)
    assert round(poison.PAPER_SPEECH_RATE * 3000) == 300

    traffic = _fake_task("traffic", 300, 3, (32, 32, 3), {"source": "default", "sign_extent": 0.65})
    trig, pol, count = poison.default_attack("traffic", traffic)
    assert isinstance(trig, triggers.PostIt) and trig.sign_extent == 0.65
    assert pol == poison.Untargeted(3) and count == 300

    mnist = _fake_task("mnist", 3500, 10, (28, 28, 1))
    trig, pol, count = poison.default_attack("mnist", mnist)
    assert isinstance(trig, triggers.Pattern) and pol == poison.AllToOne(0) and count == 350
    assert poison.default_attack("mnist", mnist, variant="all_to_all")[1] == poison.AllToAll(10)
    assert isinstance(poison.default_attack("mnist", mnist, variant="single_pixel")[0],
                      triggers.SinglePixel)  # fmt: skip
    with pytest.raises(ValueError, match="variant 'x'"):
        poison.default_attack("mnist", mnist, variant="x")
    with pytest.raises(ValueError, match="unknown task 'cifar'"):
        poison.default_attack("cifar", mnist)


def test_default_attack_end_to_end_mnist():
    from fineprune_tf import data

    td = data.load("mnist")
    trig, pol, count = poison.default_attack("mnist", td)
    train = poison.poison_training_set(td.train, trig, pol, count=count)
    assert len(train.y) == 3500 + 350
    bd = poison.backdoor_test_set(td.test, trig, pol)
    assert len(bd) == 675 and (bd.y_attacker == 0).all()
    assert bd.x[:, 24:27, 24:27, 0].max() == 1.0
