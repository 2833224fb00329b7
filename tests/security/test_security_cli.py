"""The command line on hostile inputs (one ``error:`` line, exit 2, no traceback, nothing
written) and its output-folder rules (the user's files are never deleted or changed)."""

import json

import hostile
import numpy as np
import pytest
from conftest import CHILD_MEMORY, CHILD_SECONDS, error_lines, run_cli
from PIL import Image

from fineprune_tf import cleaning, defenses
from fineprune_tf.io import LoadLimits

pytestmark = pytest.mark.subprocess

LIMIT_FLAGS = [f"--load_timeout={CHILD_SECONDS:g}", f"--load_memory_mb={CHILD_MEMORY >> 20}"]


@pytest.fixture()
def clean_npz(watched):
    x, y = hostile.clean_arrays()
    np.savez(watched.root / "clean.npz", x=x, y=y)
    return watched.root / "clean.npz"


def refused_by_cli(watched, model, data, words, *extra):
    watched.freeze()
    out = watched.root / "results"
    result, _ = run_cli(
        [f"--model={model}", f"--clean_data={data}", f"--output_dir={out}", *LIMIT_FLAGS, *extra],
        cwd=watched.root,
    )
    lines = error_lines(result.stderr)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and words in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    watched.assert_unchanged()
    return lines[0]


HOSTILE_MODELS = [
    pytest.param(
        lambda root: hostile.lambda_spelled_as_api_path(root, root / "w.png"),
        "Lambda",
        (),
        id="spelled-lambda",
    ),
    pytest.param(
        lambda root: hostile.tf1_saved_model(root, root / "pwned"),
        "TF1 SavedModel",
        (),
        id="tf1-restore-writes",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        lambda root: hostile.weights_bomb(root, 96 << 20),
        "declares",
        ("--max_weights_mb=64",),
        id="weights-bomb",
    ),
    pytest.param(
        lambda root: hostile.saved_model_with_initializer(
            root, "sm", hostile.embedded_graph_writer(root / "pwned")
        ),
        "DatasetFromGraph",
        (),
        id="embedded-graph",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        lambda root: hostile.saved_model_with_initializer(root, "sm", hostile.abort_silently()),
        "without finishing",
        ("--allow_unsafe",),
        id="abort-allowed-unsafe",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        lambda root: hostile.candidate_sampler(root, root / "vocab"),
        "FixedUnigramCandidateSampler",
        (),
        id="sampler",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        lambda root: hostile.config_bomb(root, 65 << 20),
        "config.json",
        (),
        id="config-bomb",
        marks=pytest.mark.slow,
    ),
    pytest.param(hostile.huge_dense, "memory", (), id="dense-1e9", marks=pytest.mark.slow),
    pytest.param(
        lambda root: hostile.h5_with_bad_config(root, "{not json"),
        "model_config",
        (),
        id="h5-not-json",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("build, words, extra", HOSTILE_MODELS)
def test_cli_refuses_hostile_models(watched, clean_npz, build, words, extra):
    line = refused_by_cli(watched, build(watched.root), clean_npz, words, *extra)
    assert line.startswith("error: ")


@pytest.mark.parametrize(
    "name, make, words",
    [
        ("empty.npz", lambda p: p.write_bytes(b""), "empty file"),
        pytest.param(
            "complex.npz",
            lambda p: np.savez(p, x=hostile.clean_arrays()[0] + 1j, y=hostile.clean_arrays()[1]),
            "complex-valued",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "bomb.npz",
            lambda p: hostile.npz_declaring(p, (10**6, 10**4)),
            "need more than",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_cli_refuses_bad_data(watched, name, make, words):
    model = hostile.benign_keras(watched.root, "m.KERAS")  # uppercase extension accepted
    make(watched.root / name)
    refused_by_cli(watched, model, watched.root / name, words)


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
