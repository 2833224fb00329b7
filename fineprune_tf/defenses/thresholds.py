"""Choosing how much to prune from the defender's clean holdout (the protocol's rule for ANP,
RNP and CLP): walk the candidate settings from least to most pruning and keep the last one
before the clean holdout accuracy first falls more than ``tolerance`` points below the
undefended model's -- the same rule as the pruning defense's stopping point (§3.1)."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

from fineprune_tf.defenses.coupling import pruning_units, unit_channels, unit_scores
from fineprune_tf.defenses.guard import is_selecting
from fineprune_tf.defenses.neurons import apply_pruned
from fineprune_tf.defenses.result import holdout_accuracy
from fineprune_tf.graph import ChannelGroup

__all__ = ["GROUP_RULE", "choose_by_holdout", "choose_threshold", "prune_by_scores", "THRESHOLDS"]

#: How ANP and RNP score a coupled channel (reported in their details).
GROUP_RULE = "mean of the members' masks over the dependency group's row (Torch-Pruning mean)"

#: ANP's and RNP's threshold sweep (``--pruning-step 0.05``, ``--pruning-max 0.90``).
THRESHOLDS = tuple(np.round(np.arange(0.05, 0.90 + 1e-9, 0.05), 2).tolist())


def choose_by_holdout(
    model: keras.Model,
    candidates: Sequence[tuple[float, dict]],
    holdout: tuple[np.ndarray, np.ndarray],
    tolerance: float,
) -> dict:
    """Picks among ``(setting, {layer: channels to prune})`` ordered by increasing pruning.

    The masks of ``model`` are set temporarily for each candidate and restored.  Returns
    ``{"setting", "index", "holdout_curve", "base_holdout_acc", "forward_passes", "why"}``; the
    setting is None (index -1) when even the first candidate exceeds the tolerance.
    """
    if not is_selecting():
        raise RuntimeError("choose_by_holdout must run inside guard.selecting()")
    layers = {name for _, pruned in candidates for name in pruned}
    saved = {name: model.get_layer(name).mask for name in layers}
    base = holdout_accuracy(model, holdout)
    curve, chosen, index = [], None, -1
    try:
        for position, (setting, pruned) in enumerate(candidates):
            for name in layers:
                mask = saved[name].copy()
                mask[list(pruned.get(name, []))] = 0.0
                model.get_layer(name).set_mask(mask)
            accuracy = holdout_accuracy(model, holdout)
            curve.append((setting, accuracy))
            if (base - accuracy) * 100.0 > tolerance + 1e-9:
                break
            chosen, index = setting, position
    finally:
        for name, mask in saved.items():
            model.get_layer(name).set_mask(mask)
    why = (
        f"largest pruning whose clean holdout accuracy stays within {tolerance} points of "
        f"the undefended {base:.3f}"
        if chosen is not None
        else f"every candidate lost more than {tolerance} points of clean holdout accuracy: "
        "nothing pruned"
    )
    return {
        "setting": chosen,
        "index": index,
        "holdout_curve": curve,
        "base_holdout_acc": base,
        "forward_passes": len(holdout[0]) * (len(curve) + 1),
        "why": why,
    }


def choose_threshold(
    model: keras.Model,
    units: Sequence[ChannelGroup],
    scores: Sequence[np.ndarray],
    holdout: tuple[np.ndarray, np.ndarray],
    tolerance: float,
    fixed: float | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    by: str = "number",
) -> dict:
    """The mask threshold for ANP / RNP: coupled channels with ``score <= threshold`` are
    pruned (``units``: dependency groups, :func:`~fineprune_tf.defenses.coupling.pruning_units`;
    ``scores``: one ``[K]`` score per unit row).

    ``by="number"`` (default; ANP's and RNP's ``--pruning-by number``) walks the rows in
    increasing score over the whole network, growing the pruned count by 1% of the rows at a
    time (at most half of them); the chosen threshold is the score of the last row pruned.
    It degrades gracefully when many masks fall low together (networks without BN, where the
    multiplicative noise compounds over layers), where a fixed threshold grid jumps from
    nothing to too much.  ``by="threshold"`` walks ``thresholds``.  ``fixed`` skips the choice.
    Returns ``{"threshold", "holdout_curve", "why", "chosen_pruned", "chosen_rows", ...}``
    (threshold -1 = prune nothing; ``chosen_pruned`` is layer -> channels, every member of a
    pruned row included).
    """

    def rows_at(threshold: float) -> list[list[int]]:
        return [np.flatnonzero(s <= threshold).tolist() for s in scores]

    if fixed is not None:
        rows = rows_at(float(fixed))
        return {
            "threshold": float(fixed),
            "holdout_curve": [],
            "forward_passes": 0,
            "chosen_rows": rows,
            "chosen_pruned": unit_channels(units, rows),
            "why": f"fixed threshold {fixed}",
        }
    if by == "number":
        flat = sorted(
            (float(s[row]), u_index, row)
            for u_index, s in enumerate(scores)
            for row in range(len(s))
        )
        step = max(1, len(flat) // 100)
        counts = range(step, len(flat) // 2 + 1, step)
        candidate_rows = []
        for count in counts:
            rows: list[list[int]] = [[] for _ in units]
            for _, u_index, row in flat[:count]:
                rows[u_index].append(row)
            candidate_rows.append((flat[count - 1][0], rows))
    elif by == "threshold":
        candidate_rows = [(t, rows_at(t)) for t in thresholds]
    else:
        raise ValueError(f"by must be 'number' or 'threshold', got {by!r}")
    candidates = [(t, unit_channels(units, rows)) for t, rows in candidate_rows]
    choice = choose_by_holdout(model, candidates, holdout, tolerance)
    # Apply exactly the candidate the holdout accepted (ties at its score stay unpruned).
    index = choice.pop("index")
    rows = candidate_rows[index][1] if index >= 0 else [[] for _ in units]
    threshold = -1.0 if choice["setting"] is None else float(choice["setting"])
    return {
        "threshold": threshold,
        "chosen_rows": rows,
        "chosen_pruned": unit_channels(units, rows),
        **{k: v for k, v in choice.items() if k != "setting"},
    }


def prune_by_scores(
    model: keras.Model,
    groups,
    scores: Sequence[np.ndarray],
    holdout: tuple[np.ndarray, np.ndarray],
    tolerance: float,
    fixed: float | None = None,
) -> dict:
    """Prunes ``model``'s neurons (in place), whole dependency groups at a time, at the
    threshold :func:`choose_threshold` picks from the per-neuron-group ``scores`` (ANP's and
    RNP's learned masks; low = suspicious).

    A coupled channel's score is the mean of its members' masks
    (:mod:`fineprune_tf.defenses.coupling`, Torch-Pruning's ``group_reduction="mean"``); on a
    network without coupled layers it is the neuron's own mask.

    Returns the details ANP and RNP report: ``mask_values`` (layer -> scores), ``pruned``
    (layer -> channels, every member of a pruned group row included), ``pruned_count``
    (channels), ``pruned_groups`` (coupled channels) and the threshold choice's facts.
    """
    per_layer = {g.layer.name: np.asarray(s) for g, s in zip(groups, scores, strict=True)}
    units = pruning_units(model, list(per_layer))
    choice = choose_threshold(
        model, units, unit_scores(units, per_layer, "mean"), holdout, tolerance, fixed=fixed
    )
    rows = choice.pop("chosen_rows")
    pruned = apply_pruned(model, choice.pop("chosen_pruned"))
    return {
        "mask_values": {name: s.tolist() for name, s in per_layer.items()},
        "pruned": pruned,
        "pruned_count": sum(len(v) for v in pruned.values()),
        "pruned_groups": sum(len(r) for r in rows),
        "group_rule": GROUP_RULE,
        **choice,
    }
