"""The paper's tables and figures, and atomic result files.

Table 1: clean accuracy (cl) and attack success rate (bd) per attack x defense.
Table 2: the defender's utility matrix (clean accuracy - ASR).
Fig. 4/8: mean last-conv activation per channel, clean vs backdoored inputs.
Fig. 6: clean accuracy and ASR against the fraction of channels pruned.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "atomic_write_text",
    "atomic_write_json",
    "table1_markdown",
    "table2_markdown",
    "plot_pruning_curve",
    "plot_activations",
    "ATTACK_TITLES",
    "DEFENSE_TITLES",
]

ATTACK_TITLES = {"baseline": "Baseline Attack", "pruning_aware": "Pruning Aware Attack"}
DEFENSE_TITLES = {
    "none": "None",
    "pruning": "Pruning",
    "fine_tuning": "Fine-Tuning",
    "fine_pruning": "Fine-Pruning",
    "fmp": "FMP",
}


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename, so a reader sees the
    old file or the new one, never half of one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def atomic_write_json(path: str | os.PathLike, data) -> None:
    """Atomically writes ``data`` as indented JSON (numpy values converted, NaN as null)."""
    atomic_write_text(path, json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def _cell(entry: Mapping | None) -> str:
    if not entry:
        return "—"

    def fmt(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    return f"cl: {fmt(entry.get('clean_acc'))} bd: {fmt(entry.get('asr'))}"


def table1_markdown(
    table1: Mapping[str, Mapping[str, Mapping]], task: str, defenses: Sequence[str] | None = None
) -> str:
    """Table 1 in the paper's layout: one row for ``task``, a column group per attack.

    ``table1[attack][defense] = {"clean_acc", "asr", "robust_acc", "seconds"}``.
    """
    attacks = [a for a in ATTACK_TITLES if a in table1]
    defenses = list(defenses or [d for d in DEFENSE_TITLES if any(d in table1[a] for a in attacks)])
    header = ["Neural Network"] + [
        f"{ATTACK_TITLES[a]}: {DEFENSE_TITLES[d]}" for a in attacks for d in defenses
    ]
    row = [task] + [_cell(table1[a].get(d)) for a in attacks for d in defenses]
    robust = ["robust accuracy"] + [
        "n/a"
        if not table1[a].get(d) or table1[a][d].get("robust_acc") is None
        else f"{table1[a][d]['robust_acc']:.3f}"
        for a in attacks
        for d in defenses
    ]
    seconds = ["defense seconds"] + [
        "n/a" if not table1[a].get(d) else f"{table1[a][d].get('seconds', 0.0):.1f}"
        for a in attacks
        for d in defenses
    ]
    lines = [
        "**Table 1.** Classification accuracy on clean inputs (cl) and backdoor attack success "
        "rate (bd) per attack and defender strategy.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        "| " + " | ".join(row) + " |",
        "| " + " | ".join(robust) + " |",
        "| " + " | ".join(seconds) + " |",
        "",
    ]
    return "\n".join(lines)


def defenses_markdown(table1: Mapping[str, Mapping[str, Mapping]], task: str) -> str:
    """Every defense run, per attack: clean accuracy, ASR, robust accuracy, DER against the
    undefended model and the cost (seconds, examples through the network forward / backward).

    ``table1[attack][defense]`` entries carry ``der`` (written by the experiment from
    :func:`fineprune_tf.defenses.der`) when the attack has a ``none`` row.
    """

    def fmt(value, spec=".3f"):
        return (
            "n/a"
            if value is None or (isinstance(value, float) and math.isnan(value))
            else format(value, spec)
        )

    lines = [
        f"**Defenses on {task}.** Clean accuracy, attack success rate (ASR), robust "
        "accuracy and DER = [max(0, dASR) - max(0, dACC) + 1] / 2 against the undefended "
        "model; cost in seconds and examples through the network (forward / backward).",
        "",
        "| attack | defense | clean acc | ASR | robust acc | DER | seconds | passes (fwd / bwd) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for attack in [a for a in ATTACK_TITLES if a in table1]:
        for name, entry in table1[attack].items():
            lines.append(
                f"| {ATTACK_TITLES[attack]} | {name} | {fmt(entry.get('clean_acc'))} | "
                f"{fmt(entry.get('asr'))} | {fmt(entry.get('robust_acc'))} | "
                f"{fmt(entry.get('der'))} | {fmt(entry.get('seconds'), '.1f')} | "
                f"{entry.get('forward_passes', 0):,} / {entry.get('backward_passes', 0):,} |"
            )
    return "\n".join(lines + [""])


def utility(entry: Mapping | None) -> float:
    """Defender utility = clean accuracy - attack success rate (Table 2)."""
    if not entry or entry.get("clean_acc") is None or entry.get("asr") is None:
        return math.nan
    return float(entry["clean_acc"]) - float(entry["asr"])


def table2_markdown(
    table1: Mapping[str, Mapping[str, Mapping]],
    task: str,
    defenses: Sequence[str] = ("fine_tuning", "fine_pruning"),
) -> str:
    """Table 2: the defender's utility matrix, defender strategies x attacker strategies."""
    attacks = [a for a in ATTACK_TITLES if a in table1]
    defenses = [d for d in defenses if any(d in table1[a] for a in attacks)]
    lines = [
        f"**Table 2.** Defender's utility matrix for the {task} attack (clean accuracy "
        "minus attack success rate).",
        "",
        "| Defender strategy | " + " | ".join(ATTACK_TITLES[a] for a in attacks) + " |",
        "|---|" + "---|" * len(attacks),
    ]
    for defense in defenses:
        values = [utility(table1[a].get(defense)) for a in attacks]
        lines.append(
            f"| {DEFENSE_TITLES[defense]} | "
            + " | ".join("n/a" if math.isnan(v) else f"{v:.3f}" for v in values)
            + " |"
        )
    best = {}
    for attack in attacks:
        scores = {d: utility(table1[attack].get(d)) for d in defenses}
        scores = {d: s for d, s in scores.items() if not math.isnan(s)}
        if scores:
            best[attack] = max(scores, key=scores.get)
    lines.append("")
    lines.extend(
        f"Best response to the {ATTACK_TITLES[a].lower()}: {DEFENSE_TITLES[d]}."
        for a, d in best.items()
    )
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(figure, path) -> None:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def plot_pruning_curve(
    curve: Mapping,
    channels: int,
    path: str | os.PathLike,
    title: str = "",
    stop: int | None = None,
    threshold: float | None = None,
) -> None:
    """Fig. 6: clean accuracy and ASR (y, fraction) against the fraction of channels pruned.

    ``curve`` has ``clean_acc`` and ``asr`` lists indexed by the number of pruned channels
    (offset by ``curve.get("already_pruned", 0)``).  Only what was measured is drawn: no ASR
    line without backdoor data, no stop line without ``stop``; the stop is labelled with
    ``threshold`` (accuracy points) when given.
    """
    plt = _pyplot()
    clean = np.asarray(curve["clean_acc"], dtype=float)
    asr = np.asarray([math.nan if v is None else v for v in curve.get("asr") or []], dtype=float)
    fraction = np.arange(len(clean)) / float(channels)
    figure, axis = plt.subplots(figsize=(5.0, 3.4))
    axis.plot(fraction, clean, label="Clean Classification Accuracy", color="tab:blue")
    if asr.size and not np.all(np.isnan(asr)):
        axis.plot(fraction, asr, label="Backdoor Attack Success", color="tab:red", linestyle="--")
    if stop is not None:
        label = "stop" if threshold is None else f"stop ({threshold:g}-point accuracy drop)"
        axis.axvline(stop / float(channels), color="gray", linestyle=":", label=label)
    axis.set_xlabel("Fraction of Neurons Pruned")
    axis.set_ylabel("Rate")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(title)
    axis.legend(loc="lower left", fontsize=8)
    axis.grid(alpha=0.3)
    _save_figure(figure, path)
    plt.close(figure)


def plot_activations(
    clean_mean: Sequence[float],
    backdoor_mean: Sequence[float] | None,
    path: str | os.PathLike,
    title: str = "",
) -> None:
    """Fig. 4/8: mean activation of every channel of the last conv layer for clean and
    backdoored inputs, as heat-map strips sharing one colour scale; with ``backdoor_mean``
    None (no backdoor data given) only the clean panel is drawn."""
    plt = _pyplot()
    panels = [("(a) Clean Activations", np.asarray(clean_mean, dtype=float))]
    if backdoor_mean is not None:
        panels.append(("(b) Backdoor Activations", np.asarray(backdoor_mean, dtype=float)))
    size = panels[0][1].size
    columns = int(math.ceil(math.sqrt(size)))
    rows = int(math.ceil(size / columns))

    def grid(values):
        padded = np.full(rows * columns, np.nan)
        padded[: values.size] = values
        return padded.reshape(rows, columns)

    top = max(max(float(np.nanmax(values)) for _, values in panels), 1e-12)
    figure, axes = plt.subplots(1, len(panels), figsize=(3.9 * len(panels), 3.6), squeeze=False)
    for axis, (name, values) in zip(axes[0], panels, strict=True):
        image = axis.imshow(grid(values), cmap="viridis", vmin=0.0, vmax=top)
        axis.set_title(name, fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.colorbar(image, ax=list(axes[0]), shrink=0.8, label="mean activation")
    if title:
        figure.suptitle(title, fontsize=10)
    _save_figure(figure, path)
    plt.close(figure)
