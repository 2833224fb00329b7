"""scripts.attack (--poison_rate, the field's attacks), scripts.attack_suite and the quiet
TensorFlow start-up shared by the scripts."""

from __future__ import annotations

import json

import pytest
from script_runs import run_script_several_times

from scripts import _quiet


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], 0),
        (["--verbosity=1"], 1),
        (["--verbosity", "2"], 2),
        (["-v", "1"], 1),
        (["-v=-1"], -1),
        (["--verbosity=loud"], 0),
        (["--task=mnist", "--verbosity"], 0),
    ],
)
def test_requested_verbosity_reads_absl_flag_before_absl_parses(argv, expected):
    assert _quiet.requested_verbosity(argv) == expected


@pytest.mark.subprocess
@pytest.mark.slow
def test_attack_script_trains_a_field_attack_at_a_poison_rate(tmp_path):
    out = tmp_path / "wanet"
    (status, _, stderr), (bad_status, _, bad_stderr) = runs = run_script_several_times(
        "scripts.attack",
        [
            "--task=mnist",
            "--attack=wanet",
            "--poison_rate=0.05",
            "--epochs=1",
            f"--output_dir={out}",
        ],
        ["--task=mnist", "--attack=sig", "--poison_rate=1.5", f"--output_dir={tmp_path / 'bad'}"],
        cwd=tmp_path,
    )
    assert status == 0, stderr[-2000:]
    report = json.loads((out / "attack.json").read_text())
    assert report["poisoning"]["name"] == "wanet" and report["poison_rate"] == 0.05
    assert report["poisoning"]["count"] == round(0.05 * 3500)
    assert json.loads((out / "trigger.json").read_text())["class"] == "WaNet"
    # Quiet start-up: none of TensorFlow's C++ banner lines (CPU features, cuInit).
    assert "cpu_feature_guard" not in runs.process_stderr
    assert "cuInit" not in runs.process_stderr
    assert bad_status == 2 and "poison_rate" in bad_stderr
    assert "Traceback" not in bad_stderr


@pytest.mark.subprocess
@pytest.mark.slow
def test_attack_suite_writes_mean_sd_cost_and_target(tmp_path):
    out = tmp_path / "suite"
    suite = [
        "--tasks=mnist",
        "--attacks=blended,sig",
        "--seeds=0",
        "--low_rates=",
        "--epochs=1",
        f"--output_dir={out}",
    ]
    # The second run resumes the first (its files are read after both; see below).
    (status, _, stderr), (again_status, _, again_stderr) = run_script_several_times(
        "scripts.attack_suite", suite, [*suite, "--resume"], cwd=tmp_path
    )
    assert status == 0, stderr[-2000:]
    report = json.loads((out / "attacks.json").read_text())
    assert [r["attack"] for r in report["rows"]] == ["clean", "blended", "sig"]
    summary = {s["attack"]: s for s in report["summary"]}
    clean = report["rows"][0]["clean_acc"]
    for name in ("blended", "sig"):
        row = summary[name]
        assert row["seeds"] == [0] and row["rate"] == 0.1
        assert abs(row["cost_points"] - 100 * (clean - row["clean_acc"])) < 1e-9
        assert row["target_met"] == (row["asr"] >= 0.9 and row["cost_points"] <= 2.0)
    assert report["meta"]["seeds_run"] == [0] and report["meta"]["machine"]["cores"] > 0
    markdown = (out / "attacks.md").read_text()
    assert "| mnist | blended | 0.1 (0.100) |" in markdown and "±" in markdown
    # What is on disk is the --resume run's: it kept the three finished cells (not appended
    # again) and trained nothing, its own wall time a sliver of the cells' training time.
    assert again_status == 0, again_stderr[-2000:]
    assert report["meta"]["seconds"] < 0.1 * report["meta"]["cell_seconds_total"], report["meta"]
