"""Checking a Keras model config by resolution, not by spelling.

Every serialized object in the config (a dict with ``class_name``) is resolved to the Python
object Keras would build -- registered custom objects first (by ``registered_name``, or by
name for functions), then the Keras API name ``<module>.<class_name>``, then Keras' built-in
function modules for ``module="builtins"``, then the attribute of an already imported Keras
module -- exactly in the order of Keras 3's deserializer, and the resolved object must be in
the allowlist below.  So ``{"module": "keras", "class_name": "layers.Lambda"}`` is a Lambda
like any other spelling, and a function reference (``{"class_name": "function", ...}``) that
would make Keras call a utility is refused.  Legacy (HDF5) configs have no module: the class
name must name an allowlisted object.  String values that Keras would resolve through the
registered custom objects are resolved too.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Iterator
from typing import Any

import keras

from fineprune_tf import _keras_compat
from fineprune_tf import layers as fineprune_layers

from .errors import Finding
from .op_allowlist import KERAS_CODE_CARRYING

__all__ = ["allowed_keras_objects", "inspect_keras_config"]

# Layers a model of this toolkit (image / audio classifiers) is built from.  Wrappers
# (Bidirectional, TimeDistributed) hold layer configs that are checked like the rest.
_LAYERS = (
    "InputLayer",
    "Dense",
    "EinsumDense",
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "SeparableConv1D",
    "SeparableConv2D",
    "MaxPooling1D",
    "MaxPooling2D",
    "MaxPooling3D",
    "AveragePooling1D",
    "AveragePooling2D",
    "AveragePooling3D",
    "GlobalMaxPooling1D",
    "GlobalMaxPooling2D",
    "GlobalMaxPooling3D",
    "GlobalAveragePooling1D",
    "GlobalAveragePooling2D",
    "GlobalAveragePooling3D",
    "BatchNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "UnitNormalization",
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "Flatten",
    "Reshape",
    "Permute",
    "RepeatVector",
    "Cropping1D",
    "Cropping2D",
    "Cropping3D",
    "ZeroPadding1D",
    "ZeroPadding2D",
    "ZeroPadding3D",
    "UpSampling1D",
    "UpSampling2D",
    "UpSampling3D",
    "Activation",
    "ReLU",
    "LeakyReLU",
    "PReLU",
    "ELU",
    "Softmax",
    "Add",
    "Subtract",
    "Multiply",
    "Average",
    "Maximum",
    "Minimum",
    "Concatenate",
    "Dot",
    "Embedding",
    "Identity",
    "Rescaling",
    "Normalization",  # keras.applications' preprocessing (EfficientNet, ConvNeXt): mean / var
    "Resizing",
    "CenterCrop",
    "Masking",
    "SimpleRNN",
    "LSTM",
    "GRU",
    "SimpleRNNCell",
    "LSTMCell",
    "GRUCell",
    "Bidirectional",
    "TimeDistributed",
    "MultiHeadAttention",
    "Attention",
)
# Namespaces whose every public class of the given base (and function, where noted) is plain
# numerics: weight initializers, penalties, constraints, activations, dtype policies, and the
# compile-time objects (ignored by the default ``compile=False`` but checked anyway).
_NAMESPACES = (
    ("initializers", "Initializer", False),
    ("regularizers", "Regularizer", False),
    ("constraints", "Constraint", False),
    ("activations", None, True),
    ("dtype_policies", "DTypePolicy", False),
    ("losses", "Loss", True),
    ("metrics", "Metric", True),
    ("optimizers", "Optimizer", False),
)
_NOT_MODELLING = frozenset({"get", "serialize", "deserialize"})
# Plain data markers of Keras' serializer (tensors, arrays, bytes, slices).
_DATA_MARKERS = frozenset(
    {"__keras_tensor__", "__tensor__", "__numpy__", "__bytes__", "__ellipsis__", "__slice__"}
)
_BUILTIN_FUNCTION_MODULES = (
    "activations",
    "constraints",
    "initializers",
    "losses",
    "metrics",
    "optimizers",
    "regularizers",
)


@functools.lru_cache(maxsize=1)
def allowed_keras_objects() -> frozenset:
    """Every class / function a config may resolve to."""
    allowed: set = set(_keras_compat.model_classes())
    allowed.update(getattr(keras.layers, name) for name in _LAYERS if hasattr(keras.layers, name))
    allowed.update(fineprune_layers.MASKED_LAYERS)
    for namespace, base_name, functions in _NAMESPACES:
        module = getattr(keras, namespace)
        base = getattr(module, base_name) if base_name else None
        for name, value in vars(module).items():
            if name.startswith("_") or name in _NOT_MODELLING:
                continue
            if inspect.isclass(value) and base is not None and issubclass(value, base):
                allowed.add(value)
            elif functions and inspect.isfunction(value):
                allowed.add(value)
    allowed.add(keras.DTypePolicy)
    # What keras.applications networks record besides layers: Python arithmetic on symbolic
    # tensors (``x + 3.0``, ``x * y``: MobileNetV3's hard-swish, EfficientNet's SE gates) is an
    # Add / Subtract / Multiply / Divide node of ``keras.ops``, and ConvNeXt has two helper
    # layers (LayerScale ``x * gamma``, StochasticDepth).  Each computes plain numerics from
    # its inputs and weights; nothing else of ``keras.ops`` is allowed.
    allowed.update(_keras_compat.arithmetic_operations())
    allowed.update(_keras_compat.applications_channel_layers().values())
    return frozenset(allowed)


def _refused_classes() -> tuple[type, ...]:
    return tuple(
        getattr(keras.layers, name)
        for name in ("Lambda", "TFSMLayer")
        if hasattr(keras.layers, name)
    )


def _resolve(name: str, registered_name: Any, module: Any, is_function: bool) -> Any:
    """What Keras 3's ``_retrieve_class_or_fn`` returns, without importing anything new;
    None when Keras would fail or import a module that is not loaded."""
    key = name if is_function else registered_name
    if isinstance(key, str):
        found = keras.saving.get_registered_object(key)
        if found is not None:
            return found
    if not isinstance(module, str) or not module:
        return None
    symbol = _keras_compat.keras_symbol
    if module == "keras" or module.startswith("keras."):
        found = symbol(f"{module}.{name}")
        if found is not None:
            return found
    if is_function and module == "builtins":
        for namespace in _BUILTIN_FUNCTION_MODULES:
            found = symbol(f"keras.{namespace}.{name}")
            if found is not None:
                return found
    if module.split(".", 1)[0] in {"keras", "keras_hub", "keras_cv", "keras_nlp"}:
        loaded = sys.modules.get(module)
        return None if loaded is None else vars(loaded).get(name)
    return None


def _walk(value: Any, owner: str = "") -> Iterator[tuple[Any, str]]:
    """Every dict with ``class_name`` and every string, with the innermost named object."""
    if isinstance(value, dict):
        if "class_name" in value:
            inner = value.get("config")
            name = value.get("name") or (inner.get("name") if isinstance(inner, dict) else None)
            owner = str(name) if name else owner
            yield value, owner
        for item in value.values():
            yield from _walk(item, owner)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item, owner)
    elif isinstance(value, str):
        yield value, owner


def _spelled_as_code(*names: Any) -> str | None:
    for name in names:
        if isinstance(name, str):
            last = name.replace(">", ".").split(".")[-1]
            if last in KERAS_CODE_CARRYING:
                return last
    return None


def _check_object(obj: dict, owner: str, legacy: bool) -> Finding | None:
    class_name, inner = obj.get("class_name"), obj.get("config")
    module, registered = obj.get("module"), obj.get("registered_name", class_name)
    if not isinstance(class_name, str):
        return Finding(repr(class_name)[:60], owner, "config", "class_name is not a string")
    spelled = _spelled_as_code(class_name, registered)
    if spelled:
        return Finding(spelled, owner, "config", KERAS_CODE_CARRYING[spelled])
    if class_name in _DATA_MARKERS:
        return None
    if class_name.startswith("__"):
        return Finding(class_name, owner, "config", "unknown special object of the serializer")
    is_function = class_name == "function"
    if is_function and not isinstance(inner, str):
        return Finding("function", owner, "config", "function reference without a name")
    name = inner if is_function else class_name
    spelled = _spelled_as_code(name)
    if spelled:
        return Finding(spelled, owner, "config", KERAS_CODE_CARRYING[spelled])
    allowed = allowed_keras_objects()
    if legacy or module is None:
        resolved = keras.saving.get_registered_object(name)
        if resolved is None:
            by_name = {getattr(o, "__name__", None): o for o in allowed}
            resolved = by_name.get(name)
        spelling = name
    else:
        resolved = _resolve(name, registered, module, is_function)
        spelling = f"{module}.{name}"
    if resolved is None:
        return Finding(
            spelling,
            owner,
            "config",
            "does not resolve to a known Keras object (a custom object not "
            "registered in this process, or a module Keras would import)",
        )
    if inspect.isclass(resolved) and issubclass(resolved, _refused_classes()):
        return Finding(
            resolved.__name__,
            owner,
            "config",
            KERAS_CODE_CARRYING.get(resolved.__name__, "runs code from the file"),
        )
    if resolved not in allowed:
        qualified = f"{getattr(resolved, '__module__', '?')}.{getattr(resolved, '__name__', '?')}"
        return Finding(
            spelling,
            owner,
            "config",
            f"resolves to {qualified}, which is not an allowlisted layer / "
            "initializer / regularizer / constraint / activation / dtype policy",
        )
    return None


def inspect_keras_config(config: Any, legacy: bool = False) -> list[Finding]:
    """Refused objects of a Keras model config (the parsed ``config.json`` of a ``.keras``
    file, or an HDF5 ``model_config`` with ``legacy=True``); empty list = nothing refused."""
    findings = []
    custom = keras.saving.get_custom_objects()
    allowed = allowed_keras_objects()
    for value, owner in _walk(config):
        if isinstance(value, str):
            # Keras resolves a bare string through the registered custom objects first.
            resolved = custom.get(value)
            if resolved is not None and resolved not in allowed:
                findings.append(
                    Finding(
                        value,
                        owner,
                        "config",
                        "names a registered custom object that is not allowlisted",
                    )
                )
            continue
        finding = _check_object(value, owner, legacy)
        if finding:
            findings.append(finding)
    return findings
