"""Quiet TensorFlow start-up for the scripts: import this before anything imports TensorFlow.

TensorFlow reads ``TF_CPP_MIN_LOG_LEVEL`` once, when it is imported, so the level is chosen
from the command line before absl parses it: by default only fatal C++ messages are shown
(the CUDA probing, CPU-feature and oneDNN lines of a CPU-only machine are noise; real errors
reach Python as exceptions). ``--verbosity=1`` (absl's flag, also ``-v 1``) or more shows
everything. A value the user exported is never overridden.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

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


def quiet_tensorflow(argv: Sequence[str] | None = None) -> int:
    """Sets TensorFlow's C++ log level from ``argv``; returns the requested verbosity."""
    verbosity = requested_verbosity(sys.argv if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbosity >= 1 else "3")
    return verbosity
