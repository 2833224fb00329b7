"""The README's results tables are scripts.report's rendering of results/readme_summary.json."""

from __future__ import annotations

import json
import pathlib

import pytest

from fineprune_tf import leaderboard_readme

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_readme_tables_equal_the_report_of_the_checked_in_summary():
    summary = json.loads((REPO / "results" / "readme_summary.json").read_text())
    readme = (REPO / "README.md").read_text()
    assert leaderboard_readme.readme_section(readme) == leaderboard_readme.render(summary)
    # Not an empty rendering: at least one fine-pruning table and the leaderboard.
    assert summary["fine_prune"] and summary["leaderboards"]
    assert "| attack | defense |" in readme and "retuned ASR" in readme


def _results(tmp_path, name, seed, asr, seconds):
    directory = tmp_path / name
    directory.mkdir()
    table1 = {
        "baseline": {
            "none": {"clean_acc": 0.9, "asr": 1.0, "der": 0.5, "seconds": 1.0},
            "fine_pruning": {"clean_acc": 0.88, "asr": asr, "der": 0.7, "seconds": seconds},
        }
    }
    (directory / "results.json").write_text(
        json.dumps(
            {
                "task": "speech",
                "config": {"seed": seed, "quick": False},
                "table1": table1,
                "total_seconds": 100.0 + seed,
            }
        )
    )
    return directory


def test_report_gives_mean_sd_over_seeds_and_the_wall_time(tmp_path):
    dirs = [_results(tmp_path, "a", 0, 0.1, 10.0), _results(tmp_path, "b", 1, 0.3, 20.0)]
    summary = leaderboard_readme.collect(dirs)
    (task,) = summary["fine_prune"]
    assert task["seeds"] == [0, 1] and task["wall_seconds"] == [100.0, 101.0]
    row = next(r for r in task["rows"] if r["defense"] == "fine_pruning")
    assert row["asr"][0] == pytest.approx(0.2) and row["asr"][1] == pytest.approx(0.1414, 1e-3)
    text = leaderboard_readme.render(summary)
    assert "| baseline | fine_pruning | 0.880 ± 0.000 | 0.200 ± 0.141 |" in text
    assert "seeds [0, 1], wall time 100 s, 101 s" in text
    assert json.loads(json.dumps(summary)) == summary  # the summary file round-trips


def test_report_names_the_machine_and_merges_new_runs_into_a_summary(tmp_path):
    directory = _results(tmp_path, "a", 0, 0.1, 10.0)
    stored = json.loads((directory / "results.json").read_text())
    stored["machine"] = {
        "cpu": "Test CPU",
        "cores": 2,
        "intra_op_threads": 0,
        "platform": "Linux-x",
        "tensorflow": "2.21.0",
        "keras": "3.15.1",
    }
    (directory / "results.json").write_text(json.dumps(stored))
    added = leaderboard_readme.collect([directory])
    assert "(Test CPU, 2 cores, TF threads default, Linux-x, TensorFlow 2.21.0, Keras 3.15.1)" in (
        leaderboard_readme.render(added)
    )
    old = json.loads((REPO / "results" / "readme_summary.json").read_text())
    merged = leaderboard_readme.merge(old, added)
    # speech is in the checked-in summary: the new run replaces it; the leaderboards stay.
    assert [t["task"] for t in merged["fine_prune"]] == [t["task"] for t in old["fine_prune"]]
    assert merged["fine_prune"][0]["machine"]["cpu"] == "Test CPU"
    assert merged["leaderboards"] == old["leaderboards"]


def test_report_refuses_a_directory_without_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        leaderboard_readme.collect([tmp_path])
    with pytest.raises(ValueError, match="markers"):
        leaderboard_readme.readme_section("# no markers")


@pytest.mark.subprocess
def test_report_script_prints_the_rendering_and_refuses_bad_input(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    summary_path = REPO / "results" / "readme_summary.json"
    good = subprocess.run(
        [sys.executable, "-m", "scripts.report", f"--from_summary={summary_path}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert good.returncode == 0, good.stderr[-2000:]
    assert good.stdout == leaderboard_readme.render(json.loads(summary_path.read_text()))
    bad = subprocess.run(
        [sys.executable, "-m", "scripts.report", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "neither results.json nor leaderboard.json" in bad.stderr
    assert "Traceback" not in bad.stderr and "InitializeLog" not in bad.stderr
