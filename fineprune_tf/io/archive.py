"""Reading the attacker's archives with every declared size checked first.

A ``.keras`` file is a zip.  Before anything is decompressed, its member list is checked
(only ``config.json``, ``metadata.json`` and ``model.weights.h5`` / ``.npz``; no absolute or
``..`` names, no duplicates, no encryption, declared sizes within :class:`LoadLimits`); then
``config.json`` is read (reads stop at the declared size: Python's zipfile never returns more
than a member declares) and the archive is rebuilt, member by member, into a private temporary
directory that the loader owns.  Keras only ever sees that copy, so nothing -- in particular
Keras' extraction of large weights "beside the archive" when it cannot measure free memory --
is ever written next to the user's file.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import zipfile

from .errors import Finding, LoadLimitError, ModelFormatError, UnsafeModelError
from .limits import LoadLimits

__all__ = ["copy_saved_model_dir", "rebuild_keras_archive", "read_json_bounded"]

_CONFIG_MEMBERS = ("config.json", "metadata.json")
_WEIGHT_MEMBERS = ("model.weights.h5", "model.weights.npz")
_CHUNK = 1 << 20


def read_json_bounded(raw: bytes | str, what: str) -> object:
    """``json.loads`` with every failure (syntax, encoding, nesting depth) as one error."""
    try:
        return json.loads(raw)
    except (
        json.JSONDecodeError,
        UnicodeDecodeError,
        RecursionError,
        TypeError,
        ValueError,
    ) as error:
        raise ModelFormatError(
            f"{what} is not valid JSON ({type(error).__name__}: {str(error)[:200]})"
        ) from None


def _member_findings(infos: list[zipfile.ZipInfo], limits: LoadLimits) -> list[Finding]:
    findings, seen = [], set()
    for info in infos:
        name = info.filename
        parts = re.split(r"[/\\]", name)
        if name.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", name):
            findings.append(Finding("zip member", name, "archive", "absolute or '..' path"))
        elif name in seen:
            findings.append(Finding("zip member", name, "archive", "duplicate member name"))
        elif name not in _CONFIG_MEMBERS + _WEIGHT_MEMBERS:
            findings.append(
                Finding(
                    "zip member",
                    name,
                    "archive",
                    "unexpected member (a .keras model holds config.json, "
                    "metadata.json and model.weights.h5 only; assets are "
                    "not loaded)",
                )
            )
        elif info.flag_bits & 0x1:
            findings.append(Finding("zip member", name, "archive", "encrypted member"))
        seen.add(name)
    return findings


def _check_sizes(path: pathlib.Path, infos: list[zipfile.ZipInfo], limits: LoadLimits) -> None:
    for info in infos:
        limit = limits.config_bytes if info.filename in _CONFIG_MEMBERS else limits.weights_bytes
        if info.file_size > limit:
            raise LoadLimitError(
                f"{path}: archive member {info.filename!r} declares {info.file_size:,} bytes, "
                f"over the limit of {limit:,} bytes (a decompression bomb, or raise the limit "
                "for a model you trust)"
            )


def rebuild_keras_archive(
    path: pathlib.Path,
    destination: pathlib.Path,
    limits: LoadLimits,
    shown: pathlib.Path | None = None,
) -> dict:
    """Checks the ``.keras`` zip at ``path``, copies its members into a new zip at
    ``destination`` (a private directory) and returns the parsed ``config.json``; messages
    name ``shown`` (default ``path``).

    Raises:
      ModelFormatError: not a readable ``.keras`` zip.
      UnsafeModelError: refused member names.
      LoadLimitError: a declared size over the limits.
    """
    shown = shown or path
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if len(infos) > limits.files:
                raise LoadLimitError(
                    f"{shown}: {len(infos)} archive members, over the limit of {limits.files}"
                )
            if "config.json" not in [info.filename for info in infos]:
                raise ModelFormatError(
                    f"{shown}: a zip file without config.json is not a Keras .keras model"
                )
            findings = _member_findings(infos, limits)
            if findings:
                raise UnsafeModelError(shown, findings, "The archive is malformed.")
            _check_sizes(shown, infos, limits)
            config = read_json_bounded(archive.read("config.json"), f"{shown}: config.json")
            if not isinstance(config, dict):
                raise ModelFormatError(f"{shown}: config.json is not a JSON object")
            with zipfile.ZipFile(destination, "w", zipfile.ZIP_STORED) as copy:
                for info in infos:
                    _copy_member(archive, info, copy)
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
        EOFError,
        OSError,
    ) as error:
        raise ModelFormatError(
            f"{shown}: not a readable Keras .keras file ({type(error).__name__}: {error})"
        ) from None
    return config


def _copy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, copy: zipfile.ZipFile) -> None:
    # zipfile stops at the declared size and checks the CRC, so a member cannot expand past
    # what _check_sizes accepted.
    with archive.open(info) as source, copy.open(info.filename, "w", force_zip64=True) as out:
        shutil.copyfileobj(source, out, _CHUNK)


def copy_saved_model_dir(path: pathlib.Path, destination: pathlib.Path, limits: LoadLimits) -> None:
    """Copies the SavedModel directory ``path`` into ``destination`` (private), refusing
    symbolic links, special files and sizes over the limits; links are never followed."""
    total, count = 0, 0
    findings = []
    for source in sorted(path.rglob("*")):
        relative = source.relative_to(path)
        if source.is_symlink():
            findings.append(
                Finding(
                    "symbolic link",
                    str(relative),
                    "directory",
                    "links may point anywhere on the machine",
                )
            )
            continue
        if source.is_dir():
            continue
        if not source.is_file():
            findings.append(
                Finding("special file", str(relative), "directory", "not a regular file")
            )
            continue
        count += 1
        size = source.stat().st_size
        total += size
        if count > limits.files:
            raise LoadLimitError(f"{path}: more than {limits.files} files in the SavedModel")
        budget = limits.weights_bytes + limits.graph_bytes
        if total > budget:
            raise LoadLimitError(
                f"{path}: the SavedModel's files exceed {budget:,} bytes "
                "(raise the weights limit for a model you trust)"
            )
    if findings:
        raise UnsafeModelError(path, findings, "The SavedModel was not loaded.")
    for source in sorted(path.rglob("*")):
        target = destination / source.relative_to(path)
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(source, "rb") as handle, open(target, "xb") as out:
                copied = _bounded_copy(handle, out, source.stat().st_size)
            if copied != source.stat().st_size:
                raise LoadLimitError(f"{path}: {source.name} changed while it was copied")


def _bounded_copy(source, out, limit: int) -> int:
    copied = 0
    while copied <= limit:
        chunk = source.read(min(_CHUNK, limit + 1 - copied))
        if not chunk:
            break
        out.write(chunk)
        copied += len(chunk)
    return copied
