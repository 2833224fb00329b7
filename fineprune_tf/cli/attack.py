"""Trains and saves a backdoored model with its trigger and data split.

    fineprune attack --task=speech --attack=baseline --output_dir=runs/speech_attack
    fineprune attack --task=mnist --attack=wanet --poison_rate=0.05 --output_dir=D
    python -m scripts.attack ...                                   (from a checkout)

``--attack``: ``baseline`` / ``pruning_aware`` (the paper's trigger and policy for the task,
trained plainly or with the pruning-aware attack of §3.2) or one of the field's attacks from
``fineprune_tf.attack_zoo`` (``badnets``, ``blended``, ``sig``, ``wanet``). ``--poison_rate``
sets the poisoned copies as a fraction of the training split for every attack (default: the
paper's count for baseline / pruning_aware, 10 % for the others). Writes model.keras,
trigger.json and attack.json (task, data source and seed, which determine the split; the
label policy; the poisoning; clean accuracy and ASR on the test split; the attack's report).
"""

from __future__ import annotations

import pathlib
import sys

from absl import flags, logging

from fineprune_tf.attacks import AttackSettings
from fineprune_tf.cli.flags import define_data_and_strategy_flags, define_flags, from_flags, run_app

FLAGS = flags.FLAGS
TRAINING_ATTACKS = ["baseline", "pruning_aware"]
ZOO_ATTACKS = ["badnets", "blended", "sig", "wanet"]  # fineprune_tf.attack_zoo.NAMES
flags.DEFINE_enum("task", "speech", ["face", "speech", "traffic", "mnist"], "Task.")
flags.DEFINE_enum("attack", "baseline", TRAINING_ATTACKS + ZOO_ATTACKS, "Attack to run.")
flags.DEFINE_float(
    "poison_rate",
    None,
    "Poisoned copies as a fraction of the training split, e.g. 0.01, 0.05, 0.1 "
    "(default: the paper's count for baseline/pruning_aware, 0.1 otherwise).",
)
flags.DEFINE_string("output_dir", None, "Where to write the model (required).")
flags.DEFINE_bool("overwrite", False, "Replace an existing model in --output_dir.")
define_data_and_strategy_flags()
flags.DEFINE_integer("seed", 0, "Seed for the split, the poisoning and training.")
flags.mark_flag_as_required("output_dir")
#: Every AttackSettings field is a flag (--preset, --epochs, --learning_rate, --prune_fraction,
#: ...); the seed is --seed and the verbosity follows absl's --verbosity.
SETTINGS_FLAGS = dict(
    skip=("seed", "verbose"), names={"holdout_fraction": "attack_holdout_fraction"}
)
define_flags(AttackSettings, **SETTINGS_FLAGS)


def _poisoning(task_data):
    """``(trigger, policy, count, poisoning dict or None)`` for the flags."""
    from fineprune_tf import attack_zoo, poison

    if FLAGS.attack in ZOO_ATTACKS:
        rate = 0.1 if FLAGS.poison_rate is None else FLAGS.poison_rate
        made = attack_zoo.make(FLAGS.attack, task_data, rate, seed=FLAGS.seed)
        return made.trigger, made.policy, made.count, made.to_dict()
    trigger, policy, count = poison.default_attack(FLAGS.task, task_data)
    if FLAGS.poison_rate is not None:
        made = attack_zoo.make("badnets", task_data, FLAGS.poison_rate, seed=FLAGS.seed)
        return made.trigger, made.policy, made.count, made.to_dict()
    return trigger, policy, count, None


def main(argv: list[str]) -> int:
    del argv
    from fineprune_tf import attacks, data, experiment, poison, reporting, triggers

    output_dir = pathlib.Path(FLAGS.output_dir)
    model_path = output_dir / "model.keras"
    if model_path.exists() and not FLAGS.overwrite:
        print(f"error: {model_path} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if FLAGS.poison_rate is not None and not 0.0 < FLAGS.poison_rate <= 1.0:
        print(f"error: --poison_rate must be in (0, 1], got {FLAGS.poison_rate}", file=sys.stderr)
        return 2
    try:
        settings = from_flags(
            AttackSettings,
            **SETTINGS_FLAGS,
            seed=FLAGS.seed,
            verbose=2 if FLAGS.verbosity >= 1 else 1,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.INFO if FLAGS.verbosity >= 0 else logging.WARNING)
    from fineprune_tf import distribute

    strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.cpu_replicas)
    task_data = data.load(FLAGS.task, source=FLAGS.source, data_dir=FLAGS.data_dir, seed=FLAGS.seed)
    try:
        trigger, policy, count, poisoning = _poisoning(task_data)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    attack_fn = attacks.pruning_aware if FLAGS.attack == "pruning_aware" else attacks.baseline
    with strategy.scope():
        result = attack_fn(task_data, trigger, policy, count, settings=settings)
    output_dir.mkdir(parents=True, exist_ok=True)
    experiment.save_model(result.model, model_path)
    triggers.save(trigger, output_dir / "trigger.json")
    reporting.atomic_write_json(
        output_dir / "attack.json",
        {
            "fineprune_tf": "attack",
            "task": FLAGS.task,
            "attack": FLAGS.attack,
            "source": FLAGS.source,
            "data_dir": FLAGS.data_dir,
            "seed": FLAGS.seed,
            "preset": settings.preset,
            "policy": poison.policy_to_dict(policy),
            "poisoned_count": count,
            "poison_rate": FLAGS.poison_rate,
            "poisoning": poisoning,
            "clean_acc": result.clean_acc,
            "asr": result.asr,
            "seconds": result.seconds,
            "report": result.report,
        },
    )
    print(
        f"{FLAGS.attack} attack on {FLAGS.task}: clean accuracy {result.clean_acc:.3f}, "
        f"attack success rate {result.asr:.3f}, {result.seconds:.1f} s -> {output_dir}"
    )
    return 0


def run(argv: list[str]) -> None:
    """Parses ``argv`` (``argv[0]`` is the program name) and runs; exits with the status."""
    run_app(main, argv, __name__)
