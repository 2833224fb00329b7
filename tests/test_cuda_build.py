"""The CUDA kernels compile, and the installed library carries them when nvcc was available.

No GPU is needed: these check the build, not the kernels' results (the kernels mirror the CPU
ones, which test_ops.py checks numerically).
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
    "0", "false", "no", "off")
FORCED_FALLBACK = os.environ.get("FINEPRUNE_FORCE_TF_OPS", "") not in ("", "0")

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


@needs_nvcc
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    """A real device compile of the .cu.cc, for one architecture to keep it short (~30 s)."""
    flags = [flag for flag in tf.sysconfig.get_compile_flags() if flag.startswith(("-I", "-D"))]
    output = tmp_path / "masked_activation_op_gpu.o"
    result = subprocess.run(
        [NVCC, "-x", "cu", "-std=c++17", "-O3", "-DGOOGLE_CUDA=1", "--expt-relaxed-constexpr",
         "-Xcompiler", "-fPIC", "-w", "-gencode=arch=compute_75,code=sm_75", *flags,
         "-c", str(REPO / "kernels" / "masked_activation_op_gpu.cu.cc"), "-o", str(output)],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert output.stat().st_size > 0
    symbols = subprocess.run(["nm", "-C", str(output)], capture_output=True, text=True,
                             check=False).stdout
    for kernel in ("ForwardKernel", "GradKernel", "MergeStatsKernel",
                   "LaunchMaskedActivationGpu", "LaunchMaskedActivationGradGpu"):
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
    dynamic = subprocess.run(["nm", "-D", str(library)], capture_output=True, text=True,
                             check=True).stdout.split("\n")
    cuda_symbols = [line for line in dynamic
                    if line.split() and line.split()[-1].startswith(("cuda", "__cuda"))]
    assert not cuda_symbols, cuda_symbols


def registered_devices(op_name: str, dtype: str) -> set[str]:
    from tensorflow.python.framework import kernels

    registered = kernels.get_registered_kernels_for_op(op_name).kernel
    return {kernel.device_type for kernel in registered
            if any(constraint.name == "T" and dtype in str(constraint.allowed_values)
                   for constraint in kernel.constraint)}


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
    return (not FORCED_FALLBACK and ops._MODULE is not None
            and bool(tf.config.list_physical_devices("GPU"))
            and "GPU" in registered_devices("FinepruneMaskedActivation", "DT_FLOAT"))


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
            forward = ops._MODULE.fineprune_masked_activation(z=z, mask=mask,
                                                              activation=activation)
            grad = ops._MODULE.fineprune_masked_activation_grad(dy=dy, z=z, mask=mask,
                                                                activation=activation)
            results[device] = [t.numpy() for t in forward] + [grad.numpy()]
    cpu, gpu = results["/CPU:0"], results["/GPU:0"]
    np.testing.assert_array_equal(gpu[0], cpu[0])
    np.testing.assert_allclose(gpu[1], cpu[1], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(gpu[2], cpu[2], rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(gpu[3], cpu[3])
    np.testing.assert_array_equal(gpu[4], cpu[4])
