"""Validation data larger than the memory budget streams through statistics and curves.

The claim is about the *shape* of memory use: peak resident memory does not grow with the amount
of data streamed (beyond the curve's per-sample predictions, kept by design). So the worker runs
twice, on 5,000 and on 25,000 generated MNIST-sized images, and the test compares the two
growths. An absolute margin would depend on the allocator and the machine (it did: the same run
grew by 26 MiB on one machine and by 66-75 MiB on another).
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Channels pruned by the curve (its chunking depends on the memory budget, not on the steps).
STEPS = 8
SMALL, LARGE = 5_000, 25_000


def _stream(samples: int, budget_mb: int = 16) -> dict:
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tests", "streaming_worker.py"),
            str(samples),
            str(budget_mb),
            str(STEPS),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["count"] == samples * 8 * 8  # Every sample reached the statistics.
    assert measured["curve_samples"] == samples and measured["steps"] == STEPS
    return measured


def test_peak_memory_does_not_grow_with_the_data_streamed():
    small, large = _stream(SMALL), _stream(LARGE)
    extra_data_mb = large["data_mb"] - small["data_mb"]  # 59.8 MiB more data.
    # The curve keeps int64 predictions [steps + 1, samples] by design: 72 bytes a sample.
    extra_predictions_mb = (STEPS + 1) * 8 * (LARGE - SMALL) / 2**20  # 1.4 MiB.
    growth_small = small["after_mb"] - small["before_mb"]
    growth_large = large["after_mb"] - large["before_mb"]
    extra_growth_mb = growth_large - growth_small - extra_predictions_mb
    # Holding the data would make extra_growth >= extra_data (slope 1); streaming keeps it near
    # 0 (measured 5 MiB with 15,000 against 60,000 images and 32 steps; -2 to 2 MiB with 5,000
    # against 10,000, 40,000 and 60,000 and 8 steps). A quarter of the data (15 MiB) leaves
    # room for allocator noise, not for the data (a curve that held it grew by 41 MiB more).
    assert extra_growth_mb < extra_data_mb / 4, (small, large, extra_growth_mb)
