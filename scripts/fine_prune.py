"""Fine-pruning from one command: the paper's experiment on a task, or your own model.

    python -m scripts.fine_prune --task=speech [--output_dir=runs/speech] [--quick]

trains the baseline and the pruning-aware backdoored models, runs every defense on each and
writes results.json, table1.md, table2.md, fig6_<attack>.png, fig4_<attack>.png, the cleaned
models (models/*.keras) and run.log into --output_dir.

    python -m scripts.fine_prune --model=PATH --clean_data=PATH [--layer=NAME]
        [--backdoor_data=PATH] [--output_dir=D]

cleans your own model (.keras, or a SavedModel holding model.keras) with your clean data (an
.npz with x and y, or a folder of images per class): writes pruned.keras, fine_pruned.keras, a
stock-TensorFlow SavedModel (saved_model/), report.json, report.md and figures.  The model
and data are treated as hostile (see SECURITY.md); a refused or broken input gives one
"error: ..." line and exit status 2 (add --verbosity=1 for the Python traceback).
"""

from __future__ import annotations

import logging as std_logging
import os
import pathlib
import signal
import sys
import time
import traceback

from scripts import _quiet

_quiet.quiet_tensorflow()  # before anything imports TensorFlow

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("task", "speech", ["face", "speech", "traffic", "mnist"], "Task to run.")
flags.DEFINE_string("output_dir", None, "Output directory (default: runs/<task>).")
flags.DEFINE_bool("overwrite", False, "Replace another run's results in --output_dir.")
flags.DEFINE_bool("resume", False, "Continue an interrupted run from its last finished stage.")
flags.DEFINE_bool("quick", False, "Smoke run: few epochs (under two minutes).")
flags.DEFINE_list("attacks", ["baseline", "pruning_aware"], "Attacks to run.")
flags.DEFINE_list("defenses", ["none", "pruning", "fine_tuning", "fine_pruning", "fmp"],
                  "Defenses to run against each attack: any of none, pruning, fine_tuning, "
                  "fine_pruning, fmp, anp, rnp, clp.")
flags.DEFINE_float("threshold", 4.0, "Pruning stops at this clean-accuracy drop (points).")
flags.DEFINE_integer("epochs", None, "Attack training epochs (default: per task).")
flags.DEFINE_float("learning_rate", None, "Attack learning rate (default: per task).")
flags.DEFINE_integer("batch_size", None, "Attack batch size (default: per task).")
flags.DEFINE_float("prune_fraction", 0.75, "Pruning-aware attack: channels pruned in step 2.")
flags.DEFINE_float("fine_tune_learning_rate", 1e-3, "Fine-tuning learning rate (Adam).")
flags.DEFINE_integer("fine_tune_epochs", 30, "Fine-tuning epoch cap (early stopping).")
flags.DEFINE_float("noise_stddev", 0.0,
                   "Relative Gaussian weight noise before fine-tuning (paper §4).")
flags.DEFINE_float("fmp_fraction", None,
                   "FMP: fraction of channels pruned per conv layer (default: 1/64, as published).")
flags.DEFINE_float("fmp_epsilon", None,
                   "FMP: FGSM step as a fraction of the data's range (default: 8/255).")
flags.DEFINE_enum("preset", "cpu", ["cpu", "paper"], "Network size preset.")
flags.DEFINE_string("source", "default", "Data source (see fineprune_tf.data.load).")
flags.DEFINE_string("data_dir", None, "Data directory for a non-default source.")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                  "tf.distribute strategy (multi_worker reads TF_CONFIG).")
flags.DEFINE_integer("cpu_replicas", 0, "Split the CPU into this many replicas (mirrored).")
flags.DEFINE_integer("seed", 0, "Seed for data splits, poisoning and training.")
flags.DEFINE_enum("engine", "fast", ["fast", "naive"], "Pruning-curve engine.")
flags.DEFINE_string("model", None, "Your model to clean (.keras or SavedModel directory).")
flags.DEFINE_string("clean_data", None, "Your clean data: .npz (x, y) or image folder per class.")
flags.DEFINE_string("backdoor_data", None, "Optional triggered inputs (.npz: x, y[, y_attacker]).")
flags.DEFINE_string("layer", None, "Conv layer to prune (default: the last conv layer).")
flags.DEFINE_float("eval_fraction", 0.2, "Share of --clean_data held out for the report.")
flags.DEFINE_bool("allow_unsafe", False, "Load models with code-carrying layers (trusted only).")
flags.DEFINE_float("load_timeout", 300.0, "--model: seconds the bounded trial load may take.")
flags.DEFINE_integer("load_memory_mb", 8192, "--model: memory limit of the trial load, MiB.")
flags.DEFINE_integer("max_weights_mb", 4096, "--model: largest weights file accepted, MiB.")
flags.DEFINE_integer("max_data_mb", 8192, "--clean_data/--backdoor_data: largest decoded "
                     "data accepted, MiB.")


def clean_own_model() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not FLAGS.clean_data:
        print("error: --model needs --clean_data", file=sys.stderr)
        return 2
    try:
        from fineprune_tf import cleaning, defenses, io
        from fineprune_tf.data.user import DataLimits

        settings = defenses.FineTuneSettings(
            learning_rate=FLAGS.fine_tune_learning_rate, max_epochs=FLAGS.fine_tune_epochs,
            noise_stddev=FLAGS.noise_stddev, seed=FLAGS.seed)
        load_limits = io.LoadLimits(seconds=FLAGS.load_timeout,
                                    memory_bytes=FLAGS.load_memory_mb << 20,
                                    weights_bytes=FLAGS.max_weights_mb << 20)
        report = cleaning.clean_model(
            FLAGS.model, FLAGS.clean_data, FLAGS.output_dir or "cleaned", layer=FLAGS.layer,
            backdoor_data=FLAGS.backdoor_data, threshold=FLAGS.threshold, settings=settings,
            eval_fraction=FLAGS.eval_fraction, allow_unsafe=FLAGS.allow_unsafe,
            overwrite=FLAGS.overwrite, seed=FLAGS.seed, progress=print,
            load_limits=load_limits, data_limits=DataLimits(max_bytes=FLAGS.max_data_mb << 20))
    except Exception as error:  # noqa: BLE001  (bad input: one line, not a traceback)
        return _report_error(error)
    print(pathlib.Path(FLAGS.output_dir or "cleaned", "report.md").read_text())
    print(f"Total time: {report['seconds']:.1f} s")
    return 0


def _report_error(error: Exception) -> int:
    """One ``error: ...`` line on stderr (the traceback too with --verbosity>=1); exit 2 for
    a refused or unreadable input, 1 for an internal failure."""
    from fineprune_tf import cleaning

    expected = isinstance(error, (ValueError, OSError, MemoryError))
    if FLAGS.verbosity >= 1:
        traceback.print_exception(error)
    line = cleaning.one_line_error(error)
    if not expected:
        line = (f"internal error ({type(error).__name__}): {line} (run with --verbosity=1 for "
                "the traceback)")
    print(f"error: {line}", file=sys.stderr)
    return 2 if expected else 1


def _exit_on_sigterm(signum, frame) -> None:
    # SystemExit unwinds like an exception, so half-written temporary files are removed;
    # finished stages are already on disk and --resume continues from them.
    del frame
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    del argv
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if FLAGS.model:
        return clean_own_model()
    from fineprune_tf import experiment

    output_dir = pathlib.Path(FLAGS.output_dir or f"runs/{FLAGS.task}")
    config = experiment.ExperimentConfig(
        task=FLAGS.task, source=FLAGS.source, data_dir=FLAGS.data_dir, seed=FLAGS.seed,
        preset=FLAGS.preset, attacks=tuple(FLAGS.attacks), defenses=tuple(FLAGS.defenses),
        threshold=FLAGS.threshold, epochs=FLAGS.epochs, learning_rate=FLAGS.learning_rate,
        batch_size=FLAGS.batch_size, prune_fraction=FLAGS.prune_fraction,
        fine_tune_learning_rate=FLAGS.fine_tune_learning_rate,
        fine_tune_epochs=FLAGS.fine_tune_epochs, noise_stddev=FLAGS.noise_stddev,
        engine=FLAGS.engine, quick=FLAGS.quick,
        **{name: value for name, value in (("fmp_fraction", FLAGS.fmp_fraction),
                                           ("fmp_epsilon", FLAGS.fmp_epsilon))
           if value is not None})
    try:
        config.validate()
        experiment.prepare_output_dir(output_dir, FLAGS.overwrite, FLAGS.resume)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    handler = std_logging.FileHandler(output_dir / "run.log")
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(message)s"))
    std_logging.getLogger("absl").addHandler(handler)
    logging.set_verbosity(logging.INFO)
    from fineprune_tf import distribute

    strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.cpu_replicas)
    start = time.perf_counter()
    with strategy.scope():
        results = experiment.run(config, output_dir, overwrite=False,
                                 resume=FLAGS.resume, progress=print)
    print((output_dir / "table1.md").read_text())
    print((output_dir / "table2.md").read_text())
    print(f"Total time: {time.perf_counter() - start:.1f} s "
          f"(experiment {results['total_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    app.run(main)
