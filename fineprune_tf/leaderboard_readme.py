"""The README's results tables, rendered from run files so the README cannot drift from them.

``collect(run_dirs)`` reads ``results.json`` (``scripts.fine_prune`` runs) and
``leaderboard.json`` (``scripts.leaderboard`` runs) into a *summary* (JSON-ready: machine,
seeds, mean ± sd over the runs of a task, wall time); ``render(summary)`` turns a summary into
the markdown that sits between the README's ``<!-- results:begin -->`` and
``<!-- results:end -->`` markers. ``results/readme_summary.json`` is the checked-in summary
and ``tests/test_readme_results.py`` checks that the README holds ``render`` of it.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np

from fineprune_tf import leaderboard_report
from fineprune_tf.machine import summary_line

__all__ = ["BEGIN", "END", "collect", "merge", "render", "readme_section"]

BEGIN = "<!-- results:begin (python -m scripts.report; do not edit by hand) -->"
END = "<!-- results:end -->"
FORMAT_VERSION = 1
_MEASURES = ("clean_acc", "asr", "der", "seconds")


def _mean_sd(values: Sequence[float | None]) -> list[float | None]:
    present = np.asarray([v for v in values if v is not None], float)
    if not len(present):
        return [None, None]
    return [float(present.mean()), float(present.std(ddof=1)) if len(present) > 1 else 0.0]


def _fine_prune(runs: list[dict]) -> list[dict]:
    """Per task: every (attack, defense) of table1 as mean ± sd over the runs (seeds)."""
    by_task: dict[str, list[dict]] = {}
    for run in runs:
        by_task.setdefault(run["task"], []).append(run)
    tasks = []
    for task, members in sorted(by_task.items()):
        cells: dict[tuple[str, str], list[dict]] = {}
        for run in members:
            for attack, row in run["table1"].items():
                for defense, entry in row.items():
                    cells.setdefault((attack, defense), []).append(entry)
        tasks.append(
            {
                "task": task,
                "seeds": sorted(r["config"]["seed"] for r in members),
                "quick": any(r["config"].get("quick") for r in members),
                "machine": members[0].get("machine"),
                "wall_seconds": [round(r.get("total_seconds", 0.0), 1) for r in members],
                "rows": [
                    {
                        "attack": a,
                        "defense": d,
                        **{m: _mean_sd([e.get(m) for e in entries]) for m in _MEASURES},
                    }
                    for (a, d), entries in cells.items()
                ],
            }
        )
    return tasks


def collect(run_dirs: Sequence[str | pathlib.Path]) -> dict:
    """The summary of ``run_dirs`` (each holds results.json or leaderboard.json).

    Raises:
      FileNotFoundError: a directory holds neither file.
    """
    fine_prune, boards = [], []
    for directory in map(pathlib.Path, run_dirs):
        if (directory / "leaderboard.json").exists():
            stored = json.loads((directory / "leaderboard.json").read_text())
            boards.append(
                {
                    "source": directory.name,
                    "machine": stored.get("machine"),
                    "quick": stored.get("quick", False),
                    "wall_seconds": round(stored.get("wall_seconds", 0.0), 1),
                    "runs": stored.get("runs", []),
                    "cells_missing": stored.get("cells_missing", 0),
                    "settings": stored.get("settings"),
                    "summary": leaderboard_report.summarize(
                        stored["rows"], stored.get("grid", {}).get("defenses")
                    ),
                }
            )
        elif (directory / "results.json").exists():
            fine_prune.append(json.loads((directory / "results.json").read_text()))
        else:
            raise FileNotFoundError(f"{directory} holds neither results.json nor leaderboard.json")
    return {"format": FORMAT_VERSION, "fine_prune": _fine_prune(fine_prune), "leaderboards": boards}


def merge(summary: dict, added: dict) -> dict:
    """``summary`` with the entries of ``added`` (both from :func:`collect`): a fine-prune
    task or a leaderboard (by directory name) already in ``summary`` is replaced, others are
    appended, so a checked-in summary gains new runs without re-reading the old runs' files."""
    merged = {"format": FORMAT_VERSION}
    for part, key in (("fine_prune", "task"), ("leaderboards", "source")):
        new = {entry[key]: entry for entry in added[part]}
        kept = [new.pop(entry[key], entry) for entry in summary[part]]
        merged[part] = kept + list(new.values())
    return merged


def _fmt(pair, digits: int = 3) -> str:
    mean, sd = pair
    return "n/a" if mean is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _render_fine_prune(task: dict) -> list[str]:
    run = "scripts.fine_prune --task=" + task["task"] + (" --quick" if task["quick"] else "")
    lines = [
        f"`python -m {run}`, seeds {task['seeds']}, wall time "
        f"{', '.join(f'{s:.0f} s' for s in task['wall_seconds'])} "
        f"({summary_line(task['machine'])}). Mean ± sd over the seeds.",
        "",
        "| attack | defense | clean acc | ASR | DER | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in task["rows"]:
        lines.append(
            f"| {row['attack']} | {row['defense']} | {_fmt(row['clean_acc'])} | "
            f"{_fmt(row['asr'])} | {_fmt(row['der'])} | "
            f"{_fmt(row['seconds'], 1)} |"
        )
    return lines + [""]


def _render_board(board: dict) -> list[str]:
    seeds = sorted({s for e in board["summary"] for s in e["seeds"]})
    note = (
        f" **Incomplete: {board['cells_missing']} cells not run.**"
        if board["cells_missing"]
        else ""
    )
    profile = (board.get("settings") or {}).get("profile")
    lines = [
        f"`python -m scripts.leaderboard{' --quick' if board['quick'] else ''}` "
        + (f"(defense profile {profile}) " if profile else "")
        + f"({board['source']}), seeds {seeds}, "
        f"{leaderboard_report.wall_time_text(board)} "
        f"({summary_line(board['machine'])}).{note} Mean ± sd over seeds; `protocol` = "
        "the defense chosen from the defender's clean data only (largest weight change within "
        "the clean-holdout tolerance).",
        "",
        "| task | attack | defense | clean acc | ASR | robust acc | DER | retuned ASR | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in board["summary"]:
        name = e["defense"]
        if name == leaderboard_report.PROTOCOL:
            name = "protocol (" + ", ".join(f"{k} {v}" for k, v in e["chosen"].items()) + ")"
        lines.append(
            f"| {e['task']} | {e['attack']} | {name} | "
            + " | ".join(
                _fmt((e[m], e[m + "_sd"]), 1 if m == "seconds" else 3)
                for m in leaderboard_report.MEASURES
            )
            + " |"
        )
    return lines + [""]


def render(summary: dict) -> str:
    """The markdown of a summary (what goes between :data:`BEGIN` and :data:`END`)."""
    lines: list[str] = []
    for task in summary["fine_prune"]:
        lines += [f"#### {task['task']}: the paper's attacks and defenses", ""]
        lines += _render_fine_prune(task)
    for board in summary["leaderboards"]:
        lines += ["#### Leaderboard", ""]
        lines += _render_board(board)
    return "\n".join(lines).rstrip() + "\n"


def readme_section(readme_text: str) -> str:
    """The text between the markers in the README (raises ValueError when they are absent)."""
    if BEGIN not in readme_text or END not in readme_text:
        raise ValueError("README has no results markers")
    return readme_text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"
