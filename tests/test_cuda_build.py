"""The CUDA kernels compile, the installed library carries them when nvcc was available, and,
when a GPU is present, they compute what the CPU kernels and NumPy compute.

The build checks need no GPU.  The GPU checks (skipped without one) use shapes that exercise
every path of the kernels: ~300k rows (each thread runs the multi-chunk loop many times), few
and many channels, float32 and float16, ``compute_stats=False``, an all-masked mask, and an
input buffer the op forwards as its output (the aliasing the kernels must allow).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest
import tensorflow as tf

from fineprune_tf import ops

REPO = pathlib.Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
CUDA_DISABLED = os.environ.get("FINEPRUNE_BUILD_CUDA", "").strip().lower() in (
    "0",
    "false",
    "no",
    "off",
)
FORCED_FALLBACK = os.environ.get("FINEPRUNE_FORCE_TF_OPS", "") not in ("", "0")

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


@needs_nvcc
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    """A real device compile of the .cu.cc, for one architecture to keep it short (~30 s)."""
    flags = [flag for flag in tf.sysconfig.get_compile_flags() if flag.startswith(("-I", "-D"))]
    output = tmp_path / "masked_activation_op_gpu.o"
    result = subprocess.run(
        [
            NVCC,
            "-x",
            "cu",
            "-std=c++17",
            "-O3",
            "-DGOOGLE_CUDA=1",
            "--expt-relaxed-constexpr",
            "-Xcompiler",
            "-fPIC",
            "-w",
            "-gencode=arch=compute_75,code=sm_75",
            *flags,
            "-c",
            str(REPO / "kernels" / "masked_activation_op_gpu.cu.cc"),
            "-o",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert output.stat().st_size > 0
    symbols = subprocess.run(
        ["nm", "-C", str(output)], capture_output=True, text=True, check=False
    ).stdout
    for kernel in (
        "ForwardKernel",
        "GradKernel",
        "MergeStatsKernel",
        "LaunchMaskedActivationGpu",
        "LaunchMaskedActivationGradGpu",
    ):
        assert kernel in symbols, f"{kernel} missing from the object file"


@needs_nvcc
@pytest.mark.skipif(CUDA_DISABLED, reason="FINEPRUNE_BUILD_CUDA=0 disables the CUDA kernels")
@pytest.mark.skipif(FORCED_FALLBACK, reason="FINEPRUNE_FORCE_TF_OPS is set")
def test_installed_library_was_built_with_cuda():
    assert ops._MODULE is not None, "the compiled op library is not loaded"
    assert ops.built_with_cuda()


@pytest.mark.skipif(FORCED_FALLBACK, reason="FINEPRUNE_FORCE_TF_OPS is set")
def test_library_does_not_bind_to_tensorflows_cuda_runtime():
    """cudart is linked statically with hidden symbols: the kernels compiled by this nvcc must
    not be registered through the CUDA runtime stub that libtensorflow_framework exports."""
    library = ops._library_path()
    if not library.exists() or shutil.which("nm") is None:
        pytest.skip("no compiled library or no nm")
    dynamic = subprocess.run(
        ["nm", "-D", str(library)], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    cuda_symbols = [
        line for line in dynamic if line.split() and line.split()[-1].startswith(("cuda", "__cuda"))
    ]
    assert not cuda_symbols, cuda_symbols


def registered_devices(op_name: str, dtype: str) -> set[str]:
    from tensorflow.python.framework import kernels

    registered = kernels.get_registered_kernels_for_op(op_name).kernel
    return {
        kernel.device_type
        for kernel in registered
        if any(
            constraint.name == "T" and dtype in str(constraint.allowed_values)
            for constraint in kernel.constraint
        )
    }


@pytest.mark.skipif(FORCED_FALLBACK, reason="FINEPRUNE_FORCE_TF_OPS is set")
@pytest.mark.parametrize("op_name", ["FinepruneMaskedActivation", "FinepruneMaskedActivationGrad"])
@pytest.mark.parametrize("dtype", ["DT_FLOAT", "DT_HALF"])
def test_kernel_registrations(op_name, dtype):
    assert ops._MODULE is not None, "the compiled op library is not loaded"
    devices = registered_devices(op_name, dtype)
    assert "CPU" in devices
    if not ops.built_with_cuda() or not tf.config.list_physical_devices("GPU"):
        # Without a CUDA driver the GPU kernels are deliberately not registered, so that
        # TensorFlow keeps the op on the CPU.
        assert "GPU" not in devices


def gpu_kernels_available() -> bool:
    return (
        not FORCED_FALLBACK
        and ops._MODULE is not None
        and bool(tf.config.list_physical_devices("GPU"))
        and "GPU" in registered_devices("FinepruneMaskedActivation", "DT_FLOAT")
    )


@pytest.mark.skipif(not gpu_kernels_available(), reason="no GPU, or no CUDA kernels for it")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("shape", [(3, 17, 19, 40), (1000, 7), (0, 5), (2, 1, 1, 1)])
def test_gpu_kernels_match_cpu_kernels(dtype, activation, shape):
    import numpy as np

    rng = np.random.default_rng(len(shape))
    z = rng.standard_normal(shape).astype(dtype)
    mask = (rng.random(shape[-1]) < 0.7).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    results = {}
    for device in ("/CPU:0", "/GPU:0"):
        with tf.device(device):
            forward = ops._MODULE.fineprune_masked_activation(z=z, mask=mask, activation=activation)
            grad = ops._MODULE.fineprune_masked_activation_grad(
                dy=dy, z=z, mask=mask, activation=activation
            )
            results[device] = [t.numpy() for t in forward] + [grad.numpy()]
    cpu, gpu = results["/CPU:0"], results["/GPU:0"]
    np.testing.assert_array_equal(gpu[0], cpu[0])
    np.testing.assert_allclose(gpu[1], cpu[1], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(gpu[2], cpu[2], rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(gpu[3], cpu[3])
    np.testing.assert_array_equal(gpu[4], cpu[4])


def gpu_op(device: str, z, mask, activation: str, compute_stats: bool = True, dy=None):
    """Forward outputs ``[y, sum, sum_sq, positive]`` (and the gradient when ``dy`` is given)
    on ``device``, as NumPy arrays."""
    with tf.device(device):
        forward = ops._MODULE.fineprune_masked_activation(
            z=z, mask=mask, activation=activation, compute_stats=compute_stats
        )
        results = [t.numpy() for t in forward]
        if dy is not None:
            results.append(
                ops._MODULE.fineprune_masked_activation_grad(
                    dy=dy, z=z, mask=mask, activation=activation
                ).numpy()
            )
    return results


def numpy_reference(z, mask, activation: str):
    """float64 ``y``, per-channel sum, sum of squares and positive count of ``act(z)``."""
    import numpy as np

    z64 = z.astype(np.float64).reshape(-1, z.shape[-1])
    a = np.maximum(z64, 0.0) if activation == "relu" else z64
    return (a * mask.astype(np.float64)).reshape(z.shape), a.sum(0), (a * a).sum(0), (a > 0).sum(0)


needs_gpu_kernels = pytest.mark.skipif(
    not gpu_kernels_available(), reason="no GPU, or no CUDA kernels for it"
)


@needs_gpu_kernels
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("channels", [3, 32])
@pytest.mark.parametrize("mask_kind", ["random", "all_masked"])
def test_gpu_kernels_on_300k_rows(dtype, channels, mask_kind):
    """~300k rows x <= 32 channels: every thread runs the multi-chunk loop many times."""
    import numpy as np

    rows = 300_007  # Not a multiple of any tile or chunk size.
    rng = np.random.default_rng(channels)
    z = rng.standard_normal((rows, channels)).astype(dtype)
    dy = rng.standard_normal((rows, channels)).astype(dtype)
    mask = ((rng.random(channels) < 0.6) if mask_kind == "random" else np.zeros(channels)).astype(
        dtype
    )
    y, total, total_sq, positive, dz = gpu_op("/GPU:0", z, mask, "relu", dy=dy)
    cpu = gpu_op("/CPU:0", z, mask, "relu", dy=dy)
    expected_y, expected_sum, expected_sq, expected_positive = numpy_reference(z, mask, "relu")
    np.testing.assert_array_equal(y, cpu[0])
    np.testing.assert_allclose(
        y.astype(np.float64),
        expected_y,
        rtol=1e-3 if dtype == "float16" else 1e-6,
        atol=1e-3 if dtype == "float16" else 0,
    )
    if mask_kind == "all_masked":
        assert not y.any() and not dz.any()
    # Statistics are of act(z) before the mask, so masking everything leaves them unchanged.
    np.testing.assert_allclose(total, expected_sum, rtol=1e-4)
    np.testing.assert_allclose(total_sq, expected_sq, rtol=1e-4)
    np.testing.assert_array_equal(positive, expected_positive)
    np.testing.assert_allclose(total, cpu[1], rtol=1e-5)
    np.testing.assert_array_equal(positive, cpu[3])
    np.testing.assert_array_equal(dz, cpu[4])


@needs_gpu_kernels
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("shape", [(300_007, 32), (2, 9, 11, 40), (0, 4)])
def test_gpu_forward_without_statistics(dtype, activation, shape):
    """``compute_stats=False``: the streaming kernel gives the same ``y`` and zero statistics,
    even after a statistics pass left other values in the device's memory."""
    import numpy as np

    rng = np.random.default_rng(len(shape))
    z = rng.standard_normal(shape).astype(dtype)
    mask = (rng.random(shape[-1]) < 0.5).astype(dtype)
    with_stats = gpu_op("/GPU:0", z, mask, activation, compute_stats=True)
    y, total, total_sq, positive = gpu_op("/GPU:0", z, mask, activation, compute_stats=False)
    np.testing.assert_array_equal(y, with_stats[0])
    np.testing.assert_array_equal(y, gpu_op("/CPU:0", z, mask, activation, False)[0])
    assert total.shape == total_sq.shape == positive.shape == (shape[-1],)
    assert not total.any() and not total_sq.any() and not positive.any()


@needs_gpu_kernels
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_kernels_with_a_forwarded_input_buffer(dtype):
    """Inside a tf.function the op's input is a temporary TensorFlow may forward as its output
    (and dy's buffer as dz), so the kernels read and write the same memory."""
    import numpy as np

    rng = np.random.default_rng(0)
    z = rng.standard_normal((300_007, 16)).astype(dtype)
    dy = rng.standard_normal(z.shape).astype(dtype)
    mask = (rng.random(16) < 0.5).astype(dtype)

    @tf.function
    def forward_and_grad(z, dy):
        temporary_z, temporary_dy = z * 1.0, dy * 1.0  # Buffers nothing else holds.
        y = ops._MODULE.fineprune_masked_activation(z=temporary_z, mask=mask, activation="relu")[0]
        dz = ops._MODULE.fineprune_masked_activation_grad(
            dy=temporary_dy, z=z, mask=mask, activation="relu"
        )
        return y, dz

    with tf.device("/GPU:0"):
        y, dz = (t.numpy() for t in forward_and_grad(tf.constant(z), tf.constant(dy)))
    cpu = gpu_op("/CPU:0", z, mask, "relu", dy=dy)
    np.testing.assert_array_equal(y, cpu[0])
    np.testing.assert_array_equal(dz, cpu[4])
