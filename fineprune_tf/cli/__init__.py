"""The ``fineprune`` console command: one entry point, a subcommand per command-line app.

    fineprune fine-prune --task=speech          # = python -m scripts.fine_prune --task=speech
    fineprune clean --model=m.keras --clean_data=clean.npz --output_dir=out [--defense=auto]
    fineprune attack --task=mnist --attack=baseline --output_dir=runs/a
    fineprune benchmark --quick                 # the CI smoke run

Each subcommand is an absl app in this package (``fine_prune``, ``attack``, ``benchmark``);
``scripts/`` holds thin ``python -m`` shims of the same modules for a checkout, and
:mod:`.flags` generates flags from the settings dataclasses.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["SUBCOMMANDS", "main"]

#: subcommand -> (module in fineprune_tf.cli, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "fine-prune": ("fine_prune", "the paper's experiment on a task (--task=...)"),
    "clean": ("fine_prune", "clean your own model (--model=... --clean_data=... [--defense=...])"),
    "attack": ("attack", "train and save a backdoored model"),
    "benchmark": ("benchmark", "speed and memory benchmarks (BENCHMARKS.md)"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<11} {help_}" for name, (_, help_) in SUBCOMMANDS.items())
    return (
        f"usage: fineprune SUBCOMMAND [--flags]\n\nsubcommands:\n{rows}\n\n"
        "fineprune SUBCOMMAND --help lists a subcommand's flags."
    )


def main(argv: list[str] | None = None) -> int:
    """Dispatches ``argv`` (default ``sys.argv``; ``argv[0]`` is the program name).

    Returns 0 after ``--help``, 2 (usage on stderr) without a subcommand or with an unknown
    one; a subcommand runs as an absl app, which exits with its own status.
    """
    argv = list(sys.argv if argv is None else argv)
    if len(argv) >= 2 and argv[1] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if len(argv) < 2:
        print(usage(), file=sys.stderr)
        return 2
    name = argv[1]
    if name not in SUBCOMMANDS:
        print(
            f"fineprune: unknown subcommand {name!r}; expected one of "
            f"{', '.join(SUBCOMMANDS)}. Received: {argv[1:]}",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(f"fineprune_tf.cli.{SUBCOMMANDS[name][0]}")
    module.run([f"fineprune {name}", *argv[2:]])
    return 0
