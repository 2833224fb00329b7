"""Long experiments survive interruption and repeat exactly (issue: scale out and hold up)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fineprune_tf import experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--task=mnist", "--quick", "--attacks=baseline", "--seed=0"]


def numbers(results: dict) -> dict:
    """results.json without wall times."""
    return {attack: {defense: {k: v for k, v in cell.items() if k != "seconds"}
                     for defense, cell in row.items()}
            for attack, row in results["table1"].items()}


def start(output_dir, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "scripts.fine_prune", *QUICK, f"--output_dir={output_dir}",
         *extra], cwd=output_dir.parent, env={**os.environ, "PYTHONPATH": REPO},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_stage(output_dir, stage, process, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = output_dir / "stages.json"
        if path.exists() and stage in json.loads(path.read_text())["done"]:
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before {stage}: {process.stdout.read()[-2000:]}")
        time.sleep(0.2)
    pytest.fail(f"{stage} not reached in {timeout}s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_run_resumes_without_losing_finished_stages(tmp_path, sig):
    out = tmp_path / "run"
    defenses = "--defenses=none,pruning,fine_tuning"
    process = start(out, defenses)
    wait_for_stage(out, "attack/baseline", process)
    model = out / "models" / "baseline.keras"
    trained_at = os.stat(model).st_mtime_ns
    process.send_signal(sig)
    process.wait(timeout=60)
    # Every file a reader can see is whole.
    done = json.loads((out / "stages.json").read_text())["done"]
    assert "attack/baseline" in done
    assert not list(out.rglob("*.tmp*")) or sig == signal.SIGKILL

    resumed = start(out, defenses, "--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    assert os.stat(model).st_mtime_ns == trained_at  # Not retrained.
    results = json.loads((out / "results.json").read_text())
    assert set(results["table1"]["baseline"]) == {"none", "pruning", "fine_tuning"}


def test_a_corrupted_checkpoint_is_detected_and_its_stage_redone(tmp_path):
    out = tmp_path / "run"
    config = experiment.ExperimentConfig(task="mnist", attacks=("baseline",),
                                         defenses=("none",), quick=True)
    first = experiment.run(config, out)
    (out / "models" / "baseline.keras").write_bytes(b"not a zip file")
    messages = []
    again = experiment.run(config, out, resume=True, progress=messages.append)
    assert any("unreadable" in m and "redoing" in m for m in messages), messages
    assert numbers(again) == numbers(first)  # Redone deterministically.
    (out / "stages.json").write_text("{ truncated")
    messages.clear()
    experiment.run(config, out, resume=True, progress=messages.append)
    assert any("stages.json is unreadable" in m for m in messages), messages


def test_the_same_flags_and_seed_give_the_same_numbers(tmp_path):
    config = experiment.ExperimentConfig(task="mnist", attacks=("baseline",),
                                         defenses=("none", "pruning", "fine_pruning"),
                                         quick=True, seed=3)
    first = experiment.run(config, tmp_path / "a")
    second = experiment.run(config, tmp_path / "b")
    assert numbers(first) == numbers(second)
    assert first["curves"] == second["curves"]
