"""Channel Lipschitzness-based Pruning (CLP; Zheng et al., ECCV 2022), following the authors'
code (rkteddy/channel-Lipschitzness-based-pruning, ``defense.py``).  Data-free.

For output channel k of a conv layer followed by a BatchNormalization, the upper bound of the
channel's Lipschitz constant (UCLC) is the largest singular value of its kernel reshaped to
``[C_in, kh * kw]`` times ``|gamma_k / sigma_k|`` (``sigma = sqrt(moving_var + eps)``; the
authors use ``sqrt(running_var)``, without BN's epsilon).  Without a BN the factor is 1.  In each
layer, channels with ``UCLC > mean + u * std`` are pruned (``std`` is torch's unbiased one).

The conv -> BN pairs come from the functional graph
(:func:`fineprune_tf.graph.batchnorm_after`), where the authors assume every BN
follows the conv visited just before it in module order -- which they call "difficult to write a
universal check" for (their issue #2).

Deviations: ``u = 3`` is the paper's default; ours is chosen by the protocol from the
defender's clean holdout when ``u`` is None (the smallest ``u`` in 5.0 .. 0.5 whose pruning keeps
the holdout accuracy within ``tolerance`` points), which makes CLP no longer strictly data-free.
With a fixed ``u`` no data is read.  The authors zero the BN weight and bias (the channel
outputs 0); we zero the masked conv's output (a following BN then outputs its constant shift).
"""

from __future__ import annotations

import time

import keras
import numpy as np

from fineprune_tf.defenses.guard import DefenderData, selecting
from fineprune_tf.defenses.result import DefenseResult, clone, finish, holdout_accuracy
from fineprune_tf.defenses.thresholds import choose_by_holdout
from fineprune_tf.graph import batchnorm_after
from fineprune_tf.layers import MaskedConv2D, masked_layers

__all__ = ["clp", "channel_lipschitz", "clp_prune_sets", "U_CANDIDATES"]

U_CANDIDATES = tuple(np.round(np.arange(5.0, 0.49, -0.5), 2).tolist())


def channel_lipschitz(model: keras.Model) -> dict[str, np.ndarray]:
    """UCLC of every channel of every MaskedConv2D: ``{layer: float64 [C]}`` (no data read)."""
    pairs = batchnorm_after(model)
    bounds = {}
    for layer in masked_layers(model):
        if not isinstance(layer, MaskedConv2D):
            continue
        kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
        height, width, inputs, channels = kernel.shape
        # [kh, kw, C_in, C_out] -> per channel [C_in, kh * kw], torch's weight[k].reshape(C_in, -1).
        per_channel = kernel.transpose(3, 2, 0, 1).reshape(channels, inputs, height * width)
        norms = np.linalg.svd(per_channel, compute_uv=False)[:, 0]
        bn = pairs.get(layer.name)
        if bn is not None:
            variance = keras.ops.convert_to_numpy(bn.moving_variance).astype(np.float64)
            gamma = (
                keras.ops.convert_to_numpy(bn.gamma).astype(np.float64)
                if bn.scale
                else np.ones(channels)
            )
            norms = norms * np.abs(gamma / np.sqrt(variance + bn.epsilon))
        bounds[layer.name] = norms
    if not bounds:
        raise ValueError(f"model {model.name!r} has no MaskedConv2D layer: convert it first")
    return bounds


def clp_prune_sets(bounds: dict[str, np.ndarray], u: float) -> dict[str, list[int]]:
    """Channels with ``UCLC > mean + u * std`` (unbiased std) per layer."""
    pruned = {}
    for name, values in bounds.items():
        spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
        pruned[name] = np.flatnonzero(values > values.mean() + u * spread).astype(int).tolist()
    return pruned


def clp(
    model: keras.Model,
    validation=None,
    *,
    u: float | None = 3.0,
    tolerance: float = 2.0,
    seed: int = 0,
    evaluation=None,
) -> DefenseResult:
    """CLP: prune, in every conv layer, the channels whose Lipschitz upper bound is an outlier.

    Args:
      validation: the defender's clean data; read only when ``u`` is None (the protocol's
        choice of ``u``).
      u: the outlier threshold in standard deviations; None = choose from ``U_CANDIDATES``.
    """
    start = time.perf_counter()
    defended = clone(model)
    with selecting():
        bounds = channel_lipschitz(defended)
        if u is None:
            if validation is None:
                raise ValueError("clp(u=None) chooses u from clean data: pass validation")
            defender = DefenderData.coerce(validation, seed=seed)
            choice = choose_by_holdout(
                defended,
                [(value, clp_prune_sets(bounds, value)) for value in U_CANDIDATES],
                defender.holdout,
                tolerance,
            )
            choice.pop("index")
            chosen_u = choice.pop("setting")
            chosen_u = float("inf") if chosen_u is None else chosen_u
        else:
            chosen_u, choice = float(u), {"why": f"fixed u = {u} (data-free)", "forward_passes": 0}
        pruned = clp_prune_sets(bounds, chosen_u)
        for name, channels in pruned.items():
            if channels:
                defended.get_layer(name).prune(channels)
    holdout = None
    if validation is not None:
        holdout = holdout_accuracy(defended, DefenderData.coerce(validation, seed=seed).holdout)
    details = {
        "uclc": {k: v.tolist() for k, v in bounds.items()},
        "u": chosen_u,
        "pruned": pruned,
        "pruned_count": sum(len(v) for v in pruned.values()),
        **choice,
    }
    result = DefenseResult(
        "clp",
        defended,
        time.perf_counter() - start,
        holdout_acc=np.nan if holdout is None else holdout,
        forward_passes=choice.get("forward_passes", 0),
        details=details,
    )
    return finish(result, evaluation)
