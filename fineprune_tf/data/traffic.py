"""Traffic sign data with three super-classes (Fine-Pruning §2.3, traffic backdoor of BadNets).

Classes: 0 ``stop``, 1 ``speed_limit``, 2 ``warning``. Images are float32 ``[N, S, S, 3]``
RGB in ``[0, 1]`` (``image_size`` S = 32 by default).

Sources:

* ``"default"`` -- procedurally rendered signs (no real data ships in any wheel): a red
  octagon with white border and "STOP" strokes, a white portrait rectangle with black border,
  "SPEED LIMIT" dashes and two numerals, or a yellow diamond with black border and one of
  six black symbols; placed with random scale (sign spans ~50-80 % of the image side),
  rotation, perspective and offset, optional pole, on textured backgrounds (smooth noise,
  gradients, stripes, sky, foliage, urban blocks), then lighting (brightness, contrast,
  colour cast, shading, shadow), partial occlusion, blur and sensor noise. Rendered at
  ``supersample`` x resolution and box-filtered down (in :mod:`.sign_renderer`). Every image
  depends only on ``(seed, split, index)``; ``train_count`` / ``validation_count`` /
  ``test_count`` = 3000 / 600 / 600, classes balanced.
* ``"gtsrb"`` -- German Traffic Sign Recognition Benchmark,
  ``<data_dir>[/Final_Training]/Images/<00000..00042>/GT-<class>.csv`` (semicolon CSV with
  ``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``) and ``.ppm`` images. Crops
  the (inclusive) ROI and resizes. ``super_classes=True`` (default) maps stop (14) -> 0, speed
  limits (0-8) -> 1, danger triangles (11, 18-31) -> 2 and drops the rest; ``False`` keeps
  the 43 classes. Splits whole tracks (``<track>_<frame>.ppm``), ``validation_fraction``
  0.1 / ``test_fraction`` 0.2 per class; ``Final_Test/Images/GT-final_test.csv`` with a
  ``ClassId`` column, when present, is used as the test split (``official_test=True``).
* ``"lisa"`` -- LISA U.S. traffic signs, ``<data_dir>/allAnnotations.csv`` (semicolon CSV
  with ``Filename;Annotation tag;Upper left corner X;Upper left corner Y;Lower right corner
  X;Lower right corner Y;...``; file names relative to the CSV). Crops each box enlarged by
  ``crop_margin`` (10 % per side), maps tags with :data:`LISA_TAG_CLASSES` /
  :func:`lisa_tag_class` (unmapped tags dropped), splits whole ``Origin track`` groups when
  that column exists.
"""

from __future__ import annotations

import csv
import functools
import pathlib
import re
from collections.abc import Callable

import numpy as np

from ._common import (
    DataFormatError,
    PathLike,
    Split,
    TaskData,
    check_labels,
    grouped_stratified_split,
    load_image,
    require_dir,
    require_nonempty,
    resolve_options,
    to_float_image,
)
from .sign_renderer import SPEED_LIMIT, STOP, WARNING, render_sign, render_split  # noqa: F401 - render_sign: public here too

CLASS_NAMES = ["stop", "speed_limit", "warning"]

# Fraction of the image side a rendered sign spans on average; PostIt uses it to size the
# note at ~10 % of the sign area.
RENDERED_SIGN_EXTENT = 0.65


@functools.lru_cache(maxsize=6)
def _cached_split(count: int, seed: int, split_id: int, image_size: int, supersample: int):
    # Rendering 4,200 scenes takes seconds; experiments and tests load the default repeatedly.
    split = render_split(count, seed, split_id, image_size, supersample)
    split.x.setflags(write=False)
    split.y.setflags(write=False)
    return split


def load_default(seed: int, options: dict) -> TaskData:
    opts = resolve_options(
        "default",
        options,
        {
            "train_count": 3000,
            "validation_count": 600,
            "test_count": 600,
            "image_size": 32,
            "supersample": 2,
        },
    )
    size, ss = int(opts["image_size"]), int(opts["supersample"])
    if size < 8 or ss < 1:
        raise ValueError(f"image_size must be >= 8 and supersample >= 1, got {size}, {ss}")
    splits = []
    for k, name in enumerate(("train", "validation", "test")):
        cached = _cached_split(int(opts[f"{name}_count"]), seed, k, size, ss)
        # Copies, so callers may modify their arrays without touching the cache.
        splits.append(Split(cached.x.copy(), cached.y.copy()))
    return TaskData(
        "traffic",
        *splits,
        list(CLASS_NAMES),
        {"source": "default", "seed": seed, "sign_extent": RENDERED_SIGN_EXTENT, **opts},
    )


# ============================================================================ crops from disk


def _read_csv(path: pathlib.Path, required: tuple[str, ...]) -> tuple[list[str], list[list[str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh, delimiter=";"))
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"CSV {str(path)!r} is not UTF-8 text: {exc}") from exc
    if not rows:
        raise DataFormatError(f"CSV {str(path)!r} is empty (no header)")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataFormatError(
            f"CSV {str(path)!r} lacks column(s) {missing}; header is {header} (semicolon-separated)"
        )
    return header, rows[1:]


def _crop(img, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    from PIL import Image

    out = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return to_float_image(out)


def _int_field(value: str, path: pathlib.Path, lineno: int, column: str) -> int:
    try:
        return int(float(value))
    except ValueError:
        raise DataFormatError(
            f"{str(path)}:{lineno}: column {column!r} is not a number: {value!r}"
        ) from None


def _check_box(box, width, height, path, lineno, what):
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1) or x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
        raise DataFormatError(
            f"{str(path)}:{lineno}: bad box {box} for {what} of size {width}x{height} (WxH)"
        )


GTSRB_NUM_CLASSES = 43
GTSRB_SUPER_CLASSES: dict[int, int] = {
    14: STOP,
    **{c: SPEED_LIMIT for c in range(9)},
    11: WARNING,
    **{c: WARNING for c in range(18, 32)},
}
_GTSRB_COLUMNS = ("Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")


def _gtsrb_rows(csv_path: pathlib.Path, image_dir: pathlib.Path, folder_class: int | None):
    """Yield (image path, (x1, y1, x2, y2) exclusive box, class id, track key, lineno)."""
    header, rows = _read_csv(csv_path, _GTSRB_COLUMNS)
    col = {h: i for i, h in enumerate(header)}
    for lineno, row in enumerate(rows, 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise DataFormatError(
                f"{str(csv_path)}:{lineno}: {len(row)} fields, header has {len(header)}"
            )
        vals = {k: _int_field(row[col[k]], csv_path, lineno, k) for k in _GTSRB_COLUMNS[1:]}
        cls = vals["ClassId"]
        if not 0 <= cls < GTSRB_NUM_CLASSES:
            raise DataFormatError(
                f"{str(csv_path)}:{lineno}: ClassId {cls} outside the class range "
                f"[0, {GTSRB_NUM_CLASSES - 1}]"
            )
        if folder_class is not None and cls != folder_class:
            raise DataFormatError(
                f"{str(csv_path)}:{lineno}: ClassId {cls} in the folder of class {folder_class}"
            )
        name = row[col["Filename"]].strip()
        m = re.match(r"^(\d+)_\d+\.", name)
        track = f"{cls}/{m.group(1)}" if m else f"{cls}/{name}"
        # GTSRB ROI corners are inclusive pixel indices; PIL boxes are exclusive on the right.
        box = (vals["Roi.X1"], vals["Roi.Y1"], vals["Roi.X2"] + 1, vals["Roi.Y2"] + 1)
        yield image_dir / name, box, cls, track, lineno


def _gtsrb_image_root(root: pathlib.Path) -> pathlib.Path:
    for cand in (root / "Final_Training" / "Images", root / "Images", root):
        if cand.is_dir() and any(re.fullmatch(r"\d{5}", p.name) for p in cand.iterdir()):
            return cand
    raise DataFormatError(
        f"{str(root)!r} is not a GTSRB tree: expected Final_Training/Images/<00000..00042>/"
        "GT-<class>.csv"
    )


def _load_crops(entries, size: int, csv_for: Callable[[int], str]):
    """Decode crops. ``entries``: (path, box, class, track, lineno, csv index)."""
    xs, cache_path, cache_img = [], None, None
    for path, box, _, _, lineno, csv_idx in entries:
        if path != cache_path:
            if not path.is_file():
                raise FileNotFoundError(
                    f"{csv_for(csv_idx)}:{lineno}: image {str(path)!r} not found"
                )
            cache_path, cache_img = path, load_image(path, "RGB")
        w, h = cache_img.size
        _check_box(box, w, h, csv_for(csv_idx), lineno, repr(str(path)))
        clipped = (max(0, box[0]), max(0, box[1]), min(w, box[2]), min(h, box[3]))
        xs.append(_crop(cache_img, clipped, size))
    return np.stack(xs).astype(np.float32) if xs else np.zeros((0, size, size, 3), np.float32)


def _gtsrb_entries(root: pathlib.Path, image_root: pathlib.Path, official_test: bool):
    """``(csvs, entries, test_entries, use_test)``: every annotated image of the training
    folders (and of ``Final_Test`` when present and wanted), each entry ending with the index
    of its CSV in ``csvs``."""
    csvs: list[str] = []
    entries = []
    for class_dir in sorted(p for p in image_root.iterdir() if re.fullmatch(r"\d{5}", p.name)):
        csv_path = class_dir / f"GT-{class_dir.name}.csv"
        if not csv_path.is_file():
            raise DataFormatError(f"GTSRB class folder {str(class_dir)!r} lacks {csv_path.name}")
        csvs.append(str(csv_path))
        for e in _gtsrb_rows(csv_path, class_dir, int(class_dir.name)):
            entries.append((*e, len(csvs) - 1))
    test_entries = []
    test_csv = root / "Final_Test" / "Images" / "GT-final_test.csv"
    use_test = official_test and test_csv.is_file()
    if use_test:
        csvs.append(str(test_csv))
        test_entries = [(*e, len(csvs) - 1) for e in _gtsrb_rows(test_csv, test_csv.parent, None)]
    return csvs, entries, test_entries, use_test


def load_gtsrb(data_dir: PathLike, seed: int, options: dict) -> TaskData:
    opts = resolve_options(
        "gtsrb",
        options,
        {
            "image_size": 32,
            "super_classes": True,
            "validation_fraction": 0.1,
            "test_fraction": 0.2,
            "official_test": True,
        },
    )
    root = require_dir(data_dir, "gtsrb")
    image_root = _gtsrb_image_root(root)
    csvs, entries, test_entries, use_test = _gtsrb_entries(
        root, image_root, bool(opts["official_test"])
    )

    super_classes = bool(opts["super_classes"])
    if super_classes:
        names = list(CLASS_NAMES)

        def keep(es):
            return [e for e in es if e[2] in GTSRB_SUPER_CLASSES]

        def label(e):
            return GTSRB_SUPER_CLASSES[e[2]]
    else:
        names = [f"{c:05d}" for c in range(GTSRB_NUM_CLASSES)]

        def keep(es):
            return es

        def label(e):
            return e[2]

    n_all = len(entries) + len(test_entries)
    entries, test_entries = keep(entries), keep(test_entries)
    y = np.array([label(e) for e in entries], np.int64)
    check_labels(y, len(names), f"GTSRB training images in {str(image_root)!r}", names)
    rng = np.random.default_rng(seed)
    val_f, test_f = float(opts["validation_fraction"]), float(opts["test_fraction"])
    groups = [e[3] for e in entries]
    if use_test:
        tr, va, _ = grouped_stratified_split(y, groups, (val_f, 0.0), rng)
        te = None
    else:
        tr, va, te = grouped_stratified_split(y, groups, (val_f, test_f), rng)

    size = int(opts["image_size"])

    def csv_for(i):
        return csvs[i]

    def build(idx):
        sel = [entries[i] for i in idx]
        return Split(_load_crops(sel, size, csv_for), y[idx])

    train, validation = build(tr), build(va)
    if use_test:
        test = Split(
            _load_crops(test_entries, size, csv_for),
            np.array([label(e) for e in test_entries], np.int64),
        )
    else:
        test = build(te)
    splits = {"train": train, "validation": validation, "test": test}
    require_nonempty(splits, f"GTSRB tree {str(root)!r}")
    info = {
        "source": "gtsrb",
        "root": str(root),
        "seed": seed,
        "dropped": n_all - len(entries) - len(test_entries),
        "official_test_used": use_test,
        "sign_extent": 1.0,  # crops are the sign's ROI
        **opts,
    }
    return TaskData("traffic", train, validation, test, names, info)


# LISA tag -> super-class. Warning = the yellow diamond MUTCD W-series signs (plus the yellow
# ramp-speed advisories). Left out on purpose: yield / doNotEnter / noLeftTurn ... (red or
# white regulatory signs, a different shape), school / zoneAhead* / slow (ambiguous shape),
# and truck/school speed limits (extra plaques). Speed limit = "speedLimit<N>" and
# "speedLimitUrdbl" (unreadable value).
LISA_TAG_CLASSES: dict[str, int] = {
    "stop": STOP,
    **{
        t.lower(): WARNING
        for t in (
            "addedLane",
            "curveLeft",
            "curveRight",
            "dip",
            "intersection",
            "laneEnds",
            "merge",
            "pedestrianCrossing",
            "roundabout",
            "signalAhead",
            "stopAhead",
            "thruMergeLeft",
            "thruMergeRight",
            "thruTrafficMergeLeft",
            "yieldAhead",
        )
    },
}
_LISA_PREFIXES = (("speedlimit", SPEED_LIMIT), ("rampspeedadvisory", WARNING))
_LISA_COLUMNS = (
    "Filename",
    "Annotation tag",
    "Upper left corner X",
    "Upper left corner Y",
    "Lower right corner X",
    "Lower right corner Y",
)


def lisa_tag_class(tag: str) -> int | None:
    """Super-class of a LISA annotation tag (case-insensitive), ``None`` if unmapped."""
    t = tag.strip().lower()
    if t in LISA_TAG_CLASSES:
        return LISA_TAG_CLASSES[t]
    for prefix, cls in _LISA_PREFIXES:
        if t.startswith(prefix):
            return cls
    return None


def _lisa_entries(root, csv_path, header, rows, classify, classes: int, margin: float):
    """``(entries, dropped)``: one entry ``(path, box, label, group, lineno, 0)`` per mapped
    annotation (box enlarged by ``margin`` per side), and the count of unmapped tags."""
    col = {h: i for i, h in enumerate(header)}
    has_track = "Origin track" in col and "Origin file" in col
    entries, dropped = [], 0
    for lineno, row in enumerate(rows, 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(_LISA_COLUMNS):
            raise DataFormatError(f"{str(csv_path)}:{lineno}: too few fields ({len(row)})")
        cls = classify(row[col["Annotation tag"]])
        if cls is None:
            dropped += 1
            continue
        if not 0 <= cls < classes:
            raise DataFormatError(
                f"tag_map sends tag {row[col['Annotation tag']]!r} to label {cls} outside the "
                f"class range [0, {classes - 1}]"
            )
        x1, y1, x2, y2 = (_int_field(row[col[k]], csv_path, lineno, k) for k in _LISA_COLUMNS[2:])
        if not (x2 > x1 and y2 > y1):
            raise DataFormatError(f"{str(csv_path)}:{lineno}: bad box {(x1, y1, x2, y2)}")
        mx, my = margin * (x2 - x1), margin * (y2 - y1)
        box = (x1 - mx, y1 - my, x2 + mx, y2 + my)
        name = row[col["Filename"]].strip()
        group = f"{row[col['Origin file']]}#{row[col['Origin track']]}" if has_track else name
        entries.append((root / name, box, cls, group, lineno, 0))
    return entries, dropped


def load_lisa(data_dir: PathLike, seed: int, options: dict) -> TaskData:
    opts = resolve_options(
        "lisa",
        options,
        {
            "annotations": "allAnnotations.csv",
            "image_size": 32,
            "crop_margin": 0.1,
            "validation_fraction": 0.1,
            "test_fraction": 0.2,
            "tag_map": None,
            "class_names": None,
        },
    )
    root = require_dir(data_dir, "lisa")
    csv_path = root / opts["annotations"]
    if not csv_path.is_file():
        raise FileNotFoundError(f"LISA annotation file {str(csv_path)!r} not found")
    header, rows = _read_csv(csv_path, _LISA_COLUMNS)
    tag_map = opts["tag_map"]
    if tag_map is not None:
        lowered = {k.lower(): int(v) for k, v in tag_map.items()}
        names = list(opts["class_names"] or [str(i) for i in range(max(lowered.values()) + 1)])

        def classify(tag):
            return lowered.get(tag.strip().lower())
    else:
        names = list(opts["class_names"] or CLASS_NAMES)
        classify = lisa_tag_class
    margin = float(opts["crop_margin"])
    entries, dropped = _lisa_entries(root, csv_path, header, rows, classify, len(names), margin)
    y = np.array([e[2] for e in entries], np.int64)
    check_labels(y, len(names), f"LISA annotations {str(csv_path)!r}", names)
    rng = np.random.default_rng(seed)
    idx = grouped_stratified_split(
        y,
        [e[3] for e in entries],
        (float(opts["validation_fraction"]), float(opts["test_fraction"])),
        rng,
    )
    size = int(opts["image_size"])
    # Read in file order so consecutive boxes of one frame reuse the decoded image.
    splits = {}
    for name, ix in zip(("train", "validation", "test"), idx, strict=True):
        order = sorted(ix, key=lambda i: (str(entries[i][0]), i))
        x = _load_crops([entries[i] for i in order], size, lambda _: str(csv_path))
        # order[rank] == ix (sorted), so x[rank] is back in index order.
        rank = np.argsort(np.asarray(order))
        splits[name] = Split(x[rank], y[ix])
    require_nonempty(splits, f"LISA annotations {str(csv_path)!r}")
    info = {
        "source": "lisa",
        "root": str(root),
        "seed": seed,
        "dropped": dropped,
        "sign_extent": 1.0 / (1.0 + 2.0 * margin),
        **opts,
    }
    return TaskData("traffic", splits["train"], splits["validation"], splits["test"], names, info)


SOURCES = {
    "default": lambda data_dir, seed, options: load_default(seed, options),
    "gtsrb": load_gtsrb,
    "lisa": load_lisa,
}
