"""The benchmark sections of ``fineprune benchmark`` (``python -m scripts.benchmark`` from a
checkout), one module each.

Every section module exposes ``TITLE``, ``TARGETS`` (summary key -> (comparison, threshold,
description)), ``measure(quick: bool, repeats: int, ...) -> dict`` (its numbers, with a
``"summary"`` dict of headline ratios and a ``"notes"`` list) and ``markdown(result) -> str``.
:mod:`.report` is the one writer of BENCHMARKS.md and benchmarks.json.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

#: Section key -> module name under ``fineprune_tf.benchmarks``, in report order.
SECTIONS: dict[str, str] = {
    "a": "curve",  # full per-channel pruning curve vs the naive loop
    "b": "op",  # fused op vs the best-effort TF composite and the TF fallback
    "c": "train",  # training step, masked vs plain layers
    "d": "stats_pass",  # statistics pass vs inference
    "e": "shrink",  # shrunk vs masked model
    "f": "memory",  # peak resident memory per experiment stage
    "g": "zoo",  # keras.applications models, masked vs shrunk (issue 12's "(f)")
}
#: Sections other engineers add: included by name when their module exists.
OPTIONAL_SECTIONS: dict[str, str] = {
    "masked_step": "masked_step"  # the masked layers' step in isolation (layers engineer)
}


def available() -> dict[str, str]:
    """Every section whose module can be imported here, in report order."""
    found = dict(SECTIONS)
    for key, name in OPTIONAL_SECTIONS.items():
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            found[key] = name
    return found


def load(key: str) -> ModuleType:
    """The module of section ``key``."""
    return importlib.import_module(f"{__name__}.{available()[key]}")
