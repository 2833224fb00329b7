"""The committed BENCHMARKS.md and benchmarks.json are generated, complete and consistent:
the JSON parses and carries every number the README quotes, from a full run; the markdown is
exactly what the report writer renders from that JSON (so it was not edited by hand); and the
merge step keeps each section's record of the run it came from."""

from __future__ import annotations

import json
import pathlib

import pytest

from fineprune_tf import benchmarks
from fineprune_tf.benchmarks import report

ROOT = pathlib.Path(__file__).resolve().parent.parent

# README.md "Speed" section: the summary key behind each number it quotes.
README_QUOTED_KEYS = {
    "curve_speedup_vs_naive_speech": "pruning curve vs the naive loop (speech)",
    "curve_speedup_vs_naive_face": "pruning curve vs the naive loop (face)",
    "curve_cost_vs_bound_speech": "pruning curve vs its lower bound (speech)",
    "curve_cost_vs_bound_face": "pruning curve vs its lower bound (face)",
    "op_speedup_vs_tf": "fused op forward vs the TF composite, 64x56x56x256",
    "op_grad_speedup_vs_tf": "fused op backward vs the TF composite, 64x56x56x256",
    "masked_train_overhead": "MaskedConv2D training step vs Conv2D",
    "stats_pass_vs_inference": "statistics pass vs inference",
    "shrink_params_reduction_speech": "shrink: parameters removed (speech)",
    "shrink_params_reduction_face": "shrink: parameters removed (face)",
    "shrink_flops_reduction_speech": "shrink: multiply-adds removed (speech)",
    "shrink_flops_reduction_face": "shrink: multiply-adds removed (face)",
    "shrink_inference_speedup_speech": "shrink: inference speed-up (speech)",
    "shrink_inference_speedup_face": "shrink: inference speed-up (face)",
}


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads((ROOT / report.JSON_NAME).read_text())


def test_committed_json_carries_every_number_the_readme_quotes(committed):
    summary = committed["summary"]
    missing = sorted(set(README_QUOTED_KEYS) - set(summary))
    assert not missing, f"benchmarks.json lacks {missing}: regenerate it"
    for key in README_QUOTED_KEYS:
        assert isinstance(summary[key], float) and summary[key] > 0, key
    # The README quotes a full run and the op's 64x56x56x256 shape.
    for key, entry in committed["sections"].items():
        assert committed["runs"][entry["run"]]["quick"] is False, f"section {key} is quick"
    shapes = [r["shape"] for r in committed["sections"]["b"]["result"]["sizes"]]
    assert shapes[-1] == [64, 56, 56, 256]


def test_committed_json_is_one_consistent_document(committed):
    assert set(committed) == {"generator", "summary", "targets", "runs", "sections"}
    assert set(committed["sections"]) == set(benchmarks.available())
    # The summary is exactly the union of the sections' summaries (no spliced extras).
    union = {}
    for entry in committed["sections"].values():
        union.update(entry["result"]["summary"])
    assert committed["summary"] == union
    for entry in committed["sections"].values():
        run = committed["runs"][entry["run"]]
        assert {"cores", "cpu", "date", "tensorflow", "keras"} <= set(run["machine"])
    # Each target's status is what its value says.
    for key, goal in committed["targets"].items():
        value = committed["summary"][key]
        ok = value >= goal["threshold"] if goal["op"] == ">=" else value <= goal["threshold"]
        assert goal["status"] == ("pass" if ok else "MISS"), key


def test_committed_markdown_is_rendered_from_the_json(committed):
    assert (ROOT / report.MARKDOWN_NAME).read_text() == report.markdown(committed)


def _shrink_result(speedup: float) -> dict:
    row = {
        "task": "speech",
        "layer": "conv5",
        "pruned_fraction": 0.7,
        "params": [10, 8],
        "multiply_adds": [100, 90],
        "params_reduction": 0.2,
        "flops_reduction": 0.1,
        "masked_s": 1.0,
        "shrunk_s": 1.0 / speedup,
        "inference_speedup": speedup,
        "samples": 5,
    }
    return {"rows": [row], "notes": [], "summary": {"shrink_inference_speedup_speech": speedup}}


def _run(date: str, sections: list[str]) -> dict:
    machine = {
        "cores": 2,
        "cpu": "test cpu",
        "python": "3",
        "tensorflow": "2",
        "keras": "3",
        "numpy": "2",
        "op_backend": "compiled-cpu",
        "platform": "p",
        "date": date,
    }
    return {
        "machine": machine,
        "quick": False,
        "repeats": 1,
        "load_start": "0",
        "load_end": "0",
        "seconds": 1.0,
        "sections": sections,
    }


def test_merge_replaces_only_the_sections_run_and_records_their_runs(tmp_path):
    report.write(tmp_path, "run-1", _run("d1", ["e"]), {"e": _shrink_result(1.5)}, merge=False)
    first = json.loads((tmp_path / report.JSON_NAME).read_text())
    assert first["sections"]["e"]["run"] == "run-1"
    report.write(tmp_path, "run-2", _run("d2", ["e"]), {"e": _shrink_result(2.0)}, merge=True)
    merged = json.loads((tmp_path / report.JSON_NAME).read_text())
    assert merged["sections"]["e"]["run"] == "run-2"
    assert merged["summary"] == {"shrink_inference_speedup_speech": 2.0}
    assert list(merged["runs"]) == ["run-2"]  # run-1 no longer provides any section
    text = (tmp_path / report.MARKDOWN_NAME).read_text()
    assert text == report.markdown(merged) and "`run-2`" in text and "2.00x" in text
    # Without --merge a run writes the files whole.
    (tmp_path / report.JSON_NAME).write_text("[]")
    with pytest.raises(ValueError, match="not a benchmarks.json"):
        report.write(tmp_path, "run-3", _run("d3", ["e"]), {"e": _shrink_result(1.0)}, merge=True)
    report.write(tmp_path, "run-3", _run("d3", ["e"]), {"e": _shrink_result(1.0)}, merge=False)
    assert list(json.loads((tmp_path / report.JSON_NAME).read_text())["runs"]) == ["run-3"]


def test_every_section_module_has_the_interface():
    for key in benchmarks.available():
        module = benchmarks.load(key)
        assert callable(module.measure) and callable(module.markdown), key
        assert isinstance(module.TITLE, str) and isinstance(module.TARGETS, dict), key


@pytest.mark.subprocess
def test_unknown_section_is_one_clear_line_and_a_nonzero_exit(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark", "--sections=a,zz", f"--output_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: unknown sections ['zz']")
    assert not list(tmp_path.iterdir())
