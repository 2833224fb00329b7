"""The masked-activation op on rank-3 (NWC: Conv1D) and rank-5 (NDHWC: Conv3D) inputs.

The C++ and CUDA kernels flatten every axis but the last into rows, so a rank-3 or rank-5 call
must equal the same data reshaped to rank 2, bit for bit, and the numpy / reference definition.
The compiled op is checked when loaded (as in tests/test_ops.py), the composite always.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from fineprune_tf import ops

FORCED_FALLBACK = os.environ.get("FINEPRUNE_FORCE_TF_OPS", "") not in ("", "0")

# Rank 3 and 5; the last has more rows than one CPU block (2^18 elements) and an uneven split.
SHAPES = [
    (4, 17, 8),
    (1, 1, 1),
    (2, 3, 4, 5, 6),
    (1, 2, 1, 3, 33),
    (3, 1100, 97),
    (2, 5, 33, 41, 16),
]


@pytest.fixture
def lib():
    if FORCED_FALLBACK:
        pytest.skip("FINEPRUNE_FORCE_TF_OPS is set")
    if ops._MODULE is None:
        pytest.fail(f"the compiled op library {ops._library_path()} is not loaded")
    return ops._MODULE


def _inputs(shape, seed=0, dtype=np.float32):
    rng = np.random.default_rng([seed, *shape])
    z = rng.standard_normal(shape).astype(dtype)
    z.reshape(-1)[: shape[-1]] = 0  # the ReLU kink, in every channel
    mask = (rng.random(shape[-1]) < 0.6).astype(dtype)
    return z, mask


def _numpy(z, mask, activation):
    a = np.maximum(z, 0) if activation == "relu" else z
    flat = a.astype(np.float64).reshape(-1, z.shape[-1])
    return (a * mask).astype(z.dtype), flat.sum(0), (flat * flat).sum(0), (flat > 0).sum(0)


def _check(result, z, mask, activation):
    y, total, total_sq, count = _numpy(z, mask, activation)
    assert result.y.shape == z.shape and result.channel_sum.shape == (z.shape[-1],)
    np.testing.assert_array_equal(result.y.numpy(), y)
    scale = np.sqrt(max(1, z.size // z.shape[-1]))
    np.testing.assert_allclose(result.channel_sum, total, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(result.channel_sum_sq, total_sq, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_array_equal(result.positive_count, count)


def _compiled(lib, z, mask, activation, compute_stats=True):
    return ops.MaskedActivationResult(
        *lib.fineprune_masked_activation(
            z=z, mask=mask, activation=activation, compute_stats=compute_stats
        )
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
def test_compiled_rank_3_and_5_match_numpy_and_the_rank_2_call(lib, shape, activation):
    z, mask = _inputs(shape)
    result = _compiled(lib, z, mask, activation)
    _check(result, z, mask, activation)
    flat = _compiled(lib, z.reshape(-1, shape[-1]), mask, activation)
    np.testing.assert_array_equal(result.y.numpy().reshape(-1, shape[-1]), flat.y.numpy())
    for a, b in zip(result[1:], flat[1:], strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    reference = ops.reference_masked_activation(z, mask, activation)
    np.testing.assert_array_equal(result.positive_count, reference.positive_count)


@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 2, 3, 4, 6)])
def test_compiled_without_stats_and_in_float16(lib, shape):
    z, mask = _inputs(shape, dtype=np.float16)
    result = _compiled(lib, z, mask, "relu", compute_stats=False)
    np.testing.assert_array_equal(result.y.numpy(), _numpy(z, mask, "relu")[0])
    assert not np.any(result.channel_sum) and not np.any(result.positive_count)


@pytest.mark.parametrize("shape", [(2, 5, 4), (2, 2, 3, 2, 5)])
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
def test_compiled_gradient_matches_numerical_and_reference(lib, shape, activation):
    rng = np.random.default_rng(len(shape))
    z = rng.standard_normal(shape).astype(np.float32)
    z = np.where(np.abs(z) < 0.1, 0.1 * np.sign(z + 1e-9) + z, z).astype(np.float32)
    mask = np.array([1, 0, 0.5, 1, 0][: shape[-1]], np.float32)
    theoretical, numerical = tf.test.compute_gradient(
        lambda t: ops.masked_activation(t, mask, activation).y, [tf.constant(z)]
    )
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=5e-3)
    dy = tf.constant(rng.standard_normal(shape).astype(np.float32))
    grads = []
    for fn in (
        ops.masked_activation,
        ops.reference_masked_activation,
        ops.composite_masked_activation,
    ):
        zt = tf.constant(z)
        with tf.GradientTape() as tape:
            tape.watch(zt)
            y = fn(zt, mask, activation).y
        grads.append(tape.gradient(y, zt, output_gradients=dy).numpy())
    np.testing.assert_array_equal(grads[0], grads[1])
    np.testing.assert_array_equal(grads[0], grads[2])
    assert not np.any(grads[0][..., mask == 0])


def test_masked_activation_uses_the_compiled_op_for_rank_3_and_5(lib):
    for shape in [(2, 3, 4), (1, 2, 2, 2, 4)]:

        @tf.function
        def run(z):
            return ops.masked_activation(z, tf.ones([4]), "relu").y

        graph = run.get_concrete_function(tf.TensorSpec(shape)).graph
        kinds = {op.type for op in graph.get_operations()}
        assert "FinepruneMaskedActivation" in kinds, kinds


@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 2, 2, 2, 4)])
def test_shape_function_accepts_rank_3_and_5(lib, shape):
    @tf.function(input_signature=[tf.TensorSpec(shape), tf.TensorSpec((4,))])
    def run(z, mask):
        return lib.fineprune_masked_activation(z=z, mask=mask)

    outputs = run.get_concrete_function().structured_outputs
    assert tuple(outputs[0].shape) == shape and tuple(outputs[1].shape) == (4,)


@pytest.mark.parametrize("shape", [(5,), (1, 1, 2, 2, 2, 4)])
def test_rank_1_and_6_are_refused_by_every_path(lib, shape):
    z, mask = tf.zeros(shape), tf.ones([shape[-1]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="rank 2 to 5"):
        lib.fineprune_masked_activation(z=z, mask=mask)
    for fn in (
        ops.masked_activation,
        ops.composite_masked_activation,
        ops.reference_masked_activation,
    ):
        with pytest.raises(ValueError, match="rank 2 to 5"):
            fn(z, mask)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
def test_composite_fallback_rank_3_and_5_match_numpy_and_reference(shape, activation):
    z, mask = _inputs(shape, seed=1)
    result = ops.composite_masked_activation(z, mask, activation)
    _check(result, z, mask, activation)
    reference = ops.reference_masked_activation(z, mask, activation)
    np.testing.assert_array_equal(result.y, reference.y)
    np.testing.assert_array_equal(result.positive_count, reference.positive_count)
