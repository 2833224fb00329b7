"""fineprune_tf.machine: what a run records about its machine, and the line reports print."""

from __future__ import annotations

import json
import os

from fineprune_tf import machine


def test_describe_records_cpu_cores_threads_and_versions(monkeypatch):
    import keras
    import tensorflow as tf

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    described = machine.describe()
    assert json.loads(json.dumps(described)) == described  # JSON-ready
    assert described["cpu_model"] and described["cpu_model"] != "unknown"
    assert described["cpu_count"] == os.cpu_count()
    assert 1 <= described["usable_cores"] <= os.cpu_count()
    assert described["tensorflow"] == tf.__version__ and described["keras"] == keras.__version__
    assert described["intra_op_threads"] == tf.config.threading.get_intra_op_parallelism_threads()
    assert described["thread_env"]["OMP_NUM_THREADS"] == "2"


def test_summary_line_reads_new_and_old_records():
    line = machine.summary_line(
        {
            "cpu_model": "Test CPU @ 2GHz",
            "cpu_count": 2,
            "intra_op_threads": 0,
            "thread_env": {"OMP_NUM_THREADS": "1"},
            "platform": "Linux-x",
            "tensorflow": "2.21.0",
            "keras": "3.15.1",
        }
    )
    assert line == (
        "Test CPU @ 2GHz, 2 CPUs, TF threads default, OMP_NUM_THREADS=1, Linux-x, "
        "TensorFlow 2.21.0, Keras 3.15.1"
    )
    # Files written before the CPU model was recorded still render.
    old = {"platform": "Linux-x", "cpu_count": 2, "tensorflow": "2.21.0", "keras": "3.15.1"}
    assert machine.summary_line(old) == "2 CPUs, Linux-x, TensorFlow 2.21.0, Keras 3.15.1"
    assert machine.summary_line(None) == "machine not recorded in the run's file"
