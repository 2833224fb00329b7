"""Timing helpers shared by the benchmark sections: interleaved medians, a GEMM rate probe and
per-op kernel time from ``tf.profiler``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

GEMM = 1024


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Times every function ``repeats`` times, alternating between them run by run, so that
    load from other processes hits every competitor alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return times


def fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def gemm_fn() -> Callable[[], Any]:
    """A 1024^3 float32 matmul (2 * 1024^3 FLOPs): this machine's dense-kernel peak, roughly."""
    import tensorflow as tf

    a = tf.random.normal([GEMM, GEMM])
    b = tf.random.normal([GEMM, GEMM])
    matmul = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)))
    return lambda: matmul(a, b).numpy()


def op_profile(fn: Callable[[], Any], runs: int) -> dict[str, float]:
    """Seconds per run of each TensorFlow op type, from a ``tf.profiler`` trace of ``runs``
    calls of ``fn`` (kernel time summed over the compute threads)."""
    import glob
    import pathlib
    import shutil
    import tempfile
    from collections import Counter

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    logdir = tempfile.mkdtemp(prefix="fineprune_profile_")
    try:
        tf.profiler.experimental.start(logdir)
        try:
            for _ in range(runs):
                fn()
        finally:
            tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        for path in glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True):
            space.ParseFromString(pathlib.Path(path).read_bytes())
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    totals: Counter = Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" in name and "::" not in name:  # "<node name>:<op type>" only
                    totals[name.rsplit(":", 1)[1]] += event.duration_ps / 1e12 / runs
    return dict(totals)


def profile_diff(a: dict[str, float], b: dict[str, float], top: int = 6) -> list:
    """The op types whose time differs most between two profiles: (op, a_s, b_s)."""
    keys = sorted(set(a) | set(b), key=lambda k: -abs(a.get(k, 0.0) - b.get(k, 0.0)))
    return [(k, a.get(k, 0.0), b.get(k, 0.0)) for k in keys[:top]]
