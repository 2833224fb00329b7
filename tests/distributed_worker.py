"""One process of the distribution tests: statistics, a pruning curve and a short training run
(with validation, EarlyStopping and GradualChannelPruning) of the MNIST model under a strategy;
writes the numbers as JSON.

Statistics are collected twice: over the same 256 images on every worker (the strategy splits
each global batch), and over this worker's own shard only (worker i of n passes images
``[i*256/n, (i+1)*256/n)``, with tf.data auto-sharding off), so that the summed result equals the
single-device one only if every worker read its shard and nothing else.

    python tests/distributed_worker.py STRATEGY OUTPUT.json   (TF_CONFIG for multi_worker)
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fineprune_tf import distribute  # noqa: E402

#: Training step at which the pruning callback prunes a quarter of conv2 (mid first epoch).
PRUNE_STEP = 8


def _worker_index_and_count() -> tuple[int, int]:
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    if not config:
        return 0, 1
    return config["task"]["index"], len(config["cluster"]["worker"])


def main(strategy_name: str, output: str) -> None:
    """Runs the workload under ``strategy_name`` and writes its numbers to ``output``."""
    start = time.perf_counter()
    # Logical CPUs must be configured before TensorFlow initialises, hence make_strategy first.
    strategy = distribute.make_strategy(
        strategy_name, cpu_replicas=2 if strategy_name == "mirrored" else 0, worker_timeout=180
    )
    import keras
    import numpy as np
    import tensorflow as tf

    from fineprune_tf import curves, data, defenses, models, stats, training

    task = data.load("mnist", seed=0)
    x, y = task.validation.x[:256], task.validation.y[:256]
    index, workers = _worker_index_and_count()
    shard = tf.data.Dataset.from_tensor_slices(
        x[index * 256 // workers : (index + 1) * 256 // workers]
    ).batch(64)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    with strategy.scope():
        model = models.build("mnist", seed=0)
        collected = stats.collect(model, x, batch_size=64)
        from_shards = stats.collect(model, shard.with_options(options))
        order = np.argsort(collected["conv2"].mean, kind="stable")
        curve = curves.pruning_curve(model, "conv2", order, (x, y))
        # The defenses' callbacks: under multi_worker they run in training.fit's custom loop.
        pruning = defenses.GradualChannelPruning(
            "conv2", order, lambda step: (int(step) == PRUNE_STEP, 0.25)
        )
        stopping = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=5, restore_best_weights=True
        )
        fitted = training.fit(
            model,
            task.train.x[:1024],
            task.train.y[:1024],
            epochs=2,
            batch_size=64,
            learning_rate=1e-3,
            seed=0,
            validation=(x, y),
            callbacks=[stopping, pruning],
        )
        accuracy = float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))
        mask = model.get_layer("conv2").mask
    result = {
        "replicas": strategy.num_replicas_in_sync,
        "means": {k: v.mean.tolist() for k, v in collected.items()},
        "counts": {k: v.count for k, v in collected.items()},
        "shard_means": {k: v.mean.tolist() for k, v in from_shards.items()},
        "shard_counts": {k: v.count for k, v in from_shards.items()},
        "curve": curve.clean_acc.tolist(),
        "accuracy": accuracy,
        "history": {k: [float(v) for v in values] for k, values in fitted["history"].items()},
        "pruned": pruning.pruned_count,
        "mask": mask.tolist(),
        "train_seconds": fitted["seconds"],
        "seconds": time.perf_counter() - start,
    }
    with open(output, "w") as stream:
        json.dump(result, stream)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
