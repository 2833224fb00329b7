"""The command line on hostile inputs (one ``error:`` line, exit 2, no traceback, nothing
written) and its output-folder rules (the user's files are never deleted or changed)."""

import json

import hostile
import numpy as np
import pytest
from conftest import CHILD_MEMORY, CHILD_SECONDS, Watched, error_lines, run_cli
from PIL import Image
from script_runs import run_script_several_times

from fineprune_tf import cleaning, defenses
from fineprune_tf.io import LoadLimits

pytestmark = pytest.mark.subprocess

LIMIT_FLAGS = [f"--load_timeout={CHILD_SECONDS:g}", f"--load_memory_mb={CHILD_MEMORY >> 20}"]


@pytest.fixture()
def clean_npz(watched):
    x, y = hostile.clean_arrays()
    np.savez(watched.root / "clean.npz", x=x, y=y)
    return watched.root / "clean.npz"


def with_clean_data(build):
    """A case whose model is hostile: ``build(folder)`` writes it; the clean data is fine."""

    def make(folder):
        x, y = hostile.clean_arrays()
        np.savez(folder / "clean.npz", x=x, y=y)
        return build(folder), folder / "clean.npz"

    return make


def with_bad_data(name, write):
    """A case whose clean data is hostile (``write(path)``); the model is benign (its
    uppercase extension is accepted)."""

    def make(folder):
        write(folder / name)
        return hostile.benign_keras(folder, "m.KERAS"), folder / name

    return make


REFUSALS = [
    pytest.param(
        with_clean_data(lambda root: hostile.lambda_spelled_as_api_path(root, root / "w.png")),
        "Lambda",
        (),
        id="spelled-lambda",
    ),
    pytest.param(
        with_clean_data(lambda root: hostile.tf1_saved_model(root, root / "pwned")),
        "TF1 SavedModel",
        (),
        id="tf1-restore-writes",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        with_clean_data(lambda root: hostile.weights_bomb(root, 96 << 20)),
        "declares",
        ("--max_weights_mb=64",),
        id="weights-bomb",
    ),
    pytest.param(
        with_clean_data(
            lambda root: hostile.saved_model_with_initializer(
                root, "sm", hostile.embedded_graph_writer(root / "pwned")
            )
        ),
        "DatasetFromGraph",
        (),
        id="embedded-graph",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        with_clean_data(
            lambda root: hostile.saved_model_with_initializer(root, "sm", hostile.abort_silently())
        ),
        "without finishing",
        ("--allow_unsafe",),
        id="abort-allowed-unsafe",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        with_clean_data(lambda root: hostile.candidate_sampler(root, root / "vocab")),
        "FixedUnigramCandidateSampler",
        (),
        id="sampler",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        with_clean_data(lambda root: hostile.config_bomb(root, 65 << 20)),
        "config.json",
        (),
        id="config-bomb",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        with_clean_data(hostile.huge_dense), "memory", (), id="dense-1e9", marks=pytest.mark.slow
    ),
    pytest.param(
        with_clean_data(lambda root: hostile.h5_with_bad_config(root, "{not json")),
        "model_config",
        (),
        id="h5-not-json",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        with_bad_data("empty.npz", lambda p: p.write_bytes(b"")), "empty file", (), id="empty.npz"
    ),
    pytest.param(
        with_bad_data(
            "complex.npz",
            lambda p: np.savez(p, x=hostile.clean_arrays()[0] + 1j, y=hostile.clean_arrays()[1]),
        ),
        "complex-valued",
        (),
        id="complex.npz",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        with_bad_data("bomb.npz", lambda p: hostile.npz_declaring(p, (10**6, 10**4))),
        "need more than",
        (),
        id="bomb.npz",
        marks=pytest.mark.slow,
    ),
]


@pytest.fixture(scope="module")
def refusals(request, tmp_path_factory) -> dict:
    """Every selected case of ``REFUSALS`` through the command line, each in its own watched
    folder, one after the other in one child process (one TensorFlow start-up for all of
    them, not one per case; every load of a hostile file still happens in its own sandboxed
    loader process).  ``{case id: (Watched, exit status, stderr)}``."""
    selected = {
        item.callspec.id
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_cli_refuses_hostile_input"
    }
    root = tmp_path_factory.mktemp("refusals")
    cases, runs = [], []
    for case in REFUSALS:
        if case.id not in selected:
            continue
        make, _, extra = case.values
        folder = root / case.id
        folder.mkdir()
        model, data = make(folder)
        watched = Watched(folder)
        watched.freeze()
        cases.append((case.id, watched))
        out = folder / "results"
        runs.append([f"--model={model}", f"--clean_data={data}", f"--output_dir={out}"])
        runs[-1] += [*LIMIT_FLAGS, *extra]
    outcomes = run_script_several_times("scripts.fine_prune", *runs, cwd=root, timeout=1800)
    return {
        case_id: (watched, status, stderr)
        for (case_id, watched), (status, _, stderr) in zip(cases, outcomes, strict=True)
    }


@pytest.mark.parametrize("make, words, extra", REFUSALS)
def test_cli_refuses_hostile_input(refusals, request, make, words, extra):
    """A hostile model or hostile clean data: one ``error:`` line naming the problem, exit
    status 2, no traceback, and nothing written or changed in the user's folder."""
    del make, extra  # Used by the ``refusals`` fixture.
    watched, status, stderr = refusals[request.node.callspec.id]
    lines = error_lines(stderr)
    assert status == 2, stderr[-2000:]
    assert len(lines) == 1 and words in lines[0], stderr[-2000:]
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    watched.assert_unchanged()


def foreign_folder(watched):
    model = hostile.benign_keras(watched.root)
    out = watched.root / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "report.json").write_text("{}")
    watched.freeze()
    return model, out


def test_cli_refuses_a_foreign_non_empty_output_folder_even_with_overwrite(watched, clean_npz):
    """Row 9: the user's files in --output_dir were deleted; now the folder is refused."""
    model, out = foreign_folder(watched)
    result, _ = run_cli(
        [f"--model={model}", f"--clean_data={clean_npz}", f"--output_dir={out}", "--overwrite"],
        cwd=watched.root,
    )
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "not empty and is not a previous run" in lines[0]
    watched.assert_unchanged()


@pytest.mark.slow
def test_cli_foreign_folder_without_overwrite_and_verbosity(watched, clean_npz):
    model, out = foreign_folder(watched)
    result, _ = run_cli(
        [f"--model={model}", f"--clean_data={clean_npz}", f"--output_dir={out}"], cwd=watched.root
    )
    assert result.returncode == 2 and len(error_lines(result.stderr)) == 1
    assert "Traceback" not in result.stderr
    result, _ = run_cli(
        [
            f"--model={model}",
            f"--clean_data={watched.root / 'nope.npz'}",
            f"--output_dir={watched.root / 'r2'}",
            "--verbosity=1",
        ],
        cwd=watched.root,
    )
    assert result.returncode == 2 and "Traceback" in result.stderr  # --verbosity brings it
    watched.assert_unchanged()


def test_output_folder_overlapping_an_input_is_refused(watched):
    """Row 10: results inside the clean image folder became a class / overwrote images."""
    model = hostile.benign_keras(watched.root)
    images = watched.root / "images"
    for label in ("a", "b"):
        (images / label).mkdir(parents=True)
        for index in range(3):
            Image.new("L", (4, 4), color=40 * index).save(images / label / f"{index}.png")
    watched.freeze()
    for out, words in [
        (images / "results", "is inside your input"),
        (images / "a", "is inside"),
        (images, "is your input"),
        (watched.root, "contains your input"),
        (model, "is your input"),
    ]:
        with pytest.raises(cleaning.CleaningError, match=words):
            cleaning.clean_model(model, images, out)
    watched.assert_unchanged()


def test_overwrite_deletes_only_the_files_of_the_previous_run(watched, clean_npz):
    model = watched.root / "model.keras"
    hostile.small_cnn().save(model)
    out = watched.root / "results"
    settings = defenses.FineTuneSettings(max_epochs=1, seed=0)
    limits = LoadLimits(seconds=CHILD_SECONDS, memory_bytes=CHILD_MEMORY)

    def run(**kwargs):
        return cleaning.clean_model(
            model,
            clean_npz,
            out,
            settings=settings,
            export_serving=False,
            load_limits=limits,
            **kwargs,
        )

    run()
    manifest = json.loads((out / cleaning.MANIFEST).read_text())
    assert set(manifest["files"]) == {
        n
        for n in (*cleaning.OUTPUT_FILES, cleaning.defended_file("fine_pruning"))
        if n != "saved_model"
    }
    (out / "my_notes.txt").write_text("mine")
    (watched.root / "victim.txt").write_text("also mine")
    manifest["files"].append("../victim.txt")  # a doctored manifest cannot reach outside
    (out / cleaning.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(cleaning.CleaningError, match="pass --overwrite"):
        run()
    before = (out / "report.json").stat().st_mtime_ns
    run(overwrite=True)
    assert (out / "report.json").stat().st_mtime_ns != before
    assert (out / "my_notes.txt").read_text() == "mine"
    assert (watched.root / "victim.txt").read_text() == "also mine"
