"""Performance benchmarks of fineprune_tf, measured side by side in one run.

  (a) the full per-channel pruning curve: ``curves.pruning_curve`` vs the naive loop
      (``curves.naive_pruning_curve``: set the mask, ``model.predict``, per channel) on the
      speech and face models, against one plain forward pass and an arithmetic lower bound;
  (b) the fused op ``ops.masked_activation`` vs a best-effort TensorFlow composite, with the
      library's own pure-TF fallback alongside, forward and backward;
  (c) a training step of a MaskedConv2D/MaskedDense model vs the same model with plain
      Conv2D/Dense layers and the same weights;
  (d) a statistics pass (``stats.collect``) vs a plain inference pass over the same data;
  (e) a shrunk model (``export.shrink``) vs the masked one: parameters, multiply-adds and
      inference time;
  (f) the peak resident memory of each stage of one face experiment (a child process).

One module per section in ``fineprune_tf/benchmarks/``; ``fineprune_tf/benchmarks/report.py`` writes
``BENCHMARKS.md`` and ``benchmarks.json`` to ``--output_dir`` (default: the current directory).
With ``--merge`` the sections run now replace theirs in the files already there, and the
files record which run (machine, date, mode) each section came from.

  fineprune benchmark                               # full run
  fineprune benchmark --quick                       # CI smoke run
  fineprune benchmark --sections=b,e --merge
  python -m scripts.benchmark ...                   (from a checkout)
"""

from __future__ import annotations

import datetime
import os
import pathlib
import sys
import time

from absl import flags, logging

from fineprune_tf.cli.flags import run_app

FLAGS = flags.FLAGS
flags.DEFINE_bool(
    "quick",
    False,
    "CI mode: fewer repeats, smaller sizes, the naive loop timed "
    "on a prefix of the order and scaled.",
)
flags.DEFINE_string("output_dir", ".", "Where BENCHMARKS.md and benchmarks.json go.")
flags.DEFINE_integer(
    "repeats", None, "Timed runs per measurement, median reported (default 5; 3 with --quick)."
)
flags.DEFINE_list(
    "sections",
    None,
    "Sections to run (default: all): a (pruning curve), b "
    "(fused op), c (training step), d (statistics pass), e (shrunk model), f "
    "(peak memory per experiment stage), and any optional section present.",
)
flags.DEFINE_bool(
    "merge",
    False,
    "Replace only the sections run now in the files already in "
    "--output_dir, keeping the others and the record of their runs.",
)
flags.DEFINE_integer(
    "train_epochs",
    None,
    "Epochs of backdoor training of the section (a) "
    "models before their curve (default: the task's models.default_training "
    "epochs; 2 with --quick; 0 = random initialisation).",
)


def _options(key: str, quick: bool) -> dict:
    if key == "a":
        return {
            "epochs": FLAGS.train_epochs
            if FLAGS.train_epochs is not None
            else (2 if quick else None)
        }
    return {}


def main(argv: list[str]) -> int:
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from fineprune_tf import benchmarks, machine
    from fineprune_tf.benchmarks import report

    available = benchmarks.available()
    keys = [s.strip().lower() for s in FLAGS.sections] if FLAGS.sections else list(available)
    unknown = sorted(set(keys) - set(available))
    if unknown:
        print(
            f"error: unknown sections {unknown}; available: {', '.join(available)}", file=sys.stderr
        )
        return 2
    if FLAGS.repeats is not None and FLAGS.repeats < 1:
        print(f"error: --repeats must be >= 1, got {FLAGS.repeats}", file=sys.stderr)
        return 2
    quick = FLAGS.quick
    repeats = FLAGS.repeats or (3 if quick else 5)
    output_dir = pathlib.Path(FLAGS.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        if FLAGS.merge:
            report.read(output_dir)  # refuse an unreadable file before hours of measuring
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    run_id = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    run = {
        "machine": machine.describe(),
        "quick": quick,
        "repeats": repeats,
        "load_start": machine.load(),
        "sections": keys,
    }
    print(
        f"fineprune_tf benchmarks ({'quick' if quick else 'full'}), repeats={repeats}, "
        f"{run['machine']['cores']} cores ({run['machine']['cpu']}), op backend="
        f"{run['machine']['op_backend']}, load {run['load_start']}",
        flush=True,
    )
    results = {}
    for key in keys:
        tic = time.perf_counter()
        results[key] = benchmarks.load(key).measure(quick, repeats, **_options(key, quick))
        print(f"    ({key}) [{time.perf_counter() - tic:.0f} s]", flush=True)
    run["load_end"] = machine.load()
    run["seconds"] = time.perf_counter() - start
    doc = report.write(output_dir, run_id, run, results, merge=FLAGS.merge)
    print(
        f"wrote {output_dir / report.MARKDOWN_NAME} and {report.JSON_NAME} [{run['seconds']:.0f} s]"
    )
    logging.info("summary: %s", doc["summary"])
    return 0


def run(argv: list[str]) -> None:
    """Parses ``argv`` (``argv[0]`` is the program name) and runs; exits with the status."""
    run_app(main, argv, __name__)
