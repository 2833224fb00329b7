"""fineprune_tf.machine: what a run records about its machine, and the line reports print."""

from __future__ import annotations

import json
import os

from fineprune_tf import machine


def test_describe_records_cpu_cores_threads_and_versions():
    import keras
    import tensorflow as tf

    described = machine.describe()
    assert json.loads(json.dumps(described)) == described  # JSON-ready
    assert described["cpu"] and described["cpu"] != "unknown"
    assert 1 <= described["cores"] <= os.cpu_count()
    assert described["tensorflow"] == tf.__version__ and described["keras"] == keras.__version__
    assert described["intra_op_threads"] == tf.config.threading.get_intra_op_parallelism_threads()


def test_summary_line_reads_new_and_old_records():
    record = {
        "cpu": "Test CPU @ 2GHz",
        "cores": 2,
        "intra_op_threads": 0,
        "platform": "Linux-x",
        "tensorflow": "2.21.0",
        "keras": "3.15.1",
    }
    assert machine.summary_line(record) == (
        "Test CPU @ 2GHz, 2 cores, TF threads default, Linux-x, TensorFlow 2.21.0, Keras 3.15.1"
    )
    # Files written before the module (leaderboard.json of earlier runs) still render.
    old = {"platform": "Linux-x", "cpu_count": 2, "tensorflow": "2.21.0", "keras": "3.15.1"}
    assert machine.summary_line(old) == "2 CPUs, Linux-x, TensorFlow 2.21.0, Keras 3.15.1"
    assert machine.summary_line(None) == "machine not recorded in the run's file"
