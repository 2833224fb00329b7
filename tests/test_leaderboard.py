"""fineprune_tf.leaderboard: resume, the guard in force during every defense, file formats."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from fineprune_tf import leaderboard, leaderboard_profiles, leaderboard_report, step_cache
from fineprune_tf.defenses import REGISTRY, DefenseResult, ReportOnly, SelectionLeakError
from fineprune_tf.defenses import registry as registry_module
from fineprune_tf.defenses.guard import is_selecting
from fineprune_tf.defenses.result import holdout_accuracy

TINY = leaderboard.Settings(
    epochs={"mnist": 1},
    train_limit=300,
    test_limit=100,
    retune_steps=2,
    retune_samples=32,
    retune_poisoned=4,
)


def _spy_defense(calls: list, leak: ReportOnly | None = None):
    """A registry defense that records what it saw, and tries to read ``leak``."""

    def run(model, defender, context, evaluation):  # The registry's calling convention.
        seen = {
            "selecting": is_selecting(),
            "evaluation": evaluation,
            "defender_x": defender.x,
            "seed": context.seed,
            "leak_error": None,
            "step_cache": step_cache.active(),
        }
        if leak is not None:
            try:
                leak.open()
            except SelectionLeakError as error:
                seen["leak_error"] = error
        calls.append(seen)
        return DefenseResult(
            "spy", model, 0.01, holdout_acc=holdout_accuracy(model, defender.holdout)
        )

    return registry_module.DefenseSpec("spy", run, "test spy")


@pytest.fixture
def spy(monkeypatch):
    calls: list = []
    leak = ReportOnly((np.zeros((2, 28, 28, 1), np.float32), np.zeros(2, np.int64)))
    monkeypatch.setitem(REGISTRY, "spy", _spy_defense(calls, leak))
    return calls


def test_guard_is_in_force_during_every_defense_and_only_validation_is_given(tmp_path, spy):
    grid = leaderboard.Grid(("mnist",), ("badnets",), ("spy",), (0,))
    rows = leaderboard.run(grid, TINY, tmp_path)
    assert len(spy) == 1
    seen = spy[0]
    assert seen["selecting"] is True
    assert seen["evaluation"] is None  # report-only data is never handed to a defense
    assert isinstance(seen["leak_error"], SelectionLeakError)
    context = leaderboard.TaskContext.load("mnist", 0, TINY)
    np.testing.assert_array_equal(seen["defender_x"], context.validation[0])
    # The report is filled after the defense, from the test split.
    assert rows[0]["clean_acc"] is not None and 0.0 <= rows[0]["asr"] <= 1.0
    assert rows[0]["retuned_asr"] is not None
    # Every fit of the run goes through one cache of compiled steps.
    assert isinstance(seen["step_cache"], step_cache.StepCache)


_NUMBERS = ("clean_acc", "asr", "robust_acc", "holdout_acc", "retuned_asr", "undefended")


@pytest.mark.slow
def test_reused_training_steps_leave_every_number_of_the_leaderboard_unchanged(
    tmp_path, monkeypatch
):
    # Fine-pruning's fine-tuning capped at 2 epochs (the budget profile's is 10): every fit still
    # goes through the one reused step (both candidate rates, the retuning attack), and its
    # state is still reset between fits.
    monkeypatch.setitem(
        leaderboard_profiles.PROFILES,
        "short",
        leaderboard_profiles.DefenseProfile("short", fine_tune_max_epochs=2),
    )
    settings = dataclasses.replace(TINY, profile="short")
    grid = leaderboard.Grid(("mnist",), ("badnets",), ("none", "fine_pruning"), (0,))
    cache = tmp_path / "models"
    fresh = leaderboard.run(grid, settings, tmp_path / "fresh", cache_dir=cache, reuse_steps=False)
    reused = leaderboard.run(grid, settings, tmp_path / "reused", cache_dir=cache)
    assert [[r[k] for k in _NUMBERS] for r in fresh] == [[r[k] for k in _NUMBERS] for r in reused]
    assert fresh[1]["holdout_acc"] is not None and fresh[1]["backward_passes"] > 0


def test_resume_recomputes_nothing_finished_and_reuses_the_attacked_model(
    tmp_path, spy, monkeypatch
):
    grid = leaderboard.Grid(("mnist",), ("badnets",), ("none", "spy"), (0,))
    trained = []
    real_train = leaderboard.attack_zoo.train
    monkeypatch.setattr(
        leaderboard.attack_zoo, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k)
    )

    class Interrupted(Exception):
        pass

    def stop_after_first(index, total, cell, computed):
        if index == 0:
            raise Interrupted

    with pytest.raises(Interrupted):
        leaderboard.run(grid, TINY, tmp_path, on_cell=stop_after_first)
    first = json.loads((tmp_path / "leaderboard.json").read_text())["rows"]
    assert [r["defense"] for r in first] == ["none"] and trained == [1]
    assert not list(tmp_path.glob("**/.*tmp*"))  # atomic writes leave no temporary file

    computed_flags = []
    rows = leaderboard.run(
        grid, TINY, tmp_path, on_cell=lambda i, n, c, computed: computed_flags.append(computed)
    )
    assert computed_flags == [False, True]
    assert [r["defense"] for r in rows] == ["none", "spy"]
    assert rows[0] == first[0]  # the finished cell is kept as it was
    assert trained == [1]  # the cached attacked model was loaded, not retrained
    assert len(spy) == 1

    again = []
    leaderboard.run(grid, TINY, tmp_path, on_cell=lambda i, n, c, computed: again.append(computed))
    assert again == [False, False] and len(spy) == 1

    other = dataclasses.replace(TINY, retune_steps=3)
    with pytest.raises(leaderboard.SettingsMismatchError):
        leaderboard.run(grid, other, tmp_path)


def _row(task, attack, defense, seed, clean, asr, holdout, retuned=0.5):
    return {
        "task": task,
        "attack": attack,
        "defense": defense,
        "seed": seed,
        "clean_acc": clean,
        "asr": asr,
        "robust_acc": 1 - asr,
        "seconds": 1.0 + seed,
        "holdout_acc": holdout,
        "undefended": {"clean_acc": 0.9, "asr": 1.0},
        "undefended_holdout_acc": 0.9,
        "retuned_asr": retuned,
        "key": f"{task}/{attack}/{seed}/{defense}",
    }


def test_summary_gives_mean_sd_der_and_the_protocol_choice_from_holdout_only():
    rows = []
    for seed, (asr_a, asr_b) in enumerate([(0.2, 0.0), (0.4, 0.0)]):
        rows.append(_row("mnist", "sig", "none", seed, 0.9, 1.0, 0.9))
        # "fine_pruning" keeps the holdout within 2 points; "anp" removes more backdoor on
        # the test data but loses 10 holdout points: the protocol must not pick it.
        rows.append(_row("mnist", "sig", "fine_pruning", seed, 0.88, asr_a, 0.89))
        rows.append(_row("mnist", "sig", "anp", seed, 0.80, asr_b, 0.80))
    summary = {e["defense"]: e for e in leaderboard_report.summarize(rows)}
    fp = summary["fine_pruning"]
    assert fp["seeds"] == [0, 1]
    assert fp["asr"] == pytest.approx(0.3) and fp["asr_sd"] == pytest.approx(math.sqrt(0.02))
    # DER per seed = (dASR - dACC + 1) / 2 = (0.8 - 0.02 + 1)/2 and (0.6 - 0.02 + 1)/2.
    assert fp["der"] == pytest.approx((0.89 + 0.79) / 2)
    assert summary["none"]["der"] == pytest.approx(0.5)
    assert summary["protocol"]["chosen"] == {"fine_pruning": 2}
    assert summary["protocol"]["asr"] == pytest.approx(0.3)
    # Its cost is every candidate's: seconds 1 + seed for each of the two defenses.
    assert summary["protocol"]["seconds"] == pytest.approx(2 * 1.5)


def test_protocol_row_uses_auto_defends_rule_when_cells_record_weight_change():
    """Cells that record their weight change are chosen as `auto` chooses: the largest
    change among the defenses within the holdout tolerance, not the first in PRIORITY."""
    rows = [_row("mnist", "sig", "none", 0, 0.9, 1.0, 0.9)]
    for defense, holdout, change in [
        ("fine_pruning", 0.89, 0.10),  # first in PRIORITY, within tolerance
        ("fmp", 0.885, 0.30),  # within tolerance, moved furthest: chosen
        ("anp", 0.80, 0.90),  # moved most but lost 10 holdout points: excluded
    ]:
        rows.append(
            {**_row("mnist", "sig", defense, 0, 0.88, 0.1, holdout), "weight_change": change}
        )
    (chosen,) = leaderboard_report.protocol_rows(rows)
    assert chosen["chosen"] == "fmp"
    # An older leaderboard without weight changes keeps the priority order.
    legacy = [{k: v for k, v in r.items() if k != "weight_change"} for r in rows]
    assert leaderboard_report.protocol_rows(legacy)[0]["chosen"] == "fine_pruning"


def test_files_have_the_documented_format(tmp_path):
    rows = [
        _row("speech", a, d, s, 0.9, 0.1 * s, 0.9)
        for a in ("badnets", "wanet")
        for d in ("none", "clp")
        for s in (0, 1)
    ]
    meta = {
        "machine": {"platform": "test", "cpu_count": 2},
        "settings": TINY.to_dict(),
        "wall_seconds": 61.0,
    }
    leaderboard_report.write_all(tmp_path, rows, meta)
    stored = json.loads((tmp_path / "leaderboard.json").read_text())
    assert stored["rows"] == rows and stored["settings"] == TINY.to_dict()
    assert {e["defense"] for e in stored["summary"]} == {"none", "clp", "protocol"}
    for entry in stored["summary"]:
        for measure in leaderboard_report.MEASURES:
            assert measure in entry and measure + "_sd" in entry
    table = (tmp_path / "leaderboard.md").read_text()
    header = [line for line in table.splitlines() if line.startswith("| task")]
    assert header == [
        "| task | attack | defense | clean acc | ASR | robust acc | DER | retuned ASR | seconds |"
    ]
    body = [line for line in table.splitlines() if line.startswith("| speech")]
    assert len(body) == 6 and all(line.count(" ± ") == 6 for line in body)
    assert "seeds [0, 1]" in table and "wall time 1.0 min" in table
    # The profile is stated, with what it changed and the budget arithmetic.
    assert "Defense profile: **budget** (fine_tune_max_epochs 30 -> 10" in table
    assert "`--profile=full`" in table and "Budget, measured: the default grid" in table
    png = (tmp_path / "der_speech.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_validation_names_the_bad_axis():
    with pytest.raises(ValueError, match="Received: defenses="):
        leaderboard.Grid(("mnist",), ("badnets",), ("nope",), (0,)).validate()
    with pytest.raises(ValueError, match="Received: tasks="):
        leaderboard.Grid(("cifar",), ("badnets",), ("none",), (0,)).validate()
    default = leaderboard.Grid.default()
    assert "face" not in default.tasks and set(default.defenses) == set(REGISTRY)
    assert default.seeds == (0, 1, 2)


@pytest.mark.subprocess
def test_script_refuses_bad_input_in_one_line_with_tensorflow_quiet(tmp_path):
    import os
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the script chooses it itself
    result = subprocess.run(
        [sys.executable, "-m", "scripts.leaderboard", "--tasks=cifar", f"--output_dir={tmp_path}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: tasks must be a non-empty subset of ['face', 'speech', 'traffic', 'mnist']. "
        "Received: tasks=['cifar']"
    ]  # no TensorFlow/Abseil start-up lines, no traceback


def test_quiet_import_hides_start_up_lines_but_replays_them_when_the_import_fails(capfd):
    import os

    from scripts import _quiet

    with _quiet._stderr_to_file():
        os.write(2, b"abseil start-up line\n")
    assert "abseil start-up line" not in capfd.readouterr().err
    with pytest.raises(ImportError), _quiet._stderr_to_file():
        os.write(2, b"why the import failed\n")
        raise ImportError("broken")
    assert "why the import failed" in capfd.readouterr().err


def test_a_resumed_leaderboard_reports_the_wall_time_of_every_run(tmp_path):
    # A file from before the run record counts as one run; a resumed run is appended, and the
    # markdown sums them instead of showing only the last invocation's minutes.
    (tmp_path / "leaderboard.json").write_text(
        json.dumps({"rows": [{}] * 288, "wall_seconds": 2334.0, "machine": {"date": "d0"}})
    )
    runs = leaderboard.earlier_runs(tmp_path)
    assert runs == [{"cells": 288, "wall_seconds": 2334.0, "date": "d0"}]
    meta = {"wall_seconds": 564.0, "runs": [*runs, {"cells": 36, "wall_seconds": 564.0}]}
    text = leaderboard_report.wall_time_text(meta)
    assert (
        text == "wall time 48.3 min summed over 2 runs: 288 cells in 38.9 min, 36 cells in 9.4 min"
    )
    assert leaderboard_report.wall_time_text({"wall_seconds": 60.0}) == "wall time 1.0 min"
    assert leaderboard.earlier_runs(tmp_path / "none") == []
