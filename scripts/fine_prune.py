"""Fine-pruning from one command: the paper's experiment on a task, or your own model.

The command's body is :mod:`fineprune_tf.cli.fine_prune` (also ``fineprune fine-prune`` and
``fineprune clean``); this module keeps ``python -m scripts.fine_prune`` working from a
checkout.
"""

from __future__ import annotations

import sys

from scripts import _quiet

_quiet.quiet_tensorflow()  # before anything imports TensorFlow


from fineprune_tf.cli.fine_prune import run  # noqa: E402  (defines the flags)

if __name__ == "__main__":
    run(sys.argv)
