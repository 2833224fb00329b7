"""A user's own clean (and optional backdoored) data for cleaning their model.

Two layouts:

* an ``.npz`` file with ``x`` (``[N, H, W, C]`` float or uint8; uint8 is scaled to ``[0, 1]``)
  and ``y`` (``[N]`` int labels); a backdoor file may add ``y_attacker`` (the attacker's label
  per input: targeted) — without it the backdoor is treated as untargeted.  A model with several
  inputs takes one ``x_<input name>`` array per input instead of ``x``; the labels of one output
  of a model with several may be ``y_<output name>`` instead of ``y``;
* a folder with one sub-folder per class (sorted names = class indices 0, 1, ...) of image
  files, each resized to the model's input size and scaled to ``[0, 1]``.

The data may come from anyone, so it is size-checked before it is decoded: every ``.npz``
member's declared size and ``.npy`` header (dtype, shape) are read first, pickled / object /
complex arrays are refused, each image's pixel count is read from its header before it is
decoded, and symbolic links that leave the data folder are refused, never followed.
"""

from __future__ import annotations

import math
import os
import pathlib
import zipfile
from dataclasses import dataclass

import numpy as np

from ._common import DataFormatError, to_float_image

__all__ = ["DataLimits", "UserData", "load_user_data"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class DataLimits:
    """Bounds on the user's data, checked before anything is decoded.

    Attributes:
      max_bytes: largest decoded size of the data (all ``.npz`` arrays, or all images as
        float32 at the model's input size), bytes.
      max_image_pixels: largest width x height of one image file.
      max_files: largest number of image files in a folder.
    """

    max_bytes: int = 8 << 30
    max_image_pixels: int = 50_000_000
    max_files: int = 1_000_000


@dataclass(frozen=True)
class UserData:
    """Arrays read from the user's files.

    Attributes:
      x: float32 ``[N, H, W, C]`` (``{input name: [N, ...]}`` for a model with several inputs).
      y: int64 ``[N]`` true labels.
      y_attacker: int64 ``[N]`` attacker's labels (targeted backdoor data) or None.
      class_names: names of the classes (folder layout) or None.
      source: the path the data came from.
    """

    x: np.ndarray | dict[str, np.ndarray]
    y: np.ndarray
    y_attacker: np.ndarray | None
    class_names: list[str] | None
    source: str

    @property
    def targeted(self) -> bool:
        return self.y_attacker is not None

    @property
    def untargeted(self) -> bool:
        return self.y_attacker is None

    @property
    def y_true(self) -> np.ndarray:
        return self.y


def _npz_members(path: pathlib.Path, limits: DataLimits) -> None:
    """Checks the declared size, dtype and shape of every member before anything is read."""
    total = 0
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.file_size > limits.max_bytes:
                raise DataFormatError(
                    f"{path}: member {info.filename!r} declares {info.file_size:,} bytes, over "
                    f"the limit of {limits.max_bytes:,} bytes"
                )
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(member)
            if dtype.hasobject:
                raise DataFormatError(
                    f"{path}: array {info.filename!r} holds Python objects "
                    "(pickled data is never loaded)"
                )
            total += math.prod(shape) * dtype.itemsize
            if total > limits.max_bytes:
                raise DataFormatError(
                    f"{path}: the arrays need more than {limits.max_bytes:,} "
                    "bytes once decoded (a decompression bomb?)"
                )


def _from_npz(path: pathlib.Path, limits: DataLimits, inputs: list[str] | None, output: str | None):
    """``(x, y, y_attacker)`` from an .npz: ``x`` an array, or ``{name: x_<name>}`` for the
    input names ``inputs``; ``y`` or ``y_<output>``."""
    with open(path, "rb") as handle:
        head = handle.read(6)
    if not head:
        raise DataFormatError(f"{path}: empty file, not an .npz")
    if head.startswith(b"\x93NUMPY"):
        raise DataFormatError(
            f"{path}: a single .npy array, not an .npz with 'x' and 'y' "
            "(save both with numpy.savez)"
        )
    if not head.startswith(b"PK"):
        raise DataFormatError(f"{path}: not an .npz file (no zip header)")
    try:
        _npz_members(path, limits)
        with np.load(path, allow_pickle=False) as archive:
            x_keys = ["x"] if inputs is None else [f"x_{name}" for name in inputs]
            y_key = "y" if "y" in archive.files or output is None else f"y_{output}"
            missing = [key for key in (*x_keys, y_key) if key not in archive.files]
            if missing:
                wanted = (
                    "'x' [N, ...]" if inputs is None else f"one 'x_<input name>' per input {x_keys}"
                )
                raise DataFormatError(
                    f"{path}: the .npz has no {missing} array(s); it needs {wanted} and 'y' [N] "
                    f"(or 'y_<output name>') (found {archive.files})"
                )
            x = {key[2:]: archive[key] for key in x_keys} if inputs is not None else archive["x"]
            y = archive[y_key]
            y_attacker = archive["y_attacker"] if "y_attacker" in archive.files else None
    except DataFormatError:
        raise
    except (
        OSError,
        ValueError,
        EOFError,
        TypeError,
        KeyError,
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
        MemoryError,
    ) as error:
        raise DataFormatError(
            f"{path}: not a readable .npz file ({type(error).__name__}: {str(error)[:200]})"
        ) from None
    scale = lambda a: a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a  # noqa: E731
    x = {name: scale(a) for name, a in x.items()} if isinstance(x, dict) else scale(x)
    return x, y, y_attacker


def label_outputs(path: str | os.PathLike) -> list[str]:
    """Output names ``<name>`` of the ``y_<name>`` arrays of an .npz (``y_attacker`` excepted);
    empty for a folder or an unreadable file (the loader reports those)."""
    path = pathlib.Path(path)
    if path.suffix.lower() != ".npz" or not path.is_file():
        return []
    try:
        with zipfile.ZipFile(path) as archive:
            names = [info.filename.removesuffix(".npy") for info in archive.infolist()]
    except (OSError, zipfile.BadZipFile):
        return []
    return sorted(n[2:] for n in names if n.startswith("y_") and n != "y_attacker")


def _inside(entry: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
    """``entry``; a symbolic link only when it resolves inside ``root`` (never followed out)."""
    if entry.is_symlink():
        target = pathlib.Path(os.path.realpath(entry))
        if not target.is_relative_to(root):
            raise DataFormatError(
                f"{entry} is a symbolic link to {target}, outside the data "
                f"folder {root}; refusing to follow it"
            )
    return entry


def _load_image(file: pathlib.Path, mode: str, limits: DataLimits):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise DataFormatError(
                    f"{file}: {width}x{height} pixels, over the limit of "
                    f"{limits.max_image_pixels:,} pixels per image"
                )
            image.load()
            return image.convert(mode) if image.mode != mode else image.copy()
    except DataFormatError:
        raise
    except Image.DecompressionBombError as error:
        raise DataFormatError(
            f"{file}: over the limit of {limits.max_image_pixels:,} pixels per image ({error})"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError) as error:
        raise DataFormatError(
            f"cannot decode image {str(file)!r} ({type(error).__name__}: {str(error)[:200]})"
        ) from None


def _from_folder(path: pathlib.Path, image_shape: tuple[int, int, int], limits: DataLimits):
    height, width, channels = image_shape
    if channels not in (1, 3):
        raise DataFormatError(
            f"image folders need a model input with 1 or 3 channels, the model takes {channels}"
        )
    root = pathlib.Path(os.path.realpath(path))
    classes = sorted(p.name for p in path.iterdir() if _inside(p, root).is_dir())
    if not classes:
        raise DataFormatError(f"{path}: no class sub-folders (expected <class name>/<image>)")
    per_class = []
    for name in classes:
        files = sorted(
            f
            for f in (path / name).iterdir()
            if _inside(f, root).is_file() and f.suffix.lower() in _IMAGE_SUFFIXES
        )
        if not files:
            raise DataFormatError(f"{path / name}: class folder has no images (empty class)")
        per_class.append(files)
    count = sum(len(files) for files in per_class)
    if count > limits.max_files or count * height * width * channels * 4 > limits.max_bytes:
        raise DataFormatError(
            f"{path}: {count:,} images need more than the limit of "
            f"{limits.max_bytes:,} bytes at the model's input size"
        )
    images, labels = [], []
    for index, files in enumerate(per_class):
        for file in files:
            image = _load_image(file, "L" if channels == 1 else "RGB", limits)
            if image.size != (width, height):
                image = image.resize((width, height))
            images.append(to_float_image(image))
            labels.append(index)
    return np.stack(images).astype(np.float32), np.asarray(labels, np.int64), classes


def load_user_data(
    path: str | os.PathLike,
    input_shape: tuple[int, ...] | dict[str, tuple[int, ...]],
    num_classes: int,
    what: str = "clean data",
    min_classes: int = 2,
    limits: DataLimits | None = None,
    output: str | None = None,
) -> UserData:
    """Reads and validates the user's data against the model it is meant for.

    Args:
      path: an ``.npz`` file or an image folder (see the module docstring).
      input_shape: the model's input shape without the batch axis, ``(H, W, C)``; for a model
        with several inputs, ``{input name: shape}`` (an ``.npz`` with ``x_<name>`` each).
      num_classes: the number of classes of the output the labels are for.
      what: how error messages name this data ("clean data", "backdoor data").
      min_classes: how many distinct labels the data must hold.
      limits: size limits checked before decoding (default :class:`DataLimits`).
      output: the model output the labels are for: an ``.npz`` without ``y`` gives them as
        ``y_<output>``.

    Raises:
      FileNotFoundError, DataFormatError (a ValueError) naming the problem.
    """
    path = pathlib.Path(path)
    limits = limits or DataLimits()
    several = isinstance(input_shape, dict)
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    class_names = None
    if path.is_dir():
        if several:
            raise DataFormatError(
                f"{what}: the model has {len(input_shape)} inputs {sorted(input_shape)}; an image "
                "folder gives one: use an .npz with one 'x_<input name>' array per input"
            )
        x, y, class_names = _from_folder(path, tuple(input_shape), limits)
        y_attacker = None
    elif path.suffix.lower() == ".npz":
        x, y, y_attacker = _from_npz(path, limits, list(input_shape) if several else None, output)
    else:
        raise DataFormatError(
            f"{what}: {path} is neither an .npz file nor a folder of class sub-folders"
        )
    if several:
        x = {
            name: _checked_inputs(x[name], input_shape[name], f"{what} x_{name}", path)
            for name in x
        }
        lengths = {name: len(array) for name, array in x.items()}
        if len(set(lengths.values())) != 1:
            raise DataFormatError(
                f"{what}: the inputs hold different numbers of examples {lengths}"
            )
        count = next(iter(lengths.values()))
    else:
        x = _checked_inputs(x, input_shape, what, path)
        count = len(x)
    y = _checked_labels(np.asarray(y).reshape(-1), count, what)
    labels = [("y", y)] + (
        [("y_attacker", np.asarray(y_attacker).reshape(-1))] if y_attacker is not None else []
    )
    for name, values in labels:
        outside = values[(values < 0) | (values >= num_classes)]
        if outside.size:
            raise DataFormatError(
                f"{what}: label {int(outside[0])} in {name} is outside the model's "
                f"{num_classes} classes [0, {num_classes - 1}]"
            )
    if y_attacker is not None and len(y_attacker) != len(y):
        raise DataFormatError(f"{what}: y_attacker has {len(y_attacker)} labels, y has {len(y)}")
    distinct = np.unique(y).size
    if distinct < min_classes:
        raise DataFormatError(
            f"{what}: only {distinct} class(es) present; at least {min_classes} are needed to "
            "measure accuracy meaningfully"
        )
    return UserData(
        x,
        y.astype(np.int64),
        None if y_attacker is None else np.asarray(y_attacker, np.int64).reshape(-1),
        class_names,
        str(path),
    )


def _checked_inputs(x, input_shape: tuple[int, ...], what: str, path: pathlib.Path) -> np.ndarray:
    """float32 ``[N, *input_shape]`` (a missing trailing channel of 1 added), finite numbers."""
    x = np.asarray(x)
    if x.ndim == 3 and len(input_shape) == 3 and input_shape[-1] == 1:
        x = x[..., None]
    if len(x) == 0:
        raise DataFormatError(f"{what}: {path} holds no examples")
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise DataFormatError(
            f"{what}: examples have shape {tuple(x.shape[1:])} but the model takes "
            f"{tuple(input_shape)}"
        )
    if np.iscomplexobj(x):
        raise DataFormatError(f"{what}: complex-valued x (dtype complex); expected real numbers")
    if not np.issubdtype(x.dtype, np.number):
        raise DataFormatError(f"{what}: x has dtype {x.dtype}, expected numbers")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x).reshape(len(x), -1).all(axis=1)))
        raise DataFormatError(f"{what}: {bad} example(s) contain NaN or Inf values")
    return x


def _checked_labels(y: np.ndarray, count: int, what: str) -> np.ndarray:
    """int ``[N]`` labels for ``count`` examples."""
    if len(y) != count:
        raise DataFormatError(f"{what}: {count} examples but {len(y)} labels")
    if np.iscomplexobj(y):
        raise DataFormatError(f"{what}: complex-valued y (dtype complex); expected real numbers")
    if not np.issubdtype(y.dtype, np.integer):
        if (
            np.issubdtype(y.dtype, np.floating)
            and np.all(np.isfinite(y))
            and np.all(y == np.round(y))
        ):
            y = y.astype(np.int64)
        else:
            raise DataFormatError(f"{what}: labels must be integers, got dtype {y.dtype}")
    return y
