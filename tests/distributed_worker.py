"""One process of the distribution tests: statistics, a pruning curve and a short training run
of the MNIST model under a strategy; writes the numbers as JSON.

    python tests/distributed_worker.py STRATEGY OUTPUT.json   (TF_CONFIG for multi_worker)
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fineprune_tf import distribute  # noqa: E402


def main(strategy_name: str, output: str) -> None:
    strategy = distribute.make_strategy(strategy_name, cpu_replicas=2 if strategy_name ==
                                        "mirrored" else 0, worker_timeout=30)
    import numpy as np

    from fineprune_tf import curves, data, models, stats, training

    task = data.load("mnist", seed=0)
    x, y = task.validation.x[:256], task.validation.y[:256]
    with strategy.scope():
        model = models.build("mnist", seed=0)
        collected = stats.collect(model, x, batch_size=64)
        order = np.argsort(collected["conv2"].mean, kind="stable")
        curve = curves.pruning_curve(model, "conv2", order, (x, y))
        training.fit(model, task.train.x[:1024], task.train.y[:1024], epochs=2, batch_size=64,
                     learning_rate=1e-3, seed=0)
        accuracy = float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))
    result = {"replicas": strategy.num_replicas_in_sync,
              "means": {k: v.mean.tolist() for k, v in collected.items()},
              "counts": {k: v.count for k, v in collected.items()},
              "curve": curve.clean_acc.tolist(), "accuracy": accuracy}
    with open(output, "w") as stream:
        json.dump(result, stream)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
