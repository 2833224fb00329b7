"""Loading a model supplied by an untrusted party.

The model is the attacker's artefact (Fine-Pruning's threat model: a user outsources training
and receives a possibly backdoored network), so loading must not run the supplier's code or let
the supplier's graph touch the file system.  :func:`load_model` accepts:

* a **Keras v3 ``.keras`` zip** (any file name).  Before Keras sees it, ``config.json`` is read
  from the zip and every serialized object is checked: ``Lambda`` layers and serialized Python
  lambdas / bytecode, ``TFSMLayer`` (it would load and run another SavedModel), objects from
  modules outside Keras that are not registered with ``keras.saving`` in this process (named
  with their module), Keras objects outside the model-building namespaces (e.g. utilities such
  as ``keras.utils.get_file``) and archive members with absolute or ``..`` paths are refused.
  Keras then loads it with ``safe_mode=True`` (a second, independent refusal of bytecode).
  ``allow_unsafe=True`` skips the refusals and loads with ``safe_mode=False`` -- only for files
  you trust.
* a **legacy HDF5 ``.h5``** Keras model: same config checks (on its ``model_config``), then
  Keras' loader in safe mode.
* a **TF SavedModel directory** (``saved_model.pb`` or ``saved_model.pbtxt``).  Its protobuf is
  parsed and *every* node of every meta graph and of every function in its function library is
  checked **before anything is loaded or run** (:func:`inspect_saved_model`): file-system,
  Python-callback, debugger, summary-writer, file-reading ``tf.data`` / reader, network / RPC,
  TPU and unregistered (custom-library) ops are refused with a list of op types and node names.
  Checkpoint ops (``SaveV2``, ``RestoreV2``, ``MergeV2Checkpoints`` ...) are allowed only in the
  standard saver sub-graph: graph nodes that feed ``saver_def``'s save / restore nodes and
  nothing else, and functions reachable only from those nodes.

  If the directory also holds a ``model.keras`` (as written by
  :func:`fineprune_tf.export.export_saved_model`) and ``prefer_keras`` is true, that file is
  loaded (with the ``.keras`` checks) and returned: a full Keras model that can be converted,
  pruned and fine-tuned.  Otherwise the SavedModel is loaded with ``tf.saved_model.load`` and
  returned as a :class:`SavedModelPredictor`: **inference only** (``predict`` / ``__call__``:
  evaluation and accuracy / attack-success measurement), it cannot be converted, pruned or
  fine-tuned because a SavedModel is a graph of TF ops, not Keras layers.

Nothing is ever written to the input path (files are opened read-only; when Keras insists on a
file-name extension the file is copied to a private temporary directory first).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from google.protobuf import message as pb_message
from google.protobuf import text_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

from fineprune_tf import layers as _fineprune_layers  # noqa: F401  (registers masked layers)

__all__ = [
    "Finding",
    "ModelFormatError",
    "SavedModelPredictor",
    "UnsafeModelError",
    "inspect_keras_config",
    "inspect_saved_model",
    "load_model",
]

_KERAS_IN_SAVED_MODEL = "model.keras"  # = fineprune_tf.export.KERAS_FILENAME
_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


class ModelFormatError(ValueError):
    """The path is not a model this module can read (with the reason)."""


class UnsafeModelError(ValueError):
    """The model contains code-carrying layers or side-effect ops; ``findings`` lists them."""

    def __init__(self, path: str | os.PathLike, findings: list[Finding], hint: str):
        self.findings = list(findings)
        lines = "\n".join(f"  - {f}" for f in self.findings)
        super().__init__(f"refusing to load {os.fspath(path)!r}: {len(self.findings)} unsafe "
                         f"item(s):\n{lines}\n{hint}")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One refused item.

    Attributes:
      kind: op type (SavedModel) or class name (Keras config).
      name: node name / layer name.
      where: ``"graph"``, ``"function <name>"`` (meta graph tags appended) or ``"config"``.
      reason: why it is refused.
    """

    kind: str
    name: str
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name!r} in {self.where}: {self.reason}"


# ----------------------------------------------------------------------------------------------
# Keras configs.

# Keras namespaces whose objects may appear in a model config (layers and what they hold).
_KERAS_MODEL_NAMESPACES = (
    "layers", "initializers", "regularizers", "constraints", "optimizers", "losses", "metrics",
    "activations", "models", "dtype_policies", "quantizers", "ops",
)
# Bare functions (class_name "function") are accepted from these Keras namespaces only.
_KERAS_FUNCTION_NAMESPACES = ("activations", "losses", "metrics")
_CODE_CARRYING = {
    "Lambda": "Lambda layer: runs Python code from the file",
    "__lambda__": "serialized Python bytecode",
    "TFSMLayer": "loads and runs an external SavedModel",
}


def _keras_namespace(module: str) -> str | None:
    """``keras.layers`` / ``keras.src.layers.core.dense`` -> ``layers``; ``keras`` -> ``""``."""
    parts = module.split(".")
    if parts[0] != "keras":
        return None
    if len(parts) == 1:
        return ""
    return parts[2] if parts[1] == "src" and len(parts) > 2 else parts[1]


def _walk_objects(value: Any, owner: str = "") -> Iterator[tuple[dict, str]]:
    """Every serialized object (a dict with ``class_name``) with the name of the innermost
    named object (layer) holding it."""
    if isinstance(value, dict):
        if "class_name" in value:
            inner = value.get("config")
            name = value.get("name") or (inner.get("name") if isinstance(inner, dict) else None)
            owner = str(name) if name else owner
            yield value, owner
        for item in value.values():
            yield from _walk_objects(item, owner)
    elif isinstance(value, list):
        for item in value:
            yield from _walk_objects(item, owner)


def inspect_keras_config(config: dict) -> list[Finding]:
    """Code-carrying, unregistered-custom or out-of-namespace objects in a Keras model config
    (the parsed ``config.json`` of a ``.keras`` file, or an HDF5 ``model_config``)."""
    registered = keras.saving.get_custom_objects()
    findings = []
    for obj, name in _walk_objects(config):
        class_name = str(obj.get("class_name"))
        inner = obj.get("config")
        module = obj.get("module")
        registered_name = obj.get("registered_name")
        if class_name in _CODE_CARRYING:
            findings.append(Finding(class_name, name, "config", _CODE_CARRYING[class_name]))
            continue
        if class_name == "function" and isinstance(inner, str):
            name = inner
        if module is None:
            # Legacy (HDF5) configs carry no module: the class must be a Keras layer or a
            # registered object.
            if (class_name[:2] != "__" and obj.get("inbound_nodes") is not None
                    and not hasattr(keras.layers, class_name) and class_name not in registered
                    and class_name not in ("Functional", "Sequential", "Model")):
                findings.append(Finding(class_name, name, "config",
                                        "unknown layer class (not built into Keras)"))
            continue
        namespace = _keras_namespace(str(module))
        if namespace is None:
            if registered_name not in registered:
                findings.append(Finding(
                    f"{module}.{class_name}", name, "config",
                    "custom object not registered with keras.saving in this process (its "
                    "code would have to be imported from the file's author)"))
            continue
        if class_name == "function":
            if namespace not in _KERAS_FUNCTION_NAMESPACES:
                findings.append(Finding(f"{module}.{name}", name, "config",
                                        "Keras function outside activations/losses/metrics"))
        elif namespace and namespace not in _KERAS_MODEL_NAMESPACES:
            findings.append(Finding(f"{module}.{class_name}", name, "config",
                                    "Keras object outside the model-building namespaces"))
    return findings


def _keras_zip_config(path: pathlib.Path) -> dict:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            bad = [n for n in names if n.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", n)]
            if bad:
                raise UnsafeModelError(path, [Finding("zip member", n, "archive",
                                                      "absolute or '..' path") for n in bad],
                                       "The archive is malformed.")
            if "config.json" not in names:
                raise ModelFormatError(
                    f"{path}: a zip file without config.json is not a Keras .keras model")
            return json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFormatError(f"{path}: not a readable Keras .keras file ({error})") from error


def _hdf5_config(path: pathlib.Path) -> dict:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            raw = handle.attrs.get("model_config")
    except OSError as error:
        raise ModelFormatError(f"{path}: unreadable HDF5 file ({error})") from error
    if raw is None:
        raise ModelFormatError(
            f"{path}: HDF5 file without a model_config (weights only?): not a Keras model")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    return json.loads(raw)


def _load_keras_file(path: pathlib.Path, kind: str, allow_unsafe: bool,
                     compile: bool) -> keras.Model:
    config = _keras_zip_config(path) if kind == "keras" else _hdf5_config(path)
    findings = inspect_keras_config(config)
    if findings and not allow_unsafe:
        raise UnsafeModelError(
            path, findings, "Only built-in Keras layers and objects registered in this process "
            "are loaded; pass allow_unsafe=True only for files you trust.")
    suffix = ".keras" if kind == "keras" else ".h5"
    # Keras picks the format from the file name; never rename or touch the user's file.
    with tempfile.TemporaryDirectory(prefix="fineprune_load_") as tmp:
        source = path
        if path.suffix.lower() not in ((".keras",) if kind == "keras" else (".h5", ".hdf5")):
            source = pathlib.Path(tmp) / f"model{suffix}"
            shutil.copyfile(path, source)
        try:
            model = keras.models.load_model(source, compile=compile,
                                            safe_mode=not allow_unsafe)
        except (TypeError, ValueError) as error:
            if "safe_mode" in str(error) or "unsafe" in str(error).lower():
                raise UnsafeModelError(path, [Finding("config", "?", "keras", str(error))],
                                       "Keras safe mode refused the file.") from error
            raise ModelFormatError(f"{path}: Keras could not load the model: {error}") from error
    return model


# ----------------------------------------------------------------------------------------------
# SavedModel graph inspection.

# Checkpoint I/O: legitimate in the saver sub-graph only.
_SAVER_OPS = frozenset({
    "Save", "SaveV2", "SaveSlices", "Restore", "RestoreV2", "RestoreSlice",
    "MergeV2Checkpoints"})
_DENIED: dict[str, str] = {}
for _names, _reason in [
    (("ReadFile", "WriteFile", "MatchingFiles", "FileSystemSetConfiguration", "ImmutableConst",
      "RecordInput", "InitializeTableFromTextFile", "InitializeTableFromTextFileV2",
      "GenerateVocabRemapping", "LoadAndRemapMatrix", "CalibrationStatisticsSaver",
      "DumpTensor", "DTensorRestoreV2"), "file-system access"),
    (("PyFunc", "PyFuncStateless", "EagerPyFunc"), "calls back into Python code"),
    (("TFRecordDataset", "TFRecordDatasetV2", "TextLineDataset", "FixedLengthRecordDataset",
      "FixedLengthRecordDatasetV2", "CSVDataset", "CSVDatasetV2", "ExperimentalCSVDataset",
      "SqlDataset", "ExperimentalSqlDataset", "LMDBDataset", "ExperimentalLMDBDataset",
      "MatchingFilesDataset", "ExperimentalMatchingFilesDataset", "SnapshotDataset",
      "SnapshotDatasetV2", "SnapshotChunkDataset", "SnapshotDatasetReader",
      "SnapshotNestedDatasetReader", "ListSnapshotChunksDataset", "SaveDataset",
      "SaveDatasetV2", "LoadDataset", "DistributedSave", "DatasetToTFRecord",
      "ExperimentalDatasetToTFRecord", "CacheDataset", "CacheDatasetV2"),
     "tf.data op reading or writing files"),
    (("RemoteCall", "RpcClient", "RpcCall", "RpcServer", "RpcServerRegister", "RpcServerStart",
      "RpcGetValue", "RpcCheckStatus", "DeleteRpcFutureResource", "DataServiceDataset",
      "DataServiceDatasetV2", "DataServiceDatasetV3", "DataServiceDatasetV4",
      "RegisterDataset", "RegisterDatasetV2"), "network / remote execution"),
    (("ImportEvent", "StatsAggregatorSetSummaryWriter"), "summary / event file writer"),
]:
    for _name in _names:
        _DENIED[_name] = _reason
# Names that match a pattern below but only format strings.
_HARMLESS = frozenset({"ShardedFilename", "ShardedFilespec"})
# Families caught by name, so that variants (V2, V3, Experimental...) are covered too.
_DENIED_PATTERNS = [
    (re.compile(r"Writer|^Write"), "summary / event / file writer"),
    (re.compile(r"Reader"), "file reader"),
    (re.compile(r"^Debug"), "debugger hook (sends tensors to files or network)"),
    (re.compile(r"PyFunc"), "calls back into Python code"),
    (re.compile(r"Rpc"), "network / remote execution"),
    (re.compile(r"TPU"), "TPU system / execution op"),
    (re.compile(r"^_?(Send|Recv|HostSend|HostRecv)$|^Xla.*(Send|Recv)|^_Xla.*(Send|Recv)"),
     "cross-device / host transfer"),
    (re.compile(r"^_?Collective|Nccl"), "collective communication with other workers"),
    (re.compile(r"File"), "file-system access"),
]


def _op_problem(node, in_saver: bool, library: set[str]) -> str | None:
    op = node.op
    if op in library:
        return None  # a direct call of a library function: the function itself is inspected
    if op in _SAVER_OPS:
        return None if in_saver else "checkpoint file I/O outside the standard saver sub-graph"
    if op == "PrintV2":
        stream = node.attr["output_stream"].s.decode("utf-8", "replace")
        return f"prints to a file ({stream})" if stream.startswith("file://") else None
    if op in ("DecodeProtoV2", "EncodeProto"):
        source = node.attr["descriptor_source"].s.decode("utf-8", "replace")
        return None if source in ("", "local://") else f"reads a descriptor file ({source})"
    if op in _DENIED:
        return _DENIED[op]
    if op in _HARMLESS:
        return None
    for pattern, reason in _DENIED_PATTERNS:
        if pattern.search(op):
            return reason
    if op_def_registry.get(op) is None:
        return "op not registered in this TensorFlow (needs a custom op library)"
    return None


def _node_base(name: str) -> str:
    return name.lstrip("^").split(":")[0]


def _called_functions(node) -> set[str]:
    """Library functions a NodeDef refers to (function-valued attributes, direct calls)."""
    names = {node.op}
    for value in node.attr.values():
        if value.HasField("func"):
            names.add(value.func.name)
        if value.HasField("list"):
            names.update(f.name for f in value.list.func)
    return names


def _closure(roots: Iterable[str], inputs: dict[str, list[str]]) -> set[str]:
    seen: set[str] = set()
    stack = [r for r in roots if r in inputs]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        stack.extend(i for i in inputs[name] if i in inputs and i not in seen)
    return seen


def _reachable_functions(roots: set[str], library: dict) -> set[str]:
    seen: set[str] = set()
    stack = [r for r in roots if r in library]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in library[name].node_def:
            stack.extend(f for f in _called_functions(node) if f in library and f not in seen)
    return seen


def _inspect_meta_graph(meta_graph) -> list[Finding]:
    tags = ",".join(meta_graph.meta_info_def.tags) or "no tags"
    graph_def = meta_graph.graph_def
    library = {f.signature.name: f for f in graph_def.library.function}
    inputs = {n.name: [_node_base(i) for i in n.input] for n in graph_def.node}
    by_name = {n.name: n for n in graph_def.node}

    saver = meta_graph.saver_def
    saver_roots = {_node_base(n) for n in (saver.save_tensor_name, saver.restore_op_name) if n}
    saver_closure = _closure(saver_roots, inputs)
    # Everything a signature (including __saved_model_init_op) or any non-saver node reaches
    # can run at load or serving time: Save/Restore ops there are not the saver's.
    signature_nodes = {_node_base(t.name) for sig in meta_graph.signature_def.values()
                       for t in list(sig.inputs.values()) + list(sig.outputs.values())}
    other_roots = (set(inputs) - saver_closure) | signature_nodes
    other_closure = _closure(other_roots, inputs)
    saver_only_nodes = saver_closure - other_closure

    saver_functions = _reachable_functions(
        {f for n in saver_only_nodes for f in _called_functions(by_name[n])}, library)
    object_functions = set(meta_graph.object_graph_def.concrete_functions)
    for obj in meta_graph.object_graph_def.nodes:
        kind = obj.WhichOneof("kind")
        if kind == "function":
            object_functions.update(obj.function.concrete_functions)
        elif kind == "bare_concrete_function":
            object_functions.add(obj.bare_concrete_function.concrete_function_name)
    other_functions = _reachable_functions(
        {f for n in other_closure for f in _called_functions(by_name[n])}
        | object_functions | (set(library) - saver_functions), library)
    saver_only_functions = saver_functions - other_functions

    findings = []
    names = set(library)
    for node in graph_def.node:
        reason = _op_problem(node, node.name in saver_only_nodes, names)
        if reason:
            findings.append(Finding(node.op, node.name, f"graph [{tags}]", reason))
    for fname, function in library.items():
        in_saver = fname in saver_only_functions
        for node in function.node_def:
            reason = _op_problem(node, in_saver, names)
            if reason:
                findings.append(Finding(node.op, node.name, f"function {fname} [{tags}]",
                                        reason))
    return findings


def _read_saved_model_proto(path: pathlib.Path) -> saved_model_pb2.SavedModel:
    proto = saved_model_pb2.SavedModel()
    pb, pbtxt = path / "saved_model.pb", path / "saved_model.pbtxt"
    try:
        if pb.is_file():
            proto.ParseFromString(pb.read_bytes())
        elif pbtxt.is_file():
            text_format.Parse(pbtxt.read_text("utf-8"), proto)
        else:
            raise ModelFormatError(
                f"{path}: directory without saved_model.pb (or .pbtxt): not a TF SavedModel"
                + (" (it has config.json: an unzipped .keras? zip it or pass the .keras file)"
                   if (path / "config.json").exists() else ""))
    except (pb_message.DecodeError, text_format.ParseError, UnicodeDecodeError) as error:
        raise ModelFormatError(f"{path}: corrupt saved_model protobuf ({error})") from error
    if not proto.meta_graphs:
        raise ModelFormatError(f"{path}: SavedModel without any meta graph")
    return proto


def inspect_saved_model(path: str | os.PathLike) -> list[Finding]:
    """Refused ops of the SavedModel directory ``path``, found by parsing its protobuf only
    (nothing is loaded or executed).  Empty list = nothing refused.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ModelFormatError: not a directory with a parsable ``saved_model.pb`` / ``.pbtxt``.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ModelFormatError(f"{path}: a SavedModel is a directory")
    proto = _read_saved_model_proto(path)
    findings = []
    for meta_graph in proto.meta_graphs:
        findings.extend(_inspect_meta_graph(meta_graph))
    return findings


class SavedModelPredictor:
    """Inference-only wrapper of a SavedModel signature, callable like a Keras model.

    ``predictor(x)`` runs one batch and returns a tensor (a dict when the signature has
    several outputs); ``predictor.predict(x, batch_size=256)`` runs numpy batches and returns
    numpy.  ``x`` is an array for a single-input signature, else a dict keyed by input name or
    a list in ``input_names`` order.
    """

    def __init__(self, loaded: Any, path: pathlib.Path, signature: str = "serving_default"):
        if signature not in loaded.signatures:
            raise ModelFormatError(
                f"{path}: no {signature!r} signature (has: {sorted(loaded.signatures)})")
        self._loaded = loaded  # keeps the restored variables alive
        self.path = path
        self.name = path.name
        self.signature = loaded.signatures[signature]
        _, specs = self.signature.structured_input_signature
        self.input_specs: dict[str, tf.TensorSpec] = dict(specs)
        self.input_names: list[str] = list(self.signature._arg_keywords or sorted(specs))
        self.output_names: list[str] = sorted(self.signature.structured_outputs)

    def __repr__(self) -> str:
        return (f"SavedModelPredictor({os.fspath(self.path)!r}, inputs={self.input_names}, "
                f"outputs={self.output_names})")

    def _feeds(self, x) -> dict[str, tf.Tensor]:
        if isinstance(x, dict):
            values = x
        elif isinstance(x, (list, tuple)) and len(self.input_names) > 1:
            values = dict(zip(self.input_names, x, strict=True))
        else:
            if len(self.input_names) != 1:
                raise ValueError(f"the signature has inputs {self.input_names}; pass a dict")
            values = {self.input_names[0]: x}
        return {k: tf.convert_to_tensor(v, dtype=self.input_specs[k].dtype)
                for k, v in values.items()}

    def __call__(self, x, training: bool = False):
        outputs = self.signature(**self._feeds(x))
        if len(outputs) == 1:
            return next(iter(outputs.values()))
        return outputs

    def predict(self, x, batch_size: int = 256, verbose: int = 0):
        """numpy outputs for numpy inputs (``[N, ...]``), in batches of ``batch_size``."""
        del verbose
        feeds = self._feeds(x)
        n = int(next(iter(feeds.values())).shape[0])
        chunks: list = []
        for start in range(0, n, batch_size):
            part = self({k: v[start:start + batch_size] for k, v in feeds.items()})
            chunks.append(part)
        if not chunks:
            raise ValueError("empty input")
        if isinstance(chunks[0], dict):
            return {k: np.concatenate([c[k].numpy() for c in chunks]) for k in chunks[0]}
        return np.concatenate([c.numpy() for c in chunks])


def _sniff(path: pathlib.Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(_ZIP_MAGIC):
        return "keras"
    if head == _HDF5_MAGIC:
        return "h5"
    raise ModelFormatError(
        f"{path}: not a model: expected a Keras .keras zip, a legacy Keras .h5 file or a TF "
        "SavedModel directory")


def load_model(path: str | os.PathLike, allow_unsafe: bool = False, prefer_keras: bool = True,
               compile: bool = False) -> keras.Model | SavedModelPredictor:
    """Loads an untrusted model file or SavedModel directory (see the module docstring).

    Args:
      path: ``.keras`` zip, legacy ``.h5`` or SavedModel directory.
      allow_unsafe: load even when code-carrying layers / custom objects / side-effect ops
        are found (Keras ``safe_mode=False``).  For trusted files only.
      prefer_keras: for a SavedModel directory holding ``model.keras``, return that Keras model
        (after checking both) instead of an inference-only predictor.
      compile: restore the file's training configuration (optimizer, loss); off by default
        since the supplier's training setup is not needed to clean the model.

    Returns:
      A ``keras.Model``, or a :class:`SavedModelPredictor` for a SavedModel without
      ``model.keras``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ModelFormatError: not a supported model (with the reason).
      UnsafeModelError: refused content (``.findings`` lists every item).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        findings = inspect_saved_model(path)
        if findings and not allow_unsafe:
            raise UnsafeModelError(
                path, findings, "The SavedModel was not loaded and nothing in it ran; pass "
                "allow_unsafe=True only for a model you trust.")
        embedded = path / _KERAS_IN_SAVED_MODEL
        if prefer_keras and embedded.is_file():
            return _load_keras_file(embedded, "keras", allow_unsafe, compile)
        try:
            loaded = tf.saved_model.load(str(path))
        except (ValueError, tf.errors.OpError, OSError) as error:
            raise ModelFormatError(f"{path}: TensorFlow could not load the SavedModel: "
                                   f"{error}") from error
        return SavedModelPredictor(loaded, path)
    if path.stat().st_size == 0:
        raise ModelFormatError(f"{path}: empty file: not a model")
    return _load_keras_file(path, _sniff(path), allow_unsafe, compile)
