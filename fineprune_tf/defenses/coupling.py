"""What a pruning defense removes together: the model's dependency groups
(:func:`fineprune_tf.graph.channel_groups`) as pruning units, and the rule that turns the
defense's per-channel scores into one score per coupled channel.

A defense that scores channels in several layers (ANP, RNP, CLP, FMP) prunes *coupled
channels*, not layer channels: row ``j`` of a group is channel ``j`` of every conv added into a
residual stream, or an expansion conv's channel together with the depthwise channel(s) it
feeds.  Pruning a row prunes it in every member, so :func:`fineprune_tf.export.shrink` can
remove exactly what the defense pruned (unless the group is ``blocked``: then shrink keeps the
pruned channels as zeros and the group says why).  On a network whose groups are all single
layers (the paper's four task networks) a unit is one layer and a row one channel, so nothing
changes.

Aggregation (Torch-Pruning's group importance, VainF/Torch-Pruning
``torch_pruning/pruner/importance.py``, ``GroupMagnitudeImportance._reduce``, which sums each
member's per-channel importance onto the group's root indices and divides by the number of
members for ``group_reduction="mean"``): a row's score is a reduction over the scores of every
scored channel in it.  ``"mean"`` is that default (ANP's and RNP's masks, FMP's loss
increase); ``"max"`` keeps the row's most extreme member (CLP: prune the coupled channel when
any member is an outlier).  Unlike Torch-Pruning we average over member *channels* (a depthwise
member with ``depth_multiplier`` m contributes m entries), and apply no normalizer (each
defense's scores share one scale already).

Groups that reach a model output are left out: their channels are the model's outputs (a
classifier written as a conv, say), not hidden neurons a backdoor lives in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import keras
import numpy as np

from fineprune_tf import graph as fp_graph
from fineprune_tf.graph import ChannelGroup

__all__ = [
    "REDUCTIONS",
    "active_rows",
    "pruning_units",
    "unit_channels",
    "unit_scores",
]

REDUCTIONS = ("mean", "max")


def pruning_units(model: keras.Model, scored: Sequence[str]) -> list[ChannelGroup]:
    """The dependency groups of ``model`` that hold at least one of the ``scored`` layers,
    ordered by the position of their first scored member in ``scored``.

    A scored layer in no group (a masked layer called more than once: one mask serves every
    call) is a group of its own, blocked.  Groups that reach a model output are left out.
    """
    position = {name: i for i, name in enumerate(scored)}
    units, covered = [], set()
    for group in fp_graph.channel_groups(model):
        names = [name for name in group.members if name in position]
        covered.update(group.members)
        if names and not group.reaches_output:
            units.append((min(position[n] for n in names), group))
    for name in scored:
        if name not in covered:
            channels = model.get_layer(name).channels
            members = {name: np.arange(channels, dtype=np.int64).reshape(-1, 1)}
            blocked = (f"{name} is a masked layer called more than once",)
            units.append((position[name], ChannelGroup(members, blocked)))
    units.sort(key=lambda item: item[0])
    return [group for _, group in units]


def unit_scores(
    units: Sequence[ChannelGroup], scores: Mapping[str, np.ndarray], reduce: str
) -> list[np.ndarray]:
    """One float64 ``[K]`` score per unit: ``reduce`` ("mean" or "max") over the scored
    members' channels of each row (``scores``: layer name -> ``[C]`` per-channel scores;
    members without scores are pruned with their row but do not vote)."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}. Received: reduce={reduce!r}")
    out = []
    for unit in units:
        parts = [
            np.asarray(scores[name], np.float64)[rows]
            for name, rows in unit.members.items()
            if name in scores
        ]
        stacked = np.concatenate(parts, axis=1)  # [K, scored channels per row]
        out.append(stacked.mean(axis=1) if reduce == "mean" else stacked.max(axis=1))
    return out


def unit_channels(
    units: Sequence[ChannelGroup], rows: Sequence[Iterable[int]]
) -> dict[str, list[int]]:
    """``{layer: channels}`` pruning rows ``rows[u]`` of each unit in every member, in the
    order the rows are given (every member layer appears, with an empty list when nothing of
    it is pruned)."""
    pruned: dict[str, list[int]] = {}
    for unit, chosen in zip(units, rows, strict=True):
        chosen = np.asarray(list(dict.fromkeys(int(r) for r in chosen)), np.int64)
        for name, members in unit.members.items():
            channels = members[chosen].reshape(-1).tolist() if chosen.size else []
            pruned[name] = pruned.get(name, []) + channels
    return pruned


def active_rows(model: keras.Model, unit: ChannelGroup) -> np.ndarray:
    """bool ``[K]``: rows with at least one member channel not yet pruned."""
    active = np.zeros(unit.size, bool)
    for name, members in unit.members.items():
        active |= (model.get_layer(name).mask[members] != 0).any(axis=1)
    return active
