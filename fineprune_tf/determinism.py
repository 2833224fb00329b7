"""Deterministic kernels and seeded generators for one block (:func:`deterministic`), with the
caller's settings restored after it."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import keras
import numpy as np
import tensorflow as tf

__all__ = ["deterministic"]


def _swap_tf_state(op_determinism: bool, global_seed: int | None) -> tuple[bool, int | None]:
    """Sets TensorFlow's op determinism and global seed; returns the previous values.

    The private TensorFlow access of this module, kept in one place: TensorFlow exports
    ``enable_op_determinism`` but neither its getter nor its counterpart
    ``disable_op_determinism`` (both defined next to it in
    ``tensorflow/python/framework/config.py``), and no getter for the global seed
    (``tf.compat.v1.get_seed`` would draw from the operation-seed generator it reads).
    Restoring the caller's state needs all three.
    """
    from tensorflow.python.eager import context
    from tensorflow.python.framework import config as tf_config

    previous = (bool(tf_config.is_op_determinism_enabled()), context.global_seed())
    if op_determinism:
        tf_config.enable_op_determinism()
    else:
        tf_config.disable_op_determinism()
    tf.random.set_seed(global_seed)
    return previous


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Deterministic kernels and seeded generators inside the block, the caller's settings
    after it.

    Inside: TensorFlow op determinism on, and ``keras.utils.set_random_seed(seed)`` (Python's
    ``random``, NumPy's global generator, TensorFlow's global seed, Keras' seed generator).
    On exit, op determinism, the Python and NumPy generator states and TensorFlow's global seed
    are restored (Keras keeps the seed: it has no public getter; its generators are re-seeded by
    whoever seeds next).  Scripts that want determinism for their whole process call
    ``tf.config.experimental.enable_op_determinism()`` themselves.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    previous = _swap_tf_state(True, seed)
    keras.utils.set_random_seed(seed)
    try:
        yield
    finally:
        _swap_tf_state(*previous)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
