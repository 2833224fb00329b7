"""Procedural traffic-sign renderer: the ``"default"`` source of :mod:`fineprune_tf.data.traffic`.

A red octagon with white border and "STOP" strokes, a white portrait rectangle with black
border, "SPEED LIMIT" dashes and two numerals, or a yellow diamond with black border and one of
six black symbols; placed with random scale, rotation, perspective and offset, optional pole, on
textured backgrounds, then lighting, partial occlusion, blur and sensor noise.  Rendered at
``supersample`` x resolution and box-filtered down.  Every image depends only on its generator.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ._common import Split

__all__ = ["SPEED_LIMIT", "STOP", "WARNING", "render_sign", "render_split"]

STOP, SPEED_LIMIT, WARNING = 0, 1, 2

# Stroke glyphs in a unit box (x right, y down), drawn as polylines.
# fmt: off
_GLYPHS: dict[str, list[list[tuple[float, float]]]] = {
    "S": [[(1, 0.12), (0.8, 0), (0.2, 0), (0, 0.2), (0, 0.38), (0.2, 0.5), (0.8, 0.5),
           (1, 0.62), (1, 0.8), (0.8, 1), (0.2, 1), (0, 0.88)]],
    "T": [[(0, 0), (1, 0)], [(0.5, 0), (0.5, 1)]],
    "O": [[(0.25, 0), (0.75, 0), (1, 0.25), (1, 0.75), (0.75, 1), (0.25, 1), (0, 0.75),
           (0, 0.25), (0.25, 0)]],
    "P": [[(0, 1), (0, 0), (0.75, 0), (1, 0.15), (1, 0.38), (0.75, 0.52), (0, 0.52)]],
}
# Seven-segment digits: segment name -> stroke; digit -> lit segments.
_SEG = {"a": [(0, 0), (1, 0)], "b": [(1, 0), (1, 0.5)], "c": [(1, 0.5), (1, 1)],
        "d": [(0, 1), (1, 1)], "e": [(0, 0.5), (0, 1)], "f": [(0, 0), (0, 0.5)],
        "g": [(0, 0.5), (1, 0.5)]}
_DIGIT_SEGS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg",
               "abcdfg"]
# fmt: on
for _d, _segs in enumerate(_DIGIT_SEGS):
    _GLYPHS[str(_d)] = [_SEG[s] for s in _segs]

_WARNING_SYMBOLS = ("exclamation", "curve", "cross", "merge", "signal", "pedestrian")


def _draw_text(draw, text: str, cx: float, cy: float, w: float, h: float, width: int, fill):
    """Draw ``text`` with the stroke glyphs, centred at (cx, cy) in a w x h box."""
    n = len(text)
    gap = 0.25
    gw = w / (n + gap * (n - 1))
    x0 = cx - w / 2
    for k, ch in enumerate(text):
        left = x0 + k * gw * (1 + gap)
        for line in _GLYPHS[ch]:
            pts = [(left + px * gw, cy - h / 2 + py * h) for px, py in line]
            draw.line(pts, fill=fill, width=width, joint="curve")


def _jitter_color(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float):
    noise = rng.normal(0, amount, 3).tolist()
    rgba = [int(min(max(v + d, 0.0), 1.0) * 255 + 0.5) for v, d in zip(rgb, noise, strict=True)]
    return (*rgba, 255)


def _draw_sign(label: int, canvas: int, rng: np.random.Generator):
    """RGBA PIL image ``canvas`` x ``canvas`` with the sign centred, radius 0.46 * canvas."""
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    c = canvas / 2.0
    r = 0.46 * canvas
    lw = max(1, int(round(r * 0.09)))
    draw = {STOP: _draw_stop, SPEED_LIMIT: _draw_speed_limit, WARNING: _draw_warning}.get(label)
    if draw is None:
        raise ValueError(f"traffic label must be 0, 1 or 2, got {label}")
    draw(d, c, r, lw, rng)
    return img


def _draw_stop(d, c: float, r: float, lw: int, rng: np.random.Generator) -> None:
    """Red octagon with a white border and "STOP" strokes."""

    def octagon(rad):
        return [
            (
                c + rad * math.cos(math.radians(22.5 + 45 * k)),
                c + rad * math.sin(math.radians(22.5 + 45 * k)),
            )
            for k in range(8)
        ]

    d.polygon(octagon(r), fill=_jitter_color(rng, (0.95, 0.95, 0.95), 0.03))
    d.polygon(octagon(r * 0.87), fill=_jitter_color(rng, (0.78, 0.06, 0.1), 0.06))
    _draw_text(d, "STOP", c, c, 1.25 * r, 0.45 * r, lw, (245, 245, 245, 255))


def _draw_speed_limit(d, c: float, r: float, lw: int, rng: np.random.Generator) -> None:
    """White portrait rectangle, black border, "SPEED LIMIT" dashes and a two-digit value."""
    hw, hh = 0.66 * r, 0.9 * r
    d.rounded_rectangle(
        [c - hw, c - hh, c + hw, c + hh],
        radius=0.1 * r,
        fill=_jitter_color(rng, (0.08, 0.08, 0.08), 0.03),
    )
    b = 0.08 * r
    d.rounded_rectangle(
        [c - hw + b, c - hh + b, c + hw - b, c + hh - b],
        radius=0.06 * r,
        fill=_jitter_color(rng, (0.95, 0.95, 0.93), 0.03),
    )
    ink = _jitter_color(rng, (0.05, 0.05, 0.05), 0.02)
    # "SPEED" / "LIMIT" are unreadable at 32 px; dashes of the right layout suffice.
    for row, words in ((-0.62, (0.5, 0.42)), (-0.36, (0.45, 0.45))):
        y = c + row * r
        x = c - 0.45 * r
        for k, frac in enumerate(words):
            x2 = x + frac * 0.9 * r
            d.line([(x, y), (x2 - (0.05 * r if k == 0 else 0), y)], fill=ink, width=max(1, lw // 2))
            x = x2 + 0.08 * r
    value = int(rng.choice([15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75]))
    _draw_text(d, str(value), c, c + 0.3 * r, 0.95 * r, 0.85 * r, lw, ink)


def _draw_warning(d, c: float, r: float, lw: int, rng: np.random.Generator) -> None:
    """Yellow diamond with a black border and one of :data:`_WARNING_SYMBOLS`."""

    def diamond(rad):
        return [(c, c - rad), (c + rad, c), (c, c + rad), (c - rad, c)]

    d.polygon(diamond(r), fill=_jitter_color(rng, (0.97, 0.8, 0.08), 0.05))
    ink = _jitter_color(rng, (0.05, 0.05, 0.05), 0.02)
    d.polygon(diamond(r), outline=ink, width=max(1, lw // 2 + 1))
    d.polygon(diamond(r * 0.86), outline=ink, width=max(1, lw // 2))
    s = 0.38 * r
    kind = _WARNING_SYMBOLS[int(rng.integers(len(_WARNING_SYMBOLS)))]
    _draw_symbol(d, kind, c, s, lw, ink, rng)


def _draw_symbol(d, kind: str, c: float, s: float, lw: int, ink, rng: np.random.Generator):
    if kind == "exclamation":
        d.line([(c, c - s), (c, c + 0.35 * s)], fill=ink, width=lw + 1)
        d.ellipse([c - 0.14 * s, c + 0.6 * s, c + 0.14 * s, c + 0.88 * s], fill=ink)
    elif kind == "curve":
        pts = [
            (c - 0.3 * s + 0.6 * s * math.sin(t * math.pi), c + s - 2 * s * t)
            for t in np.linspace(0, 1, 9)
        ]
        d.line(pts, fill=ink, width=lw, joint="curve")
        tip = pts[-1]
        d.polygon(
            [
                (tip[0] - 0.3 * s, tip[1] + 0.25 * s),
                (tip[0] + 0.3 * s, tip[1] + 0.25 * s),
                (tip[0], tip[1] - 0.2 * s),
            ],
            fill=ink,
        )
    elif kind == "cross":
        d.line([(c, c - s), (c, c + s)], fill=ink, width=lw)
        d.line([(c - s, c), (c + s, c)], fill=ink, width=lw)
    elif kind == "merge":
        d.line([(c + 0.2 * s, c - s), (c + 0.2 * s, c + s)], fill=ink, width=lw)
        d.line([(c - 0.7 * s, c + s), (c + 0.2 * s, c - 0.1 * s)], fill=ink, width=lw)
    elif kind == "signal":
        d.rounded_rectangle([c - 0.4 * s, c - s, c + 0.4 * s, c + s], radius=0.15 * s, fill=ink)
        for k, col in enumerate(((0.9, 0.1, 0.1), (0.95, 0.8, 0.1), (0.1, 0.8, 0.3))):
            yy = c - 0.62 * s + k * 0.62 * s
            d.ellipse(
                [c - 0.24 * s, yy - 0.24 * s, c + 0.24 * s, yy + 0.24 * s],
                fill=_jitter_color(rng, col, 0.02),
            )
    else:  # pedestrian
        d.ellipse([c - 0.18 * s, c - s, c + 0.18 * s, c - 0.64 * s], fill=ink)
        d.line([(c, c - 0.6 * s), (c - 0.05 * s, c + 0.15 * s)], fill=ink, width=lw)
        d.line([(c - 0.05 * s, c + 0.15 * s), (c - 0.45 * s, c + s)], fill=ink, width=lw)
        d.line([(c - 0.05 * s, c + 0.15 * s), (c + 0.4 * s, c + s)], fill=ink, width=lw)
        d.line(
            [(c - 0.5 * s, c - 0.1 * s), (c + 0.45 * s, c - 0.35 * s)],
            fill=ink,
            width=max(1, lw - 1),
        )


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only float32 ``(yy, xx)`` pixel-centre grids in ``[-0.5, 0.5)``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size) - np.float32(0.5)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


@functools.lru_cache(maxsize=64)
def _interp_matrix(size: int, cells: int) -> np.ndarray:
    """float32 ``[size, cells + 1]`` linear interpolation weights from a coarse grid."""
    t = np.linspace(0, cells, size)
    i0 = np.minimum(np.floor(t).astype(int), cells - 1)
    f = t - i0
    m = np.zeros((size, cells + 1), np.float32)
    m[np.arange(size), i0] = 1 - f
    m[np.arange(size), i0 + 1] = f
    m.setflags(write=False)
    return m


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Value noise: a ``cells`` x ``cells`` random grid bilinearly upsampled to ``size``."""
    grid = rng.random((cells + 1, cells + 1, channels), dtype=np.float32)
    m = _interp_matrix(size, cells)
    rows = (m @ grid.reshape(cells + 1, -1)).reshape(size, cells + 1, channels)
    return m @ rows  # broadcast over rows: [size, size, channels]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 ``[size, size, 3]`` textured background in ``[0, 1]``."""
    kind = int(rng.integers(6))
    yy, xx = _grid(size)
    yy, xx = yy + np.float32(0.5), xx + np.float32(0.5)
    if kind == 0:  # smooth multi-scale colour noise
        base = rng.random(3, dtype=np.float32) * 0.8 + 0.1
        bg = base + 0.35 * (_smooth_noise(rng, size, int(rng.integers(2, 6)), 3) - 0.5)
        bg += 0.15 * (_smooth_noise(rng, size, int(rng.integers(8, 16)), 3) - 0.5)
    elif kind == 1:  # linear gradient between two colours
        a, b = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
        ang = float(rng.uniform(0, 2 * np.pi))
        t = (math.cos(ang) * (xx - 0.5) + math.sin(ang) * (yy - 0.5)) + 0.5
        bg = a + (b - a) * np.clip(t, 0, 1)[..., None]
    elif kind == 2:  # stripes (fences, buildings, road markings)
        a, b = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
        ang = float(rng.uniform(0, np.pi))
        freq = float(rng.uniform(3, 12))
        phase = float(rng.uniform(0, 6))
        t = np.sin(2 * math.pi * freq * (math.cos(ang) * xx + math.sin(ang) * yy) + phase)
        t = 0.5 + 0.5 * np.tanh(float(rng.uniform(1, 6)) * t)
        bg = a + (b - a) * t[..., None]
    elif kind == 3:  # sky: blue vertical gradient with soft clouds
        top = (np.array([0.25, 0.45, 0.85]) + rng.normal(0, 0.06, 3)).astype(np.float32)
        bottom = (np.array([0.7, 0.82, 0.95]) + rng.normal(0, 0.05, 3)).astype(np.float32)
        bg = top + (bottom - top) * yy[..., None]
        cloud = _smooth_noise(rng, size, int(rng.integers(3, 7)), 1)
        cloud = np.clip((cloud - float(rng.uniform(0.45, 0.7))) * 3, 0, 1)
        bg = bg * (1 - cloud) + 0.95 * cloud
    elif kind == 4:  # foliage: green/brown blotches at two scales
        greens = np.array([[0.15, 0.35, 0.1], [0.3, 0.5, 0.15], [0.35, 0.3, 0.15]])
        w = _smooth_noise(rng, size, int(rng.integers(4, 10)), 3)
        w = w / w.sum(-1, keepdims=True)
        bg = w @ (greens + rng.normal(0, 0.05, greens.shape)).astype(np.float32)
        bg += 0.12 * (_smooth_noise(rng, size, int(rng.integers(12, 20)), 1) - 0.5)
    else:  # urban: grey blocks
        bg = np.full((size, size, 3), rng.uniform(0.3, 0.7), np.float32)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = rng.integers(0, size, 2)
            w, h = rng.integers(size // 8, size // 2, 2)
            bg[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0.15, 0.85) + rng.normal(0, 0.04, 3)
    return np.clip(np.asarray(bg, np.float32), 0, 1)


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> tuple[float, ...]:
    """PIL PERSPECTIVE coefficients mapping output points ``dst`` to input points ``src``."""
    a, b = [], []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b.extend([u, v])
    return tuple(np.linalg.solve(np.asarray(a, np.float64), np.asarray(b, np.float64)))


def _scene(label: int, rng: np.random.Generator, size: int, supersample: int) -> np.ndarray:
    """Background, pole, warped sign and occluder: float32 ``[size, size, 3]``, unlit.

    Only the sign (sharp edges, thin strokes) is drawn at ``supersample`` x resolution and
    box-filtered down; the smooth background is generated at the output size directly.
    """
    from PIL import Image

    f32 = np.float32
    bg = _background(rng, size)
    scale = rng.uniform(0.55, 0.85)  # canvas side / image side; sign spans 0.92 of it
    centre = 0.5 + rng.normal(0, 0.05, 2)  # relative (x, y)
    angle = math.radians(rng.uniform(-12, 12))
    if rng.random() < 0.6:  # pole below the sign
        pole_w = max(1, int(round(size * rng.uniform(0.03, 0.06))))
        x = int(round(centre[0] * size))
        bg[int(centre[1] * size) :, max(0, x - pole_w // 2) : x + (pole_w + 1) // 2] = rng.uniform(
            0.35, 0.65
        ) + rng.normal(0, 0.03, 3)
    big = size * supersample
    sign = _draw_sign(label, big, rng)
    half = scale * big / 2
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * half
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    dst = corners @ rot.T + centre * big + rng.normal(0, 0.07 * half, (4, 2))  # skew
    src = np.array([[0, 0], [big, 0], [big, big], [0, big]], np.float64)
    warped = sign.transform(
        (big, big),
        Image.Transform.PERSPECTIVE,
        _perspective_coeffs(dst, src),
        Image.Resampling.BILINEAR,
    )
    if supersample > 1:  # PIL filters RGBA with premultiplied alpha, so edges stay clean
        warped = warped.resize((size, size), Image.Resampling.BOX)
    rgba = np.asarray(warped, np.float32) * f32(1 / 255)
    alpha = rgba[..., 3:]
    img = bg + (rgba[..., :3] - bg) * alpha

    if rng.random() < 0.3:  # partial occlusion (branch, another object) over the sign
        yy, xx = _grid(size)
        ow, oh = rng.uniform(0.25, 0.6, 2) * scale
        ox, oy = centre - 0.5 + rng.uniform(-0.5, 0.5, 2) * scale
        if rng.random() < 0.5:
            occ = (np.abs(xx - f32(ox)) < f32(ow / 2)) & (np.abs(yy - f32(oy)) < f32(oh / 2))
        else:
            occ = ((xx - f32(ox)) / f32(ow / 2)) ** 2 + ((yy - f32(oy)) / f32(oh / 2)) ** 2 < 1
        colour = np.array([[0.2, 0.35, 0.12], [0.35, 0.25, 0.15], [0.45, 0.45, 0.45]])[
            int(rng.integers(3))
        ] + rng.normal(0, 0.05, 3)
        texture = f32(0.15) * (_smooth_noise(rng, size, 6, 1) - f32(0.5))
        img = np.where(occ[..., None], np.clip(colour.astype(f32) + texture, 0, 1), img)
    return img


def _photometric_params(rng: np.random.Generator) -> np.ndarray:
    """Per-image camera/lighting parameters, drawn in a fixed order (see _render_batch)."""
    p = np.ones(12)
    p[0] = rng.uniform(0.6, 1.3)  # contrast around the image mean
    p[1:4] = rng.uniform(0.55, 1.3) * rng.uniform(0.9, 1.1, 3)  # brightness x colour cast
    ang = rng.uniform(0, 2 * np.pi)
    p[4:6] = rng.uniform(0, 0.4) * np.array([np.cos(ang), np.sin(ang)])  # linear shading
    if rng.random() < 0.25:  # cast shadow: a darker half-plane
        ang = rng.uniform(0, 2 * np.pi)
        p[6:9] = np.cos(ang), np.sin(ang), rng.uniform(-0.3, 0.3)
        p[9] = rng.uniform(0.45, 0.75)
    else:
        p[6:10] = 0.0, 0.0, 1.0, 1.0  # threshold above any projection: no shadow
    if rng.random() < 0.5:
        p[10] = rng.uniform(0.7, 1.4)  # gamma (1 = none)
    p[11] = rng.uniform(0, 0.7)  # defocus blur sigma, output pixels
    return p


def _blur(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable 5-tap Gaussian blur of ``[B, H, W, C]`` with one ``sigma`` (pixels) per image.

    Edges are extended (as PIL's GaussianBlur); a tiny sigma leaves the image unchanged.
    """
    taps = np.arange(-2, 3)
    s = np.maximum(sigma, 1e-3)[:, None]
    w = np.exp(-(taps**2) / (2 * s**2))
    w = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
    n = x.shape[1]
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (2, 2)
        padded = np.pad(x, pad, mode="edge")
        out = np.zeros_like(x)
        for j in range(5):
            window = padded[:, j : j + n] if axis == 1 else padded[:, :, j : j + n]
            out += w[:, j, None, None, None] * window
        x = out
    return x


def _render_batch(
    labels: np.ndarray, rngs: list[np.random.Generator], image_size: int, supersample: int
) -> np.ndarray:
    """Render ``len(labels)`` scenes: float32 ``[B, image_size, image_size, 3]`` in [0, 1].

    Geometry is drawn per image; blur and lighting run vectorised over the batch. Each
    image uses only its own generator, in a fixed order, so batching does not change it.
    """
    f32 = np.float32
    size = image_size
    n = len(labels)
    img = np.empty((n, size, size, 3), f32)
    params = np.empty((n, 12))
    sigma = np.empty(n)
    noise = np.empty((n, size, size, 3), f32)
    for i, (lab, rng) in enumerate(zip(labels, rngs, strict=True)):
        img[i] = _scene(int(lab), rng, size, supersample)
        params[i] = _photometric_params(rng)
        sigma[i] = rng.uniform(0, 0.025)  # sensor noise
        noise[i] = rng.standard_normal((size, size, 3), dtype=f32)

    def col(k):
        return params[:, k].astype(f32)[:, None, None]

    img = _blur(img, params[:, 11])
    yy, xx = _grid(size)
    mean = img.mean(axis=(1, 2, 3), dtype=np.float64).astype(f32)[:, None, None]
    shade = 1 + col(4) * xx + col(5) * yy
    shadow = col(6) * xx + col(7) * yy > col(8)
    shade = np.where(shadow, shade * col(9), shade)
    img = (img * col(0)[..., None] + (mean * (1 - col(0)))[..., None]) * (
        shade[..., None] * params[:, None, None, 1:4].astype(f32)
    )
    np.clip(img, 0, 1, out=img)
    gamma = np.flatnonzero(params[:, 10] != 1)
    img[gamma] = img[gamma] ** params[gamma, 10].astype(f32)[:, None, None, None]
    img += noise * sigma.astype(f32)[:, None, None, None]
    return np.clip(img, 0, 1, out=img)


def render_sign(
    label: int, rng: np.random.Generator, image_size: int = 32, supersample: int = 2
) -> np.ndarray:
    """Render one scene: float32 ``[image_size, image_size, 3]`` in ``[0, 1]``."""
    return _render_batch(np.array([label]), [rng], image_size, supersample)[0]


def render_split(
    count: int, seed: int, split_id: int, image_size: int = 32, supersample: int = 2
) -> Split:
    """``count`` rendered signs, classes balanced (differ by at most one).

    Image ``i`` is drawn from its own generator seeded by ``(seed, split_id, i)``, so any
    image can be re-rendered alone and splits with different ``split_id`` never coincide.
    """
    labels = np.resize(np.arange(3, dtype=np.int64), count)
    labels = np.random.default_rng([seed, split_id, 1 << 20]).permutation(labels)
    x = np.empty((count, image_size, image_size, 3), np.float32)
    chunk = 256  # bounds the float32 working set to a few MB at 32 px
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        rngs = [np.random.default_rng([seed, split_id, i]) for i in range(start, stop)]
        x[start:stop] = _render_batch(labels[start:stop], rngs, image_size, supersample)
    return Split(x, labels)
