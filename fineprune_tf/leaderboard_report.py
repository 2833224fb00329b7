"""The leaderboard's summaries: mean ± sd over seeds, the protocol's choice, leaderboard.md and
the DER heat maps ``der_<task>.png``.

Rows come from :func:`fineprune_tf.leaderboard.run`. DER is computed per seed against the
same seed's undefended model (``defenses.der``: ``[max(0, dASR) - max(0, dACC) + 1] / 2``),
then averaged. The ``protocol`` row is what a defender would deploy: per seed,
``defenses.choose`` picks among the defenses run (``none`` excluded) by the rule of
``defenses.auto_defend``: within the tolerance on clean *holdout* accuracy, the largest weight
change from the attacker's model (each cell records both); the row reports the chosen
defense's numbers.
"""

from __future__ import annotations

import io
import pathlib
import types
from collections.abc import Sequence

import numpy as np

from fineprune_tf import reporting
from fineprune_tf.machine import summary_line

__all__ = ["MEASURES", "PROTOCOL", "summarize", "markdown", "heatmap", "write_all"]

MEASURES = ("clean_acc", "asr", "robust_acc", "der", "retuned_asr", "seconds")
PROTOCOL = "protocol"


def _mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    present = np.asarray([v for v in values if v is not None], float)
    if not len(present):
        return None, None
    return float(present.mean()), float(present.std(ddof=1)) if len(present) > 1 else 0.0


def _with_der(row: dict) -> dict:
    from fineprune_tf.defenses import der

    if row.get("asr") is None or row["undefended"].get("asr") is None:
        return {**row, "der": None}
    return {**row, "der": der(row["undefended"], row)}


def protocol_rows(rows: Sequence[dict], defenses: Sequence[str] | None = None) -> list[dict]:
    """Per (task, attack, seed) whose candidate defenses (``defenses`` without ``none``;
    default: every defense in ``rows``) all finished, the chosen defense's row (``defense`` =
    ``"protocol"``, ``chosen`` = its name), chosen from holdout accuracy only."""
    from fineprune_tf.defenses import choose

    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row["defense"] != "none":
            key = (row["task"], row["attack"], row["seed"])
            groups.setdefault(key, {})[row["defense"]] = row
    expected = (
        {name for members in groups.values() for name in members}
        if defenses is None
        else set(defenses) - {"none"}
    )
    chosen_rows = []
    for members in groups.values():
        if set(members) != expected:  # a seed still running: its choice is not final
            continue
        # choose() reads only .holdout_acc and the weight changes, inside guard.selecting().
        results = {
            name: types.SimpleNamespace(holdout_acc=r["holdout_acc"]) for name, r in members.items()
        }
        base = next(iter(members.values()))["undefended_holdout_acc"]
        # The rule `auto` uses (largest weight change within the tolerance); rows written
        # before cells recorded their weight change fall back to the priority order.
        changes = (
            {name: r["weight_change"] for name, r in members.items()}
            if all("weight_change" in r for r in members.values())
            else None
        )
        name, why, _ = choose(results, base, changes=changes)
        chosen_rows.append(
            {
                **members[name],
                "defense": PROTOCOL,
                "chosen": name,
                "why": why,
                # The protocol runs every candidate before it can choose: its cost is theirs.
                "seconds": sum(r["seconds"] for r in members.values()),
            }
        )
    return chosen_rows


def summarize(rows: Sequence[dict], defenses: Sequence[str] | None = None) -> list[dict]:
    """Per (task, attack, defense), sorted: mean and sd (``<measure>_sd``) of every
    :data:`MEASURES` over seeds, the seeds, and (protocol rows) how often each defense was
    chosen (``defenses``: the protocol's candidates, see :func:`protocol_rows`)."""
    full = [_with_der(r) for r in rows]
    full += [_with_der(r) for r in protocol_rows(rows, defenses)]
    groups: dict[tuple, list[dict]] = {}
    for row in full:
        groups.setdefault((row["task"], row["attack"], row["defense"]), []).append(row)
    summary = []
    for (task, attack, defense), members in sorted(groups.items(), key=_order):
        entry = {
            "task": task,
            "attack": attack,
            "defense": defense,
            "seeds": sorted(r["seed"] for r in members),
        }
        for measure in MEASURES:
            entry[measure], entry[measure + "_sd"] = _mean_sd([r.get(measure) for r in members])
        if defense == PROTOCOL:
            names = [r["chosen"] for r in members]
            entry["chosen"] = {n: names.count(n) for n in sorted(set(names))}
        summary.append(entry)
    return summary


def _order(item):
    (task, attack, defense), _ = item
    return task, attack, defense == PROTOCOL, defense != "none", defense


def _fmt(entry: dict, measure: str) -> str:
    mean, sd = entry.get(measure), entry.get(measure + "_sd")
    if mean is None:
        return "n/a"
    if measure == "seconds":
        return f"{mean:.1f} ± {sd:.1f}"
    return f"{mean:.3f} ± {sd:.3f}"


def markdown(summary: Sequence[dict], meta: dict) -> str:
    """leaderboard.md: the machine, seeds, settings and wall time, then one table."""
    machine = meta.get("machine", {})
    seeds = sorted({s for e in summary for s in e["seeds"]})
    lines = [
        "# Defense leaderboard (defender-realistic protocol)",
        "",
        f"Written by `python -m scripts.leaderboard{' --quick' if meta.get('quick') else ''}` "
        f"on {summary_line(machine)}; "
        f"seeds {seeds}; {wall_time_text(meta)}.",
        "",
        f"Settings: `{meta.get('settings')}`.",
        "",
        *_profile_lines(meta.get("settings") or {}),
        *_completeness(meta),
        "Mean ± sd over seeds. Every choice a defense makes reads only the defender's clean "
        "validation split (DefenderData, inside guard.selecting()); the test split and its "
        "triggered copy only report. DER = [max(0, dASR) - max(0, dACC) + 1] / 2 against the "
        "same seed's undefended model. Retuned ASR: ASR after the retuning attack (Min et al. "
        "2024) on the defended model. `protocol`: the defense `defenses.choose` picks from the "
        "defender's clean data: within the tolerance on clean holdout accuracy, the largest "
        "weight change (times chosen in brackets). Seconds: the defense alone (the protocol row: "
        "every candidate's, summed, since it runs them all to choose).",
        "",
        "| task | attack | defense | clean acc | ASR | robust acc | DER | retuned ASR | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        name = e["defense"]
        if name == PROTOCOL:
            name = "**protocol** (" + ", ".join(f"{k} {v}" for k, v in e["chosen"].items()) + ")"
        lines.append(
            f"| {e['task']} | {e['attack']} | {name} | "
            + " | ".join(_fmt(e, m) for m in MEASURES)
            + " |"
        )
    return "\n".join(lines) + "\n"


def wall_time_text(meta: dict) -> str:
    """ "wall time 48.3 min" over every invocation that wrote the leaderboard (a resumed run
    lists each: "summed over 2 runs: 288 cells in 38.9 min, 36 in 9.4")."""
    runs = meta.get("runs") or []
    if len(runs) <= 1:
        return f"wall time {meta.get('wall_seconds', 0.0) / 60:.1f} min"
    total = sum(run["wall_seconds"] for run in runs) / 60
    parts = [f"{run['cells']} cells in {run['wall_seconds'] / 60:.1f} min" for run in runs]
    return f"wall time {total:.1f} min summed over {len(runs)} runs: {', '.join(parts)}"


def _profile_lines(settings: dict) -> list[str]:
    """What the defense profile changed (nothing is weakened silently) and its time budget."""
    from fineprune_tf import leaderboard_profiles

    costs = settings.get("defense_costs")
    if not costs:
        return []
    if costs["name"] == "full":
        return ["Defense profile: **full** (every defense at its defaults).", ""]
    full = leaderboard_profiles.profile("full").to_dict()
    changed = ", ".join(
        f"{knob} {full[knob]} -> {value}"
        for knob, value in costs.items()
        if knob != "name" and value != full[knob]
    )
    return [
        f"Defense profile: **{costs['name']}** ({changed}; every threshold, learning rate and "
        "stopping rule still chosen from the defender's clean data). `--profile=full` runs "
        "every defense at its defaults.",
        "",
        leaderboard_profiles.BUDGET_NOTE,
        "",
    ]


def _completeness(meta: dict) -> list[str]:
    missing, total = meta.get("cells_missing"), meta.get("cells_total")
    if not missing:
        return []
    return [
        f"**Incomplete: {missing} of {total} cells not run yet** (stopped by the "
        f"{meta.get('budget_minutes', 0):g}-minute budget; the same command continues). "
        "Means are over the seeds finished.",
        "",
    ]


def heatmap(summary: Sequence[dict], task: str, path: str | pathlib.Path) -> None:
    """der_<task>.png: mean DER, attacks (rows) x defenses (columns), annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in summary if e["task"] == task and e["defense"] != "none"]
    attacks = sorted({e["attack"] for e in entries})
    names = sorted({e["defense"] for e in entries}, key=lambda n: (n == PROTOCOL, n))
    grid = np.full((len(attacks), len(names)), np.nan)
    for e in entries:
        if e["der"] is not None:
            grid[attacks.index(e["attack"]), names.index(e["defense"])] = e["der"]
    figure, axes = plt.subplots(figsize=(1.1 * len(names) + 2, 0.6 * len(attacks) + 1.6))
    image = axes.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(names)), names, rotation=35, ha="right")
    axes.set_yticks(range(len(attacks)), attacks)
    for i in range(len(attacks)):
        for j in range(len(names)):
            if not np.isnan(grid[i, j]):
                axes.text(
                    j,
                    i,
                    f"{grid[i, j]:.2f}",
                    ha="center",
                    va="center",
                    color="white" if grid[i, j] < 0.6 else "black",
                    fontsize=8,
                )
    axes.set_title(f"{task}: DER (mean over seeds)")
    figure.colorbar(image, ax=axes, fraction=0.04)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    reporting.atomic_write_bytes(path, buffer.getvalue())


def write_all(
    output_dir: str | pathlib.Path, rows: list[dict], meta: dict, *, figures: bool = True
) -> list[dict]:
    """Writes leaderboard.json (rows, summary, meta), leaderboard.md and, when ``figures``,
    der_<task>.png; returns the summary."""
    from fineprune_tf.leaderboard import FORMAT_VERSION

    output_dir = pathlib.Path(output_dir)
    summary = summarize(rows, meta.get("grid", {}).get("defenses"))
    reporting.atomic_write_json(
        output_dir / "leaderboard.json",
        {**meta, "format": FORMAT_VERSION, "rows": rows, "summary": summary},
    )
    reporting.atomic_write_text(output_dir / "leaderboard.md", markdown(summary, meta))
    if figures:
        for task in sorted({e["task"] for e in summary}):
            heatmap(summary, task, output_dir / f"der_{task}.png")
    return summary
