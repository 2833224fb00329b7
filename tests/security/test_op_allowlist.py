"""The op allowlist covers every registered TensorFlow op: a TF upgrade forces a decision."""

import tensorflow as tf
from tensorflow.core.framework import op_def_pb2
from tensorflow.python.client import _pywrap_tf_session
from tensorflow.python.framework import op_def_registry

from fineprune_tf.io import op_allowlist


def registered_ops() -> list[op_def_pb2.OpDef]:
    buffer = _pywrap_tf_session.TF_GetAllOpList()
    ops = op_def_pb2.OpList()
    ops.ParseFromString(_pywrap_tf_session.TF_GetBuffer(buffer))
    return list(ops.op)


def test_every_registered_op_is_allowed_or_explicitly_refused():
    names = {op.name for op in registered_ops()}
    assert len(names) > 1500 and set(dir(tf.raw_ops)) & names
    undecided = sorted(
        n
        for n in names
        if n not in op_allowlist.ALLOWED_OPS and not op_allowlist.explicitly_refused(n)
    )
    assert not undecided, (
        "ops registered in this TensorFlow that fineprune_tf/io/op_allowlist.py neither allows "
        f"nor refuses (review each and add it to a group): {undecided}"
    )


def test_allowlist_names_registered_ops_only():
    project_ops = {"FinepruneMaskedActivation", "FinepruneMaskedActivationGrad"}
    unknown = sorted(
        n for n in op_allowlist.ALLOWED_OPS - project_ops if op_def_registry.get(n) is None
    )
    assert not unknown, unknown


def test_only_reviewed_control_flow_carries_functions():
    carriers = {
        op.name for op in registered_ops() if any(a.type in ("func", "list(func)") for a in op.attr)
    }
    assert carriers & op_allowlist.ALLOWED_OPS == op_allowlist.FUNCTION_CALLING_OPS
    assert "SymbolicGradient" in carriers and op_allowlist.refusal_reason("SymbolicGradient")


def test_the_issue_ops_are_refused_with_reasons():
    for op, words in [
        ("Abort", "ends or stalls"),
        ("DatasetFromGraph", "tf.data"),
        ("FixedUnigramCandidateSampler", "samples"),
        ("WriteFile", "file"),
        ("Save", "file"),
        ("EagerPyFunc", "Python"),
        ("RpcCall", "network"),
        ("DecodePng", "not needed"),
        ("NotAnOpAtAll", "not in the reviewed"),
    ]:
        assert words in op_allowlist.refusal_reason(op), op
    assert op_allowlist.refusal_reason("Conv2D") is None
