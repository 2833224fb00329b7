"""The cleaning report's parts: the layer's activations, a defense's facts worth keeping, and
``report.md``."""

from __future__ import annotations

import keras
import numpy as np

from fineprune_tf import defenses
from fineprune_tf.data.user import UserData
from fineprune_tf.layers import MaskedConv2D

__all__ = ["activation_report", "defense_facts", "markdown"]


def defense_facts(result: defenses.DefenseResult) -> dict:
    """The JSON-ready facts of a defense's details worth a report (fine-tuning's epochs ...)."""
    keep = ("fine_tuning", "pruned", "pruned_fraction", "why")
    return {k: v for k, v in result.details.items() if k in keep}


def activation_report(
    model: keras.Model,
    layer_name: str,
    clean_x: np.ndarray,
    backdoor: UserData | None,
    means: np.ndarray,
) -> dict:
    """The layer's per-channel facts for the report: clean mean activations ``means``
    (``[channels]``), dormant count, and the backdoor data's means when it is given."""
    layer = model.get_layer(layer_name)
    report = {
        "clean_mean": means.tolist(),
        "dormant_channels": int(np.sum(means <= 1e-6)),
        "channels": layer.channels,
    }
    if isinstance(layer, MaskedConv2D) and layer.activation is keras.activations.relu:
        from fineprune_tf import stats

        clean_stats = stats.collect(model, clean_x, layer_names=[layer_name])[layer_name]
        report["clean_dormant_fraction"] = clean_stats.dormant_fraction.tolist()
        if backdoor is not None:
            triggered = stats.collect(model, backdoor.x, layer_names=[layer_name])[layer_name]
            report["backdoor_mean"] = triggered.mean.tolist()
    elif backdoor is not None:
        _, backdoor_means = defenses.rank_channels(model, layer_name, backdoor.x)
        report["backdoor_mean"] = backdoor_means.tolist()
    return report


def markdown(report: dict) -> str:
    """``report.md``: the models' numbers, ``auto``'s candidates and the serving model."""

    def fmt(value):
        return (
            "n/a"
            if value is None or (isinstance(value, float) and np.isnan(value))
            else f"{value:.3f}"
        )

    chosen = report["defense"]["chosen"]
    rows = [("original", report["original"]), ("pruning", report["pruning"])]
    if chosen != "pruning":
        rows.append((chosen.replace("_", "-"), report[chosen]))
    lines = [
        f"# Cleaning report: {report['model']}",
        "",
        f"Layer `{report['layer']}`: {report['activations']['channels']} channels, "
        f"{report['activations']['dormant_channels']} dormant on clean data; pruning "
        f"removed {len(report['pruning']['pruned'])} "
        f"(threshold {report['threshold']} points).",
        "",
        f"Defense: **{chosen}** (`{report['defense']['model_file']}`; requested "
        f"`{report['defense']['requested']}`): {report['defense']['why']}.",
        "",
        "| model | clean accuracy | attack success | robust accuracy |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {fmt(r['clean_acc'])} | {fmt(r['asr'])} | {fmt(r['robust_acc'])} |"
        for name, r in rows
    ]
    candidates = report["defense"].get("candidates")
    if candidates:
        lines += [
            "",
            "Candidates of `auto` (clean holdout only; among those within the tolerance, the "
            "one that moved the weights furthest is chosen):",
            "",
            "| defense | holdout accuracy | drop (points) | weight change | qualifies |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {name} | not applicable: {row['not_applicable']} | | | no |"
            if "not_applicable" in row
            else f"| {name} | {fmt(row['holdout_acc'])} | {row['holdout_drop_points']:.1f} | "
            f"{fmt(row.get('change'))} | {'yes' if row['qualifies'] else 'no'} |"
            for name, row in candidates.items()
        ]
    if report["serving"]:
        params, flops = report["serving"]["params"], report["serving"]["flops"]
        lines += [
            "",
            f"Serving model: `{report['serving']['path']}` (stock TensorFlow), "
            f"{params[0]:,} -> {params[1]:,} parameters, {flops[0]:,} -> {flops[1]:,} "
            "multiply-adds.",
        ]
    return "\n".join(lines) + "\n"
