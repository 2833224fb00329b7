"""The compiled masked-activation op against the pure-TensorFlow reference and numpy.

The compiled library is expected after ``pip install``: tests of the compiled op fail (not skip)
when it is missing, unless FINEPRUNE_FORCE_TF_OPS is set, in which case they skip.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from fineprune_tf import ops

REPO = pathlib.Path(__file__).resolve().parents[1]
FORCED_FALLBACK = os.environ.get("FINEPRUNE_FORCE_TF_OPS", "") not in ("", "0")


@pytest.fixture
def lib():
    """The loaded op module (the generated wrappers of the .so)."""
    if FORCED_FALLBACK:
        pytest.skip("FINEPRUNE_FORCE_TF_OPS is set")
    if ops._MODULE is None:
        pytest.fail(
            f"the compiled op library {ops._library_path()} is not loaded; "
            "build it with `pip install -e .`"
        )
    return ops._MODULE


def compiled(lib, z, mask, activation="relu", compute_stats=True):
    return ops.MaskedActivationResult(
        *lib.fineprune_masked_activation(
            z=z, mask=mask, activation=activation, compute_stats=compute_stats
        )
    )


def numpy_expected(z, mask, activation):
    """y (in z's dtype) and float64 statistics of the unmasked activation."""
    a = np.maximum(z, 0) if activation == "relu" else z
    y = (a.astype(np.float32) * mask.astype(np.float32)).astype(z.dtype)
    flat = a.astype(np.float64).reshape(-1, z.shape[-1])
    return y, flat.sum(0), (flat * flat).sum(0), (flat > 0).sum(0)


def random_inputs(rng, shape, dtype=np.float32, keep=0.7):
    z = rng.standard_normal(shape).astype(dtype)
    mask = (rng.random(shape[-1]) < keep).astype(dtype)
    return z, mask


def assert_matches_numpy(result, z, mask, activation, compute_stats=True):
    y, total, total_sq, count = numpy_expected(z, mask, activation)
    assert result.y.dtype == z.dtype and result.y.shape == z.shape
    np.testing.assert_array_equal(result.y.numpy(), y)
    channels = z.shape[-1]
    assert result.channel_sum.dtype == tf.float32 and result.channel_sum.shape == (channels,)
    assert result.channel_sum_sq.dtype == tf.float32
    assert result.positive_count.dtype == tf.int64 and result.positive_count.shape == (channels,)
    if not compute_stats:
        total, total_sq, count = (np.zeros(channels),) * 3
    # float32 output of a double (compiled) or float (reference) accumulation.
    scale = np.sqrt(max(1, z.size // max(channels, 1)))
    np.testing.assert_allclose(result.channel_sum, total, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(result.channel_sum_sq, total_sq, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_array_equal(result.positive_count, count)


SHAPES = [
    (2, 4, 4, 8),
    (3, 5, 7, 16),
    (1, 1, 1, 1),
    (5, 3),
    (16, 96),
    (2, 6, 5, 33),
    # Several CPU blocks (> 2 * 2^18 elements) and a row count that does not divide evenly.
    (3, 31, 29, 128),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("compute_stats", [True, False])
def test_compiled_matches_numpy_and_reference(lib, shape, activation, compute_stats):
    rng = np.random.default_rng([len(shape), *shape, compute_stats])
    z, mask = random_inputs(rng, shape)
    result = compiled(lib, z, mask, activation, compute_stats)
    assert_matches_numpy(result, z, mask, activation, compute_stats)
    reference = ops.reference_masked_activation(z, mask, activation, compute_stats)
    np.testing.assert_array_equal(result.y, reference.y)
    np.testing.assert_allclose(result.channel_sum, reference.channel_sum, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        result.channel_sum_sq, reference.channel_sum_sq, rtol=1e-5, atol=1e-4
    )
    np.testing.assert_array_equal(result.positive_count, reference.positive_count)


@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("shape", [(4, 5, 5, 8), (7, 24), (2, 9, 9, 1024)])
def test_float16(lib, shape, activation):
    rng = np.random.default_rng(16)
    z, mask = random_inputs(rng, shape, np.float16)
    # Fractional mask values and tiny activations: the products land among half's subnormals,
    # where the float -> half rounding of y must still match numpy's (round to nearest even).
    mask[: shape[-1] // 2] *= np.float16(0.37)
    z.reshape(-1)[::5] *= np.float16(1e-4)
    result = compiled(lib, z, mask, activation)
    y, total, total_sq, count = numpy_expected(z, mask, activation)
    assert result.y.dtype == tf.float16
    np.testing.assert_array_equal(result.y.numpy(), y)
    # Statistics are accumulated in float from the half values: close to float64 numpy.
    np.testing.assert_allclose(result.channel_sum, total, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(result.channel_sum_sq, total_sq, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(result.positive_count, count)
    reference = ops.reference_masked_activation(z, mask, activation)
    np.testing.assert_array_equal(result.y, reference.y)
    np.testing.assert_allclose(result.channel_sum, reference.channel_sum, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize(
    "case",
    [
        "c1",
        "batch1",
        "c1024",
        "all_masked",
        "none_masked",
        "zeros",
        "negatives",
        "rank2",
        "fractional_mask",
    ],
)
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
def test_edge_cases(lib, case, activation):
    rng = np.random.default_rng(7)
    shape = {
        "c1": (6, 5, 5, 1),
        "batch1": (1, 7, 7, 12),
        "c1024": (3, 2, 2, 1024),
        "rank2": (33, 10),
    }.get(case, (4, 6, 6, 16))
    z, mask = random_inputs(rng, shape)
    if case == "all_masked":
        mask[:] = 0
    elif case == "none_masked":
        mask[:] = 1
    elif case == "zeros":
        z[:] = 0
    elif case == "negatives":
        z = -np.abs(z) - 0.5
    elif case == "fractional_mask":
        mask = rng.random(shape[-1]).astype(np.float32)
    result = compiled(lib, z, mask, activation)
    assert_matches_numpy(result, z, mask, activation)
    if case == "all_masked":
        assert not np.any(result.y.numpy())
        # The statistics describe the unmasked activation, so pruning does not hide a channel.
        assert np.any(result.channel_sum.numpy())
    if case in ("zeros",) or (case == "negatives" and activation == "relu"):
        assert not np.any(result.positive_count.numpy())
        assert not np.any(result.channel_sum.numpy())


@pytest.mark.parametrize("shape", [(0, 4, 4, 8), (0, 3), (2, 0, 3, 5)])
def test_empty_input_gives_zero_statistics(lib, shape):
    z = np.zeros(shape, np.float32)
    mask = np.ones(shape[-1], np.float32)
    result = compiled(lib, z, mask)
    assert result.y.shape == shape
    np.testing.assert_array_equal(result.channel_sum, np.zeros(shape[-1]))
    np.testing.assert_array_equal(result.positive_count, np.zeros(shape[-1]))
    dz = lib.fineprune_masked_activation_grad(dy=z, z=z, mask=mask)
    assert dz.shape == shape


def test_public_api_uses_compiled_op(lib):
    rng = np.random.default_rng(3)
    z, mask = random_inputs(rng, (2, 3, 3, 4))
    result = ops.masked_activation(z, mask)
    assert isinstance(result, ops.MaskedActivationResult)
    assert_matches_numpy(result, z, mask, "relu")
    graph = (
        tf.function(ops.masked_activation)
        .get_concrete_function(tf.TensorSpec([None, 3, 3, 4]), tf.TensorSpec([4]))
        .graph
    )
    assert "FinepruneMaskedActivation" in {op.type for op in graph.get_operations()}


def test_statistics_accumulate_over_batches_like_numpy(lib):
    rng = np.random.default_rng(11)
    mask = (rng.random(32) < 0.5).astype(np.float32)
    batches = [rng.standard_normal((8, 9, 9, 32)).astype(np.float32) + 0.2 for _ in range(5)]
    total = np.zeros(32)
    total_sq = np.zeros(32)
    count = np.zeros(32, np.int64)
    for batch in batches:
        result = compiled(lib, batch, mask)
        total += result.channel_sum.numpy()
        total_sq += result.channel_sum_sq.numpy()
        count += result.positive_count.numpy()
    a = np.maximum(np.concatenate(batches), 0).astype(np.float64).reshape(-1, 32)
    np.testing.assert_allclose(total, a.sum(0), rtol=1e-6)
    np.testing.assert_allclose(total_sq, (a * a).sum(0), rtol=1e-6)
    np.testing.assert_array_equal(count, (a > 0).sum(0))
    mean = total / len(a)
    np.testing.assert_allclose(mean, a.mean(0), rtol=1e-6)


def test_statistics_are_deterministic(lib):
    rng = np.random.default_rng(5)
    z, mask = random_inputs(rng, (8, 40, 40, 64))
    first = compiled(lib, z, mask)
    for _ in range(3):
        again = compiled(lib, z, mask)
        np.testing.assert_array_equal(first.channel_sum, again.channel_sum)
        np.testing.assert_array_equal(first.channel_sum_sq, again.channel_sum_sq)


# ---------------------------------------------------------------------------------------------
# Gradients.


def away_from_kink(rng, shape):
    z = rng.standard_normal(shape).astype(np.float32)
    return np.where(np.abs(z) < 0.1, np.sign(z + 1e-9) * 0.1 + z, z).astype(np.float32)


@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("shape", [(2, 3, 3, 4), (5, 6)])
def test_numerical_gradient_of_compiled_op(lib, activation, shape):
    rng = np.random.default_rng(21)
    z = away_from_kink(rng, shape)
    mask = np.array([1, 0, 0.5, 1, 1, 0][: shape[-1]], np.float32)

    def f(z):
        return ops.masked_activation(z, mask, activation).y

    theoretical, numerical = tf.test.compute_gradient(f, [tf.constant(z)])
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=5e-3)
    assert np.any(theoretical[0])


@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_compiled_and_fallback_gradients_are_equal(lib, activation, dtype):
    rng = np.random.default_rng(8)
    z, mask = random_inputs(rng, (3, 5, 5, 16), dtype)
    z[0, 0, 0, :4] = 0  # the relu kink: both sides must give 0 there
    weights = tf.constant(rng.standard_normal(z.shape).astype(dtype))
    z = tf.constant(z)
    gradients = []
    for fn in (ops.masked_activation, ops.reference_masked_activation):
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = tf.reduce_sum(fn(z, mask, activation).y * weights)
        gradients.append(tape.gradient(loss, z).numpy())
    np.testing.assert_array_equal(gradients[0], gradients[1])
    # A pruned channel receives exactly zero gradient.
    assert not np.any(gradients[0][..., mask == 0])


@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
def test_grad_op_matches_formula(lib, activation):
    rng = np.random.default_rng(9)
    z, mask = random_inputs(rng, (4, 7, 7, 24))
    dy = rng.standard_normal(z.shape).astype(np.float32)
    dz = lib.fineprune_masked_activation_grad(dy=dy, z=z, mask=mask, activation=activation)
    derivative = (z > 0).astype(np.float32) if activation == "relu" else 1.0
    np.testing.assert_array_equal(dz.numpy(), dy * mask * derivative)


def test_gradient_inside_tf_function_and_keras_fit_shape(lib):
    rng = np.random.default_rng(4)
    z, mask = random_inputs(rng, (4, 3, 3, 8))

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 8])])
    def grad(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            result = ops.masked_activation(z, mask)
            loss = tf.reduce_sum(result.y) + tf.reduce_sum(result.channel_sum)
        return tape.gradient(loss, z)

    # The statistics carry no gradient; only y contributes.
    expected = (z > 0).astype(np.float32) * mask
    np.testing.assert_array_equal(grad(tf.constant(z)).numpy(), expected)


# ---------------------------------------------------------------------------------------------
# Validation.

BAD_SHAPES = [
    ((2, 4, 4, 8), (5,), "mask length 5 does not match the 8 channels of z [2,4,4,8]"),
    ((2, 1, 2, 4, 4, 8), (8,), "[2,1,2,4,4,8]"),  # rank 6; ranks 2-5: tests/test_ops_ranks.py
    ((2, 4, 4, 8), (2, 4), "[2,4]"),
]


@pytest.mark.parametrize("z_shape, mask_shape, message", BAD_SHAPES)
def test_compiled_op_rejects_bad_shapes(lib, z_shape, mask_shape, message):
    z = tf.zeros(z_shape)
    mask = tf.ones(mask_shape)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message.replace("[", r"\[")):
        lib.fineprune_masked_activation(z=z, mask=mask)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message.replace("[", r"\[")):
        lib.fineprune_masked_activation_grad(dy=z, z=z, mask=mask)


@pytest.mark.parametrize("z_shape, mask_shape, message", BAD_SHAPES)
def test_compiled_op_rejects_bad_dynamic_shapes_at_run_time(lib, z_shape, mask_shape, message):
    """With unknown static shapes only the kernel's own check can catch the error."""

    @tf.function(input_signature=[tf.TensorSpec(None), tf.TensorSpec(None)])
    def run(z, mask):
        return lib.fineprune_masked_activation(z=z, mask=mask)[0]

    with pytest.raises(tf.errors.InvalidArgumentError, match=message.replace("[", r"\[")):
        run(tf.zeros(z_shape), tf.ones(mask_shape))


@pytest.mark.parametrize("z_shape, mask_shape, message", BAD_SHAPES)
def test_shape_function_rejects_bad_static_shapes(lib, z_shape, mask_shape, message):
    @tf.function(input_signature=[tf.TensorSpec(z_shape), tf.TensorSpec(mask_shape)])
    def run(z, mask):
        return lib.fineprune_masked_activation(z=z, mask=mask)[0]

    with pytest.raises(
        (ValueError, tf.errors.InvalidArgumentError), match=message.replace("[", r"\[")
    ):
        run.get_concrete_function()


def test_grad_op_rejects_dy_of_another_shape(lib):
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"dy shape \[2,3\].*\[2,4\]"):
        lib.fineprune_masked_activation_grad(
            dy=tf.zeros([2, 3]), z=tf.zeros([2, 4]), mask=tf.ones([4])
        )


def test_compiled_op_rejects_integer_dtype(lib):
    with pytest.raises((TypeError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError)):
        lib.fineprune_masked_activation(z=tf.zeros([2, 3], tf.int32), mask=tf.ones([3], tf.int32))


@pytest.mark.parametrize("fn", [ops.masked_activation, ops.reference_masked_activation])
@pytest.mark.parametrize(
    "z_shape, mask_shape, fragment",
    [
        ((2, 4, 4, 8), (5,), "mask length 5 does not match the 8 channels"),
        ((8,), (8,), "(8,)"),
        ((2, 4, 4, 8), (2, 4), "(2, 4)"),
    ],
)
def test_python_api_rejects_bad_static_shapes_with_value_error(fn, z_shape, mask_shape, fragment):
    with pytest.raises(ValueError) as error:
        fn(tf.zeros(z_shape), tf.ones(mask_shape))
    assert fragment in str(error.value)


# ---------------------------------------------------------------------------------------------
# Backends and the Bazel build.


def test_backend_is_compiled_after_install(lib):
    expected = "compiled-cuda" if tf.config.list_physical_devices("GPU") else "compiled-cpu"
    assert ops.backend() == expected


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env},
    )


def test_force_tf_ops_selects_the_fallback():
    result = run_python(
        "from fineprune_tf import ops; print(ops.backend())", FINEPRUNE_FORCE_TF_OPS="1"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "tensorflow"


def bazel_library() -> pathlib.Path:
    configured = os.environ.get("FINEPRUNE_BAZEL_LIB")
    if configured:
        path = pathlib.Path(configured)
        assert path.is_file(), f"FINEPRUNE_BAZEL_LIB={configured} does not exist"
        return path
    path = REPO / "bazel-bin" / "_fineprune_ops.so"
    if path.is_file():
        return path
    if shutil.which("bazel") is None:
        pytest.skip("bazel is not installed and FINEPRUNE_BAZEL_LIB is not set")
    pytest.fail(
        f"bazel is installed but {path} is missing: run `bash kernels/build_bazel.sh` "
        "(or set FINEPRUNE_BAZEL_LIB to the library it prints)"
    )


def test_bazel_built_library_matches_reference():
    path = bazel_library()
    # A subprocess: the Bazel library registers the same op names as the pip-built one, and the
    # pip-built one must not be loaded first (FINEPRUNE_FORCE_TF_OPS keeps ops.py off it).
    result = run_python(
        f"""
        import numpy as np, tensorflow as tf
        from fineprune_tf import ops
        lib = tf.load_op_library({str(path)!r})
        assert not lib.fineprune_built_with_cuda().numpy()
        rng = np.random.default_rng(0)
        z = rng.standard_normal((4, 9, 9, 48)).astype(np.float32)
        mask = (rng.random(48) < 0.6).astype(np.float32)
        for activation in ops.ACTIVATIONS:
            got = lib.fineprune_masked_activation(z=z, mask=mask, activation=activation)
            want = ops.reference_masked_activation(z, mask, activation)
            np.testing.assert_array_equal(got[0], want.y)
            np.testing.assert_allclose(got[1], want.channel_sum, rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(got[2], want.channel_sum_sq, rtol=1e-5, atol=1e-4)
            np.testing.assert_array_equal(got[3], want.positive_count)
            dy = rng.standard_normal(z.shape).astype(np.float32)
            dz = lib.fineprune_masked_activation_grad(dy=dy, z=z, mask=mask,
                                                      activation=activation)
            d = (z > 0).astype(np.float32) if activation == "relu" else 1.0
            np.testing.assert_array_equal(dz, dy * mask * d)
        print("bazel-ok")
        """,
        FINEPRUNE_FORCE_TF_OPS="1",
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert "bazel-ok" in result.stdout


# ---------------------------------------------------------------------------------------------
# The composite: the fallback users without the compiled op run, and what runs inside XLA.


@pytest.mark.parametrize("shape", [(2, 4, 4, 8), (5, 3), (3, 31, 29, 128), (1, 1, 1, 1)])
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("compute_stats", [True, False])
def test_composite_matches_numpy_and_reference(shape, activation, compute_stats):
    rng = np.random.default_rng([len(shape), *shape, compute_stats, 3])
    z, mask = random_inputs(rng, shape)
    result = ops.composite_masked_activation(z, mask, activation, compute_stats)
    assert_matches_numpy(result, z, mask, activation, compute_stats)
    reference = ops.reference_masked_activation(z, mask, activation, compute_stats)
    np.testing.assert_array_equal(result.y, reference.y)
    np.testing.assert_array_equal(result.positive_count, reference.positive_count)


@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_composite_gradient_is_the_references_and_zero_on_pruned_channels(activation, dtype):
    rng = np.random.default_rng(11)
    z, mask = random_inputs(rng, (3, 5, 5, 12), dtype)
    z[0, 0, 0, :] = 0  # act'(0) = 0 for ReLU, as tf.nn.relu and the compiled op.
    dy = rng.standard_normal(z.shape).astype(dtype)
    gradients = {}
    for name, fn in [
        ("composite", ops.composite_masked_activation),
        ("reference", ops.reference_masked_activation),
    ]:
        z_var, mask_var = tf.Variable(z), tf.Variable(mask)
        with tf.GradientTape() as tape:
            y = fn(z_var, mask_var, activation).y
        dz, dmask = tape.gradient(y, [z_var, mask_var], output_gradients=tf.constant(dy))
        assert dmask is None  # The mask is never differentiated.
        gradients[name] = dz.numpy()
    np.testing.assert_array_equal(gradients["composite"], gradients["reference"])
    assert np.all(gradients["composite"][..., mask == 0] == 0)


def test_composite_runs_inside_xla_and_masked_activation_picks_it_there():
    rng = np.random.default_rng(5)
    z, mask = random_inputs(rng, (4, 6, 6, 16))

    @tf.function(jit_compile=True)
    def compiled_by_xla(z, mask):
        with tf.GradientTape() as tape:
            tape.watch(z)
            result = ops.masked_activation(z, mask)
        return result, tape.gradient(result.y, z)

    result, dz = compiled_by_xla(tf.constant(z), tf.constant(mask))
    assert_matches_numpy(result, z, mask, "relu")
    np.testing.assert_array_equal(dz.numpy(), (z > 0) * mask[None, None, None, :])
