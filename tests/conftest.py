"""Shared test set-up: quiet TensorFlow logs, deterministic seeds, 2-core friendly threading,
and a fixture that forbids network access."""

import os
import socket

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


class NetworkAccessError(RuntimeError):
    """Raised by :func:`no_network` on any attempt to reach a socket address."""


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connect (TCP, UDP, Unix, any family) and every name lookup raises
    :class:`NetworkAccessError` while the test runs."""

    def refuse(*args, **kwargs):
        raise NetworkAccessError(f"network access attempted: {args[1:] or args}")

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse)
    for name in ("create_connection", "getaddrinfo", "gethostbyname", "gethostbyname_ex"):
        monkeypatch.setattr(socket, name, refuse)
    return NetworkAccessError


@pytest.fixture
def trusted_loads(monkeypatch):
    """``fineprune_tf.io.load_model`` without its trial load in a bounded child process
    (``isolate=False``), for tests of what comes *after* loading that load a stock-layer file
    the test wrote itself: each trial load starts a TensorFlow process (seconds per call).
    Every check of the file still runs in-process; the child and its limits are tested in
    tests/security and by the end-to-end cleaning tests, which keep it."""
    from fineprune_tf import io

    original = io.load_model

    def load_in_process(path, *args, **kwargs):
        return original(path, *args, **{**kwargs, "isolate": False})

    monkeypatch.setattr(io, "load_model", load_in_process)
