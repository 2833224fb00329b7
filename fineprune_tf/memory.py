"""Peak resident memory of this process, resettable so each stage of a run gets its own peak.

Linux keeps the peak resident set size (``VmHWM`` in ``/proc/self/status``) and resets it when
``5`` is written to ``/proc/self/clear_refs`` (Linux >= 4.0).  Elsewhere the peak comes from
``resource.getrusage`` and cannot be reset: it is then the peak since the process started.
"""

from __future__ import annotations

import re
import resource
import sys

__all__ = ["peak_rss_mb", "reset_peak_rss"]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def peak_rss_mb() -> float:
    """Peak resident set size in MiB since the last :func:`reset_peak_rss` (or the start)."""
    try:
        with open(_STATUS) as status:
            match = re.search(r"^VmHWM:\s+(\d+)\s+kB", status.read(), re.MULTILINE)
        if match:
            return int(match.group(1)) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024.0


def reset_peak_rss() -> bool:
    """Starts a new peak; False when the platform cannot reset it."""
    try:
        with open(_CLEAR_REFS, "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False
