"""Fused channel masking + per-channel activation statistics.

One op, ``masked_activation(z, mask)``, computes for a pre-activation tensor ``z`` of rank 2 to
5, channels last (``[N, C]``, ``[N, W, C]``, ``[N, H, W, C]`` or ``[N, D, H, W, C]``: dense,
Conv1D, Conv2D and Conv3D outputs) and a per-channel ``mask`` of shape ``[C]``:

* ``y = act(z) * mask`` (``act`` is ReLU or identity), shape of ``z``;
* per-channel statistics of the *unmasked* activation ``a = act(z)`` over every non-channel
  axis: ``sum(a)``, ``sum(a**2)`` (float32, shape ``[C]``) and ``count(a > 0)`` (int64, ``[C]``).

The statistics are what the pruning defense ranks channels by (mean activation on clean data,
Fine-Pruning §3.1); computing them in the same pass as the masking means a statistics pass costs
the same as an inference pass.  The gradient is ``dz = dy * mask * act'(z)`` (``act'(0) = 0``, as
``tf.nn.relu``), so a pruned channel receives exactly zero gradient.

Backends: the compiled library ``_fineprune_ops.so`` built by ``pip install`` (C++ CPU kernel,
plus CUDA kernels when built with nvcc); otherwise a pure-TensorFlow composite with the same
outputs and gradients.  ``FINEPRUNE_FORCE_TF_OPS=1`` forces the composite.  The composite is
also what runs inside an XLA cluster (``tf.function(jit_compile=True)``, Keras
``compile(jit_compile=True)``, or ``"auto"`` on a GPU machine): the compiled op has no XLA
kernel, and XLA fuses the composite into the convolution's epilogue.  It is what a SavedModel
records too (``tf.saved_model.save``, Keras' ``model.export``), so the artefact serves without
the op library.
"""

from __future__ import annotations

import os
import pathlib
from typing import NamedTuple

import tensorflow as tf
from absl import logging

__all__ = [
    "ACTIVATIONS",
    "RANKS",
    "MaskedActivationResult",
    "backend",
    "built_with_cuda",
    "composite_masked_activation",
    "in_saved_model_save",
    "in_xla_context",
    "masked_activation",
    "reference_masked_activation",
]

ACTIVATIONS = ("relu", "linear")
#: Ranks of ``z`` the op takes: every axis but the last is flattened into rows, in the C++ and
#: CUDA kernels as in the composite, so the rank only names the layer kind.
RANKS = (2, 3, 4, 5)
_LIBRARY_NAME = "_fineprune_ops.so"


class MaskedActivationResult(NamedTuple):
    """Outputs of :func:`masked_activation`.

    Attributes:
      y: ``act(z) * mask``, same shape and dtype as ``z``.
      channel_sum: float32 ``[C]``, sum of ``act(z)`` over all non-channel axes.
      channel_sum_sq: float32 ``[C]``, sum of ``act(z)**2``.
      positive_count: int64 ``[C]``, number of entries with ``act(z) > 0``.
    """

    y: tf.Tensor
    channel_sum: tf.Tensor
    channel_sum_sq: tf.Tensor
    positive_count: tf.Tensor


def _library_path() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parent / _LIBRARY_NAME


def _load_library():
    """Returns ``(module, backend_name)``; logs once why the compiled op is not used."""
    if os.environ.get("FINEPRUNE_FORCE_TF_OPS", "") not in ("", "0"):
        logging.info("fineprune_tf: FINEPRUNE_FORCE_TF_OPS is set; using the TensorFlow ops.")
        return None, "tensorflow"
    path = _library_path()
    if not path.exists():
        logging.warning(
            "fineprune_tf: compiled op library %s not found (the install could not build it); "
            "using the pure TensorFlow fallback.",
            path,
        )
        return None, "tensorflow"
    try:
        module = tf.load_op_library(str(path))
    except (tf.errors.NotFoundError, OSError) as error:
        logging.warning(
            "fineprune_tf: could not load %s (%s); using the pure TensorFlow fallback.", path, error
        )
        return None, "tensorflow"
    return module, "compiled"


def _library_has_cuda(module) -> bool:
    with tf.device("/CPU:0"):
        return bool(module.fineprune_built_with_cuda().numpy())


_MODULE, _BACKEND = _load_library()


def backend() -> str:
    """The backend in use: ``"compiled-cpu"``, ``"compiled-cuda"`` or ``"tensorflow"``.

    Decided on first call rather than at import: asking the library runs an op, which would
    fix TensorFlow's device set before a user could split the CPU into logical devices.
    """
    global _BACKEND
    if _BACKEND == "compiled":
        gpu = built_with_cuda() and bool(tf.config.list_physical_devices("GPU"))
        _BACKEND = "compiled-cuda" if gpu else "compiled-cpu"
    return _BACKEND


def built_with_cuda() -> bool:
    """Whether the loaded op library contains the CUDA kernels (False for the fallback)."""
    return _MODULE is not None and _library_has_cuda(_MODULE)


def _check_inputs(z: tf.Tensor, mask: tf.Tensor, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not z.dtype.is_floating:
        raise TypeError(f"z must be a floating tensor, got dtype {z.dtype.name}")
    rank = z.shape.rank
    if rank is not None and rank not in RANKS:
        raise ValueError(
            "z must have rank 2 to 5 ([N, C], [N, W, C], [N, H, W, C] or "
            f"[N, D, H, W, C]); got shape {z.shape}"
        )
    channels = z.shape[-1] if rank else None
    if mask.shape.rank not in (None, 1):
        raise ValueError(f"mask must have shape [C]; got shape {mask.shape}")
    if channels is not None and mask.shape.rank == 1 and mask.shape[0] not in (None, channels):
        raise ValueError(
            f"mask length {mask.shape[0]} does not match the {channels} channels of z "
            f"(z shape {z.shape})"
        )


# The two questions below have no public TensorFlow API; these functions are the module's only
# private access.  If TensorFlow moves the modules, the answer is False and the compiled op is
# used, as before.
def in_xla_context() -> bool:
    """Whether the code being traced now will be compiled by XLA.

    ``tf.function(jit_compile=True)`` (which Keras' ``compile(jit_compile=True)`` and the
    ``"auto"`` choice on GPU machines use) traces its Python function inside an XLA control-flow
    context, and nested functions inherit it; asking the default graph sees every way in.
    """
    try:
        from tensorflow.python.framework import ops as tf_framework_ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - a TensorFlow that moved the module
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf_framework_ops.get_default_graph()))


def in_saved_model_save() -> bool:
    """Whether ``tf.saved_model.save`` is tracing now (Keras' ``model.export`` ends there).

    A SavedModel traced with the composite loads and serves without the op library.
    """
    try:
        from tensorflow.python.saved_model import save_context
    except ImportError:  # pragma: no cover
        return False
    return bool(save_context.in_save_context())


def masked_activation(
    z, mask, activation: str = "relu", compute_stats: bool = True
) -> MaskedActivationResult:
    """Applies ``act(z) * mask`` and returns per-channel statistics of ``act(z)``.

    Uses the compiled op when it is loaded and ``z`` is float32 or float16, except inside an XLA
    cluster or a SavedModel save; there :func:`composite_masked_activation` (same results).

    Args:
      z: float tensor of rank 2 to 5, channels last (pre-activation), e.g. ``[N, H, W, C]``.
      mask: tensor ``[C]``, 1 keeps a channel, 0 prunes it; cast to ``z.dtype``.
      activation: ``"relu"`` or ``"linear"``.
      compute_stats: when False the statistics outputs are zeros (saves the reduction).

    Returns:
      A :class:`MaskedActivationResult`.
    """
    z = tf.convert_to_tensor(z)
    mask = tf.cast(tf.convert_to_tensor(mask), z.dtype)
    _check_inputs(z, mask, activation)
    use_op = _MODULE is not None and z.dtype in (tf.float32, tf.float16)
    if not in_xla_context() and not in_saved_model_save() and use_op:
        return MaskedActivationResult(
            *_MODULE.fineprune_masked_activation(
                z=z, mask=mask, activation=activation, compute_stats=compute_stats
            )
        )
    return composite_masked_activation(z, mask, activation, compute_stats)


def composite_masked_activation(
    z, mask, activation: str = "relu", compute_stats: bool = True
) -> MaskedActivationResult:
    """The fast pure-TensorFlow path: plain ops that XLA and Grappler fuse.

    One reshape to ``[-1, C]``, float32 reductions (the positive count is summed as float32,
    exact up to 2**24 entries per channel per call, and cast to int64 once), no assertion op
    (shapes are checked statically; a mismatch at run time fails in the multiply), and no
    custom gradient: autodiff of ``act(z) * mask`` is already ``dy * mask * act'(z)``, with
    ``act'(0) = 0`` for ReLU, and the mask is behind ``stop_gradient``.
    """
    z = tf.convert_to_tensor(z)
    mask = tf.stop_gradient(tf.cast(tf.convert_to_tensor(mask), z.dtype))
    _check_inputs(z, mask, activation)
    activated = tf.nn.relu(z) if activation == "relu" else z
    y = activated * mask
    channels = tf.shape(z)[-1]
    if not compute_stats:
        zeros = tf.zeros([channels], tf.float32)
        return MaskedActivationResult(y, zeros, zeros, tf.zeros([channels], tf.int64))
    flat = tf.reshape(tf.cast(tf.stop_gradient(activated), tf.float32), [-1, channels])
    positive = tf.reduce_sum(tf.cast(flat > 0, tf.float32), axis=0)
    return MaskedActivationResult(
        y,
        tf.reduce_sum(flat, axis=0),
        tf.reduce_sum(tf.square(flat), axis=0),
        tf.cast(positive, tf.int64),
    )


def _activation_grad(z: tf.Tensor, activation: str) -> tf.Tensor:
    if activation == "relu":
        return tf.cast(z > 0, z.dtype)
    return tf.ones_like(z)


def reference_masked_activation(
    z, mask, activation: str = "relu", compute_stats: bool = True
) -> MaskedActivationResult:
    """The slow, literal pure-TensorFlow definition, kept for equality tests only.

    int64 counts, a run-time shape assertion and an explicit custom gradient spell out the
    op's contract; :func:`composite_masked_activation` is what users without the compiled op
    run.
    """
    z = tf.convert_to_tensor(z)
    mask = tf.cast(tf.convert_to_tensor(mask), z.dtype)
    _check_inputs(z, mask, activation)
    tf.debugging.assert_equal(
        tf.shape(mask)[0],
        tf.shape(z)[-1],
        message="mask length does not match the channel count of z",
    )

    @tf.custom_gradient
    def forward(z, mask):
        activated = tf.nn.relu(z) if activation == "relu" else z
        y = activated * mask

        def grad(dy):
            return dy * mask * _activation_grad(z, activation), None

        return y, grad

    y = forward(z, mask)
    channels = tf.shape(z)[-1]
    if compute_stats:
        activated = tf.stop_gradient(tf.nn.relu(z) if activation == "relu" else z)
        flat = tf.reshape(tf.cast(activated, tf.float32), [-1, channels])
        channel_sum = tf.reduce_sum(flat, axis=0)
        channel_sum_sq = tf.reduce_sum(tf.square(flat), axis=0)
        positive_count = tf.reduce_sum(tf.cast(flat > 0, tf.int64), axis=0)
    else:
        channel_sum = tf.zeros([channels], tf.float32)
        channel_sum_sq = tf.zeros([channels], tf.float32)
        positive_count = tf.zeros([channels], tf.int64)
    return MaskedActivationResult(y, channel_sum, channel_sum_sq, positive_count)


if _MODULE is not None:

    @tf.RegisterGradient("FinepruneMaskedActivation")
    def _masked_activation_grad(op, dy, *unused_stat_grads):
        """Statistics outputs carry no gradient; the mask is not differentiated."""
        dz = _MODULE.fineprune_masked_activation_grad(
            dy=dy, z=op.inputs[0], mask=op.inputs[1], activation=op.get_attr("activation")
        )
        return [dz, None]
