"""Several command lines of one script in one child process (one TensorFlow import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Runs module ``sys.argv[1]`` as ``__main__`` (as ``python -m`` does) once per argument list
#: in ``sys.argv[2]`` (JSON), one after the other, each with its own freshly parsed flags, and
#: prints [exit status, stdout, stderr] per run as JSON on its last line.
_DRIVER = """
import contextlib, io, json, runpy, sys
from absl import flags
module, runs = sys.argv[1], json.loads(sys.argv[2])
outcomes = []
for args in runs:
    flags.FLAGS.unparse_flags()
    # A script that defines its flags itself defines them again when run again: drop its own
    # (absl files them under the program name, sys.argv[0]); library modules' flags stay.
    for owner in (module, "__main__"):
        for flag in list(flags.FLAGS.flags_by_module_dict().get(owner, [])):
            if flag.name in flags.FLAGS:
                delattr(flags.FLAGS, flag.name)
    sys.argv = [module, *args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__")
            status = 0
        except SystemExit as exit:
            status = exit.code
    outcomes.append([status, out.getvalue(), err.getvalue()])
print(json.dumps(outcomes))
"""


class Runs(list):
    """[(exit status, stdout, stderr)] per run; ``process_stderr``: everything the child wrote
    to its file descriptor 2 (TensorFlow's C++ start-up lines land there, not in a run's
    stderr)."""

    process_stderr: str = ""


def run_script_several_times(module: str, *runs, cwd, timeout: float = 600.0) -> Runs:
    """[(exit status, stdout, stderr)] of ``python -m module *args`` per ``args`` in ``runs``,
    run one after the other in one child process (the scripts choose TensorFlow's log level
    themselves, as from a shell)."""
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    result = subprocess.run(
        [sys.executable, "-c", _DRIVER, module, json.dumps([list(r) for r in runs])],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = Runs(tuple(o) for o in json.loads(result.stdout.strip().splitlines()[-1]))
    outcomes.process_stderr = result.stderr
    return outcomes
