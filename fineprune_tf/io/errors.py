"""Error types and findings of the safe loader."""

from __future__ import annotations

import dataclasses
import os

__all__ = ["Finding", "LoadLimitError", "ModelFormatError", "UnsafeModelError"]


class ModelFormatError(ValueError):
    """The path is not a model this module can read (with the reason)."""


class LoadLimitError(ModelFormatError):
    """Loading exceeded a limit (time, memory, archive size) or the loader process died; the
    message says which, in one line."""


@dataclasses.dataclass(frozen=True)
class Finding:
    """One refused item.

    Attributes:
      kind: op type (SavedModel), class name (Keras config) or archive member kind.
      name: node name / layer name / member name.
      where: ``"graph [...]"``, ``"function <name> [...]"``, ``"config"`` or ``"archive"``.
      reason: why it is refused.
    """

    kind: str
    name: str
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name!r} in {self.where}: {self.reason}"


class UnsafeModelError(ValueError):
    """The model contains refused content; ``findings`` lists every item."""

    def __init__(self, path: str | os.PathLike, findings: list[Finding], hint: str):
        self.path = os.fspath(path)
        self.findings = list(findings)
        self.hint = hint
        lines = "\n".join(f"  - {f}" for f in self.findings)
        super().__init__(
            f"refusing to load {self.path!r}: {len(self.findings)} unsafe item(s):\n{lines}\n{hint}"
        )

    def one_line(self, limit: int = 5) -> str:
        """The refusal in one line (the first ``limit`` findings)."""
        shown = "; ".join(str(f) for f in self.findings[:limit])
        more = len(self.findings) - limit
        return f"refusing to load {self.path!r}: {len(self.findings)} unsafe item(s): {shown}" + (
            f"; and {more} more" if more > 0 else ""
        )
