"""SavedModel export of a plain (shrunk) model with a stock ``serving_default`` signature."""

from __future__ import annotations

import os
import pathlib
import shutil

import keras
import tensorflow as tf

from fineprune_tf import _keras_compat as compat
from fineprune_tf import io as fp_io
from fineprune_tf.conversion import ConversionError
from fineprune_tf.export.shrink import rebuild_plain
from fineprune_tf.graph import Graph

__all__ = ["KERAS_FILENAME", "export_saved_model"]

#: The ``.keras`` copy of the exported model, inside the SavedModel directory.
KERAS_FILENAME = "model.keras"


def _serving_function(model: keras.Model, output_name: str) -> tf.types.experimental.Callable:
    """A ``tf.function`` with one named float32 ``[None, ...]`` argument per model input,
    returning a dict of named outputs."""
    struct = compat.input_struct(model)
    flat_inputs = keras.tree.flatten(struct)
    specs = []
    for t in flat_inputs:
        if t.dtype != "float32":
            raise ConversionError(
                f"input {t.name!r} has dtype {t.dtype}; only float32 inputs are exported"
            )
        specs.append(
            tf.TensorSpec((None, *t.shape[1:]), tf.float32, name=compat.producing_operation(t).name)
        )
    output_layers = Graph(model).output_names

    def serve(*inputs):
        x = keras.tree.pack_sequence_as(struct, list(inputs))
        y = keras.tree.flatten(model(x, training=False))
        if len(y) == 1:
            return {output_name: y[0]}
        return dict(zip(output_layers, y, strict=True))

    return tf.function(serve, input_signature=specs)


def export_saved_model(
    model: keras.Model,
    path: str | os.PathLike,
    shrink: bool = True,
    output_name: str = "probabilities",
    overwrite: bool = False,
    verify: bool = True,
) -> keras.Model:
    """Writes ``model`` as a TF SavedModel servable by stock TensorFlow.

    Layout::

      path/saved_model.pb, path/variables/, ...   the SavedModel (tag "serve")
      path/model.keras                            the same plain Keras model (KERAS_FILENAME)

    The ``serving_default`` signature takes one float32 tensor per model input, named after
    the input layer (e.g. ``input``: ``[None, H, W, C]``, batch dimension unknown) and returns
    ``{output_name: [None, num_classes]}`` (the model's output: probabilities for the task
    models; for several outputs, one entry per output layer name).  Inference mode (dropout
    off, BN moving statistics).

    Args:
      model: a (masked) functional / Sequential model.
      path: directory to create.
      shrink: remove pruned channels (:func:`shrink`); otherwise export :func:`to_plain`'s model
        (same shapes, pruned weights zeroed).  Either way the artefact contains only stock
        TensorFlow ops and Keras layers: serving never needs ``fineprune_tf`` or its custom op.
      output_name: key of the (single) output in the signature.
      overwrite: replace an existing ``path``; otherwise an existing non-empty path is an error.
      verify: check the plain model against ``model`` (see :func:`shrink`) and re-inspect the
        written graph with :func:`fineprune_tf.io.inspect_saved_model`.

    Returns:
      The plain Keras model that was exported.
    """
    path = pathlib.Path(path)
    if path.exists():
        if not overwrite and (path.is_file() or any(path.iterdir())):
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    plain = rebuild_plain(model, remove=shrink, verify=verify)
    serve = _serving_function(plain, output_name)
    archive = keras.export.ExportArchive()
    archive.track(plain)
    archive.add_endpoint("serving_default", serve)
    archive.write_out(str(path), verbose=False)
    plain.save(str(path / KERAS_FILENAME))
    if verify:
        findings = fp_io.inspect_saved_model(path)
        if findings:
            raise ConversionError(
                "internal error: the exported graph contains refused ops: "
                + "; ".join(str(f) for f in findings)
            )
    return plain
