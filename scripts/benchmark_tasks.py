"""Per task: training speed of the cpu preset and the baseline backdoored model it yields.

    python -m scripts.benchmark_tasks [--tasks=face,speech,traffic,mnist] [--epochs=N]

Prints, per task, training examples/s, epochs and seconds to train the backdoored model, its
clean accuracy and attack success rate, against the targets (at most 3 minutes on 2 cores; ASR
at least 0.9 on the targeted tasks), and writes the rows as JSON with --output.
"""

from __future__ import annotations

import json
import sys
import time

from scripts import _quiet

_quiet.quiet_tensorflow()  # before anything imports TensorFlow

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("tasks", ["face", "speech", "traffic", "mnist"], "Tasks to measure.")
flags.DEFINE_integer("epochs", None, "Override the per-task epochs (e.g. 1 for a smoke run).")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_string("output", None, "Write the rows as JSON here.")

TIME_LIMIT_SECONDS = 180.0
TARGETED_ASR = 0.9


def main(argv: list[str]) -> int:
    del argv
    from fineprune_tf import attacks, data

    rows = []
    for task in FLAGS.tasks:
        if task not in data.TASKS:
            print(f"error: unknown task {task!r}; expected some of {data.TASKS}", file=sys.stderr)
            return 2
        load_start = time.perf_counter()
        task_data = data.load(task, seed=FLAGS.seed)
        load_seconds = time.perf_counter() - load_start
        settings = attacks.AttackSettings(epochs=FLAGS.epochs, seed=FLAGS.seed)
        result = attacks.baseline(task_data, settings=settings)
        report = result.report
        # The attacker trains on 90% of the split (10% is her holdout) plus the poison.
        examples = report["poisoned_examples"] + round(len(task_data.train.x) * 0.9)
        targeted = result.policy.targeted
        row = {
            "task": task,
            "load_seconds": load_seconds,
            "epochs": report["epochs"],
            "train_seconds": report["train_seconds"],
            "attack_seconds": result.seconds,
            "examples_per_second": examples * report["epochs"] / report["train_seconds"],
            "clean_acc": result.clean_acc,
            "asr": result.asr,
            "targeted": targeted,
            "within_time": result.seconds <= TIME_LIMIT_SECONDS,
            "asr_target_met": (result.asr >= TARGETED_ASR) if targeted else None,
        }
        rows.append(row)
        print(
            f"{task:8s} {row['examples_per_second']:7.0f} examples/s  {row['epochs']:3d} "
            f"epochs  {row['train_seconds']:6.1f} s training ({row['attack_seconds']:.1f} s "
            f"attack)  clean {row['clean_acc']:.3f}  ASR {row['asr']:.3f} "
            f"({'targeted' if targeted else 'untargeted'})  "
            f"time<=3min: {'yes' if row['within_time'] else 'NO'}"
            + ("" if not targeted else f"  ASR>=0.9: {'yes' if row['asr_target_met'] else 'NO'}"),
            flush=True,
        )
    if FLAGS.output:
        with open(FLAGS.output, "w") as stream:
            json.dump(rows, stream, indent=2)
    return 0


if __name__ == "__main__":
    app.run(main)
