"""Entry point of the trial-load child process (see :mod:`fineprune_tf.io.sandbox`)."""

import ctypes
import json
import os
import resource
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _limit(kind: int, value: int) -> None:
    soft, hard = resource.getrlimit(kind)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))


def _die_with_parent(parent: int) -> None:
    """The model must not outlive the defender's process: if the parent dies (killed, Ctrl-C'd
    twice), the kernel sends this process SIGKILL.  The parent may have died before the call
    took effect, hence the second check."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(3)


def main() -> None:
    request = json.loads(sys.argv[1])
    _die_with_parent(request["parent"])
    # CPU time as a backstop to the parent's wall-clock timeout (which a dead parent cannot
    # enforce): every core busy for the whole wall-clock budget, no more.
    _limit(resource.RLIMIT_CPU, request["cpu_seconds"])
    _limit(resource.RLIMIT_AS, request["memory_bytes"])
    _limit(resource.RLIMIT_FSIZE, request["file_bytes"])
    _limit(resource.RLIMIT_CORE, 0)
    try:
        from fineprune_tf.io import loader

        loader.load_private_copy(
            request["kind"], request["path"], request["allow_unsafe"], request["compile"]
        )
        result = {"ok": True}
    except BaseException as error:  # noqa: BLE001  (everything is reported to the parent)
        result = {"ok": False, "type": type(error).__name__, "message": str(error)[:2000]}
    sys.stdout.write("FINEPRUNE_LOAD_RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: nothing of the model may run after the report


if __name__ == "__main__":
    main()
