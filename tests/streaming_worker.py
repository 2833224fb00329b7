"""Streams a generated data set through statistics and the pruning-curve engine and prints
the process's peak resident memory before and after, as JSON (for tests/test_streaming.py).

    python tests/streaming_worker.py SAMPLES BUDGET_MB STEPS
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(samples: int, budget_mb: int, steps: int) -> None:
    import numpy as np
    import tensorflow as tf

    from fineprune_tf import curves, models, stats

    model = models.build("mnist", seed=0)
    batch = 500

    def generate():
        rng = np.random.default_rng(0)
        for _ in range(samples // batch):
            yield (
                rng.random((batch, 28, 28, 1), dtype=np.float32),
                rng.integers(0, 10, batch).astype(np.int64),
            )

    spec = (tf.TensorSpec([None, 28, 28, 1], tf.float32), tf.TensorSpec([None], tf.int64))
    dataset = tf.data.Dataset.from_generator(generate, output_signature=spec)
    # Warm up on a small slice so library and graph memory is in the baseline.
    stats.collect(model, dataset.take(2))
    curves.pruning_curve(
        model, "conv2", list(range(steps)), dataset.take(2), memory_budget_mb=budget_mb
    )
    before = peak_rss_mb()
    collected = stats.collect(model, dataset)
    curve = curves.pruning_curve(
        model, "conv2", list(range(steps)), dataset, memory_budget_mb=budget_mb
    )
    print(
        json.dumps(
            {
                "before_mb": before,
                "after_mb": peak_rss_mb(),
                "data_mb": samples * 28 * 28 * 4 / 2**20,
                "count": collected["conv2"].count,
                "steps": int(curve.steps),
                "curve_samples": int(curve.predictions_clean.shape[1]),
            }
        )
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
