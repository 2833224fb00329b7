"""Long experiments survive interruption, resume to the very results of an uninterrupted run,
and never report numbers of a model that is no longer on disk (issue 16, point 1)."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from fineprune_tf import attacks, data, defenses, experiment, metrics, poison, triggers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--task=mnist", "--quick", "--attacks=baseline", "--seed=0"]
DEFENSES = "--defenses=none,pruning,fine_pruning"


def numbers(results: dict) -> dict:
    """results.json without wall times."""
    return {
        attack: {
            defense: {k: v for k, v in cell.items() if k != "seconds"}
            for defense, cell in row.items()
        }
        for attack, row in results["table1"].items()
    }


def start(output_dir, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "scripts.fine_prune", *QUICK, f"--output_dir={output_dir}", *extra],
        cwd=output_dir.parent,
        env={**os.environ, "PYTHONPATH": REPO},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_stage(output_dir, stage, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = output_dir / "stages.json"
        if path.exists() and stage in json.loads(path.read_text())["done"]:
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before {stage}: {process.stdout.read()[-2000:]}")
        time.sleep(0.2)
    pytest.fail(f"{stage} not reached in {timeout}s")


# ---------------------------------------------------------------------------------------------
# File-by-file comparison of two output directories.

#: Keys whose values are wall times (or depend on them), memory peaks or the machine record
#: (it carries the date the run wrote it): legitimately differ between runs.
TIMING_KEYS = {
    "machine",
    "seconds",
    "timings",
    "peak_rss_mb",
    "total_seconds",
    "train_seconds",
    "step_seconds",
    "epoch_seconds",
    "examples_per_second",
}


def without_timings(value):
    if isinstance(value, dict):
        return {
            k: without_timings(v)
            for k, v in value.items()
            if k not in TIMING_KEYS and "seconds" not in k
        }
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def stage_records(path) -> dict:
    """stages.json without timings, and without the model-file hashes: a ``.keras`` file is a
    zip archive whose entries carry the time they were written, so the same weights saved at
    another time hash differently (the weights themselves are compared separately)."""
    done = json.loads(path.read_text())["done"]
    return {
        name: {"config": record["inputs"]["config"], "result": without_timings(record["result"])}
        for name, record in done.items()
    }


def table_without_seconds(path) -> str:
    return "\n".join(
        line for line in path.read_text().splitlines() if not line.startswith("| defense seconds")
    )


def defenses_table_without_seconds(path) -> str:
    """defenses.md without its "seconds" column (the 7th cell of each row)."""
    rows = []
    for line in path.read_text().splitlines():
        cells = line.split("|")
        rows.append("|".join(cells[:7] + cells[8:]) if line.startswith("|") else line)
    return "\n".join(rows)


def assert_same_outputs(reference, other) -> None:
    """Every file of ``reference`` is in ``other`` with the same content, except what
    legitimately differs: wall times (results.json ``timings``/``*seconds``, table1's
    "defense seconds" row, defenses.md's seconds column), the ``.keras`` archives' bytes (zip
    entry times; their weights are compared) and ``run.log`` (time stamps, and the resume's
    own messages)."""
    files = sorted(p.relative_to(reference).as_posix() for p in reference.rglob("*") if p.is_file())
    other_files = sorted(p.relative_to(other).as_posix() for p in other.rglob("*") if p.is_file())
    assert files == other_files
    for name in files:
        a, b = reference / name, other / name
        if name == "run.log":
            continue
        if name == "results.json":
            assert without_timings(json.loads(b.read_text())) == without_timings(
                json.loads(a.read_text())
            )
        elif name == "stages.json":
            assert stage_records(b) == stage_records(a)
        elif name in ("table1.md", "table2.md"):
            assert table_without_seconds(b) == table_without_seconds(a), name
        elif name == "defenses.md":
            assert defenses_table_without_seconds(b) == defenses_table_without_seconds(a)
        elif name.endswith(".keras"):
            weights_a = keras.models.load_model(a).get_weights()
            weights_b = keras.models.load_model(b).get_weights()
            assert len(weights_a) == len(weights_b), name
            for wa, wb in zip(weights_a, weights_b, strict=True):
                np.testing.assert_array_equal(wb, wa, err_msg=name)
        else:  # trigger.json, the figures
            assert b.read_bytes() == a.read_bytes(), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    output, _ = start(out, DEFENSES).communicate(timeout=600)
    assert (out / "results.json").exists(), output[-3000:]
    return out


def interrupt_at(out, stage, sig, *extra):
    """Starts (or resumes, with ``--resume`` in ``extra``) the run and sends ``sig`` once
    ``stage`` is recorded; checks that every file a reader can see is whole."""
    process = start(out, DEFENSES, *extra)
    wait_for_stage(out, stage, process)
    process.send_signal(sig)
    process.wait(timeout=60)
    assert stage in json.loads((out / "stages.json").read_text())["done"]
    assert not list(out.rglob("*.tmp*")) or sig == signal.SIGKILL
    assert not (out / "results.json").exists()


@pytest.mark.slow
@pytest.mark.subprocess
def test_an_interrupted_run_resumes_to_the_uninterrupted_results(tmp_path, uninterrupted):
    """SIGTERM after the attack is trained, then SIGKILL of the resumed run after a defense:
    the second resume finishes with every number and weight of the uninterrupted run (same
    flags and seed), and the attack is never trained again."""
    out = tmp_path / "run"
    interrupt_at(out, "attack/baseline", signal.SIGTERM)
    model = out / "models" / "baseline.keras"
    trained_at = os.stat(model).st_mtime_ns
    interrupt_at(out, "defense/baseline/none", signal.SIGKILL, "--resume")
    resumed = start(out, DEFENSES, "--resume")
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    assert os.stat(model).st_mtime_ns == trained_at  # Not retrained.
    for leftover in out.rglob("*.tmp*"):  # A SIGKILL may leave a temporary file behind.
        leftover.unlink()
    assert_same_outputs(uninterrupted, out)


# ---------------------------------------------------------------------------------------------
# A redone stage invalidates every stage that depends on it.


def recomputed_table(out, defenses) -> dict:
    """Each defense's clean accuracy, ASR and robust accuracy measured now, from the models in
    ``out/models`` (``none`` is the attack's model itself)."""
    task_data = data.load("mnist", seed=0)
    _, policy, _ = poison.default_attack("mnist", task_data)
    trigger = triggers.load(out / "trigger.json")
    backdoor = poison.backdoor_test_set(task_data.test, trigger, policy, seed=0)
    table = {}
    for defense in defenses:
        name = "baseline" if defense == "none" else f"baseline_{defense}"
        model = keras.models.load_model(out / "models" / f"{name}.keras")
        table[defense] = metrics.evaluate(model, (task_data.test.x, task_data.test.y), backdoor)
    return table


@pytest.mark.slow
def test_a_redone_attack_invalidates_its_analysis_and_defenses(tmp_path, monkeypatch):
    out = tmp_path / "run"
    defenses = ("none", "pruning")
    config = experiment.ExperimentConfig(
        task="mnist", attacks=("baseline",), defenses=defenses, quick=True
    )
    first = experiment.run(config, out)
    assert first["table1"]["baseline"]["none"]["clean_acc"] > 0.5

    # The checkpoint is corrupt, and retraining gives another model (as it may: another
    # machine, another TensorFlow): here one whose classifier has classes 0 and 1 swapped, so
    # it gets those wrong (not at chance: the pruning defense refuses a model at chance).
    # Numbers of the first model in the tables would now be stale.
    (out / "models" / "baseline.keras").write_bytes(b"not a zip file")
    original = attacks.baseline

    def retrained_differently(*args, **kwargs):
        result = original(*args, **kwargs)
        classifier = result.model.layers[-1]
        kernel, bias = classifier.get_weights()
        kernel[:, [0, 1]], bias[[0, 1]] = kernel[:, [1, 0]], bias[[1, 0]]
        classifier.set_weights([kernel, bias])
        return result

    monkeypatch.setattr(attacks, "baseline", retrained_differently)
    messages = []
    again = experiment.run(config, out, resume=True, progress=messages.append)
    assert any("baseline.keras is not the file its stage wrote" in m for m in messages), messages
    assert any(m.startswith("analysis/baseline: its inputs changed") for m in messages)
    assert any(m.startswith("defense/baseline/pruning: its inputs changed") for m in messages)

    on_disk = recomputed_table(out, defenses)
    # The retrained model is the broken one ...
    assert on_disk["none"]["clean_acc"] < first["table1"]["baseline"]["none"]["clean_acc"] - 0.1
    for defense in defenses:  # ... and the tables describe it, not the first model.
        cell = again["table1"]["baseline"][defense]
        for key in ("clean_acc", "asr", "robust_acc"):
            assert cell[key] == pytest.approx(on_disk[defense][key], abs=1e-9), (defense, key)
    saved = json.loads((out / "results.json").read_text())
    assert numbers(saved) == numbers(again)
    # The curve was recomputed for the retrained model: its first point is that model's
    # validation accuracy, not the first model's.
    curve = again["curves"]["baseline"]["curve"]
    assert curve["clean_acc"][0] < first["curves"]["baseline"]["curve"]["clean_acc"][0] - 0.1

    # A defended model replaced on disk is detected too, and that defense alone is redone.
    monkeypatch.setattr(attacks, "baseline", original)
    pruned = out / "models" / "baseline_pruning.keras"
    keras.models.load_model(out / "models" / "baseline.keras").save(pruned)
    messages.clear()
    experiment.run(config, out, resume=True, progress=messages.append)
    assert any("baseline_pruning.keras is not the file its stage wrote" in m for m in messages), (
        messages
    )
    assert not any("training" in m or "analysis/baseline" in m for m in messages), messages

    # An unreadable manifest means starting over, with a warning: the attack is trained again
    # although its checkpoint is intact (the run is stopped there; the rest is as above).
    (out / "stages.json").write_text("{ truncated")
    messages.clear()

    class Retraining(Exception):
        pass

    def stop_when_retraining(message):
        messages.append(message)
        if message.startswith("attack/baseline: training"):
            raise Retraining

    with pytest.raises(Retraining):
        experiment.run(config, out, resume=True, progress=stop_when_retraining)
    assert any("stages.json is unreadable" in m for m in messages), messages


def test_resume_refuses_a_changed_configuration(tmp_path):
    out = tmp_path / "run"
    config = experiment.ExperimentConfig(
        task="mnist", attacks=("baseline",), defenses=("none",), quick=True
    )
    experiment.run(config, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for changed in (
        dict(seed=1),
        dict(pruning=defenses.PruningSettings(threshold=2.0)),
        dict(fine_tune=defenses.FineTuneSettings(max_epochs=3)),
    ):
        with pytest.raises(experiment.OutputDirError, match="different configuration"):
            experiment.run(
                experiment.ExperimentConfig(**{**config.__dict__, **changed}), out, resume=True
            )
    # The refused runs changed nothing.
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # Adding a defense is not a configuration change: the resume goes on.
    experiment.run(
        experiment.ExperimentConfig(**{**config.__dict__, "defenses": ("none", "pruning")}),
        out,
        resume=True,
    )
