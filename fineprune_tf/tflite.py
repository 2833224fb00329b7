"""Moved to :mod:`fineprune_tf.export.tflite`; ``fineprune_tf.tflite`` is that very module (an
alias, so patching its attributes patches the real ones)."""

import sys

from fineprune_tf.export import tflite as _tflite

sys.modules[__name__] = _tflite
