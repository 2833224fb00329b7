"""Performance benchmarks of fineprune_tf (see :mod:`fineprune_tf.cli.benchmark`).

The command's body is :mod:`fineprune_tf.cli.benchmark` (also ``fineprune benchmark``); this
module keeps ``python -m scripts.benchmark`` working from a checkout.
"""

from __future__ import annotations

import sys

from fineprune_tf.cli.benchmark import run  # noqa: F401  (defines the flags)

if __name__ == "__main__":
    run(sys.argv)
