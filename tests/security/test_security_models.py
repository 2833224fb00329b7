"""Hostile model files, built here, are refused by load_model with a clear message, nothing
written under the watched root, the test process alive and the time bounded."""

import pathlib
import subprocess
import sys
import time

import hostile
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import CHILD_MEMORY, CHILD_SECONDS

from fineprune_tf import export, io
from fineprune_tf.io import LoadLimitError, LoadLimits, ModelFormatError, UnsafeModelError

LIMITS = LoadLimits(seconds=CHILD_SECONDS, memory_bytes=CHILD_MEMORY)


def refused(path, error=UnsafeModelError, match=None, limits=LIMITS, **kwargs):
    start = time.monotonic()
    with pytest.raises(error, match=match) as caught:
        io.load_model(path, limits=limits, **kwargs)
    assert time.monotonic() - start < limits.seconds + 60
    line = (
        caught.value.one_line() if isinstance(caught.value, UnsafeModelError) else str(caught.value)
    )
    assert "\n" not in line and str(path.name) in line
    return caught.value


# ---------------------------------------------------------------- SavedModels (rows 1-5)


def test_tf1_saved_model_whose_restore_writes_a_file(watched):
    marker = watched.root / "pwned.ckpt"
    path = hostile.tf1_saved_model(watched.root, marker)
    watched.freeze()
    error = refused(path, match="TF1 SavedModel")
    assert {f.kind for f in error.findings} >= {"SavedModel", "Save"}
    assert not marker.exists()
    watched.assert_unchanged()


def test_initializer_running_an_embedded_graph(watched):
    marker = watched.root / "pwned.txt"
    path = hostile.saved_model_with_initializer(
        watched.root, "graph_sm", hostile.embedded_graph_writer(marker)
    )
    watched.freeze()
    error = refused(path, match="DatasetFromGraph")
    assert "__inference__initializer" in error.findings[0].where
    assert not marker.exists()
    watched.assert_unchanged()


def test_serving_function_sampling_from_a_file(watched):
    path = hostile.candidate_sampler(watched.root, watched.root / "vocab.txt")
    watched.freeze()
    refused(path, match="FixedUnigramCandidateSampler")
    watched.assert_unchanged()


@pytest.mark.subprocess
def test_abort_is_refused_and_even_when_allowed_is_not_a_silent_exit(watched):
    path = hostile.saved_model_with_initializer(watched.root, "abort_sm", hostile.abort_silently())
    watched.freeze()
    refused(path, match="Abort")
    refused(path, LoadLimitError, match="without finishing", allow_unsafe=True)
    watched.assert_unchanged()


@pytest.mark.subprocess
def test_endless_loop_is_stopped_by_the_time_limit(watched):
    path = hostile.saved_model_with_initializer(watched.root, "loop_sm", hostile.endless_loop())
    watched.freeze()
    assert io.inspect_saved_model(path) == []  # allowlisted ops only: the child must stop it
    refused(
        path,
        LoadLimitError,
        match="did not finish within 15 s",
        limits=LoadLimits(seconds=15, memory_bytes=CHILD_MEMORY),
    )
    watched.assert_unchanged()


@pytest.mark.subprocess
def test_memory_bomb_is_stopped_by_the_memory_limit(watched):
    path = hostile.saved_model_with_initializer(watched.root, "bomb_sm", hostile.memory_bomb())
    watched.freeze()
    refused(path, LoadLimitError, match="memory limit|died")
    watched.assert_unchanged()


def test_edited_graphs_function_attributes_unregistered_ops_constant_paths(watched):
    def carry_function(meta_graph):
        serve = hostile.function_named(meta_graph, "__inference_serve")
        node = serve.node_def.add(name="smuggled", op="Identity")
        node.attr["f"].func.name = serve.signature.name

    def unregistered(meta_graph):
        serve = hostile.function_named(meta_graph, "__inference_serve")
        serve.node_def.add(name="custom", op="EvilCustomKernel")

    def constant_restore_path(meta_graph):
        restore = hostile.function_named(meta_graph, "__inference__traced_restore")
        const = restore.node_def.add(name="evil_prefix", op="Const")
        const.attr["dtype"].type = tf.string.as_datatype_enum
        const.attr["value"].tensor.dtype = tf.string.as_datatype_enum
        const.attr["value"].tensor.string_val.append(b"/etc/secrets/ckpt")
        node = next(n for n in restore.node_def if n.op == "RestoreV2")
        node.input[0] = "evil_prefix:output:0"

    cases = [
        ("carry", carry_function, "carries a function"),
        ("unregistered", unregistered, "not registered"),
        ("constant", constant_restore_path, "constant absolute"),
    ]
    for name, edit, _ in cases:
        folder = watched.root / name
        folder.mkdir()
        hostile.edit_saved_model(hostile.benign_saved_model(folder), edit)
    watched.freeze()
    for name, _, words in cases:
        refused(watched.root / name / "benign_sm", match=words)
    watched.assert_unchanged()


def test_symlink_inside_a_saved_model_is_refused(watched):
    path = hostile.benign_saved_model(watched.root)
    (path / "assets").mkdir(exist_ok=True)
    (path / "assets" / "link").symlink_to("/etc/hostname")
    watched.freeze()
    refused(path, match="symbolic link")
    watched.assert_unchanged()


# ---------------------------------------------------------------- .keras / .h5 (rows 6-8, 11)


def test_lambda_spelled_as_an_api_path_is_refused(watched):
    marker = watched.root / "written.png"
    harmful = hostile.lambda_spelled_as_api_path(watched.root, marker)
    (watched.root / "harmless").mkdir()
    harmless = hostile.lambda_spelled_as_api_path(watched.root / "harmless", marker, harmful=False)
    by_module = hostile.lambda_by_module_path(watched.root)
    watched.freeze()
    for path in (harmful, harmless, by_module):
        error = refused(path, match="Lambda")
        assert any(f.kind == "Lambda" and f.name == "pool" for f in error.findings)
    assert not marker.exists()
    watched.assert_unchanged()


def test_functions_that_keras_would_call_are_refused(watched):
    path = hostile.activation_calls_utility(watched.root, watched.root / "x")
    watched.freeze()
    error = refused(path)
    spelled = {f.kind for f in error.findings}
    assert {"keras.utils.get_file", "builtins.exec"} <= spelled, spelled
    watched.assert_unchanged()


def test_weights_bomb_is_refused_before_extraction(watched):
    path = hostile.weights_bomb(watched.root, declared=96 << 20)
    watched.freeze()
    refused(
        path,
        LoadLimitError,
        match="declares 100,663,296 bytes",
        limits=LoadLimits(weights_bytes=64 << 20),
    )
    watched.assert_unchanged()


def test_config_bomb_is_refused_by_the_default_limit(watched):
    path = hostile.config_bomb(watched.root, declared=65 << 20)
    watched.freeze()
    refused(path, LoadLimitError, match="config.json")
    watched.assert_unchanged()


def test_unexpected_archive_members_are_refused(watched):
    path = hostile.extra_member(watched.root)
    watched.freeze()
    refused(path, match="assets/vocab.txt")
    watched.assert_unchanged()


@pytest.mark.subprocess
def test_huge_layer_is_stopped_by_the_memory_limit(watched):
    path = hostile.huge_dense(watched.root)
    watched.freeze()
    refused(path, ModelFormatError, match="memory|could not be loaded")
    watched.assert_unchanged()


@pytest.mark.parametrize("value", [np.arange(3), "{not json", "[1, 2]"])
def test_h5_with_a_malformed_model_config(watched, value):
    path = hostile.h5_with_bad_config(watched.root, value)
    watched.freeze()
    refused(path, ModelFormatError, match="model_config")
    watched.assert_unchanged()


# ---------------------------------------------------------------- benign controls


@pytest.mark.subprocess
def test_benign_models_still_load(watched):
    upper = hostile.benign_keras(watched.root, "m.KERAS")
    exported = watched.root / "exported"
    export.export_saved_model(hostile.small_cnn(), exported)
    plain = hostile.benign_saved_model(watched.root)
    watched.freeze()
    x = np.random.default_rng(0).uniform(size=(2, 4, 4, 1)).astype("float32")
    model = io.load_model(upper, limits=LIMITS)
    assert isinstance(model, keras.Model) and model(x).shape == (2, 2)
    assert isinstance(io.load_model(exported, limits=LIMITS), keras.Model)
    predictor = io.load_model(plain, limits=LIMITS)
    np.testing.assert_allclose(predictor(np.ones((1, 4), "float32")), 1.0)
    watched.assert_unchanged()


def _children(pid: int) -> list[int]:
    found = []
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _gone(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_trial_load_dies_with_the_process_that_started_it(watched):
    """A killed defender process leaves no model running: the trial-load child gets SIGKILL
    with its parent instead of looping until its own time limit."""
    path = hostile.saved_model_with_initializer(watched.root, "loop_sm", hostile.endless_loop())
    watched.freeze()
    code = (
        "import sys; from fineprune_tf import io; "
        "io.load_model(sys.argv[1], limits=io.LoadLimits(seconds=600))"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline, children = time.monotonic() + 240, []
        while not children and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.5)
            children = _children(parent.pid)
        assert children, "the loader never started its trial-load child"
        time.sleep(2.0)  # let the child get past its start-up and into the loop
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while not all(_gone(child) for child in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(child) for child in children)
    watched.assert_unchanged()
