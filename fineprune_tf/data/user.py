"""A user's own clean (and optional backdoored) data for cleaning their model.

Two layouts:

* an ``.npz`` file with ``x`` (``[N, H, W, C]`` float or uint8; uint8 is scaled to ``[0, 1]``)
  and ``y`` (``[N]`` int labels); a backdoor file may add ``y_attacker`` (the attacker's label
  per input: targeted) — without it the backdoor is treated as untargeted;
* a folder with one sub-folder per class (sorted names = class indices 0, 1, ...) of image
  files, each resized to the model's input size and scaled to ``[0, 1]``.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

import numpy as np

from ._common import DataFormatError, load_image, to_float_image

__all__ = ["UserData", "load_user_data"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class UserData:
    """Arrays read from the user's files.

    Attributes:
      x: float32 ``[N, H, W, C]``.
      y: int64 ``[N]`` true labels.
      y_attacker: int64 ``[N]`` attacker's labels (targeted backdoor data) or None.
      class_names: names of the classes (folder layout) or None.
      source: the path the data came from.
    """

    x: np.ndarray
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


def _from_npz(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                raise DataFormatError(
                    f"{path}: the .npz has no {missing} array(s); it needs 'x' [N, H, W, C] and "
                    f"'y' [N] (found {archive.files})")
            x, y = archive["x"], archive["y"]
            y_attacker = archive["y_attacker"] if "y_attacker" in archive.files else None
    except (OSError, ValueError) as error:
        if isinstance(error, DataFormatError):
            raise
        raise DataFormatError(f"{path}: not a readable .npz file: {error}") from error
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    return x, y, y_attacker


def _from_folder(path: pathlib.Path, image_shape: tuple[int, int, int]):
    height, width, channels = image_shape
    if channels not in (1, 3):
        raise DataFormatError(f"image folders need a model input with 1 or 3 channels, "
                              f"the model takes {channels}")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataFormatError(f"{path}: no class sub-folders (expected <class name>/<image>)")
    images, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(f for f in (path / name).iterdir()
                       if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise DataFormatError(f"{path / name}: class folder has no images (empty class)")
        for file in files:
            image = load_image(file, "L" if channels == 1 else "RGB")
            if image.size != (width, height):
                image = image.resize((width, height))
            images.append(to_float_image(image))
            labels.append(index)
    return np.stack(images).astype(np.float32), np.asarray(labels, np.int64), classes


def load_user_data(path: str | os.PathLike, input_shape: tuple[int, ...], num_classes: int,
                   what: str = "clean data", min_classes: int = 2) -> UserData:
    """Reads and validates the user's data against the model it is meant for.

    Args:
      path: an ``.npz`` file or an image folder (see the module docstring).
      input_shape: the model's input shape without the batch axis, ``(H, W, C)``.
      num_classes: the model's number of output classes.
      what: how error messages name this data ("clean data", "backdoor data").
      min_classes: how many distinct labels the data must hold.

    Raises:
      FileNotFoundError, DataFormatError (a ValueError) naming the problem.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    class_names = None
    if path.is_dir():
        x, y, class_names = _from_folder(path, tuple(input_shape))
        y_attacker = None
    elif path.suffix.lower() == ".npz":
        x, y, y_attacker = _from_npz(path)
    else:
        raise DataFormatError(f"{what}: {path} is neither an .npz file nor a folder of class "
                              "sub-folders")
    x = np.asarray(x)
    y = np.asarray(y).reshape(-1)
    if x.ndim == 3 and len(input_shape) == 3 and input_shape[-1] == 1:
        x = x[..., None]
    if len(x) == 0:
        raise DataFormatError(f"{what}: {path} holds no examples")
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise DataFormatError(
            f"{what}: examples have shape {tuple(x.shape[1:])} but the model takes "
            f"{tuple(input_shape)}")
    if len(y) != len(x):
        raise DataFormatError(f"{what}: {len(x)} examples but {len(y)} labels")
    if not np.issubdtype(x.dtype, np.number):
        raise DataFormatError(f"{what}: x has dtype {x.dtype}, expected numbers")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x).reshape(len(x), -1).all(axis=1)))
        raise DataFormatError(f"{what}: {bad} example(s) contain NaN or Inf values")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(
                y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise DataFormatError(f"{what}: labels must be integers, got dtype {y.dtype}")
    labels = [("y", y)] + ([("y_attacker", np.asarray(y_attacker).reshape(-1))]
                           if y_attacker is not None else [])
    for name, values in labels:
        outside = values[(values < 0) | (values >= num_classes)]
        if outside.size:
            raise DataFormatError(
                f"{what}: label {int(outside[0])} in {name} is outside the model's "
                f"{num_classes} classes [0, {num_classes - 1}]")
    if y_attacker is not None and len(y_attacker) != len(y):
        raise DataFormatError(f"{what}: y_attacker has {len(y_attacker)} labels, y has {len(y)}")
    distinct = np.unique(y).size
    if distinct < min_classes:
        raise DataFormatError(
            f"{what}: only {distinct} class(es) present; at least {min_classes} are needed to "
            "measure accuracy meaningfully")
    return UserData(x, y.astype(np.int64),
                    None if y_attacker is None else np.asarray(y_attacker, np.int64).reshape(-1),
                    class_names, str(path))
