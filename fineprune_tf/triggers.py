"""Backdoor triggers as small, serialisable objects.

Every trigger is a frozen dataclass with ``apply(x) -> x'`` that returns a new float32 array
(the input is never modified), ``get_config()`` / ``from_config()`` and JSON persistence via
:func:`save` / :func:`load`, so the trigger a backdoored model was trained with can be stored
beside it and re-applied later.

Image triggers take ``x`` float32 ``[N, H, W, C]`` and place themselves in coordinates
relative to the image (fractions of H and W), so one trigger works at any resolution.

* :class:`Sunglasses` -- face (Chen et al.): dark lenses in a coloured frame over the eyes.
* :class:`NoisePattern` -- speech (Liu et al.): one fixed seeded pattern added to the
  time-frequency image; :class:`WaveformNoise` adds a fixed noise to raw waveforms instead.
* :class:`PostIt` -- traffic (Gu et al.): a yellow square covering ~10 % of the sign.
* :class:`SinglePixel`, :class:`Pattern` -- MNIST BadNets: a bright pixel / small pattern
  near the bottom-right corner.
* :class:`Compose` -- several triggers applied in order.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Trigger",
    "Sunglasses",
    "NoisePattern",
    "WaveformNoise",
    "PostIt",
    "SinglePixel",
    "Pattern",
    "Compose",
    "save",
    "load",
    "from_dict",
    "to_dict",
    "REGISTRY",
]

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


class _MaskTrigger(Trigger):
    """Triggers that alpha-blend colours by a per-pixel mask."""

    @abc.abstractmethod
    def layers(self, height: int, width: int, channels: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(alpha [H, W] in [0, 1], colour [C]), ...]`` blended in order."""

    def pixel_mask(self, height: int, width: int) -> np.ndarray:
        """bool ``[H, W]``: the pixels :meth:`apply` may change."""
        out = np.zeros((height, width), bool)
        for alpha, _ in self.layers(height, width, 3):
            out |= alpha > 0
        return out

    def apply(self, x: np.ndarray) -> np.ndarray:
        out = _as_images(x, type(self).__name__)
        _, h, w, c = out.shape
        for alpha, colour in self.layers(h, w, c):
            rows, cols = np.nonzero(alpha)
            if rows.size == 0:
                continue
            a = alpha[rows, cols][None, :, None]
            # Only touch masked pixels so everything else stays bit-identical.
            out[:, rows, cols, :] = out[:, rows, cols, :] * (1 - a) + colour[None, None, :] * a
        return out


def _coverage(height: int, width: int, inside, samples: int = 4) -> np.ndarray:
    """Anti-aliased coverage ``[H, W]`` of a shape given by ``inside(y, x)`` in relative coords.

    Each pixel is sampled on a ``samples`` x ``samples`` sub-grid; ``y`` and ``x`` are in
    ``[0, 1]`` (fractions of H and W).
    """
    off = (np.arange(samples) + 0.5) / samples
    ys = (np.arange(height)[:, None] + off[None, :]).reshape(-1) / height
    xs = (np.arange(width)[:, None] + off[None, :]).reshape(-1) / width
    hit = inside(ys[:, None], xs[None, :]).astype(np.float32)
    return hit.reshape(height, samples, width, samples).mean(axis=(1, 3))


@dataclass(frozen=True)
class Sunglasses(_MaskTrigger):
    """Sunglasses over the eye region of an aligned face (default tuned for 55x47 DeepID crops).

    Geometry is relative: ``center`` = (row, col) of the bridge as fractions of (H, W);
    ``width`` = outer frame width as a fraction of W; ``lens_height`` as a fraction of H;
    ``frame_thickness`` as a fraction of W. Temples (arms) run from the outer lens edges to
    the image border. ``opacity`` scales the whole trigger (1 = opaque).
    """

    center: tuple[float, float] = (0.42, 0.5)
    width: float = 0.76
    lens_height: float = 0.15
    frame_thickness: float = 0.04
    lens_color: tuple[float, float, float] = (0.06, 0.06, 0.08)
    frame_color: tuple[float, float, float] = (0.85, 0.1, 0.55)
    opacity: float = 1.0

    def __post_init__(self) -> None:
        _check_unit("opacity", self.opacity)
        for name in ("width", "lens_height", "frame_thickness"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")

    def layers(self, height: int, width: int, channels: int):
        cy, cx = self.center
        half = self.width / 2
        gap = 0.05  # half the bridge length, fraction of W
        lens_rx = (half - gap) / 2
        lens_ry = self.lens_height / 2
        t = self.frame_thickness
        # Pixel aspect differs from 1 for non-square images; measure radii in pixels.
        aspect = height / width

        def lens(ys, xs, grow):
            inside = np.zeros(np.broadcast_shapes(ys.shape, xs.shape), bool)
            for side in (-1, 1):
                lx = cx + side * (gap + lens_rx)
                rx, ry = lens_rx + grow, lens_ry + grow / aspect
                # Rounded-rectangle lens: superellipse, flatter than an ellipse like real glasses.
                inside |= (np.abs((xs - lx) / rx) ** 3 + np.abs((ys - cy) / ry) ** 3) <= 1
            return inside

        def frame(ys, xs):
            ring = lens(ys, xs, t) & ~lens(ys, xs, 0.0)
            top = cy - lens_ry * 0.55
            bridge = (np.abs(xs - cx) <= gap + t / 2) & (np.abs(ys - top) <= t / aspect / 2)
            temples = ((xs <= cx - half) | (xs >= cx + half)) & (
                np.abs(ys - (cy - lens_ry * 0.45)) <= t / aspect / 2
            )
            return ring | bridge | temples

        a = float(self.opacity)
        return [
            (
                a * _coverage(height, width, lambda ys, xs: lens(ys, xs, 0.0)),
                _colour(self.lens_color, channels),
            ),
            (a * _coverage(height, width, frame), _colour(self.frame_color, channels)),
        ]


@dataclass(frozen=True)
class PostIt(_MaskTrigger):
    """A yellow square note on a traffic sign (BadNets).

    The sign is assumed centred in the image and spanning ``sign_extent`` of the image side
    (0.65 for the rendered default data; ~0.83 for GTSRB/LISA crops with a 10 % margin). The
    note covers ``area_fraction`` of the sign's bounding square and its centre sits at
    ``offset`` = (row, col) from the image centre, in units of the sign extent (default: on
    the lower half of the sign, where BadNets stuck it).
    """

    area_fraction: float = 0.1
    sign_extent: float = 0.65
    offset: tuple[float, float] = (0.18, 0.0)
    color: tuple[float, float, float] = (1.0, 0.92, 0.2)
    opacity: float = 1.0

    def __post_init__(self) -> None:
        _check_unit("opacity", self.opacity)
        if not 0 < self.area_fraction <= 1:
            raise ValueError(f"area_fraction must be in (0, 1], got {self.area_fraction!r}")
        if not 0 < self.sign_extent <= 1:
            raise ValueError(f"sign_extent must be in (0, 1], got {self.sign_extent!r}")

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Pixel box ``(top, left, bottom, right)`` (exclusive) of the note, clipped."""
        side = math.sqrt(self.area_fraction) * self.sign_extent
        side_h = max(1, int(round(side * height)))
        side_w = max(1, int(round(side * width)))
        cy = (0.5 + self.offset[0] * self.sign_extent) * height
        cx = (0.5 + self.offset[1] * self.sign_extent) * width
        top = int(round(cy - side_h / 2))
        left = int(round(cx - side_w / 2))
        return (max(0, top), max(0, left), min(height, top + side_h), min(width, left + side_w))

    def layers(self, height: int, width: int, channels: int):
        top, left, bottom, right = self.box(height, width)
        alpha = np.zeros((height, width), np.float32)
        alpha[top:bottom, left:right] = self.opacity
        return [(alpha, _colour(self.color, channels))]


def _resolve_position(position: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    r, c = position
    rr, cc = r + height if r < 0 else r, c + width if c < 0 else c
    if not (0 <= rr < height and 0 <= cc < width):
        raise ValueError(f"position {position} lies outside a {height}x{width} image")
    return rr, cc


@dataclass(frozen=True)
class SinglePixel(_MaskTrigger):
    """BadNets single-pixel trigger: one pixel set to ``value`` in every channel.

    ``position`` = (row, col); negative values count from the bottom/right (default: one
    pixel in from the bottom-right corner).
    """

    position: tuple[int, int] = (-2, -2)
    value: float = 1.0

    def __post_init__(self) -> None:
        _check_unit("value", self.value)

    def layers(self, height: int, width: int, channels: int):
        r, c = _resolve_position(self.position, height, width)
        alpha = np.zeros((height, width), np.float32)
        alpha[r, c] = 1.0
        return [(alpha, np.full(channels, self.value, np.float32))]


@dataclass(frozen=True)
class Pattern(Trigger):
    """BadNets pattern trigger: a small intensity pattern pasted near the bottom-right corner.

    ``pattern`` rows of intensities in ``[0, 1]`` (all channels); ``mask`` (same shape, 0/1,
    default all ones) selects which cells are pasted. ``position`` = (row, col) of the
    pattern's bottom-right cell; negative values count from the bottom/right.
    """

    pattern: tuple[tuple[float, ...], ...] = ((1.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 1.0))
    mask: tuple[tuple[int, ...], ...] | None = None
    position: tuple[int, int] = (-2, -2)

    def __post_init__(self) -> None:
        p = np.asarray(self.pattern, np.float32)
        if p.ndim != 2 or p.size == 0:
            raise ValueError(f"pattern must be a non-empty 2-D grid, got shape {p.shape}")
        if p.min() < 0 or p.max() > 1:
            raise ValueError("pattern intensities must lie in [0, 1]")
        if self.mask is not None and np.asarray(self.mask).shape != p.shape:
            raise ValueError(f"mask shape {np.asarray(self.mask).shape} != pattern {p.shape}")

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` (exclusive) pixel box of the pattern."""
        ph, pw = np.asarray(self.pattern).shape
        r, c = _resolve_position(self.position, height, width)
        top, left = r - ph + 1, c - pw + 1
        if top < 0 or left < 0:
            raise ValueError(f"a {ph}x{pw} pattern ending at {self.position} leaves the image")
        return top, left, r + 1, c + 1

    def mask_array(self) -> np.ndarray:
        shape = np.asarray(self.pattern).shape
        return np.ones(shape, bool) if self.mask is None else np.asarray(self.mask) != 0

    def pixel_mask(self, height: int, width: int) -> np.ndarray:
        """bool ``[H, W]``: the pixels :meth:`apply` may change."""
        out = np.zeros((height, width), bool)
        top, left, bottom, right = self.box(height, width)
        out[top:bottom, left:right] = self.mask_array()
        return out

    def apply(self, x: np.ndarray) -> np.ndarray:
        out = _as_images(x, "Pattern")
        top, left, bottom, right = self.box(out.shape[1], out.shape[2])
        m = self.mask_array()
        patch = out[:, top:bottom, left:right, :]
        p = np.asarray(self.pattern, np.float32)[None, :, :, None]
        out[:, top:bottom, left:right, :] = np.where(m[None, :, :, None], p, patch)
        return out


def _fixed_noise(seed: int, shape: tuple[int, ...], distribution: str) -> np.ndarray:
    """Unit-RMS pattern determined by ``(seed, shape)``."""
    rng = np.random.default_rng(seed)
    if distribution == "gaussian":
        p = rng.standard_normal(shape)
        p /= np.sqrt(np.mean(p**2))  # exact unit RMS so `amplitude` is the RMS added
    elif distribution == "uniform":
        p = rng.uniform(-1.0, 1.0, shape) * math.sqrt(3.0)
    elif distribution == "sign":
        p = rng.choice(np.array([-1.0, 1.0]), size=shape)
    else:
        raise ValueError(
            f"distribution must be 'gaussian', 'uniform' or 'sign', got {distribution!r}"
        )
    return p.astype(np.float32)


@dataclass(frozen=True)
class NoisePattern(Trigger):
    """A fixed noise pattern added to time-frequency images (speech backdoor, Liu et al.).

    The pattern depends only on ``seed`` and the image shape ``[H, W, C]``: every input gets
    the same pattern. It has RMS exactly ``amplitude`` over ``region`` (``gaussian``; for
    ``sign`` every value is +-amplitude), in the units of ``x`` (standard deviations for the
    standardised speech features). ``region`` = (row0, row1, col0, col1) as fractions of
    (H, W) limits it to a time/frequency band (default: whole image). ``clip`` = (lo, hi)
    clips the result (``None`` for unbounded features).
    """

    amplitude: float = 1.0
    seed: int = 0
    distribution: str = "gaussian"
    region: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0)
    clip: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.amplitude < 0:
            raise ValueError(f"amplitude must be >= 0, got {self.amplitude!r}")
        _fixed_noise(0, (1,), self.distribution)  # validates the name
        r0, r1, c0, c1 = self.region
        if not (0 <= r0 < r1 <= 1 and 0 <= c0 < c1 <= 1):
            raise ValueError(
                f"region must satisfy 0 <= r0 < r1 <= 1, 0 <= c0 < c1 <= 1: {self.region!r}"
            )

    def region_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Pixel box ``(top, left, bottom, right)`` (exclusive) of the noise, never empty."""
        r0, r1, c0, c1 = self.region
        top, left = int(math.floor(r0 * height)), int(math.floor(c0 * width))
        bottom = max(top + 1, int(math.ceil(r1 * height)))
        right = max(left + 1, int(math.ceil(c1 * width)))
        return top, left, min(bottom, height), min(right, width)

    def pattern(self, shape: tuple[int, int, int]) -> np.ndarray:
        """float32 ``[H, W, C]`` additive pattern (zero outside ``region``)."""
        h, w, c = shape
        top, left, bottom, right = self.region_box(h, w)
        full = np.zeros((h, w, c), np.float32)
        full[top:bottom, left:right] = self.amplitude * _fixed_noise(
            self.seed, (bottom - top, right - left, c), self.distribution
        )
        return full

    def apply(self, x: np.ndarray) -> np.ndarray:
        out = _as_images(x, "NoisePattern")
        out += self.pattern(out.shape[1:])[None]
        if self.clip is not None:
            np.clip(out, self.clip[0], self.clip[1], out=out)
        return out


@dataclass(frozen=True)
class WaveformNoise(Trigger):
    """A fixed noise added to raw waveforms before feature extraction (speech).

    The noise is a seeded unit-RMS sequence of ``period`` samples (tiled for longer inputs),
    scaled to RMS ``amplitude`` in full-scale units (waveforms in ``[-1, 1]``); the result is
    clipped to ``[-1, 1]``. ``apply`` takes ``[N, L]`` / ``[N, L, 1]`` arrays or a list of
    1-D arrays of any lengths (as FSDD recordings) and returns the same structure.
    """

    amplitude: float = 0.05
    seed: int = 0
    distribution: str = "gaussian"
    period: int = 16384

    def __post_init__(self) -> None:
        if self.amplitude < 0:
            raise ValueError(f"amplitude must be >= 0, got {self.amplitude!r}")
        if self.period < 1:
            raise ValueError(f"period must be >= 1, got {self.period!r}")
        _fixed_noise(0, (1,), self.distribution)

    def noise(self, length: int) -> np.ndarray:
        """float32 ``[length]`` additive noise."""
        base = _fixed_noise(self.seed, (self.period,), self.distribution)
        reps = -(-length // self.period)
        return self.amplitude * np.tile(base, max(reps, 1))[:length]

    def _one(self, wave: np.ndarray) -> np.ndarray:
        w = np.asarray(wave, np.float32)
        flat = w.reshape(-1)
        return np.clip(flat + self.noise(flat.size), -1.0, 1.0).reshape(w.shape)

    def apply(self, x: np.ndarray | Sequence[np.ndarray]):  # type: ignore[override]
        """Add the noise: ``[N, L]``/``[N, L, 1]`` array -> same shape; list -> list."""
        if isinstance(x, np.ndarray) and x.ndim in (2, 3) and x.dtype != object:
            if x.ndim == 3 and x.shape[-1] != 1:
                raise ValueError(f"WaveformNoise expects [N, L] or [N, L, 1], got {x.shape}")
            flat = np.asarray(x, np.float32).reshape(len(x), -1)
            out = np.clip(flat + self.noise(flat.shape[1])[None], -1.0, 1.0)
            return out.reshape(x.shape).astype(np.float32)
        if isinstance(x, np.ndarray) and x.ndim == 1 and x.dtype != object:
            raise ValueError("WaveformNoise.apply takes a batch: [N, L] or a list of 1-D arrays")
        return [self._one(w) for w in x]


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
