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
