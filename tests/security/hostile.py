"""Builders of hostile (and benign) models and data, made inside the tests: no payload is
committed.  Each builder writes into ``folder`` and returns the path to load; markers that a
successful attack would create are paths inside ``folder`` (the watched root)."""

from __future__ import annotations

import json
import pathlib
import struct
import zipfile
import zlib

import keras
import numpy as np
import tensorflow as tf
from PIL import Image
from tensorflow.core.framework import graph_pb2
from tensorflow.core.protobuf import saved_model_pb2

# ------------------------------------------------------------------------- Keras files


def small_cnn() -> keras.Model:
    """A benign model that solves :func:`clean_arrays` (class 1 iff the mean pixel > 0.5):
    channel 0 computes x, channel 1 computes 1 - x, channel 2 is unused, so pruning has a
    meaningful stopping point (the defenses refuse a model at chance)."""
    inputs = keras.Input((4, 4, 1), name="image")
    conv_layer = keras.layers.Conv2D(3, 1, activation="relu", name="conv")
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(conv_layer(inputs))
    dense = keras.layers.Dense(2, activation="softmax", name="out")
    model = keras.Model(inputs, dense(pooled))
    conv_layer.kernel.assign(np.array([1.0, -1.0, 0.5], np.float32).reshape(1, 1, 1, 3))
    conv_layer.bias.assign(np.array([0.0, 1.0, 0.0], np.float32))
    dense.kernel.assign(np.array([[0.0, 10.0], [0.0, -10.0], [0.0, 0.0]], np.float32))
    dense.bias.assign(np.zeros(2, np.float32))
    return model


def rewrite_zip(path: pathlib.Path, config_edit=None, extra: dict | None = None) -> None:
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    if config_edit:
        config = json.loads(members["config.json"])
        config_edit(config)
        members["config.json"] = json.dumps(config).encode()
    members.update(extra or {})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _layer(config: dict, name: str) -> dict:
    return next(layer for layer in config["config"]["layers"] if layer["name"] == name)


def benign_keras(folder: pathlib.Path, name: str = "model.keras") -> pathlib.Path:
    path = folder / "source.keras"
    small_cnn().save(path)
    return path.rename(folder / name)


def lambda_spelled_as_api_path(
    folder: pathlib.Path, marker: pathlib.Path, harmful: bool = True
) -> pathlib.Path:
    """Row 6: a "pool" layer spelled {"module": "keras", "class_name": "layers.Lambda"} whose
    ``arguments`` make it call a public Keras utility that writes an image to ``marker``."""
    path = benign_keras(folder, "spelled_lambda.keras")

    def edit(config):
        layer = _layer(config, "pool")
        function = (
            {
                "module": "keras.utils",
                "class_name": "function",
                "config": "save_img",
                "registered_name": "function",
            }
            if harmful
            else {
                "module": "keras.ops",
                "class_name": "function",
                "config": "mean",
                "registered_name": "function",
            }
        )
        layer.update(module="keras", class_name="layers.Lambda", registered_name=None)
        layer["config"] = {
            "name": "pool",
            "function": function,
            "arguments": {"path": str(marker)} if harmful else {"axis": [1, 2]},
            "output_shape": [3],
        }

    rewrite_zip(path, edit)
    return path


def lambda_by_module_path(folder: pathlib.Path) -> pathlib.Path:
    path = benign_keras(folder, "module_lambda.keras")

    def edit(config):
        layer = _layer(config, "pool")
        layer.update(
            module="keras.src.layers.core.lambda_layer",
            class_name="Lambda",
            registered_name="Lambda",
        )

    rewrite_zip(path, edit)
    return path


def activation_calls_utility(folder: pathlib.Path, marker: pathlib.Path) -> pathlib.Path:
    """An activation that is a Keras utility (get_file) / a Python builtin."""
    path = benign_keras(folder, "utility_activation.keras")

    def edit(config):
        _layer(config, "conv")["config"]["activation"] = {
            "module": "keras.utils",
            "class_name": "function",
            "config": "get_file",
            "registered_name": "function",
        }
        _layer(config, "out")["config"]["activation"] = {
            "module": "builtins",
            "class_name": "function",
            "config": "exec",
            "registered_name": "function",
        }

    rewrite_zip(path, edit)
    return path


def weights_bomb(folder: pathlib.Path, declared: int) -> pathlib.Path:
    """Row 7: model.weights.h5 that expands to ``declared`` bytes of zeros."""
    path = benign_keras(folder, "weights_bomb.keras")
    with zipfile.ZipFile(path) as archive:
        config = archive.read("config.json")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", config)
        with archive.open("model.weights.h5", "w", force_zip64=True) as member:
            chunk = bytes(1 << 20)
            for _ in range(declared >> 20):
                member.write(chunk)
    return path


def config_bomb(folder: pathlib.Path, declared: int) -> pathlib.Path:
    """Row 8: a config.json of ``declared`` bytes (whitespace around a tiny object)."""
    path = folder / "config_bomb.keras"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("config.json", "w", force_zip64=True) as member:
            member.write(b"{")
            chunk = b" " * (1 << 20)
            for _ in range(declared >> 20):
                member.write(chunk)
            member.write(b"}")
    return path


def extra_member(folder: pathlib.Path) -> pathlib.Path:
    path = benign_keras(folder, "assets.keras")
    rewrite_zip(path, extra={"assets/vocab.txt": b"a\nb\n"})
    return path


def huge_dense(folder: pathlib.Path) -> pathlib.Path:
    """Row 11: Dense(10**9) declared in the config (the weights file is the small one)."""
    path = benign_keras(folder, "huge_dense.keras")
    rewrite_zip(path, lambda c: _layer(c, "out")["config"].update(units=10**9))
    return path


def h5_with_bad_config(folder: pathlib.Path, value) -> pathlib.Path:
    """Row 11: legacy .h5 whose model_config is not a string / not JSON."""
    import h5py

    path = folder / "bad_config.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["model_config"] = value
    return path


# ------------------------------------------------------------------------- SavedModels


class _Resource(tf.saved_model.experimental.TrackableResource):
    """A resource whose initializer (run by tf.saved_model.load) is ``body``."""

    def __init__(self, body):
        self._body = body
        super().__init__()

    def _create_resource(self):
        return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="")

    def _initialize(self):
        # The assigned value depends on the body's result (or, for an op without outputs, the
        # assignment on the op), so neither the runtime nor grappler can prune it.
        result = self._body()
        value = tf.constant(1.0)
        if isinstance(result, tf.Tensor):
            value += 0.0 * tf.reduce_sum(tf.cast(result, tf.float32))
        with tf.control_dependencies(
            [] if isinstance(result, tf.Tensor) or result is None else [result]
        ):
            return tf.raw_ops.AssignVariableOp(resource=self.resource_handle, value=value)


class _WithInitializer(tf.Module):
    def __init__(self, body):
        super().__init__()
        self.resource = _Resource(body)

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def serve(self, x):
        return {
            "y": x
            * tf.raw_ops.ReadVariableOp(resource=self.resource.resource_handle, dtype=tf.float32)
        }


def saved_model_with_initializer(folder: pathlib.Path, name: str, body) -> pathlib.Path:
    module = _WithInitializer(body)
    path = folder / name
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def embedded_graph_writer(marker: pathlib.Path):
    """Row 2: an initializer running DatasetFromGraph on a serialized GraphDef constant that
    holds a WriteFile of ``marker``."""
    graph = graph_pb2.GraphDef()
    with tf.Graph().as_default() as inner:
        tf.io.write_file(str(marker), "pwned")
    graph.CopyFrom(inner.as_graph_def())
    serialized = graph.SerializeToString()

    return lambda: tf.raw_ops.DatasetFromGraph(graph_def=tf.constant(serialized))


def abort_silently():
    """Row 3."""
    return lambda: tf.raw_ops.Abort(error_msg="", exit_without_error=True)


def endless_loop():
    """Row 4: only allowlisted ops, so it is stopped by the time limit."""
    return lambda: tf.while_loop(lambda i: i >= 0, lambda i: i + 1, [tf.constant(0)])[0]


def memory_bomb():
    """64 GiB of random numbers from allowlisted ops (stateful, so not constant-folded):
    stopped by the memory limit."""
    return lambda: tf.reduce_sum(tf.random.uniform(tf.constant([1 << 34], tf.int64)))


class _Sampler(tf.Module):
    def __init__(self, vocabulary: pathlib.Path):
        super().__init__()
        self.vocabulary = str(vocabulary)

    @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.int64, name="x")])
    def serve(self, x):
        sampled, _, _ = tf.raw_ops.FixedUnigramCandidateSampler(
            true_classes=x,
            num_true=1,
            num_sampled=1,
            unique=True,
            range_max=2,
            vocab_file=self.vocabulary,
        )
        return {"y": sampled}


def candidate_sampler(folder: pathlib.Path, vocabulary: pathlib.Path) -> pathlib.Path:
    """Row 5: FixedUnigramCandidateSampler(vocab_file=...) in the serving function."""
    module = _Sampler(vocabulary)
    path = folder / "sampler_sm"
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def tf1_saved_model(folder: pathlib.Path, marker: pathlib.Path) -> pathlib.Path:
    """Row 1: a TF1 SavedModel (no object graph) whose saver restore sub-graph also runs a
    Save op writing ``marker``."""
    path = folder / "tf1_sm"
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
        variable = tf.compat.v1.get_variable("v", initializer=tf.constant(1.0), use_resource=False)
        x = tf.compat.v1.placeholder(tf.float32, [None], name="x")
        y = tf.identity(x * variable, name="y")
        saver = tf.compat.v1.train.Saver()
        evil = tf.raw_ops.Save(filename=str(marker), tensor_names=["v"], data=[variable])
        restore = tf.group(
            graph.get_operation_by_name(saver.saver_def.restore_op_name),
            evil,
            name="restore_and_save",
        )
        saver.saver_def.restore_op_name = restore.name
        session.run(tf.compat.v1.global_variables_initializer())
        builder = tf.compat.v1.saved_model.Builder(str(path))
        signature = tf.compat.v1.saved_model.predict_signature_def({"x": x}, {"y": y})
        builder.add_meta_graph_and_variables(
            session, ["serve"], saver=saver, signature_def_map={"serving_default": signature}
        )
        builder.save()
    return path


def benign_saved_model(folder: pathlib.Path) -> pathlib.Path:
    module = _WithInitializer(lambda: None)
    path = folder / "benign_sm"
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def edit_saved_model(path: pathlib.Path, edit) -> pathlib.Path:
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "saved_model.pb").read_bytes())
    edit(proto.meta_graphs[0])
    (path / "saved_model.pb").write_bytes(proto.SerializeToString())
    return path


def function_named(meta_graph, prefix: str):
    return next(
        f for f in meta_graph.graph_def.library.function if f.signature.name.startswith(prefix)
    )


# ------------------------------------------------------------------------- data


def clean_arrays(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose label is 1 iff their mean pixel > 0.5 (kept away from the boundary)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(8 * n, 4, 4, 1)).astype(np.float32)
    means = x.reshape(len(x), -1).mean(axis=1)
    x = x[np.abs(means - 0.5) > 0.02][:n]
    return x, (x.reshape(n, -1).mean(axis=1) > 0.5).astype(np.int64)


def npz_declaring(path: pathlib.Path, shape: tuple[int, ...]) -> pathlib.Path:
    """Row 8: an .npz whose 'x' header declares ``shape`` float64 (a few bytes stored)."""
    header = {"descr": "<f8", "fortran_order": False, "shape": shape}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, header)
            member.write(bytes(1024))
        archive.writestr("y.npy", b"")
    return path


def png_declaring(path: pathlib.Path, width: int, height: int) -> pathlib.Path:
    """Row 11: a PNG whose header declares width x height pixels (a few bytes stored)."""
    Image.new("L", (2, 2)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path
