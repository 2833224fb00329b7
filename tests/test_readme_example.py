"""The README's "Use MaskedConv2D in your own model" example runs as printed."""

import os
import pathlib
import re
import subprocess
import sys

import keras
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="the example exports with TensorFlow"
)


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Use MaskedConv2D in your own model", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.slow
@pytest.mark.subprocess
def test_readme_example_runs(tmp_path):
    pytest.importorskip("tensorflow_model_optimization")
    result = subprocess.run(
        [sys.executable, "-c", readme_example()],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env={
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        },
    )
    assert result.returncode == 0, result.stderr[-4000:]
    pruned = re.search(r"pruned: \[([\d\s]*)\]", result.stdout).group(1).split()
    assert len(pruned) == 16  # Half of conv2's 32 channels.
    assert (tmp_path / "model.tflite").stat().st_size > 0
    assert (tmp_path / "serving" / "saved_model.pb").is_file()
