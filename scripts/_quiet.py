"""Quiet TensorFlow start-up for the scripts: import this before anything imports TensorFlow.

TensorFlow reads ``TF_CPP_MIN_LOG_LEVEL`` once, when it is imported, so the level is chosen
from the command line before absl parses it: by default only fatal C++ messages are shown
(the CUDA probing, CPU-feature and oneDNN lines of a CPU-only machine are noise; real errors
reach Python as exceptions). ``--verbosity=1`` (absl's flag, also ``-v 1``) or more shows
everything. A value the user exported is never overridden.

The level alone is not enough on TensorFlow 2.21: its C++ start-up logs through Abseil before
``absl::InitializeLog()`` runs, and Abseil writes those lines ("All log messages before
absl::InitializeLog() ...", cudart_stub's "Could not find cuda drivers") whatever the level
(abseil/abseil-cpp#1957, open).  So, unless ``--verbosity`` asks for detail, TensorFlow is
imported here with the process's stderr (file descriptor 2) pointed at a temporary file; if
the import fails, what it wrote is printed before the error propagates, so nothing is lost.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence

__all__ = ["requested_verbosity", "quiet_tensorflow"]


def requested_verbosity(argv: Sequence[str]) -> int:
    """The ``--verbosity`` / ``-v`` value in ``argv`` (0 when absent or not an integer)."""
    value = None
    for i, arg in enumerate(argv):
        for name in ("--verbosity", "-v"):
            if arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


@contextlib.contextmanager
def _stderr_to_file() -> Iterator[None]:
    """Points file descriptor 2 at a temporary file; replays it if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            capture.seek(0)
            sys.stderr.write(capture.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def quiet_tensorflow(argv: Sequence[str] | None = None, *, preload: bool = True) -> int:
    """Sets TensorFlow's C++ log level from ``argv`` and (``preload``, verbosity < 1) imports
    TensorFlow and probes its devices with stderr captured; returns the requested verbosity."""
    verbosity = requested_verbosity(sys.argv if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbosity >= 1 else "3")
    if preload and verbosity < 1 and "tensorflow" not in sys.modules:
        with _stderr_to_file():
            import tensorflow as tf

            tf.config.list_physical_devices()  # the device probe logs its own start-up lines
    return verbosity
