"""fineprune_tf: backdoor attacks and pruning defenses (Fine-Pruning, RAID 2018) for Keras 3.

Core: :mod:`ops` (the fused masking + statistics op), :mod:`layers` (MaskedConv2D,
MaskedDense), :mod:`stats`.  Tasks: :mod:`data`, :mod:`triggers`, :mod:`poison`, :mod:`models`,
:mod:`metrics`.  Attacks and defenses: :mod:`attacks`, :mod:`defenses`, :mod:`curves`,
:mod:`experiment`, :mod:`reporting`.  Your own model: :func:`convert`, :mod:`export`, :mod:`io`,
:mod:`cleaning`.  Model graphs (walker, channel roles, costs): :mod:`graph`.  The other
modules are imported on first use.
"""

import importlib

from fineprune_tf import layers, ops, stats
from fineprune_tf._version import __version__  # noqa: F401 - the package's version
from fineprune_tf.layers import MaskedConv2D, MaskedDense

_LAZY_MODULES = (
    "attack_zoo",
    "attacks",
    "cleaning",
    "conversion",
    "curves",
    "data",
    "defenses",
    "experiment",
    "export",
    "graph",
    "io",
    "metrics",
    "models",
    "poison",
    "reporting",
    "retuning",
    "tflite",
    "training",
    "triggers",
)

__all__ = ["MaskedConv2D", "MaskedDense", "convert", "layers", "ops", "stats", *_LAZY_MODULES]


def convert(model, **kwargs):
    """Same model with MaskedConv2D (and MaskedDense) layers: see
    :func:`fineprune_tf.conversion.convert`."""
    from fineprune_tf.conversion import convert as _convert

    return _convert(model, **kwargs)


def __getattr__(name):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"fineprune_tf.{name}")
    raise AttributeError(f"module 'fineprune_tf' has no attribute {name!r}")
