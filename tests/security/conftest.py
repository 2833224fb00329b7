"""Shared set-up of the security tests: a watched temporary root and a command-line runner."""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
# Small limits keep the children fast; the CLI test passes the same through flags.
CHILD_SECONDS = 120.0
CHILD_MEMORY = 3 << 30


def tree_state(root: pathlib.Path) -> dict[str, str]:
    """Every path under ``root`` (files by content hash, folders and links by kind)."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            state[key] = "link:" + os.readlink(path)
        elif path.is_dir():
            state[key] = "dir"
        else:
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


class Watched:
    """A temporary root whose state is recorded once the inputs are built."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.before: dict[str, str] | None = None

    def freeze(self) -> None:
        self.before = tree_state(self.root)

    def assert_unchanged(self) -> None:
        assert self.before is not None, "freeze() first"
        after = tree_state(self.root)
        created = sorted(set(after) - set(self.before))
        removed = sorted(set(self.before) - set(after))
        changed = sorted(k for k in self.before if k in after and after[k] != self.before[k])
        assert not (created or removed or changed), (created, removed, changed)


@pytest.fixture()
def watched(tmp_path) -> Watched:
    return Watched(tmp_path)


def run_cli(args: list[str], cwd: pathlib.Path, timeout: float = 600.0):
    """Runs ``python -m scripts.fine_prune`` in a child; returns (result, seconds)."""
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "scripts.fine_prune", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    return result, time.monotonic() - start


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]
