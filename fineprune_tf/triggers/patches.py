"""Patch triggers: sunglasses (face), post-it (traffic), BadNets pixel and pattern (MNIST)."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import numpy as np

from .base import Trigger, _as_images, _check_unit, _colour


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
