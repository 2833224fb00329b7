"""Serving a pruned model: physically remove pruned channels, and export plain Keras /
TensorFlow artefacts that need neither ``fineprune_tf`` nor its custom op.

* :func:`shrink` rewrites a (masked) model into a smaller **plain** Keras model — standard
  ``Conv2D`` / ``Dense`` / ``DepthwiseConv2D`` / ``BatchNormalization`` ... layers only — with
  the same predictions.  A masked layer carrying a fused BatchNormalization (the default of
  :func:`fineprune_tf.convert`) becomes one plain convolution with the BN folded in, exact in
  inference mode: ``kernel * s`` and ``beta + (bias - mean) * s`` with
  ``s = gamma / sqrt(var + eps)`` per output channel, and the fused activation.
* :func:`to_plain` does the same without removing anything (pruned channels become all-zero
  weights), for when the exact original shapes are wanted.
* :func:`export_saved_model` writes a TF SavedModel with a stock ``serving_default`` signature,
  plus the ``.keras`` file of the same plain model inside the SavedModel directory.
* :func:`to_tflite` shrinks, converts to TFLite and checks the interpreter's outputs.
* :func:`count_params_and_flops` / :func:`shrink_report` measure what shrinking saved.

How :func:`shrink` decides what can go
--------------------------------------
Every tensor of the graph gets, per channel (last axis), a *constant value* when the channel is
the same number at every position for every input (``NaN`` = "live", input-dependent).  The
sources are the pruned channels of masked layers (exactly 0: the mask multiplies *after* bias,
fused BN and activation).  Constants propagate through channel-wise layers (BatchNormalization,
ReLU and other activations, pooling, Dropout, ...: computed by running the original layer on a
constant tensor, so BN's shift ``beta - gamma*mean/sqrt(var+eps)`` is reproduced bit for bit),
DepthwiseConv1D/2D (and convolutions with ``groups`` equal to their input channels, ConvNeXt's
depthwise ``Conv2D``), LayerScale, Flatten / Reshape, Concatenate (offsets), bare ``keras.ops``
arithmetic by a constant (``x + 3.0`` turns a pruned 0 into the constant 3; MobileNetV3's
hard-sigmoid) and element-wise merges (Add, Multiply, ``x * y``, ..., broadcasting ones such as
a squeeze-excitation gate included: constant only if constant on every input).
:func:`fineprune_tf.graph.channel_groups` lists the masked channels that must be pruned together
for a merge to drop them.

A constant channel is removed when every consumer can absorb it exactly:

* ``Dense`` (any input rank): always — ``bias += v * W[c, :]`` (``W[i, :]`` for the flattened
  row ``i = ((h * W) + w) * C + c`` after Flatten).
* ``Conv1D`` / ``Conv2D`` / ``Conv3D``: when ``v == 0``, or when the convolution has no
  effective padding ('valid', or 'same' that happens to pad nothing, e.g. 1x1) — then every
  output position sees the constant through the full kernel and
  ``bias[o] += v * sum_{taps} W[..., c, o]``.  With real 'same' padding the border positions
  see fewer taps, so a non-zero constant channel is **kept** (e.g. conv -> BN -> ReLU with a
  positive BN shift feeding a 'same' conv): its producer then computes it with all-zero
  weights, which is exact.
* ``SeparableConv1D/2D``: only when ``v == 0`` (sliced from both kernels).
* channel-wise layers, DepthwiseConv1D/2D (and ``groups == C_in`` convolutions: ``filters`` and
  ``groups`` shrink together), Flatten, Concatenate: the channel simply disappears from their
  inputs and outputs (BN / PReLU / LayerScale parameters, a bare ``x * constant[C]``'s constant
  sliced).  A masked depthwise layer does not read an input channel whose ``depth_multiplier``
  outputs are all pruned, so pruning the producer's channel with them removes both.
* Add and other merges: a channel is kept if *any* input keeps it, and then every input keeps
  it (the union is kept); a pruned branch channel that is kept contributes its exact value
  (0, or its BN constant).
* model outputs and every other layer (a "barrier": Conv2DTranspose, grouped convolutions,
  LayerNormalization, softmax, shared weighted layers, other keras.ops calls such as a division
  by a tensor, ...): all channels are kept.  A masked grouped convolution keeps all its inputs
  and removes pruned outputs while every group keeps as many (else the first pruned ones of the
  smaller groups are kept, zeroed).

A kept pruned channel of a masked layer is computed by the plain layer with zero kernel slice
and zero bias, which gives ``act(0)``: exact for ReLU / linear / tanh / ... (``act(0) == 0``);
for other activations (sigmoid, softplus, ...) a ``Rescaling(scale=mask)`` layer named
``<layer>_mask`` is appended, which multiplies by the 0/1 mask exactly.

Folding constants reorders float32 sums, so predictions agree to rounding error (~1e-7 on
softmax outputs), not bit for bit.  Models must be float32 and channels_last.
"""

from fineprune_tf.export.cost import ShrinkReport, count_params_and_flops, shrink_report
from fineprune_tf.export.serving import KERAS_FILENAME, export_saved_model
from fineprune_tf.export.shrink import shrink, to_plain
from fineprune_tf.export.tflite import TFLiteExport, to_tflite

__all__ = [
    "KERAS_FILENAME",
    "ShrinkReport",
    "TFLiteExport",
    "count_params_and_flops",
    "export_saved_model",
    "shrink",
    "shrink_report",
    "to_plain",
    "to_tflite",
]
