"""Pruning curves of the pruning defense (Fine-Pruning §3.1), at close to their arithmetic cost.

The defense prunes the channels of one layer (the last convolution) one at a time, in increasing
order of mean clean activation, and records the clean accuracy and the attack success rate after
every channel.  Done naively (:func:`naive_pruning_curve`) that is ``K`` full forward passes over
the validation data for ``K`` channels.  :func:`pruning_curve` gives the same predictions for a
fraction of the work:

1. **Prefix once.**  The layers up to the pruned layer ``L`` do not depend on ``L``'s mask: they
   run once over the data, giving ``a = act(z)``, ``L``'s *unmasked* activation ``[n, H, W, C]``.
2. **Per-channel region.**  Operations after ``L`` that act on each channel separately (pooling,
   flatten/reshape, inference-mode BatchNormalization, element-wise activations, dropout,
   padding, cropping, up-sampling) commute with the mask: for such a stack ``g``, the tensor
   ``g(a * m)`` equals ``where(m, g(a), g(0))`` channel by channel.  ``T1 = g(a)`` is computed
   once per sample and ``T0 = g(0)`` once in all.
3. **Linear frontier, updated incrementally.**  A Dense or Conv2D layer ``F`` fed by the
   per-channel region (directly, or through a ``Concatenate`` with other tensors, as DeepID's
   ``deepid`` layer) has pre-activations ``Z_F(m) = W . g(a * m) + b``.  Pruning channel ``c``
   changes them by exactly ``-W . (g(a)_c - g(0)_c)`` -- ``F`` applied to one input channel, so
   over a whole curve these updates cost one pass of ``F``.
4. **Only the rest per step.**  Everything after the frontier's non-linearity (and any tensor the
   decomposition cannot handle, which is rebuilt as ``where(m, T1, T0)``) runs per step.  A step
   is evaluated only for the samples it can change: if channel ``c`` is identically zero on
   sample ``i`` (a dormant channel, the common case the defense prunes first), pruning it leaves
   sample ``i``'s prediction unchanged.  All steps of a chunk of samples run in one
   ``tf.while_loop`` that keeps only the current pre-activations, so one call per chunk and no
   per-step Python.

If ``L``'s output feeds something that is not per-channel (``describe(...).mode ==
"batched-masks"``), the engine falls back to stacking masked copies ``a * m_k`` of the prefix
output for several steps along the batch axis and running the whole suffix on them (still one
prefix pass in all, and still only for the samples each step can change).

Layout: :mod:`.result` (what a curve returns), :mod:`.inputs` (argument checks), :mod:`.naive`
(the reference loop), :mod:`.plan` (the graph analysis, on :mod:`fineprune_tf.graph`),
:mod:`.engine` (the compiled passes), :mod:`.api` (the driver).

Predictions equal the naive loop's except where float summation order decides an exact tie: the
incremental pre-activations differ from a direct evaluation by rounding (a float32 running sum
of per-channel contributions, error of order 1e-7 relative per step), so a top-2 margin of order
1e-6 can flip.  The tests check that any difference is such a tie.
"""

from fineprune_tf.curves.api import describe, pruning_curve
from fineprune_tf.curves.naive import naive_pruning_curve
from fineprune_tf.curves.result import CurvePlanInfo, PruningCurve

__all__ = ["CurvePlanInfo", "PruningCurve", "describe", "naive_pruning_curve", "pruning_curve"]
