"""Trains and saves a backdoored model with its trigger and data split.

The command's body is :mod:`fineprune_tf.cli.attack` (also ``fineprune attack``); this module
keeps ``python -m scripts.attack`` working from a checkout.
"""

from __future__ import annotations

import sys

from scripts import _quiet

_quiet.quiet_tensorflow()  # before anything imports TensorFlow


from fineprune_tf.cli.attack import run  # noqa: E402  (defines the flags)

if __name__ == "__main__":
    run(sys.argv)
