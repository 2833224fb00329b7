"""Trained models shared by the defense ablation and evaluation, cached on disk.

    python -m scripts.model_cache [--tasks=speech,traffic,mnist] [--seeds=0,1,2]
        [--kinds=baseline,pruning_aware,clean] [--cache_dir=runs/defense_cache]

One model per (task, kind, seed): ``baseline`` and ``pruning_aware`` are the attacks of
``fineprune_tf.attacks`` with the task's default poisoning; ``clean`` is the same network
trained honestly on the clean training split (to measure what a defense costs a model that was
never backdoored).  A cached ``.keras`` file is reused; training happens only when it is
missing.  The evaluation data (validation = the defender's clean data, test + its triggered
copy = report only) is rebuilt from the seed, which fixes the splits.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

from absl import app, flags

KINDS = ("baseline", "pruning_aware", "clean")


@dataclasses.dataclass
class TaskBundle:
    """One task's data for a seed: the defender's validation split and the report-only sets."""

    task: str
    seed: int
    validation: tuple
    test: tuple
    backdoor_test: object
    num_classes: int


def bundle(task: str, seed: int) -> TaskBundle:
    from fineprune_tf import data, poison

    task_data = data.load(task, seed=seed)
    trigger, policy, _ = poison.default_attack(task, task_data)
    backdoor_test = poison.backdoor_test_set(task_data.test, trigger, policy, seed=seed)
    return TaskBundle(
        task,
        seed,
        (task_data.validation.x, task_data.validation.y),
        (task_data.test.x, task_data.test.y),
        backdoor_test,
        task_data.num_classes,
    )


def _train(task: str, kind: str, seed: int):
    import keras

    from fineprune_tf import attacks, data, models, training

    keras.utils.set_random_seed(seed)
    task_data = data.load(task, seed=seed)
    settings = attacks.AttackSettings(seed=seed)
    if kind == "baseline":
        return attacks.baseline(task_data, settings=settings).model
    if kind == "pruning_aware":
        return attacks.pruning_aware(task_data, settings=settings).model
    recipe = models.default_training(task)
    model = models.build(
        task, num_classes=task_data.num_classes, input_shape=task_data.input_shape, seed=seed
    )
    training.fit(
        model,
        task_data.train.x,
        task_data.train.y,
        epochs=recipe["epochs"],
        batch_size=recipe["batch_size"],
        learning_rate=recipe["learning_rate"],
        optimizer=recipe["optimizer"],
        schedule=recipe["schedule"],
        seed=seed,
    )
    return model


def load_or_train(task: str, kind: str, seed: int, cache_dir: str | pathlib.Path, log=print):
    """The cached model for (task, kind, seed), training and saving it when missing."""
    import keras

    from fineprune_tf.experiment import save_model

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = pathlib.Path(cache_dir) / f"{task}_{kind}_{seed}.keras"
    if path.exists():
        return keras.models.load_model(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = _train(task, kind, seed)
    save_model(model, path)
    log(f"trained {path.name} in {time.perf_counter() - start:.1f} s")
    return model


FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a script: other scripts import this module for its functions.
    flags.DEFINE_list("tasks", ["speech", "traffic", "mnist"], "Tasks.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
    flags.DEFINE_list("kinds", list(KINDS), "Model kinds.")
    flags.DEFINE_string("cache_dir", "runs/defense_cache", "Cache directory.")


def main(argv: list[str]) -> int:
    del argv
    unknown = [kind for kind in FLAGS.kinds if kind not in KINDS]
    if unknown:
        print(f"error: unknown kinds {unknown}; expected some of {KINDS}", file=sys.stderr)
        return 2
    from fineprune_tf import metrics

    rows = []
    for seed in [int(s) for s in FLAGS.seeds]:
        for task in FLAGS.tasks:
            data_bundle = bundle(task, seed)
            for kind in FLAGS.kinds:
                if kind == "pruning_aware" and task != "speech":
                    continue
                model = load_or_train(task, kind, seed, FLAGS.cache_dir)
                measured = metrics.evaluate(model, data_bundle.test, data_bundle.backdoor_test)
                rows.append({"task": task, "kind": kind, "seed": seed, **measured})
                print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(main)
