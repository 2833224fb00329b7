"""Choosing how much to prune from the defender's clean holdout (the protocol's rule for ANP,
RNP and CLP): walk the candidate settings from least to most pruning and keep the last one
before the clean holdout accuracy first falls more than ``tolerance`` points below the
undefended model's -- the same rule as the pruning defense's stopping point (§3.1)."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

from fineprune_tf.defenses.guard import is_selecting
from fineprune_tf.defenses.neurons import apply_pruned
from fineprune_tf.defenses.result import holdout_accuracy

__all__ = ["choose_by_holdout", "choose_threshold", "prune_by_scores", "THRESHOLDS"]

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
    groups,
    scores: Sequence[np.ndarray],
    holdout: tuple[np.ndarray, np.ndarray],
    tolerance: float,
    fixed: float | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    by: str = "number",
) -> dict:
    """The mask threshold for ANP / RNP: neurons with ``score <= threshold`` are pruned.

    ``by="number"`` (default; ANP's and RNP's ``--pruning-by number``) walks the neurons in
    increasing score over the whole network, growing the pruned count by 1% of the neurons at a
    time (at most half of them); the chosen threshold is the score of the last neuron pruned.
    It degrades gracefully when many masks fall low together (networks without BN, where the
    multiplicative noise compounds over layers), where a fixed threshold grid jumps from
    nothing to too much.  ``by="threshold"`` walks ``thresholds``.  ``fixed`` skips the choice.
    Returns ``{"threshold", "holdout_curve", "why", ...}`` (threshold -1 = prune nothing).
    """

    def pruned_at(threshold: float) -> dict:
        return {
            g.layer.name: [c for c in range(g.channels) if float(s[c]) <= threshold]
            for g, s in zip(groups, scores, strict=True)
        }

    if fixed is not None:
        return {
            "threshold": float(fixed),
            "holdout_curve": [],
            "forward_passes": 0,
            "chosen_pruned": pruned_at(fixed),
            "why": f"fixed threshold {fixed}",
        }
    if by == "number":
        flat = sorted(
            (float(s[c]), g_index, c)
            for g_index, (g, s) in enumerate(zip(groups, scores, strict=True))
            for c in range(g.channels)
        )
        step = max(1, len(flat) // 100)
        counts = range(step, len(flat) // 2 + 1, step)
        thresholds = [flat[count - 1][0] for count in counts]
        candidates = []
        for count, threshold in zip(counts, thresholds, strict=True):
            pruned: dict = {g.layer.name: [] for g in groups}
            for _, g_index, channel in flat[:count]:
                pruned[groups[g_index].layer.name].append(channel)
            candidates.append((threshold, pruned))
    elif by == "threshold":
        candidates = [(t, pruned_at(t)) for t in thresholds]
    else:
        raise ValueError(f"by must be 'number' or 'threshold', got {by!r}")
    choice = choose_by_holdout(model, candidates, holdout, tolerance)
    # Apply exactly the candidate the holdout accepted (ties at its score stay unpruned).
    index = choice.pop("index")
    chosen = candidates[index][1] if index >= 0 else {g.layer.name: [] for g in groups}
    threshold = -1.0 if choice["setting"] is None else float(choice["setting"])
    return {
        "threshold": threshold,
        "chosen_pruned": chosen,
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
    """Prunes ``model``'s neurons (in place) at the threshold :func:`choose_threshold` picks
    from the per-group ``scores`` (ANP's and RNP's learned masks; low = suspicious).

    Returns the details ANP and RNP report: ``mask_values`` (layer -> scores), ``pruned``
    (layer -> channels), ``pruned_count`` and the threshold choice's facts.
    """
    choice = choose_threshold(model, groups, scores, holdout, tolerance, fixed=fixed)
    pruned = apply_pruned(model, choice.pop("chosen_pruned"))
    return {
        "mask_values": {g.layer.name: s.tolist() for g, s in zip(groups, scores, strict=True)},
        "pruned": pruned,
        "pruned_count": sum(len(v) for v in pruned.values()),
        **choice,
    }
