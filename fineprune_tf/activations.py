"""Which activation functions mix channels: the one rule shared by the masked layers (which
refuse to prune such a layer) and the graph registry (which gives it the cross-channel role).

It sits below both so that neither imports the other for it.
"""

from __future__ import annotations

from typing import Any

import keras

__all__ = ["CROSS_CHANNEL_ACTIVATIONS", "activation_name", "cross_channel_activation"]

#: Activation names whose output mixes channels (softmax normalises over them, glu halves them).
CROSS_CHANNEL_ACTIVATIONS = frozenset({"softmax", "log_softmax", "sparsemax", "glu"})


def activation_name(activation: Any) -> str:
    """The serialised name of an activation function (``"relu"``, ``"softmax"``, ...)."""
    try:
        name = keras.activations.serialize(activation)
    except (ValueError, TypeError):
        name = None
    if isinstance(name, dict):
        name = name.get("config", name.get("class_name"))
    return name if isinstance(name, str) else getattr(activation, "__name__", "")


def cross_channel_activation(layer: Any) -> bool:
    """Whether ``layer`` has an ``activation`` that mixes channels (e.g. a conv with
    ``activation="softmax"``): its channels cannot be pruned independently."""
    activation = getattr(layer, "activation", None)
    return activation is not None and activation_name(activation) in CROSS_CHANNEL_ACTIVATIONS
