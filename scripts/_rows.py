"""What the evaluation scripts (``defense_eval``, ``third_party_eval``, ``ablation``) share: a
resumable file of measured rows, mean ± sd over seeds, the ``--defenses`` check and the machine
line of their reports."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import numpy as np


class RowFile:
    """Rows measured so far, one JSON object a line in ``path``: an interrupted run reads them
    back and measures only what is missing.

    Args:
      path: the ``.jsonl`` file (created on the first row).
      version: keep only rows with this ``"version"`` (None: keep every row).
      describe: one progress line per new row (None: the row as JSON).
    """

    def __init__(
        self,
        path: pathlib.Path,
        version: int | None = None,
        describe: Callable[[dict], str] | None = None,
    ):
        self.path = path
        self.describe = describe or json.dumps
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        self.rows = [r for r in rows if version is None or r.get("version") == version]

    def add(self, row: dict) -> None:
        """Appends ``row`` to the file (before anything else can fail) and prints its line."""
        self.rows.append(row)
        with self.path.open("a") as stream:
            stream.write(json.dumps(row) + "\n")
        print(self.describe(row), flush=True)

    def latest(self, key: Callable[[dict], tuple]) -> list[dict]:
        """One row per ``key``: the last one measured."""
        return list({key(r): r for r in self.rows}.values())


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def defenses_error(names: list[str]) -> str | None:
    """Why ``--defenses`` is unusable (it must hold "none", the baseline, and registered names
    only), or None."""
    from fineprune_tf import defenses

    unknown = [d for d in names if d not in defenses.REGISTRY]
    if unknown or "none" not in names:
        return (
            f"defenses must include 'none' and be some of {list(defenses.REGISTRY)}; "
            f"unknown: {unknown}"
        )
    return None


def machine_line() -> str:
    """The machine, for a report's header (see :mod:`fineprune_tf.machine`)."""
    from fineprune_tf import machine

    return machine.summary_line(machine.describe())
