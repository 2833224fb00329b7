"""Resource limits of the safe loader (defaults documented in SECURITY.md)."""

from __future__ import annotations

import dataclasses

__all__ = ["LoadLimits", "MiB", "GiB"]

MiB = 1 << 20
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class LoadLimits:
    """Bounds on what loading an untrusted model may use.

    Attributes:
      seconds: wall-clock limit of the child process that trial-loads the model (importing
        TensorFlow included), seconds.
      memory_bytes: address-space limit (``RLIMIT_AS``) of that child, bytes.
      config_bytes: largest declared size of a ``.keras`` ``config.json`` / ``metadata.json``
        or of a legacy ``.h5`` ``model_config``, bytes.
      weights_bytes: largest declared size of the weights (``model.weights.h5`` member, ``.h5``
        file, or a SavedModel's files in total), bytes.
      graph_bytes: largest ``saved_model.pb`` / ``.pbtxt``, bytes.
      files: largest number of files in a SavedModel directory or members in an archive.
    """

    seconds: float = 300.0
    memory_bytes: int = 8 * GiB
    config_bytes: int = 64 * MiB
    weights_bytes: int = 4 * GiB
    graph_bytes: int = 512 * MiB
    files: int = 10_000

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if not getattr(self, field.name) > 0:
                raise ValueError(
                    f"LoadLimits.{field.name} must be positive. Received: "
                    f"{getattr(self, field.name)!r}"
                )
