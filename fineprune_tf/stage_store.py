"""What an experiment keeps on disk: the stage manifest ``stages.json`` (:class:`StageStore`),
the model checkpoints (saved atomically, reused only while their hash is the one recorded) and
the output folder's rules (:func:`prepare_output_dir`)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import Protocol

import keras

from fineprune_tf import reporting


class Fingerprinted(Protocol):
    """What the store needs of a run's configuration (``experiment.ExperimentConfig``): the
    hash of the settings that determine each stage's numbers.  A protocol, not an import: the
    experiment driver imports this module."""

    def fingerprint(self) -> str: ...


__all__ = [
    "RESULT_FILES",
    "OutputDirError",
    "StageStore",
    "file_hash",
    "load_checkpoint",
    "prepare_output_dir",
    "save_model",
]

RESULT_FILES = ("results.json", "stages.json")


class OutputDirError(ValueError):
    """The output directory holds another run's results."""


def save_model(model: keras.Model, path: pathlib.Path) -> None:
    """Saves a ``.keras`` file atomically (a temporary file renamed over ``path``)."""
    temporary = path.with_name(f".{path.stem}.tmp.keras")
    try:
        model.save(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def file_hash(path: pathlib.Path) -> str:
    """SHA-256 (hex) of a file's bytes: what a stage read or wrote."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


class StageStore:
    """The stage manifest ``stages.json``: each finished stage's JSON result, the inputs it was
    computed from and the hashes of the files it wrote.

    A record is ``{"inputs": {...}, "outputs": {file: sha256}, "result": {...}}``.  A stage is
    reused only while its recorded inputs equal the current ones (:meth:`current`), so
    redoing a stage changes the hash its dependents record as input and they are redone too.
    """

    def __init__(
        self,
        directory: pathlib.Path,
        config: Fingerprinted,
        resume: bool,
        progress: Callable[[str], None],
    ):
        self.path = directory / "stages.json"
        self.fingerprint = config.fingerprint()
        self.progress = progress
        self.done: dict[str, dict] = {}
        if resume and self.path.exists():
            try:
                manifest = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                progress(f"warning: stages.json is unreadable ({error}): starting over")
                manifest = {}
            if manifest.get("fingerprint") not in (None, self.fingerprint):
                raise OutputDirError(
                    f"{directory} holds a run with a different configuration; use a new "
                    "--output_dir or --overwrite"
                )
            self.done = manifest.get("done", {})

    def current(self, name: str, inputs: dict) -> dict | None:
        """The stage's result if it finished from exactly ``inputs``; None if it never ran or
        ran from other inputs (then it must be redone)."""
        record = self.done.get(name)
        if not isinstance(record, dict) or "result" not in record:
            return None
        if record.get("inputs") != inputs:
            self.progress(
                f"{name}: its inputs changed since it ran (a stage it depends on "
                "was redone): redoing it"
            )
            return None
        return record["result"]

    def outputs(self, name: str) -> dict:
        """The hashes of the files the stage wrote, as recorded."""
        return (self.done.get(name) or {}).get("outputs", {})

    def result(self, name: str) -> dict:
        return self.done[name]["result"]

    def mark(self, name: str, result: dict, inputs: dict, outputs: dict | None = None) -> None:
        self.done[name] = {"inputs": inputs, "outputs": outputs or {}, "result": result}
        reporting.atomic_write_json(self.path, {"fingerprint": self.fingerprint, "done": self.done})


def prepare_output_dir(directory: str | os.PathLike, overwrite: bool, resume: bool) -> pathlib.Path:
    """Creates ``directory``; refuses one that holds another run's results unless ``overwrite``
    (which deletes only this project's result files) or ``resume``."""
    path = pathlib.Path(directory)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"--output_dir {path} exists and is not a directory")
    existing = [name for name in RESULT_FILES if (path / name).exists()]
    if existing and not (overwrite or resume):
        raise OutputDirError(
            f"{path} already holds a run's results ({', '.join(existing)}); pass --resume to "
            "continue it, --overwrite to replace it, or choose another --output_dir"
        )
    if existing and overwrite:
        for name in ("results.json", "stages.json", "table1.md", "table2.md", "run.log"):
            (path / name).unlink(missing_ok=True)
        for sub in ("models", "stages"):
            shutil.rmtree(path / sub, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_checkpoint(
    path: pathlib.Path, expected_hash: str | None, progress: Callable[[str], None]
) -> keras.Model | None:
    """The stage's model if ``path`` is the very file the stage wrote and it loads; else None
    (the stage is redone)."""
    if not path.exists():
        return None
    if expected_hash is None or file_hash(path) != expected_hash:
        progress(f"warning: checkpoint {path} is not the file its stage wrote: redoing that stage")
        return None
    try:
        return keras.models.load_model(path)
    except Exception as error:  # noqa: BLE001 - any corruption means "redo the stage"
        progress(f"warning: checkpoint {path} is unreadable ({error}): redoing that stage")
        return None
