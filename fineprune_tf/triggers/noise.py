"""Additive fixed-noise triggers for speech: on the features or on the raw waveform."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import Trigger, _as_images


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
