"""Where a leaderboard cell's seconds go, with and without the reused training step.

    python -m scripts.leaderboard_speed [--tasks=mnist,traffic,speech] [--attack=badnets]
        [--seed=0] [--defenses=...] [--output=results/leaderboard_speed]
        [--cache_dir=runs/leaderboard_speed/models]

For each task, one attacked model (trained once, cached like the leaderboard's) is defended by
every defense, each cell followed by the retuning attack (``leaderboard.run_cell``, the
leaderboard's default settings and budget profile), three times in one process:

* ``fresh``: every fit compiles and traces its own step (the leaderboard before
  ``step_cache``);
* ``cold``: inside ``step_cache.reuse_compiled_steps()``, with an empty cache (what the first
  attacked model of a task costs in a leaderboard run);
* ``warm``: the same cells again with the cache ``cold`` filled (what each further attacked
  model of that task costs: the grid's other 11 per task).

Every cell's numbers (clean accuracy, ASR, robust and holdout accuracy, post-retuning ASR,
passes) must be equal across the three; ``identical`` says whether they were.  Writes
``<output>.json`` (every cell: wall and CPU seconds of the defense, the retuning attack and
the report; the machine and its load) and ``<output>.md`` (per task and defense, side by side,
and the default grid extrapolated from them).
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

from scripts import _quiet

_quiet.quiet_tensorflow()  # before anything imports TensorFlow

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("tasks", ["mnist", "traffic", "speech"], "Tasks to measure.")
flags.DEFINE_string("attack", "badnets", "The attack of the measured model.")
flags.DEFINE_integer("seed", 0, "Seed of the attacked model and the cells.")
flags.DEFINE_list("defenses", None, "Defenses (default: every defense of the registry).")
flags.DEFINE_string("output", "results/leaderboard_speed", "Output path without suffix.")
flags.DEFINE_string("cache_dir", "runs/leaderboard_speed/models", "Attacked models.")

#: The numbers a cell reports; the reused step must leave every one unchanged.
NUMBERS = ("clean_acc", "asr", "robust_acc", "holdout_acc", "retuned_asr", "undefended")
NUMBERS += ("forward_passes", "backward_passes")
MODES = ("fresh", "cold", "warm")
#: Attacked models per task in the default grid (4 attacks x 3 seeds).
MODELS_PER_TASK = 12


def _cells(task: str, defenses, settings, cache) -> list[dict]:
    from fineprune_tf import leaderboard, metrics

    context = leaderboard.TaskContext.load(task, FLAGS.seed, settings)
    model, poisoning, info = cache.get(task, FLAGS.attack, FLAGS.seed, settings, context)
    undefended = metrics.evaluate(model, context.test, None)  # warm-up, not used
    del undefended
    rows, undefended = [], None
    for defense in defenses:
        cell = leaderboard.Cell(task, FLAGS.attack, FLAGS.seed, defense)
        wall, cpu = time.perf_counter(), time.process_time()
        row = leaderboard.run_cell(cell, model, poisoning, context, settings, undefended)
        undefended = row["undefended"]  # once per attacked model, as leaderboard.run
        rows.append(
            {
                "defense": defense,
                **{name: row[name] for name in NUMBERS},
                "defense_seconds": row["seconds"],
                "retune_seconds": row["retune_seconds"],
                "report_seconds": row["report_seconds"],
                "cell_seconds": time.perf_counter() - wall,
                "cell_cpu_seconds": time.process_time() - cpu,
            }
        )
        print(f"  {task} {defense}: {rows[-1]['cell_cpu_seconds']:.1f} s CPU", file=sys.stderr)
    rows.append({"train": info})
    return rows


def _measure(task: str, defenses, settings, cache) -> dict:
    from fineprune_tf import step_cache

    measured = {"fresh": _cells(task, defenses, settings, cache)}
    with step_cache.reuse_compiled_steps() as steps:
        measured["cold"] = _cells(task, defenses, settings, cache)
        measured["warm"] = _cells(task, defenses, settings, cache)
        measured["trainers"] = {"built": steps.misses, "reused": steps.hits}
    info = measured["fresh"].pop()["train"]
    for mode in ("cold", "warm"):
        measured[mode].pop()
    measured["identical"] = all(
        [row[name] for name in NUMBERS] == [ref[name] for name in NUMBERS]
        for mode in ("cold", "warm")
        for row, ref in zip(measured[mode], measured["fresh"], strict=True)
    )
    measured["train_cpu_seconds"] = info.get("train_cpu_seconds")
    measured["train_seconds"] = info.get("train_seconds")
    return measured


def _total(rows: list[dict], key: str = "cell_cpu_seconds") -> float:
    return sum(row[key] for row in rows)


def render(result: dict) -> str:
    """The markdown report of a ``<output>.json``."""
    machine = result["machine"]
    lines = [
        "# Leaderboard cell cost: fresh traces vs one reused training step",
        "",
        f"`python -m scripts.leaderboard_speed` ({result['attack']}, seed {result['seed']}, "
        f"profile `{result['profile']}`), {machine.get('cores')} cores, "
        f"{machine.get('cpu', '')}; load average {result['load_start']} at the start, "
        f"{result['load_end']} at the end; {result['wall_seconds']:.0f} s wall.  CPU seconds "
        "of the process per cell (defense + retuning attack + report); wall in parentheses.",
        "",
    ]
    grid = {"before": 0.0, "after": 0.0}
    for task, measured in result["tasks"].items():
        lines += [
            f"## {task}: numbers identical in the three runs: {measured['identical']}; "
            f"trainers built {measured['trainers']['built']}, reused "
            f"{measured['trainers']['reused']}",
            "",
            "| defense | fresh | cold cache | warm cache | retuning (fresh / warm) |",
            "|---|---|---|---|---|",
        ]
        by_mode = {mode: measured[mode] for mode in MODES}
        for i, row in enumerate(by_mode["fresh"]):
            cells = [
                f"{by_mode[m][i]['cell_cpu_seconds']:.1f} ({by_mode[m][i]['cell_seconds']:.1f})"
                for m in MODES
            ]
            retune = f"{row['retune_seconds']:.1f} / {by_mode['warm'][i]['retune_seconds']:.1f}"
            lines.append(f"| {row['defense']} | {' | '.join(cells)} | {retune} |")
        totals = {m: _total(by_mode[m]) for m in MODES}
        walls = {m: _total(by_mode[m], "cell_seconds") for m in MODES}
        lines.append(
            "| **total** | "
            + " | ".join(f"**{totals[m]:.0f}** ({walls[m]:.0f})" for m in MODES)
            + " | |"
        )
        train = measured["train_cpu_seconds"] or 0.0
        before = MODELS_PER_TASK * (train + totals["fresh"])
        after = MODELS_PER_TASK * train + totals["cold"] + (MODELS_PER_TASK - 1) * totals["warm"]
        grid["before"] += before
        grid["after"] += after
        lines += [
            "",
            f"Attack training {train:.0f} s CPU ({measured['train_seconds'] or 0:.0f} s wall) per "
            f"model.  {MODELS_PER_TASK} models of this task: {before:.0f} s CPU before, "
            f"{after:.0f} s after (one cold, {MODELS_PER_TASK - 1} warm).",
            "",
        ]
    lines += [
        "## The default grid, extrapolated",
        "",
        f"{MODELS_PER_TASK} attacked models per task (4 attacks x 3 seeds, every attack's "
        f"training taken as {result['attack']}'s): {grid['before']:.0f} s CPU "
        f"({grid['before'] / 60:.0f} CPU-minutes) before, {grid['after']:.0f} s "
        f"({grid['after'] / 60:.0f} CPU-minutes) after.  Wall time on an idle 2-core machine "
        "is CPU / cores used (1-2): "
        f"{grid['after'] / 120:.0f}-{grid['after'] / 60:.0f} minutes after, "
        f"{grid['before'] / 120:.0f}-{grid['before'] / 60:.0f} before.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    del argv
    import dataclasses

    import tensorflow as tf

    from fineprune_tf import leaderboard, machine, reporting
    from fineprune_tf.defenses import REGISTRY

    tf.config.experimental.enable_op_determinism()  # as scripts.leaderboard
    defenses = tuple(FLAGS.defenses or REGISTRY)
    settings = leaderboard.Settings.default()
    cache = leaderboard.ModelCache(FLAGS.cache_dir)
    start = time.perf_counter()
    result = {
        "machine": machine.describe(),
        "attack": FLAGS.attack,
        "seed": FLAGS.seed,
        "profile": settings.profile,
        "settings": dataclasses.asdict(settings),
        "load_start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "tasks": {},
    }
    for task in FLAGS.tasks:
        result["tasks"][task] = _measure(task, defenses, settings, cache)
    result["load_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    result["wall_seconds"] = time.perf_counter() - start
    output = pathlib.Path(FLAGS.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    reporting.atomic_write_json(output.with_suffix(".json"), result)
    markdown = render(result)
    output.with_suffix(".md").write_text(markdown)
    print(markdown)
    return 0 if all(m["identical"] for m in result["tasks"].values()) else 1


if __name__ == "__main__":
    app.run(main)
