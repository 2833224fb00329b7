"""Loading a model supplied by an untrusted party.

The model is the attacker's artefact (Fine-Pruning's threat model: a user outsources training
and receives a possibly backdoored network), so loading must not run the supplier's code, let
the supplier's graph touch the file system, or exhaust the machine.  :func:`load_model`
accepts a Keras ``.keras`` zip, a legacy ``.h5`` file, or a TF SavedModel directory (returned
as an inference-only :class:`SavedModelPredictor` unless it holds ``model.keras``).  What is
checked at each stage, and the limits, are in SECURITY.md and :mod:`fineprune_tf.io.loader`.

Modules: :mod:`.op_allowlist` (the reviewed TF op allowlist), :mod:`.graph_check` (SavedModel
inspection), :mod:`.keras_config` (Keras configs by resolution), :mod:`.archive` (bounded
archive reading), :mod:`.sandbox` (the bounded child process), :mod:`.loader`.
"""

from .errors import Finding, LoadLimitError, ModelFormatError, UnsafeModelError
from .keras_config import inspect_keras_config
from .limits import LoadLimits
from .loader import inspect_saved_model, load_model
from .predictor import SavedModelPredictor

__all__ = [
    "Finding",
    "LoadLimitError",
    "LoadLimits",
    "ModelFormatError",
    "SavedModelPredictor",
    "UnsafeModelError",
    "inspect_keras_config",
    "inspect_saved_model",
    "load_model",
]
