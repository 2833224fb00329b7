"""``tf.distribute`` strategies for attacks, fine-tuning, statistics and curves.

The library's code is strategy-agnostic: build and train under ``strategy.scope()`` and Keras
distributes ``fit``; :func:`fineprune_tf.stats.collect` sums its statistics over every replica.
This module only makes the strategy the scripts' ``--strategy`` flag names, with clear errors
for a malformed ``TF_CONFIG`` and a bounded wait for the other workers.
"""

from __future__ import annotations

import json
import os
import socket
import time

import tensorflow as tf

__all__ = ["STRATEGIES", "make_strategy", "parse_tf_config", "split_cpu", "wait_for_workers"]

STRATEGIES = ("default", "mirrored", "multi_worker")


def split_cpu(replicas: int) -> list[str]:
    """Splits the CPU into ``replicas`` logical devices (before TensorFlow initialises).

    Returns their names, e.g. ``["/cpu:0", "/cpu:1"]``, for a MirroredStrategy on one machine.
    """
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas
        )
    except RuntimeError as error:
        current = len(tf.config.list_logical_devices("CPU"))
        if current != replicas:
            raise RuntimeError(
                f"TensorFlow is already initialised with {current} CPU device(s); "
                f"split the CPU before using TensorFlow"
            ) from error
    return [f"/cpu:{index}" for index in range(replicas)]


def parse_tf_config(text: str | None = None) -> dict:
    """Validates ``TF_CONFIG`` for a multi-worker run and returns it as a dict.

    Raises ValueError naming the problem: missing, not JSON, no ``cluster.worker`` list, bad
    ``host:port`` entries, or a ``task`` whose type/index is not in the cluster.
    """
    text = os.environ.get("TF_CONFIG") if text is None else text
    if not text:
        raise ValueError(
            "--strategy=multi_worker needs the TF_CONFIG environment variable "
            '(e.g. {"cluster": {"worker": ["host:port", ...]}, "task": {"type": '
            '"worker", "index": 0}})'
        )
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON: {error}") from error
    cluster = config.get("cluster") if isinstance(config, dict) else None
    workers = cluster.get("worker") if isinstance(cluster, dict) else None
    if not isinstance(workers, list) or not workers:
        raise ValueError("TF_CONFIG has no cluster.worker list of 'host:port' addresses")
    for address in workers:
        host, _, port = str(address).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"TF_CONFIG worker address {address!r} is not 'host:port'")
    task = config.get("task")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise ValueError(
            f"TF_CONFIG task {task!r} does not name a job of the cluster ({sorted(cluster)})"
        )
    index = task.get("index")
    if not isinstance(index, int) or not 0 <= index < len(cluster[task["type"]]):
        raise ValueError(
            f"TF_CONFIG task index {index!r} is outside the "
            f"{len(cluster[task['type']])} {task['type']} address(es)"
        )
    return config


def _address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def wait_for_workers(config: dict, timeout: float = 60.0, hold_own_port: bool = False) -> None:
    """Waits until every other worker's port accepts connections, or raises TimeoutError.

    TensorFlow itself would wait for a missing worker without a bound (and ignore SIGTERM
    while doing so).  With ``hold_own_port`` this worker listens on its own address while it
    waits, so workers that all wait *before* starting TensorFlow's server still see each
    other; the port is released on return for the server to take.
    """
    me = config["cluster"][config["task"]["type"]][config["task"]["index"]]
    pending = [a for a in config["cluster"]["worker"] if a != me]
    holder = None
    if hold_own_port:
        holder = socket.socket()
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind(_address(me))
            holder.listen(16)
        except OSError as error:
            holder.close()
            raise ValueError(
                f"this worker cannot listen on its TF_CONFIG address {me}: {error}"
            ) from error
    deadline = time.monotonic() + timeout
    try:
        while pending:
            address = pending[0]
            try:
                with socket.create_connection(_address(address), timeout=1.0):
                    pending.pop(0)
                    continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"worker {address} did not come up within {timeout:.0f}s "
                    f"(still waiting for {pending}); is it running with the "
                    "same TF_CONFIG cluster?"
                )
            time.sleep(0.2)
    finally:
        if holder is not None:
            holder.close()


def make_strategy(
    name: str = "default", cpu_replicas: int = 0, worker_timeout: float = 60.0
) -> tf.distribute.Strategy:
    """The strategy for ``--strategy``.

    Args:
      name: ``"default"`` (no distribution), ``"mirrored"`` (every local GPU, or
        ``cpu_replicas`` logical CPUs when > 1) or ``"multi_worker"`` (from ``TF_CONFIG``).
      cpu_replicas: split the CPU into this many replicas (for tests and CPU-only machines).
      worker_timeout: seconds to wait for the other workers of a multi-worker run.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGIES}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = split_cpu(cpu_replicas) if cpu_replicas > 1 else None
        return tf.distribute.MirroredStrategy(devices)
    config = parse_tf_config()
    if cpu_replicas > 1:
        split_cpu(cpu_replicas)
    # The strategy's constructor blocks, without a bound and deaf to SIGTERM, until every
    # worker has joined, so wait for them first.  Each worker holds its own port meanwhile
    # (the others' probes see it); one that has already moved on is then probed again until
    # its TensorFlow server listens on the same port.
    wait_for_workers(config, worker_timeout, hold_own_port=True)
    return tf.distribute.MultiWorkerMirroredStrategy()
