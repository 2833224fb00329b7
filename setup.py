"""Build of the compiled op library ``fineprune_tf/_fineprune_ops.so``.

The op library is built by a custom ``build_ext`` that calls the compilers directly rather than
through distutils, because a TensorFlow op library must be compiled with exactly the flags that
``tf.sysconfig`` reports for the TensorFlow it will be loaded into, and must be named
``_fineprune_ops.so`` (no Python ABI tag) for ``tf.load_op_library``.

* C++ CPU kernels: ``g++`` (``$CXX``) with ``tf.sysconfig`` flags.
* CUDA kernels: compiled by ``nvcc`` and linked into the same library (with ``-DGOOGLE_CUDA=1``
  on the C++ side) when nvcc is found on PATH. ``FINEPRUNE_BUILD_CUDA=0`` disables them;
  ``FINEPRUNE_BUILD_CUDA=1`` requires them (the install fails if they cannot be built).
* If the library cannot be built at all (no compiler, ...), the install still succeeds with a
  warning and ``fineprune_tf.ops`` uses its pure-TensorFlow fallback.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = pathlib.Path(__file__).resolve().parent
LIBRARY_EXTENSION = "fineprune_tf._fineprune_ops"
LIBRARY_FILE = "_fineprune_ops.so"
CPU_SOURCE = "kernels/masked_activation_op.cc"
GPU_SOURCE = "kernels/masked_activation_op_gpu.cu.cc"
HEADER = "kernels/masked_activation_op.h"

CXX_FLAGS = [
    "-O3", "-fPIC", "-std=c++17", "-DNDEBUG",
    # Lets g++ if-convert the relu/count selects so the channel loops vectorise; the kernels
    # never read floating-point exception flags.
    "-fno-trapping-math",
    # TensorFlow's own headers trigger hundreds of these.
    "-Wno-deprecated-declarations",
]
# CUDA 13 accepts compute_75 and newer only; see the comment at the top of the .cu.cc file for
# why these (sm_75, sm_80, sm_89, sm_90 + compute_90 PTX for newer GPUs).
CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_75,code=sm_75",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_89,code=sm_89",
    "-gencode=arch=compute_90,code=[sm_90,compute_90]",
]
NVCC_FLAGS = [
    "-x", "cu", "-std=c++17", "-O3", "-DNDEBUG", "-DGOOGLE_CUDA=1",
    "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
    # Compile the four architectures concurrently.
    "--threads", "0",
    # Warnings come from TensorFlow's and Eigen's headers, not from the kernels.
    "-w",
]


class CompileError(RuntimeError):
    """A compiler step failed; the message carries the compiler's output."""


class CudaRequiredError(CompileError):
    """FINEPRUNE_BUILD_CUDA=1 and the CUDA kernels could not be built: fails the install."""


def _run(command: list[str], cwd: pathlib.Path) -> None:
    result = subprocess.run(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, check=False)
    if result.returncode != 0:
        raise CompileError(f"command failed ({result.returncode}): {' '.join(command)}\n"
                           f"{result.stdout[-20000:]}")


def _tensorflow_flags() -> tuple[list[str], list[str]]:
    """tf.sysconfig's compile and link flags, from a subprocess so TF's threads and logging stay
    out of the setup process."""
    code = ("import json, tensorflow as tf; "
            "print(json.dumps([tf.sysconfig.get_compile_flags(), tf.sysconfig.get_link_flags()]))")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, check=False)
    if result.returncode != 0:
        raise CompileError(f"could not import tensorflow to read its build flags:\n"
                           f"{result.stderr[-5000:]}")
    compile_flags, link_flags = json.loads(result.stdout.strip().splitlines()[-1])
    return compile_flags, link_flags


def _cuda_request() -> str:
    """'off', 'required' or 'auto' from FINEPRUNE_BUILD_CUDA."""
    value = os.environ.get("FINEPRUNE_BUILD_CUDA", "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    if value in ("1", "true", "yes", "on"):
        return "required"
    return "auto"


def _cuda_library_dir(nvcc: str) -> str:
    """The directory holding libcudart_static.a, as nvcc itself reports it (nvcc on PATH may be
    a wrapper script far from the toolkit)."""
    result = subprocess.run([nvcc, "--dryrun", "-o", "probe", "probe.cu"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, check=False)
    candidates = re.findall(r'-L"?([^"\s]+)"?', "\n".join(
        line for line in result.stdout.splitlines() if "LIBRARIES=" in line))
    for root in filter(None, (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                              "/usr/local/cuda")):
        candidates += [os.path.join(root, "lib64"), os.path.join(root, "lib")]
    for directory in candidates:
        if os.path.exists(os.path.join(directory, "libcudart_static.a")):
            return directory
    raise CompileError(f"nvcc found at {nvcc}, but not libcudart_static.a (looked in "
                       f"{candidates})")


class BuildTensorFlowOps(build_ext):
    """Builds ``fineprune_tf/_fineprune_ops.so``; never fails the install unless CUDA was
    explicitly required."""

    def get_ext_filename(self, fullname: str) -> str:
        # Called with the dotted name by setuptools and with the last component by distutils.
        if fullname in (LIBRARY_EXTENSION, LIBRARY_EXTENSION.rsplit(".", 1)[1]):
            return os.path.join(*fullname.split(".")[:-1], LIBRARY_FILE)
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        if ext.name != LIBRARY_EXTENSION:
            super().build_extension(ext)
            return
        output = pathlib.Path(self.get_ext_fullpath(ext.name)).resolve()
        try:
            self._build_library(output)
        except CudaRequiredError:
            raise
        except CompileError as error:
            self._warn(f"could not build the op library ({error}).\nfineprune_tf will use its "
                       "pure TensorFlow fallback (correct, but slower).")

    @staticmethod
    def _warn(message: str) -> None:
        print(f"\nWARNING: fineprune_tf: {message}\n", file=sys.stderr, flush=True)

    def _build_library(self, output: pathlib.Path) -> None:
        cxx = shutil.which(os.environ.get("CXX", "g++"))
        if cxx is None:
            raise CompileError("no C++ compiler (g++ or $CXX) on PATH")
        compile_flags, link_flags = _tensorflow_flags()
        temp = pathlib.Path(self.build_temp).resolve() / "fineprune_ops"
        temp.mkdir(parents=True, exist_ok=True)
        output.parent.mkdir(parents=True, exist_ok=True)

        cuda = _cuda_request()
        nvcc = shutil.which("nvcc") if cuda != "off" else None
        if cuda == "required" and nvcc is None:
            raise CudaRequiredError("FINEPRUNE_BUILD_CUDA=1 but nvcc is not on PATH")
        if nvcc is not None:
            try:
                self._build_with_cuda(cxx, nvcc, compile_flags, link_flags, temp, output)
                return
            except CompileError as error:
                if cuda == "required":
                    raise CudaRequiredError(f"the CUDA kernels failed to build: {error}") from error
                self._warn(f"the CUDA kernels failed to build; building the CPU-only library "
                           f"instead.\n{error}")

        print("fineprune_tf: compiling the CPU op library with g++ ...", flush=True)
        _run([cxx, *CXX_FLAGS, *compile_flags, "-shared", CPU_SOURCE, "-o", str(output),
              *link_flags], cwd=HERE)

    def _build_with_cuda(self, cxx, nvcc, compile_flags, link_flags, temp, output) -> None:
        cuda_lib_dir = _cuda_library_dir(nvcc)
        # nvcc only needs the include path and the ABI/Eigen defines, not g++'s --std spelling.
        nvcc_tf_flags = [flag for flag in compile_flags if flag.startswith(("-I", "-D"))]
        cpu_object = temp / "masked_activation_op.o"
        gpu_object = temp / "masked_activation_op_gpu.o"
        print("fineprune_tf: compiling the op library with g++ and nvcc (CUDA kernels) ...",
              flush=True)
        # The two compilers run concurrently: g++ takes ~15 s, nvcc (4 architectures) longer.
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            jobs = [
                pool.submit(_run, [cxx, *CXX_FLAGS, *compile_flags, "-DGOOGLE_CUDA=1", "-c",
                                   CPU_SOURCE, "-o", str(cpu_object)], HERE),
                pool.submit(_run, [nvcc, *NVCC_FLAGS, *CUDA_ARCH_FLAGS, *nvcc_tf_flags, "-c",
                                   GPU_SOURCE, "-o", str(gpu_object)], HERE),
            ]
            for job in jobs:
                job.result()
        # cudart is linked statically with its symbols hidden: TensorFlow's framework library
        # exports a cudart stub bound to the CUDA 12 runtime, and the kernels compiled by this
        # nvcc must run on the runtime they were compiled with.
        _run([cxx, "-shared", str(cpu_object), str(gpu_object), "-o", str(output),
              "-Wl,--exclude-libs,libcudart_static.a", f"-L{cuda_lib_dir}", "-lcudart_static",
              "-lrt", "-ldl", "-lpthread", *link_flags], cwd=HERE)


# Metadata, dependencies and entry points are in pyproject.toml (PEP 621); this file only builds
# the op library.
setup(
    # The sources are listed so that an sdist carries them; BuildTensorFlowOps compiles them.
    # optional=True: an editable install then skips copying the library into fineprune_tf/
    # when its build was skipped, instead of failing.
    ext_modules=[Extension(LIBRARY_EXTENSION, sources=[CPU_SOURCE, GPU_SOURCE],
                           depends=[HEADER], optional=True)],
    cmdclass={"build_ext": BuildTensorFlowOps},
    zip_safe=False,
)
