"""Writers of tiny on-disk data sets in each real layout the loaders accept.

Every writer is deterministic (seeded) and returns the folder to pass as ``data_dir``.
Images carry a class-dependent pattern plus noise, so the files are distinct and a loader
that mixes up labels or splits gets caught by the tests.
"""

from __future__ import annotations

import csv
import gzip
import pathlib

import numpy as np
from PIL import Image
from scipy.io import wavfile


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _gray(rng: np.random.Generator, cls: int, height: int, width: int) -> np.ndarray:
    """uint8 ``[H, W]``: class-dependent stripes plus noise."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = 128 + 60 * np.sin(2 * np.pi * (cls + 1) * (xx + 2 * yy) / (width + height))
    return np.clip(base + rng.normal(0, 20, (height, width)), 0, 255).astype(np.uint8)


def write_orl_tree(
    root: pathlib.Path, identities: int = 4, images: int = 10, seed: int = 0
) -> pathlib.Path:
    """``root/s{1..identities}/{1..images}.pgm``, 92x112 8-bit gray like AT&T/ORL."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(1, identities + 1):
        d = root / f"s{k}"
        d.mkdir(exist_ok=True)
        for n in range(1, images + 1):
            Image.fromarray(_gray(_rng(seed, k, n), k, 112, 92), "L").save(d / f"{n}.pgm")
    return root


def write_youtube_faces_tree(
    root: pathlib.Path, people: dict[str, tuple[int, int]] | None = None, seed: int = 0
) -> pathlib.Path:
    """``root/<person>/<video>/<frame>.jpg``; ``people`` maps name -> (videos, frames each).

    Frame sizes vary between videos (as in the real set), which the loader must resize.
    """
    people = people or {"Alice": (2, 6), "Bob": (3, 4), "Carol": (1, 12), "Dan": (1, 5)}
    for p_idx, (person, (videos, frames)) in enumerate(sorted(people.items())):
        for v in range(videos):
            d = root / person / str(v)
            d.mkdir(parents=True, exist_ok=True)
            size = 60 + 10 * v
            for f in range(frames):
                rng = _rng(seed, p_idx, v, f)
                rgb = np.stack([_gray(rng, p_idx + c, size, size) for c in range(3)], -1)
                Image.fromarray(rgb, "RGB").save(d / f"aligned_detect_{v}.{f}.jpg", quality=95)
    return root


def write_fsdd(
    root: pathlib.Path,
    speakers: tuple[str, ...] = ("jackson", "nicolas", "theo"),
    per_speaker: int = 2,
    rate: int = 8000,
    seed: int = 0,
) -> pathlib.Path:
    """FSDD-style ``{digit}_{speaker}_{index}.wav`` int16 files: a digit-dependent chirp."""
    root.mkdir(parents=True, exist_ok=True)
    for digit in range(10):
        for s_idx, speaker in enumerate(speakers):
            for n in range(per_speaker):
                rng = _rng(seed, digit, s_idx, n)
                length = int(rate * rng.uniform(0.25, 0.6))
                t = np.arange(length) / rate
                f0 = 300 + 150 * digit
                wav = 0.5 * np.sin(2 * np.pi * (f0 + 200 * t) * t) + rng.normal(0, 0.02, length)
                wav = (np.clip(wav, -1, 1) * 32767).astype(np.int16)
                wavfile.write(root / f"{digit}_{speaker}_{n}.wav", rate, wav)
    return root


def write_spectrogram_pngs(
    root: pathlib.Path,
    classes: int = 3,
    per_class: int = 6,
    size: tuple[int, int] = (24, 20),
    split_column: bool = False,
    class_names: list[str] | None = None,
    seed: int = 0,
) -> pathlib.Path:
    """``root/img/<c>_<i>.png`` gray PNGs, ``labels.txt`` and optionally ``classes.txt``.

    With ``class_names`` labels are written as names and ``classes.txt`` lists them.
    With ``split_column`` every line ends in train/validation/test (4/1/1 per class).
    """
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = ["# file label [split]"]
    for c in range(classes):
        for i in range(per_class):
            name = f"img/{c}_{i}.png"
            Image.fromarray(_gray(_rng(seed, c, i), c, *size), "L").save(root / name)
            label = class_names[c] if class_names else str(c)
            line = f"{name} {label}"
            if split_column:
                line += " " + ("test" if i == 0 else "validation" if i == 1 else "train")
            lines.append(line)
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    if class_names:
        (root / "classes.txt").write_text("\n".join(class_names) + "\n")
    return root


GTSRB_HEADER = ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]


def _ppm_with_roi(rng: np.random.Generator, cls: int, path: pathlib.Path) -> list:
    w, h = int(rng.integers(30, 50)), int(rng.integers(30, 50))
    rgb = np.stack([_gray(rng, cls + c, h, w) for c in range(3)], -1)
    Image.fromarray(rgb, "RGB").save(path)  # .ppm suffix -> binary P6
    x1, y1 = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    return [path.name, w, h, x1, y1, w - 1 - int(rng.integers(2, 6)), h - 1 - 3, cls]


def write_gtsrb_tree(
    root: pathlib.Path,
    classes: tuple[int, ...] = (14, 1, 5, 11, 25, 40),
    tracks: int = 5,
    frames: int = 2,
    official_test: bool = False,
    seed: int = 0,
) -> pathlib.Path:
    """``root/Final_Training/Images/<5-digit class>/GT-<class>.csv`` + ``<track>_<frame>.ppm``.

    Defaults cover all three super-classes and one class (40, roundabout) that is dropped.
    ``official_test`` also writes ``Final_Test/Images`` with ``GT-final_test.csv``.
    """
    images = root / "Final_Training" / "Images"
    for cls in classes:
        d = images / f"{cls:05d}"
        d.mkdir(parents=True, exist_ok=True)
        rows = []
        for t in range(tracks):
            for f in range(frames):
                path = d / f"{t:05d}_{f:05d}.ppm"
                rows.append(_ppm_with_roi(_rng(seed, cls, t, f), cls, path))
        with open(d / f"GT-{cls:05d}.csv", "w", newline="") as fh:
            w = csv.writer(fh, delimiter=";")
            w.writerow(GTSRB_HEADER)
            w.writerows(rows)
    if official_test:
        d = root / "Final_Test" / "Images"
        d.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, cls in enumerate(classes * 2):
            rows.append(_ppm_with_roi(_rng(seed, 999, i), cls, d / f"{i:05d}.ppm"))
        with open(d / "GT-final_test.csv", "w", newline="") as fh:
            w = csv.writer(fh, delimiter=";")
            w.writerow(GTSRB_HEADER)
            w.writerows(rows)
    return root


LISA_HEADER = [
    "Filename",
    "Annotation tag",
    "Upper left corner X",
    "Upper left corner Y",
    "Lower right corner X",
    "Lower right corner Y",
    "Occluded,On another road",
    "Origin file",
    "Origin frame number",
    "Origin track",
    "Origin track frame number",
]

LISA_TAGS = ("stop", "speedLimit25", "speedLimit35", "pedestrianCrossing", "signalAhead",
             "yield", "doNotEnter")  # fmt: skip


def write_lisa(
    root: pathlib.Path, tracks_per_tag: int = 5, frames: int = 2, seed: int = 0
) -> pathlib.Path:
    """``root/allAnnotations.csv`` + ``root/vid<k>/frame_<n>.png`` (two boxes per frame).

    Tags include ``yield`` and ``doNotEnter``, which the default mapping drops.
    """
    rows = []
    for t_idx, tag in enumerate(LISA_TAGS):
        for track in range(tracks_per_tag):
            for f in range(frames):
                rng = _rng(seed, t_idx, track, f)
                rel = pathlib.Path(f"vid{t_idx}") / f"frame_{track}_{f}.png"
                (root / rel.parent).mkdir(parents=True, exist_ok=True)
                w, h = 80, 60
                rgb = np.stack([_gray(rng, t_idx + c, h, w) for c in range(3)], -1)
                Image.fromarray(rgb, "RGB").save(root / rel)
                for box_i in range(2):  # a second box in the same frame (same sign type)
                    x1 = int(rng.integers(0, 30)) + 40 * box_i
                    y1 = int(rng.integers(0, 20))
                    x2 = min(w - 1, x1 + int(rng.integers(12, 30)))
                    y2 = y1 + int(rng.integers(12, 30))
                    rows.append([rel.as_posix(), tag, x1, y1, x2, y2, "0,0",
                                 f"vid{t_idx}.avi", f, f"{tag}_{track}.avi", f])  # fmt: skip
    with open(root / "allAnnotations.csv", "w", newline="") as fh:
        w = csv.writer(fh, delimiter=";")
        w.writerow(LISA_HEADER)
        w.writerows(rows)
    return root


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist_idx(
    root: pathlib.Path, n_train: int = 120, n_test: int = 30, gz: bool = True, seed: int = 0
) -> pathlib.Path:
    """The four MNIST idx files (``.gz`` or raw) with 28x28 class-patterned digits."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.resize(np.arange(10), n).astype(np.uint8)
        images = np.stack([_gray(_rng(seed, n, i), int(c), 28, 28) for i, c in enumerate(labels)])
        files = {
            f"{prefix}-images-idx3-ubyte": _idx_bytes(images, 2051),
            f"{prefix}-labels-idx1-ubyte": _idx_bytes(labels, 2049),
        }
        for name, payload in files.items():
            if gz:
                with gzip.open(root / f"{name}.gz", "wb") as fh:
                    fh.write(payload)
            else:
                (root / name).write_bytes(payload)
    return root
