"""Trains and saves a backdoored model with its trigger and data split.

    python -m scripts.attack --task=speech --attack=baseline --output_dir=runs/speech_attack

Writes model.keras, trigger.json and attack.json (task, data source and seed, which determine
the split; the label policy; clean accuracy and ASR on the test split; the attack's report).
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_enum("task", "speech", ["face", "speech", "traffic", "mnist"], "Task.")
flags.DEFINE_enum("attack", "baseline", ["baseline", "pruning_aware"], "Attack to run.")
flags.DEFINE_string("output_dir", None, "Where to write the model (required).")
flags.DEFINE_bool("overwrite", False, "Replace an existing model in --output_dir.")
flags.DEFINE_enum("preset", "cpu", ["cpu", "paper"], "Network size preset.")
flags.DEFINE_string("source", "default", "Data source (see fineprune_tf.data.load).")
flags.DEFINE_string("data_dir", None, "Data directory for a non-default source.")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                  "tf.distribute strategy (multi_worker reads TF_CONFIG).")
flags.DEFINE_integer("cpu_replicas", 0, "Split the CPU into this many replicas (mirrored).")
flags.DEFINE_integer("seed", 0, "Seed for the split, the poisoning and training.")
flags.DEFINE_integer("epochs", None, "Training epochs (default: per task).")
flags.DEFINE_float("learning_rate", None, "Learning rate (default: per task).")
flags.DEFINE_float("prune_fraction", 0.75, "Pruning-aware attack: channels pruned in step 2.")
flags.mark_flag_as_required("output_dir")


def main(argv: list[str]) -> int:
    del argv
    from fineprune_tf import attacks, data, experiment, poison, reporting, triggers

    output_dir = pathlib.Path(FLAGS.output_dir)
    model_path = output_dir / "model.keras"
    if model_path.exists() and not FLAGS.overwrite:
        print(f"error: {model_path} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.INFO)
    from fineprune_tf import distribute

    strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.cpu_replicas)
    task_data = data.load(FLAGS.task, source=FLAGS.source, data_dir=FLAGS.data_dir,
                          seed=FLAGS.seed)
    trigger, policy, count = poison.default_attack(FLAGS.task, task_data)
    settings = attacks.AttackSettings(preset=FLAGS.preset, epochs=FLAGS.epochs,
                                      learning_rate=FLAGS.learning_rate, seed=FLAGS.seed,
                                      prune_fraction=FLAGS.prune_fraction, verbose=2)
    attack_fn = attacks.baseline if FLAGS.attack == "baseline" else attacks.pruning_aware
    with strategy.scope():
        result = attack_fn(task_data, trigger, policy, count, settings=settings)
    output_dir.mkdir(parents=True, exist_ok=True)
    experiment.save_model(result.model, model_path)
    triggers.save(trigger, output_dir / "trigger.json")
    reporting.atomic_write_json(output_dir / "attack.json", {
        "fineprune_tf": "attack", "task": FLAGS.task, "attack": FLAGS.attack,
        "source": FLAGS.source, "data_dir": FLAGS.data_dir, "seed": FLAGS.seed,
        "preset": FLAGS.preset, "policy": poison.policy_to_dict(policy),
        "poisoned_count": count, "clean_acc": result.clean_acc, "asr": result.asr,
        "seconds": result.seconds, "report": result.report})
    print(f"{FLAGS.attack} attack on {FLAGS.task}: clean accuracy {result.clean_acc:.3f}, "
          f"attack success rate {result.asr:.3f}, {result.seconds:.1f} s -> {output_dir}")
    return 0


if __name__ == "__main__":
    app.run(main)
