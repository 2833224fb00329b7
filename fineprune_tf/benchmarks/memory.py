"""(f) Peak resident memory of one experiment, per stage.

Runs ``fineprune fine-prune --task=face --quick --epochs=25`` in a child process (so
the other sections' allocations do not count) and reads the per-stage peaks the experiment
records in ``results.json`` (``peak_rss_mb``: the peak since the previous stage ended, reset between
stages through ``/proc/self/clear_refs``; see ``fineprune_tf.memory``).  The process's peak
is the largest stage's: the reset also resets what ``/usr/bin/time -v`` would report.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

TITLE = "(f) Peak resident memory per experiment stage"
TASK = "face"
#: The attack at the task's default length (--quick alone trains 2 epochs, which leaves the
#: face model at chance, and the pruning defense then refuses it); the defenses' fine-tuning
#: stays --quick.
ATTACK_EPOCHS = 25
TARGETS: dict = {}
#: The folder holding the ``fineprune_tf`` package (a checkout, or site-packages).
REPO = pathlib.Path(__file__).resolve().parents[2]


def _child(output_dir: pathlib.Path, quick: bool) -> subprocess.CompletedProcess:
    # --quick (CI): a smoke run of the same code on mnist's baseline attack, with one defense
    # of each kind (a pruning and a fine-tuning stage).
    task_flags = (
        ["--task=mnist", "--attacks=baseline", "--defenses=none,pruning,fine_pruning"]
        if quick
        else [f"--task={TASK}", f"--epochs={ATTACK_EPOCHS}"]
    )
    command = [
        sys.executable,
        "-m",
        "fineprune_tf.cli",
        "fine-prune",
        *task_flags,
        "--quick",
        f"--output_dir={output_dir}",
    ]
    return subprocess.run(
        command,
        cwd=output_dir.parent,  # a temporary folder: nothing is written next to the package
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def measure(quick: bool, repeats: int) -> dict:
    del repeats  # One run: the experiment's --quick (a full face run takes an hour on 2 cores).
    with tempfile.TemporaryDirectory() as folder:
        done = _child(pathlib.Path(folder) / "run", quick)
        if done.returncode != 0:
            raise RuntimeError(f"fine_prune failed: {done.stderr[-2000:]}")
        results = json.loads((pathlib.Path(folder) / "run" / "results.json").read_text())
    peaks, seconds = results["peak_rss_mb"], results["timings"]
    stages = [
        {"stage": name, "peak_rss_mb": peak, "seconds": seconds.get(name)}
        for name, peak in peaks.items()
    ]
    for row in stages:
        print(f"(f) {row['stage']}: peak RSS {row['peak_rss_mb']:.0f} MiB", flush=True)
    top = max(stages, key=lambda row: row["peak_rss_mb"])
    task = "mnist" if quick else TASK
    summary = {f"peak_rss_mb_{task}": top["peak_rss_mb"]}
    return {
        "task": task,
        "stages": stages,
        "data": results["data"],
        "summary": summary,
        "notes": [f"largest stage: {top['stage']} ({top['peak_rss_mb']:.0f} MiB)"],
    }


def markdown(result: dict) -> str:
    data = result["data"]
    lines = [
        f"`fineprune fine-prune --task={result['task']} --quick "
        + (f"--epochs={ATTACK_EPOCHS}" if result["task"] == TASK else "--attacks=baseline")
        + "` in a child process "
        f"({data['train']} train / {data['validation']} validation / {data['test']} test "
        f"examples of {data['input_shape']}); each stage's peak resident memory since the "
        "previous stage ended (the peak is reset between stages on Linux).",
        "",
        "| stage | peak RSS (MiB) | seconds |",
        "|---|---|---|",
    ]
    for row in result["stages"]:
        secs = "" if row["seconds"] is None else f"{row['seconds']:.1f}"
        lines.append(f"| {row['stage']} | {row['peak_rss_mb']:.0f} | {secs} |")
    if result.get("notes"):
        lines += ["", *result["notes"]]
    return "\n".join(lines) + "\n"
