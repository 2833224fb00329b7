"""Static inspection of a SavedModel's graphs against the op allowlist (nothing runs).

Every node of every meta graph and of every function in its library -- serving functions,
resource initializers, restore functions and gradients alike -- is checked:

* its op must be in :data:`~fineprune_tf.io.op_allowlist.ALLOWED_OPS` or be a call of a
  function of the same library (a library function named like a registered op is refused);
* only the reviewed control-flow ops may carry a function (``func`` / ``list(func)``
  attribute), and the functions they name must be in the library (where they are inspected);
* checkpoint ops (``RestoreV2``, ``SaveV2``, ``MergeV2Checkpoints``) only in the standard
  saver sub-graph (reached from ``saver_def`` and from nothing else), with their file name
  computed from the saver's file-name argument (never a constant path);
* ``PrintV2`` only to the standard streams;
* a meta graph without an object graph (a TF1 SavedModel, whose loading runs its restore
  sub-graph with the file's own arguments) is refused unless ``allow_unsafe``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable

from google.protobuf import message as pb_message
from google.protobuf import text_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

from .errors import Finding, LoadLimitError, ModelFormatError
from .limits import LoadLimits
from .op_allowlist import CHECKPOINT_OPS, FUNCTION_CALLING_OPS, PRINT_OPS, refusal_reason

__all__ = ["inspect_saved_model_proto", "read_saved_model_proto"]

_STD_STREAMS = frozenset({"", "stderr", "stdout", "log(info)", "log(warning)", "log(error)"})
# Ops a checkpoint file name may be computed with (string formatting only).
_FILENAME_OPS = frozenset(
    {
        "Identity",
        "StringJoin",
        "ShardedFilename",
        "Select",
        "SelectV2",
        "StaticRegexFullMatch",
        "Pack",
        "Const",
    }
)
# Which inputs of a checkpoint op are file names.
_FILENAME_INPUTS = {"RestoreV2": (0,), "SaveV2": (0,), "MergeV2Checkpoints": (0, 1)}


def _node_base(name: str) -> str:
    return name.lstrip("^").split(":")[0]


def _called_functions(node) -> set[str]:
    names = set()
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
        if name not in seen:
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
            calls = _called_functions(node) | {node.op}
            stack.extend(f for f in calls if f in library and f not in seen)
    return seen


def _const_string_ok(node) -> bool:
    tensor = node.attr["value"].tensor
    for raw in tensor.string_val:
        text = raw.decode("utf-8", "replace")
        if text.startswith(("/", "\\")) or ".." in text or ":" in text:
            return False
    return True


def _filename_problem(node, by_name: dict, bound: set[str]) -> str | None:
    """None when every file-name input of checkpoint op ``node`` is computed, with string
    formatting only, from a name in ``bound`` (the saver's file-name argument)."""
    for index in _FILENAME_INPUTS[node.op]:
        if index >= len(node.input):
            return "checkpoint op without a file-name input"
        stack, seen, reached = [_node_base(node.input[index])], set(), False
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in bound:
                reached = True
                continue
            source = by_name.get(name)
            if source is None or source.op not in _FILENAME_OPS:
                return f"checkpoint file name computed by {getattr(source, 'op', name)!r}"
            if source.op == "Const" and not _const_string_ok(source):
                return "checkpoint file name built from a constant absolute or '..' path"
            stack.extend(_node_base(i) for i in source.input if not i.startswith("^"))
        if not reached:
            return "checkpoint file name not derived from the saver's file-name argument"
    return None


def _op_problem(
    node, in_saver: bool, library: set[str], by_name: dict, bound: set[str]
) -> str | None:
    op = node.op
    calls = _called_functions(node)
    if op in library:
        return None  # a direct call: the function itself is inspected
    reason = refusal_reason(op)
    if reason:
        if op_def_registry.get(op) is None:
            return "op not registered in this TensorFlow (needs a custom op library)"
        return reason
    if calls and op not in FUNCTION_CALLING_OPS:
        return f"carries a function ({', '.join(sorted(calls))}) outside reviewed control flow"
    missing = calls - library
    if missing:
        return f"calls functions that are not in the file's library: {sorted(missing)}"
    if op in CHECKPOINT_OPS:
        if not in_saver:
            return "checkpoint file I/O outside the standard saver sub-graph"
        return _filename_problem(node, by_name, bound)
    if op in PRINT_OPS and node.attr["output_stream"].s:
        stream = node.attr["output_stream"].s.decode("utf-8", "replace")
        return None if stream in _STD_STREAMS else f"prints to {stream!r}"
    return None


def _object_functions(meta_graph) -> set[str]:
    names = set(meta_graph.object_graph_def.concrete_functions)
    for obj in meta_graph.object_graph_def.nodes:
        kind = obj.WhichOneof("kind")
        if kind == "function":
            names.update(obj.function.concrete_functions)
        elif kind == "bare_concrete_function":
            names.add(obj.bare_concrete_function.concrete_function_name)
    return names


def _saver_scope(meta_graph, library: dict) -> tuple[set[str], set[str], set[str]]:
    """(graph nodes, functions) reached only from ``saver_def``, and the bound file-name
    names (the saver's file-name placeholder and the saver functions' first argument)."""
    graph_def = meta_graph.graph_def
    inputs = {n.name: [_node_base(i) for i in n.input] for n in graph_def.node}
    by_name = {n.name: n for n in graph_def.node}
    saver = meta_graph.saver_def
    roots = {_node_base(n) for n in (saver.save_tensor_name, saver.restore_op_name) if n}
    saver_closure = _closure(roots, inputs)
    signature_nodes = {
        _node_base(t.name)
        for sig in meta_graph.signature_def.values()
        for t in list(sig.inputs.values()) + list(sig.outputs.values())
    }
    other_closure = _closure((set(inputs) - saver_closure) | signature_nodes, inputs)
    saver_nodes = saver_closure - other_closure
    saver_functions = _reachable_functions(
        {f for n in saver_nodes for f in _called_functions(by_name[n]) | {by_name[n].op}}, library
    )
    other_functions = _reachable_functions(
        {f for n in other_closure for f in _called_functions(by_name[n]) | {by_name[n].op}}
        | _object_functions(meta_graph)
        | (set(library) - saver_functions),
        library,
    )
    saver_only = saver_functions - other_functions
    bound = {_node_base(saver.filename_tensor_name)} if saver.filename_tensor_name else set()
    return saver_nodes, saver_only, bound


def inspect_meta_graph(meta_graph, allow_tf1: bool = False) -> list[Finding]:
    """Refused items of one meta graph (see the module docstring)."""
    tags = ",".join(meta_graph.meta_info_def.tags) or "no tags"
    graph_def = meta_graph.graph_def
    library = {f.signature.name: f for f in graph_def.library.function}
    findings = []
    if not meta_graph.object_graph_def.nodes and not allow_tf1:
        findings.append(
            Finding(
                "SavedModel",
                f"meta graph [{tags}]",
                "file",
                "TF1 SavedModel (no object graph): loading it runs its own restore sub-graph "
                "with arguments from the file; re-export it with TF2 (tf.saved_model.save)",
            )
        )
    for name in library:
        if op_def_registry.get(name) is not None:
            findings.append(
                Finding(
                    "function",
                    name,
                    f"library [{tags}]",
                    "a library function named like a registered op",
                )
            )
    saver_nodes, saver_functions, bound = _saver_scope(meta_graph, library)
    names = set(library)
    by_name = {n.name: n for n in graph_def.node}
    for node in graph_def.node:
        reason = _op_problem(node, node.name in saver_nodes, names, by_name, bound)
        if reason:
            findings.append(Finding(node.op, node.name, f"graph [{tags}]", reason))
    for fname, function in library.items():
        by_name = {n.name: n for n in function.node_def}
        args = {a.name for a in function.signature.input_arg}
        in_saver = fname in saver_functions
        for node in function.node_def:
            reason = _op_problem(node, in_saver, names, by_name, args)
            if reason:
                findings.append(Finding(node.op, node.name, f"function {fname} [{tags}]", reason))
    return findings


def read_saved_model_proto(
    path: pathlib.Path, limits: LoadLimits, shown: pathlib.Path | None = None
) -> saved_model_pb2.SavedModel:
    """Parses ``saved_model.pb`` (or ``.pbtxt``) of the directory ``path`` (messages name
    ``shown``, default ``path``)."""
    shown = shown or path
    proto = saved_model_pb2.SavedModel()
    pb, pbtxt = path / "saved_model.pb", path / "saved_model.pbtxt"
    source = pb if pb.is_file() else pbtxt if pbtxt.is_file() else None
    if source is None:
        raise ModelFormatError(
            f"{shown}: directory without saved_model.pb (or .pbtxt): not a TF SavedModel"
            + (
                " (it has config.json: an unzipped .keras? zip it or pass the .keras file)"
                if (path / "config.json").exists()
                else ""
            )
        )
    if source.stat().st_size > limits.graph_bytes:
        raise LoadLimitError(
            f"{shown / source.name}: {source.stat().st_size:,} bytes, over "
            f"the graph limit of {limits.graph_bytes:,} bytes"
        )
    try:
        if source is pb:
            proto.ParseFromString(pb.read_bytes())
        else:
            text_format.Parse(pbtxt.read_text("utf-8"), proto)
    except (
        pb_message.DecodeError,
        text_format.ParseError,
        UnicodeDecodeError,
        RecursionError,
    ) as error:
        raise ModelFormatError(
            f"{shown}: corrupt saved_model protobuf ({str(error)[:200]})"
        ) from None
    if not proto.meta_graphs:
        raise ModelFormatError(f"{shown}: SavedModel without any meta graph")
    return proto


def inspect_saved_model_proto(
    proto: saved_model_pb2.SavedModel, allow_tf1: bool = False
) -> list[Finding]:
    """Refused items of every meta graph of ``proto``."""
    findings = []
    for meta_graph in proto.meta_graphs:
        findings.extend(inspect_meta_graph(meta_graph, allow_tf1))
    return findings
