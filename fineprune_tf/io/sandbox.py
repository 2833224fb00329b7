"""Trial-loading in a child process with a wall-clock and a memory limit.

Whatever runs while a model is loaded (a SavedModel's initializers, Keras building layers of
the declared sizes) runs first in a child Python process with ``RLIMIT_AS`` (memory),
``RLIMIT_FSIZE`` (largest file it may write), ``RLIMIT_CPU`` (every core for the whole
wall-clock budget), no core dumps, its working and temporary directory inside the loader's
private directory, a wall-clock timeout, and a parent-death signal (it is killed with the
process that started it).  The child reports
one JSON line; a hang, a crash, an abort, a memory bomb or a silent exit becomes a
:class:`LoadLimitError` with one line saying what happened.  Only when the child succeeded is
the same private copy loaded in the calling process.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

from .errors import Finding, LoadLimitError, ModelFormatError, UnsafeModelError
from .limits import LoadLimits, MiB

__all__ = ["trial_load"]

_PACKAGE_ROOT = str(pathlib.Path(__file__).resolve().parents[2])
_RESULT_PREFIX = "FINEPRUNE_LOAD_RESULT "


def _describe_signal(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def trial_load(
    kind: str,
    path: pathlib.Path,
    workdir: pathlib.Path,
    limits: LoadLimits,
    allow_unsafe: bool,
    compile: bool,
    shown: str,
) -> None:
    """Loads the private copy ``path`` (``kind`` "keras", "h5" or "saved_model") in a child.

    Raises:
      LoadLimitError: time or memory limit, crash, abort or silent exit (one line).
      ModelFormatError / UnsafeModelError: the loader in the child refused the model.
    """
    request = json.dumps(
        {
            "kind": kind,
            "path": str(path),
            "allow_unsafe": allow_unsafe,
            "compile": compile,
            "memory_bytes": limits.memory_bytes,
            "file_bytes": limits.weights_bytes + limits.config_bytes,
            "parent": os.getpid(),
            "cpu_seconds": int(limits.seconds * (os.cpu_count() or 1)) + 1,
        }
    )
    env = {
        **os.environ,
        "TMPDIR": str(workdir),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": os.pathsep.join(
            [_PACKAGE_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        ),
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fineprune_tf.io._child", request],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=limits.seconds,
        )
    except subprocess.TimeoutExpired:
        raise LoadLimitError(
            f"{shown}: loading did not finish within {limits.seconds:g} s (a hang or an "
            "endless loop in the model's graph); the loader process was stopped"
        ) from None
    result = None
    for line in done.stdout.splitlines():
        if line.startswith(_RESULT_PREFIX):
            result = json.loads(line[len(_RESULT_PREFIX) :])
    if result is None:
        _raise_for_dead_child(done, limits, shown)
    if result["ok"]:
        return
    error_type, message = result["type"], " ".join(str(result["message"]).split())[:400]
    if error_type in ("MemoryError", "ResourceExhaustedError"):
        raise LoadLimitError(
            f"{shown}: loading needs more than the memory limit of "
            f"{limits.memory_bytes // MiB:,} MiB ({error_type})"
        )
    if "safe_mode" in message or "unsafe" in message.lower():
        raise UnsafeModelError(
            shown, [Finding("config", "?", "keras", message)], "Keras safe mode refused the file."
        )
    raise ModelFormatError(f"{shown}: could not be loaded ({error_type}: {message})")


def _raise_for_dead_child(
    done: subprocess.CompletedProcess, limits: LoadLimits, shown: str
) -> None:
    last = next((line.strip() for line in reversed(done.stderr.splitlines()) if line.strip()), "")
    if done.returncode == 0:
        raise LoadLimitError(
            f"{shown}: loading ended the loader process without finishing (exit status 0): "
            "the model stops the process it is loaded in"
        )
    if done.returncode < 0:
        name = _describe_signal(done.returncode)
        why = {
            "SIGXFSZ": "it tried to write a file larger than allowed",
            "SIGKILL": "it was killed (out of memory?)",
            "SIGXCPU": "it used more CPU time than the time limit allows",
            "SIGABRT": "it aborted (an abort op, or out of the "
            f"{limits.memory_bytes // MiB:,} MiB memory limit)",
            "SIGSEGV": "it crashed (out of memory or a malformed graph)",
        }.get(name, "")
        raise LoadLimitError(
            f"{shown}: the loader process died with {name}" + (f": {why}" if why else "")
        )
    raise LoadLimitError(
        f"{shown}: the loader process exited with status {done.returncode}"
        + (f" ({last[:200]})" if last else "")
    )
