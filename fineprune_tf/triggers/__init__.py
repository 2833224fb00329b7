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
* :class:`Blended` -- Chen et al. 2017: a seeded random key alpha-blended over the input.
* :class:`SIG` -- Barni et al. 2019: a horizontal sinusoid (clean-label with
  :class:`fineprune_tf.poison.CleanLabel`).
* :class:`WaNet` -- Nguyen & Tran 2021: a smooth warp, with its noise mode.
* :class:`Compose` -- several triggers applied in order.

Each family lives in its own module (``patches``, ``noise``, ``blend``, ``warp``; the base
class, registry and persistence in ``base``); everything is importable from here.
"""

from .base import REGISTRY, Compose, Trigger, from_dict, load, save, to_dict
from .blend import SIG, Blended
from .noise import NoisePattern, WaveformNoise
from .patches import Pattern, PostIt, SinglePixel, Sunglasses
from .warp import WaNet

__all__ = [
    "Trigger",
    "Sunglasses",
    "NoisePattern",
    "WaveformNoise",
    "PostIt",
    "SinglePixel",
    "Pattern",
    "Blended",
    "SIG",
    "WaNet",
    "Compose",
    "save",
    "load",
    "from_dict",
    "to_dict",
    "REGISTRY",
]
