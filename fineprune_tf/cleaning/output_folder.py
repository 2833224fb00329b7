"""The output folder's rules: outside every input, empty or a previous run, and a manifest of
every file written (entered just before the file is), so ``overwrite`` deletes exactly the
previous run's files and never anything else."""

from __future__ import annotations

import json
import os
import pathlib

from fineprune_tf import reporting
from fineprune_tf.cleaning.errors import CleaningError

__all__ = [
    "MANIFEST",
    "OUTPUT_FILES",
    "Manifest",
    "check_output_dir",
    "defended_file",
    "read_manifest",
    "remove_previous",
]

#: The files every run writes; the defended model goes to ``defended_file(defense)`` too
#: (``fine_pruned.keras`` for the default fine-pruning).
OUTPUT_FILES = (
    "report.json",
    "report.md",
    "pruned.keras",
    "pruning_curve.png",
    "activations.png",
    "saved_model",
)
MANIFEST = "fineprune_manifest.json"
_MANIFEST_KIND = "fineprune_tf.clean_model"


def defended_file(defense: str) -> str:
    """The file the defended model is saved as: ``fine_pruned.keras``, ``pruned.keras`` or
    ``<defense>.keras``."""
    return {"fine_pruning": "fine_pruned.keras", "pruning": "pruned.keras"}.get(
        defense, f"{defense}.keras"
    )


def _real(path: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(os.path.realpath(path))


def check_output_dir(
    output_dir: pathlib.Path, inputs: list[pathlib.Path], overwrite: bool
) -> list[str]:
    """Refuses an output folder that overlaps an input or holds anything but a previous run;
    returns the files listed by that run's manifest (to delete when ``overwrite``)."""
    out = _real(output_dir)
    for path in inputs:
        real = _real(path)
        relation = (
            "is"
            if out == real
            else "is inside"
            if out.is_relative_to(real)
            else "contains"
            if real.is_relative_to(out)
            else None
        )
        if relation:
            raise CleaningError(
                f"--output_dir {output_dir} {relation} your input {path}; "
                "choose a folder outside every input"
            )
    if not output_dir.exists():
        return []
    if not output_dir.is_dir():
        raise CleaningError(f"--output_dir {output_dir} exists and is not a directory")
    if not any(output_dir.iterdir()):
        return []
    previous = read_manifest(output_dir)
    if previous is None:
        raise CleaningError(
            f"--output_dir {output_dir} is not empty and is not a previous "
            f"run (no {MANIFEST}); choose an empty or new folder"
        )
    if not overwrite:
        raise CleaningError(
            f"{output_dir} already holds a report of a previous run; pass "
            "--overwrite to replace the files it lists, or choose another "
            "--output_dir"
        )
    return previous


def read_manifest(output_dir: pathlib.Path) -> list[str] | None:
    """The files a previous run listed, or None if ``output_dir`` holds no valid manifest of
    ours (a symlink, unreadable JSON or another kind is not one)."""
    path = output_dir / MANIFEST
    if path.is_symlink() or not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("kind") != _MANIFEST_KIND:
        return None
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return files


def remove_previous(
    output_dir: pathlib.Path, listed: list[str], writing: tuple[str, ...] = ()
) -> None:
    """Deletes the previous run's listed files (regular files inside ``output_dir`` only),
    then the folders they leave empty; refuses if a result name is still taken."""
    root = _real(output_dir)
    for name in sorted(set(listed), key=lambda n: -n.count("/")):
        target = output_dir / name
        if (
            pathlib.PurePosixPath(name).is_absolute()
            or ".." in pathlib.PurePosixPath(name).parts
            or not _real(target.parent).is_relative_to(root)
        ):
            continue
        if target.is_symlink() or target.is_file():
            target.unlink()
        parent = target.parent
        while (
            parent != output_dir
            and _real(parent).is_relative_to(root)
            and parent.is_dir()
            and not any(parent.iterdir())
        ):
            parent.rmdir()
            parent = parent.parent
    (output_dir / MANIFEST).unlink(missing_ok=True)
    taken = [name for name in (*OUTPUT_FILES, *writing) if (output_dir / name).exists()]
    if taken:
        raise CleaningError(
            f"{output_dir} holds {taken}, which the previous run's manifest "
            "does not list; they are left untouched: move them or choose "
            "another --output_dir"
        )


class Manifest:
    """The list of files a run wrote, saved before each file is written."""

    def __init__(self, output_dir: pathlib.Path):
        self.output_dir = output_dir
        self.files: list[str] = []

    def add(self, *names: str) -> None:
        self.files.extend(n for n in names if n not in self.files)
        reporting.atomic_write_json(
            self.output_dir / MANIFEST, {"kind": _MANIFEST_KIND, "files": self.files}
        )

    def add_tree(self, name: str) -> None:
        self.add(
            *(
                str(p.relative_to(self.output_dir).as_posix())
                for p in sorted((self.output_dir / name).rglob("*"))
                if p.is_file()
            )
        )
