"""The leaderboard in several processes: one shard of the attacked models each, merged.

TensorFlow keeps a small model's ops on about one core, so one process leaves the second core
of a 2-core machine mostly idle.  :func:`run_shards` starts ``count`` copies of the leaderboard
command, each with ``--shard=i/count`` and its own output folder
(``<output_dir>/shards/<i>-of-<count>``), sharing the attacked-model cache (each model belongs
to one shard, so no two processes write the same file).  Every shard resumes like a single
run; the parent polls the shards' ``leaderboard.json`` for progress, and :func:`merge_shards`
puts their rows back in the grid's order.  Each process runs the same seeded cells with the
same thread settings as a single run, so the numbers are the single run's (a test checks the
partition; ``scripts.leaderboard --workers=2`` was compared with ``--workers=1``).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import time
from collections.abc import Callable, Sequence

from fineprune_tf.leaderboard import Grid, Settings, load_rows

__all__ = ["merge_shards", "run_shards", "shard_dirs"]


def shard_dirs(output_dir: str | pathlib.Path, count: int) -> list[pathlib.Path]:
    """The output folder of each of ``count`` shards, under ``output_dir/shards``."""
    root = pathlib.Path(output_dir) / "shards"
    return [root / f"{index}-of-{count}" for index in range(count)]


def _rows_done(folder: pathlib.Path) -> int:
    path = folder / "leaderboard.json"
    try:
        return len(json.loads(path.read_text()).get("rows", []))
    except (OSError, ValueError):  # not written yet (the writes are atomic renames)
        return 0


def run_shards(
    command: Sequence[str],
    count: int,
    output_dir: str | pathlib.Path,
    cache_dir: str | pathlib.Path,
    *,
    on_progress: Callable[[int], None] | None = None,
    poll_seconds: float = 5.0,
) -> None:
    """Runs ``command`` once per shard, in parallel, and waits for all of them.

    Args:
      command: the leaderboard command with its grid and settings flags; each shard adds
        ``--shard=i/count``, ``--output_dir``, ``--cache_dir`` and ``--nofigures``.
      count: number of processes (>= 2).
      output_dir: the merged run's folder; the shards write under ``output_dir/shards``.
      cache_dir: the attacked-model cache every shard shares.
      on_progress: called with the number of rows the shards have written in this call.

    Raises:
      RuntimeError: a shard exited with an error (the message names its log).
    """
    if count < 2:
        raise ValueError(f"run_shards needs at least 2 shards. Received: count={count}")
    folders = shard_dirs(output_dir, count)
    earlier = sum(_rows_done(folder) for folder in folders)  # a resumed run's finished rows
    processes = []
    try:
        for index, folder in enumerate(folders):
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "log.txt", "ab") as log:
                processes.append(
                    subprocess.Popen(
                        [
                            *command,
                            f"--shard={index}/{count}",
                            f"--output_dir={folder}",
                            f"--cache_dir={cache_dir}",
                            "--nofigures",
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        while any(process.poll() is None for process in processes):
            if on_progress is not None:
                on_progress(sum(_rows_done(folder) for folder in folders) - earlier)
            time.sleep(poll_seconds)
    finally:  # an interrupted parent leaves no shard running (they resume next time)
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait()
    failed = [
        f"shard {index} exited with status {process.returncode} (see {folders[index]}/log.txt)"
        for index, process in enumerate(processes)
        if process.returncode != 0
    ]
    if failed:
        raise RuntimeError("; ".join(failed))


def merge_shards(
    output_dir: str | pathlib.Path, count: int, grid: Grid, settings: Settings
) -> tuple[list[dict], dict]:
    """The rows of every shard in the grid's cell order, and what their runs add up to:
    ``cpu_seconds`` (summed over the processes), ``cells_missing`` and the shards' wall times.

    Raises:
      SettingsMismatchError: a shard was computed with other settings.
    """
    rows: dict[str, dict] = {}
    cpu_seconds, walls = 0.0, []
    for folder in shard_dirs(output_dir, count):
        for row in load_rows(folder, settings):
            rows[row["key"]] = row
        path = folder / "leaderboard.json"
        if path.exists():
            stored = json.loads(path.read_text())
            cpu_seconds += float(stored.get("cpu_seconds") or 0.0)
            walls.append(float(stored.get("wall_seconds") or 0.0))
    keys = [cell.key(settings) for cell in grid.cells()]
    ordered = [rows[key] for key in keys if key in rows]
    totals = {
        "cpu_seconds": cpu_seconds,
        "cells_missing": sum(key not in rows for key in keys),
        "shard_wall_seconds": walls,
        "workers": count,
    }
    return ordered, totals
