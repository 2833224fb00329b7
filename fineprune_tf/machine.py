"""The machine a run was measured on: cores, CPU model, thread settings, library versions,
load and date.  Every results file (benchmark, ``scripts.fine_prune``'s results.json, the
leaderboard, the evaluation scripts) records :func:`describe`, so a reader knows which
machine its numbers come from."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform

__all__ = ["cores", "cpu_model", "describe", "load", "summary_line"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores() -> int:
    """CPUs this process may run on (the affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load() -> str:
    """The 1, 5 and 15-minute load averages, space-separated ("n/a" where unknown)."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def describe() -> dict:
    """Cores, CPU, TensorFlow's thread settings (0 = TensorFlow's own choice), Python,
    TensorFlow, Keras and numpy versions, the op's backend, the platform and the UTC date."""
    import keras
    import numpy as np
    import tensorflow as tf

    from fineprune_tf import ops

    return {
        "cores": cores(),
        "cpu": cpu_model(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "op_backend": ops.backend(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def summary_line(record: dict | None) -> str:
    """One line for a results report from a stored :func:`describe` record: CPU, cores,
    TensorFlow's intra-op threads, platform, TensorFlow and Keras.  Tolerates records written
    before this module (``cpu_count`` instead of ``cores``, no CPU model) and none at all."""
    if not record:
        return "machine not recorded in the run's file"
    cores_text = (
        f"{record['cores']} cores" if "cores" in record else f"{record.get('cpu_count', '?')} CPUs"
    )
    threads = record.get("intra_op_threads")
    cpu = record.get("cpu") or record.get("cpu_model")  # cpu_model: this branch's first runs
    return (
        (f"{cpu}, " if cpu else "")
        + cores_text
        + ("" if threads is None else f", TF threads {threads or 'default'}")
        + f", {record.get('platform', '?')}, TensorFlow {record.get('tensorflow', '?')}"
        + (f", Keras {record['keras']}" if record.get("keras") else "")
    )
