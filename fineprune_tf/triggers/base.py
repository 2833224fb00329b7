"""The :class:`Trigger` base class, its registry, :class:`Compose` and JSON persistence."""

from __future__ import annotations

import abc
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Trigger classes by name, filled by :class:`Trigger` subclassing; used by :func:`load`.
REGISTRY: dict[str, type[Trigger]] = {}


def _as_images(x: np.ndarray, who: str) -> np.ndarray:
    """Validate ``[N, H, W, C]`` input and return a float32 copy to draw on."""
    arr = np.asarray(x)
    if arr.ndim != 4:
        raise ValueError(f"{who}.apply expects images [N, H, W, C], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{who}.apply expects float images in [0, 1], got dtype {arr.dtype}")
    return np.array(arr, dtype=np.float32, copy=True)


def _colour(rgb: Sequence[float], channels: int) -> np.ndarray:
    """A colour for ``channels`` channels: RGB as is, its luminance for grayscale."""
    c = np.asarray(rgb, np.float32)
    if channels == 3:
        return c
    if channels == 1:
        return np.array([0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]], np.float32)
    return np.full(channels, c.mean(), np.float32)


def _tuple(v: Any) -> Any:
    """JSON lists back to (nested) tuples so configs round-trip to equal dataclasses."""
    return tuple(_tuple(i) for i in v) if isinstance(v, list | tuple) else v


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class Trigger(abc.ABC):
    """Base class: subclasses implement :meth:`apply`; configs are their dataclass fields."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            REGISTRY[cls.__name__] = cls

    @abc.abstractmethod
    def apply(self, x: np.ndarray) -> np.ndarray:
        """Triggered copy of ``x`` ``[N, H, W, C]`` (the input is never modified)."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.apply(x)

    def training_extras(
        self, x: np.ndarray, y: np.ndarray, poison_count: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Extra *correctly labelled* training inputs the attack adds beside its poison.

        Most triggers add none (``None``). WaNet's noise mode returns randomly warped copies
        of clean inputs with their true labels, so the network learns the exact warp rather
        than "any warp". ``x`` ``[N, ...]`` and ``y`` ``[N]`` are the attacker's clean training
        inputs, ``poison_count`` the number of poisoned copies; returns ``(x', y')``.
        """
        del x, y, poison_count, rng
        return None

    def get_config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Trigger:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} config key(s) {unknown}")
        return cls(**{k: _tuple(v) for k, v in config.items()})


@dataclass(frozen=True)
class Compose(Trigger):
    """Apply ``triggers`` in order (e.g. sunglasses plus a pixel pattern)."""

    triggers: tuple[Trigger, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "triggers", tuple(self.triggers))
        for t in self.triggers:
            if not isinstance(t, Trigger):
                raise TypeError(f"Compose takes Trigger objects, got {type(t).__name__}")

    def apply(self, x: np.ndarray) -> np.ndarray:
        out = x
        for t in self.triggers:
            out = t.apply(out)
        if out is x:  # an empty Compose must still not hand back the caller's array
            out = np.array(x, np.float32, copy=True)
        return out

    def get_config(self) -> dict[str, Any]:
        return {"triggers": [to_dict(t) for t in self.triggers]}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Compose:
        unknown = sorted(set(config) - {"triggers"})
        if unknown:
            raise ValueError(f"unknown Compose config key(s) {unknown}")
        return cls(tuple(from_dict(d) for d in config.get("triggers", [])))


def to_dict(trigger: Trigger) -> dict[str, Any]:
    """``{"class": name, "config": {...}}`` (JSON-serialisable)."""
    return {"class": type(trigger).__name__, "config": trigger.get_config()}


def from_dict(data: dict[str, Any]) -> Trigger:
    """Inverse of :func:`to_dict`."""
    if not isinstance(data, dict) or "class" not in data:
        raise ValueError(f"not a serialised trigger (needs a 'class' key): {data!r}")
    name = data["class"]
    if name not in REGISTRY:
        raise ValueError(f"unknown trigger class {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name].from_config(data.get("config", {}))


def save(trigger: Trigger, path: str | os.PathLike) -> None:
    """Write ``trigger`` as JSON to ``path``."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(to_dict(trigger), fh, indent=2, sort_keys=True)
        fh.write("\n")


def load(path: str | os.PathLike) -> Trigger:
    """Read a trigger written by :func:`save`."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"trigger file {os.fspath(path)!r} is not valid JSON: {exc}") from exc
    try:
        return from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"trigger file {os.fspath(path)!r}: {exc}") from exc
