"""Mutation check: deliberate breakages of the package, each of which the fast tests must catch.

    python -m scripts.mutants [--only=NAME,...] [--list]

For every mutant of :data:`MUTANTS` this runs its test selection in a fresh ``pytest`` process
with the breakage installed, and reports whether the tests failed ("killed") or passed
("survived").  Exits 1 if any mutant survives, 2 if one could not be installed or its tests
could not run (an error is not a kill: only failing tests count).

How a breakage is installed: this module is also a pytest plugin (``-p scripts.mutants``).
When ``FINEPRUNE_MUTANT`` names a mutant, its ``pytest_configure`` hook replaces the attribute at
the mutant's dotted ``target`` (a module attribute, or a class attribute as in
``module.Class.method``) with ``replacement(original)`` before any test module is imported, so
``from fineprune_tf.x import f`` in a test sees the mutant too.  Everything goes through the
package's public seams; to repoint a mutant after code moves, edit its ``target`` in the table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "FINEPRUNE_MUTANT"
REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One deliberate breakage.

    Attributes:
      name: short name, also the value of ``FINEPRUNE_MUTANT``.
      target: dotted path of the replaced attribute, e.g. ``fineprune_tf.export.shrink``.
      replacement: ``original -> broken`` (gets the original attribute, returns its stand-in).
      tests: pytest arguments selecting the tests that must catch it (node ids).
      what: the breakage in words.
    """

    name: str
    target: str
    replacement: Callable[[Any], Any]
    tests: tuple[str, ...]
    what: str


# ----------------------------------------------------------------------------- replacements


def _prune_nothing(original):
    def prune(self, channels) -> None:
        del self, channels

    return prune


def _zero_statistics(original):
    import numpy as np

    from fineprune_tf.stats import ChannelStats

    def collect(*args, **kwargs):
        return {
            name: ChannelStats(
                np.zeros_like(s.mean),
                np.zeros_like(s.std),
                np.zeros_like(s.dormant_fraction),
                s.count,
            )
            for name, s in original(*args, **kwargs).items()
        }

    return collect


def _find_nothing(original):
    def inspect(*args, **kwargs):
        return []

    return inspect


def _return_input(original):
    def shrink(model, *args, **kwargs):
        return model

    return shrink


def _train_zero_epochs(original):
    def fit(model, x, y, **kwargs):
        return {"history": {}, "seconds": 0.0, "epochs": 0}

    return fit


def _ignore_the_mask(original):
    """Every step of the curve reports the starting model, as an engine that never applied
    the pruned channels' mask would."""
    import dataclasses as dc

    import numpy as np

    def flat(values):
        return None if values is None else np.repeat(values[:1], len(values), axis=0)

    def pruning_curve(*args, **kwargs):
        curve = original(*args, **kwargs)
        return dc.replace(
            curve,
            clean_acc=flat(curve.clean_acc),
            asr=flat(curve.asr),
            robust_acc=flat(curve.robust_acc),
            predictions_clean=flat(curve.predictions_clean),
            predictions_backdoor=flat(curve.predictions_backdoor),
        )

    return pruning_curve


def _keep_old_results(original):
    def current(self, name, inputs):
        return (self.done.get(name) or {}).get("result")

    return current


# ----------------------------------------------------------------------------- the table

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "prune-does-nothing",
        "fineprune_tf.layers.MaskedLayerMixin.prune",
        _prune_nothing,
        (
            "tests/test_layers.py::test_pruned_channels_output_exactly_zero_even_with_bias",
            "tests/test_defenses.py::test_pruning_removes_the_dormant_backdoor_neuron_first",
        ),
        "pruning a channel leaves its mask at 1",
    ),
    Mutant(
        "stats-are-zeros",
        "fineprune_tf.stats.collect",
        _zero_statistics,
        ("tests/test_layers.py::test_stats_collect_equals_numpy_over_several_batches",),
        "activation statistics come back as zeros",
    ),
    Mutant(
        "loader-skips-savedmodel-inspection",
        "fineprune_tf.io.loader.inspect_saved_model_proto",
        _find_nothing,
        ("tests/test_io.py::test_hostile_saved_model_is_refused_with_every_op_listed",),
        "a SavedModel's graph is not inspected before loading",
    ),
    Mutant(
        "loader-skips-keras-inspection",
        "fineprune_tf.io.loader.inspect_keras_config",
        _find_nothing,
        ("tests/test_io.py::test_unregistered_custom_object_is_refused_by_name",),
        "a .keras file's config is not inspected before loading",
    ),
    Mutant(
        "shrink-returns-its-input",
        "fineprune_tf.export.shrink",
        _return_input,
        ("tests/test_export.py::test_shrink_task_models_same_predictions_fewer_params",),
        "shrink removes nothing",
    ),
    Mutant(
        "fine-tuning-trains-0-epochs",
        "fineprune_tf.training.fit",
        _train_zero_epochs,
        ("tests/test_defenses.py::test_fine_tuning_holds_masks_and_leaves_the_input_model_alone",),
        "fine-tuning returns without a training step",
    ),
    Mutant(
        "curve-ignores-the-mask",
        "fineprune_tf.curves.pruning_curve",
        _ignore_the_mask,
        ("tests/test_curves.py::test_matches_naive_on_task_models",),
        "the fast pruning curve never applies the pruned channels",
    ),
    Mutant(
        "redone-stage-keeps-old-results",
        "fineprune_tf.experiment.StageStore.current",
        _keep_old_results,
        ("tests/test_resume.py::test_a_redone_attack_invalidates_its_analysis_and_defenses",),
        "a stage is reused although a stage it depends on was redone",
    ),
)

BY_NAME = {mutant.name: mutant for mutant in MUTANTS}


def resolve(target: str) -> tuple[Any, str]:
    """``(owner, attribute)`` for a dotted path: the longest importable module prefix, then
    attribute lookups (so ``pkg.module.Class.method`` works).  Raises LookupError naming the
    path if it does not exist (a moved target must fail loudly, not survive)."""
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:-1]:
            owner = getattr(owner, name, None)
            if owner is None:
                break
        if owner is not None and hasattr(owner, parts[-1]):
            return owner, parts[-1]
    raise LookupError(f"mutant target {target} does not exist: repoint it in scripts/mutants.py")


# ----------------------------------------------------------------------------- pytest plugin


def pytest_configure(config) -> None:
    name = os.environ.get(ENV)
    if not name:
        return
    if name not in BY_NAME:
        raise LookupError(f"{ENV}={name!r} is not a mutant; known: {sorted(BY_NAME)}")
    mutant = BY_NAME[name]
    owner, attribute = resolve(mutant.target)
    setattr(owner, attribute, mutant.replacement(getattr(owner, attribute)))


def pytest_report_header(config) -> str | None:
    name = os.environ.get(ENV)
    return f"mutant installed: {name} at {BY_NAME[name].target}" if name else None


# ----------------------------------------------------------------------------- runner


def run_mutant(mutant: Mutant, timeout: float = 900.0) -> tuple[str, float, str]:
    """Runs the mutant's tests with it installed: ``(verdict, seconds, output tail)``, verdict
    ``killed`` (tests failed), ``survived`` (tests passed) or ``error`` (anything else)."""
    env = {
        **os.environ,
        ENV: mutant.name,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "scripts.mutants",
        "-p",
        "no:cacheprovider",
        *mutant.tests,
    ]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return "error", time.perf_counter() - start, f"timed out after {timeout:.0f}s"
    seconds = time.perf_counter() - start
    output = (done.stdout + done.stderr)[-3000:]
    verdict = {0: "survived", 1: "killed"}.get(done.returncode, "error")
    return verdict, seconds, output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.mutants", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--only", default="", help="comma-separated mutant names")
    parser.add_argument("--list", action="store_true", help="print the table and exit")
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="mutants run at once (each in its own pytest process; most of a process's time "
        "is its single-threaded start-up and tracing, so 2 fill 2 cores)",
    )
    args = parser.parse_args(argv)
    if args.list:
        for mutant in MUTANTS:
            print(f"{mutant.name:36s} {mutant.target}\n{'':36s} {' '.join(mutant.tests)}")
        return 0
    selected = [name for name in args.only.split(",") if name]
    unknown = [name for name in selected if name not in BY_NAME]
    if unknown:
        print(f"error: unknown mutant(s) {unknown}; known: {', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"error: --jobs must be >= 1. Received: {args.jobs}", file=sys.stderr)
        return 2
    mutants = [BY_NAME[name] for name in selected] or list(MUTANTS)
    counts = {"killed": 0, "survived": 0, "error": 0}
    start = time.perf_counter()
    # Each mutant lives in its own process (the plugin installs it at start-up), so running
    # several at once cannot mix them; results print in the table's order.
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        outcomes = list(pool.map(run_mutant, mutants))
    for mutant, (verdict, seconds, output) in zip(mutants, outcomes, strict=True):
        counts[verdict] += 1
        print(
            f"{verdict.upper():8s} {mutant.name:36s} {seconds:6.1f} s  ({mutant.what}; "
            f"{mutant.target})",
            flush=True,
        )
        if verdict != "killed":
            print(output, flush=True)
    print(
        f"{counts['killed']}/{len(mutants)} mutants killed, {counts['survived']} survived, "
        f"{counts['error']} errors in {time.perf_counter() - start:.0f} s"
    )
    return 0 if counts["killed"] == len(mutants) else (1 if counts["survived"] else 2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
