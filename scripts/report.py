"""Renders the README's results tables from run directories (``fineprune_tf.leaderboard_readme``).

    python -m scripts.report RUN_DIR [RUN_DIR ...] [--summary=results/readme_summary.json]
    python -m scripts.report --from_summary=results/readme_summary.json
    python -m scripts.report RUN_DIR ... --summary=results/readme_summary.json --update_readme
    python -m scripts.report RUN_DIR ... --from_summary=results/readme_summary.json \
        --summary=results/readme_summary.json --update_readme   # add runs to the summary

Each RUN_DIR holds a ``results.json`` (``scripts.fine_prune``; several seeds of a task give
mean ± sd) or a ``leaderboard.json`` (``scripts.leaderboard``).  The markdown goes to stdout;
``--summary`` also writes the summary it was rendered from (the checked-in file the README
test compares with), ``--update_readme`` replaces the README's marked section with it.
RUN_DIRs given with ``--from_summary`` are merged into that summary
(``leaderboard_readme.merge``: a run replaces the entry of the same task or directory name).
Each section names the machine its numbers came from (``fineprune_tf.machine``).
"""

from __future__ import annotations

import json
import pathlib
import sys

from scripts import _quiet

_quiet.quiet_tensorflow()  # before anything imports TensorFlow (fineprune_tf does)

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("summary", None, "Write the summary JSON here.")
flags.DEFINE_string("from_summary", None, "Render this summary (with any RUN_DIRs merged into it).")
flags.DEFINE_bool("update_readme", False, "Replace the README's results section.")

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def main(argv: list[str]) -> int:
    from fineprune_tf import leaderboard_readme, reporting

    run_dirs = argv[1:]
    if not run_dirs and not FLAGS.from_summary:
        print("error: give RUN_DIR... and/or --from_summary", file=sys.stderr)
        return 2
    try:
        summary = leaderboard_readme.collect(run_dirs)
        if FLAGS.from_summary:
            stored = json.loads(pathlib.Path(FLAGS.from_summary).read_text())
            summary = leaderboard_readme.merge(stored, summary)
        markdown = leaderboard_readme.render(summary)
    except (OSError, ValueError, KeyError) as error:
        print(f"error: cannot read the runs: {error!r}", file=sys.stderr)
        return 2
    if FLAGS.summary:
        reporting.atomic_write_json(FLAGS.summary, summary)
    if FLAGS.update_readme:
        text = README.read_text()
        try:
            leaderboard_readme.readme_section(text)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        head, rest = text.split(leaderboard_readme.BEGIN, 1)
        tail = rest.split(leaderboard_readme.END, 1)[1]
        reporting.atomic_write_text(
            README,
            f"{head}{leaderboard_readme.BEGIN}\n\n{markdown}\n{leaderboard_readme.END}{tail}",
        )
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    app.run(main)
