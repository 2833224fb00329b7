"""``load_model``: the stages an untrusted model goes through (see SECURITY.md).

1. The path is sniffed (zip / HDF5 magic, or a directory); file-name extensions are not
   trusted and their case does not matter.
2. The file is copied into a private temporary directory, with every declared size checked
   first (:mod:`.archive`): the user's file is only ever opened read-only, and nothing is
   written next to it.
3. The copy is inspected statically: a ``.keras`` / ``.h5`` config by resolution against the
   allowlisted Keras objects (:mod:`.keras_config`), a SavedModel's graphs against the op
   allowlist (:mod:`.graph_check`).  Refusals list every finding.
4. The copy is trial-loaded in a child process with time and memory limits (:mod:`.sandbox`).
5. Only then is it loaded here (Keras ``safe_mode=True``, or ``tf.saved_model.load``).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import keras

from .archive import copy_saved_model_dir, read_json_bounded, rebuild_keras_archive
from .errors import Finding, LoadLimitError, ModelFormatError, UnsafeModelError
from .graph_check import inspect_saved_model_proto, read_saved_model_proto
from .keras_config import inspect_keras_config
from .limits import LoadLimits
from .predictor import SavedModelPredictor
from .sandbox import trial_load

__all__ = ["inspect_saved_model", "load_model", "load_private_copy"]

KERAS_IN_SAVED_MODEL = "model.keras"  # = fineprune_tf.export.KERAS_FILENAME
_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_KERAS_HINT = (
    "Only allowlisted Keras layers and objects are loaded; pass allow_unsafe=True "
    "only for files you trust."
)
_GRAPH_HINT = (
    "The SavedModel was not loaded and nothing in it ran; pass allow_unsafe=True "
    "only for a model you trust."
)


def inspect_saved_model(
    path: str | os.PathLike, limits: LoadLimits | None = None, allow_tf1: bool = False
) -> list[Finding]:
    """Refused ops of the SavedModel directory ``path``, found by parsing its protobuf only
    (nothing is loaded or executed).  Empty list = nothing refused.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ModelFormatError: not a directory with a parsable ``saved_model.pb`` / ``.pbtxt``.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ModelFormatError(f"{path}: a SavedModel is a directory")
    proto = read_saved_model_proto(path, limits or LoadLimits())
    return inspect_saved_model_proto(proto, allow_tf1)


def _sniff(path: pathlib.Path, shown: pathlib.Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(_ZIP_MAGIC):
        return "keras"
    if head == _HDF5_MAGIC:
        return "h5"
    raise ModelFormatError(
        f"{shown}: not a model: expected a Keras .keras zip, a legacy Keras .h5 file or a TF "
        "SavedModel directory"
    )


def _hdf5_config(path: pathlib.Path, shown: pathlib.Path, limits: LoadLimits) -> object:
    """The parsed ``model_config`` of the private copy ``path`` (messages name ``shown``)."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            attribute = (
                handle.attrs.get_id("model_config") if "model_config" in handle.attrs else None
            )
            if attribute is None:
                raise ModelFormatError(
                    f"{shown}: HDF5 file without a model_config (weights only?): not a Keras model"
                )
            if attribute.get_storage_size() > limits.config_bytes:
                raise LoadLimitError(
                    f"{shown}: model_config is larger than the config limit "
                    f"of {limits.config_bytes:,} bytes"
                )
            raw = handle.attrs["model_config"]
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as error:
        if isinstance(error, ModelFormatError):
            raise
        raise ModelFormatError(
            f"{shown}: unreadable HDF5 file ({type(error).__name__}: {str(error)[:200]})"
        ) from None
    if hasattr(raw, "item") and getattr(raw, "shape", None) == ():
        raw = raw.item()
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if not isinstance(raw, str):
        raise ModelFormatError(
            f"{shown}: model_config is a {type(raw).__name__}, not a JSON string"
        )
    config = read_json_bounded(raw, f"{shown}: model_config")
    if not isinstance(config, dict):
        raise ModelFormatError(f"{shown}: model_config is not a JSON object")
    return config


def load_private_copy(kind: str, path: str | os.PathLike, allow_unsafe: bool, compile: bool):
    """Loads an already checked private copy (used in the child and, after it succeeded, in
    the calling process)."""
    path = pathlib.Path(path)
    if kind == "saved_model":
        import tensorflow as tf

        return SavedModelPredictor(tf.saved_model.load(str(path)), path)
    return keras.models.load_model(path, compile=compile, safe_mode=not allow_unsafe)


def _load_checked(
    kind: str,
    copy: pathlib.Path,
    workdir: pathlib.Path,
    shown: pathlib.Path,
    allow_unsafe: bool,
    compile: bool,
    limits: LoadLimits,
    isolate: bool,
):
    if isolate:
        trial_load(kind, copy, workdir, limits, allow_unsafe, compile, str(shown))
    try:
        loaded = load_private_copy(kind, copy, allow_unsafe, compile)
    except (MemoryError, RecursionError) as error:
        raise LoadLimitError(
            f"{shown}: loading ran out of memory ({type(error).__name__})"
        ) from None
    except Exception as error:  # noqa: BLE001  (every loader failure is one clear error)
        if "safe_mode" in str(error) or "unsafe" in str(error).lower():
            raise UnsafeModelError(
                shown,
                [Finding("config", "?", "keras", str(error)[:300])],
                "Keras safe mode refused the file.",
            ) from None
        raise ModelFormatError(
            f"{shown}: could not be loaded ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:300]})"
        ) from None
    if isinstance(loaded, SavedModelPredictor):
        loaded.path, loaded.name = shown, shown.name
    return loaded


def _keras_file(
    path: pathlib.Path,
    shown: pathlib.Path,
    workdir: pathlib.Path,
    allow_unsafe: bool,
    compile: bool,
    limits: LoadLimits,
    isolate: bool,
):
    if path.stat().st_size == 0:
        raise ModelFormatError(f"{shown}: empty file: not a model")
    kind = _sniff(path, shown)
    if kind == "keras":
        copy = workdir / "model.keras"
        config = rebuild_keras_archive(path, copy, limits, shown)
        findings = inspect_keras_config(config)
    else:
        if path.stat().st_size > limits.weights_bytes:
            raise LoadLimitError(
                f"{shown}: {path.stat().st_size:,} bytes, over the weights "
                f"limit of {limits.weights_bytes:,} bytes"
            )
        copy = workdir / "model.h5"
        shutil.copyfile(path, copy)
        findings = inspect_keras_config(_hdf5_config(copy, shown, limits), legacy=True)
    if findings and not allow_unsafe:
        raise UnsafeModelError(shown, findings, _KERAS_HINT)
    return _load_checked(kind, copy, workdir, shown, allow_unsafe, compile, limits, isolate)


def _saved_model(
    path: pathlib.Path,
    workdir: pathlib.Path,
    allow_unsafe: bool,
    prefer_keras: bool,
    compile: bool,
    limits: LoadLimits,
    isolate: bool,
):
    copy = workdir / "saved_model"
    copy_saved_model_dir(path, copy, limits)
    proto = read_saved_model_proto(copy, limits, path)
    findings = inspect_saved_model_proto(proto, allow_tf1=allow_unsafe)
    if findings and not allow_unsafe:
        raise UnsafeModelError(path, findings, _GRAPH_HINT)
    embedded = copy / KERAS_IN_SAVED_MODEL
    if prefer_keras and embedded.is_file():
        return _keras_file(
            embedded, path / KERAS_IN_SAVED_MODEL, workdir, allow_unsafe, compile, limits, isolate
        )
    return _load_checked("saved_model", copy, workdir, path, allow_unsafe, compile, limits, isolate)


def load_model(
    path: str | os.PathLike,
    allow_unsafe: bool = False,
    prefer_keras: bool = True,
    compile: bool = False,
    limits: LoadLimits | None = None,
    isolate: bool = True,
) -> keras.Model | SavedModelPredictor:
    """Loads an untrusted model file or SavedModel directory (see SECURITY.md).

    Args:
      path: ``.keras`` zip, legacy ``.h5`` or SavedModel directory (any file name).
      allow_unsafe: load even when refused layers / objects / ops are found (Keras
        ``safe_mode=False``, TF1 SavedModels).  For trusted files only; the size, time and
        memory limits still apply.
      prefer_keras: for a SavedModel directory holding ``model.keras``, return that Keras model
        (after checking both) instead of an inference-only predictor.
      compile: restore the file's training configuration (optimizer, loss); off by default
        since the supplier's training setup is not needed to clean the model.
      limits: size, time and memory limits (default :class:`LoadLimits`).
      isolate: trial-load in a bounded child process first (default; turn off only for files
        you produced yourself).

    Returns:
      A ``keras.Model``, or a :class:`SavedModelPredictor` for a SavedModel without
      ``model.keras`` (inference only).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ModelFormatError: not a supported model (with the reason).
      LoadLimitError: a size, time or memory limit was hit, or loading killed the loader.
      UnsafeModelError: refused content (``.findings`` lists every item).
    """
    limits = limits or LoadLimits()
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    with tempfile.TemporaryDirectory(prefix="fineprune_load_") as tmp:
        workdir = pathlib.Path(tmp)
        if path.is_dir():
            loaded = _saved_model(
                path, workdir, allow_unsafe, prefer_keras, compile, limits, isolate
            )
        elif path.is_file():
            loaded = _keras_file(path, path, workdir, allow_unsafe, compile, limits, isolate)
        else:
            raise ModelFormatError(f"{path}: not a regular file or directory")
    return loaded
