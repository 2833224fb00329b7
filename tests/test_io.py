"""load_model(): untrusted .keras / .h5 / SavedModel inputs are inspected before anything runs,
refused with named findings, and never written to."""

import codecs
import hashlib
import json
import marshal
import os
import pathlib
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import fineprune_tf as fp
from fineprune_tf import export, io, models
from fineprune_tf.io import ModelFormatError, SavedModelPredictor, UnsafeModelError


def _snapshot(path: pathlib.Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of ``path`` itself), keyed by relative path."""
    path = pathlib.Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }


def _rewrite_config(path: pathlib.Path, edit) -> None:
    """Rewrites config.json inside a .keras zip (test helper: builds hostile files without
    ever deserializing them)."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    edit(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _layer_config(config, name):
    return next(layer for layer in config["config"]["layers"] if layer["name"] == name)


def _x(shape, n=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype("float32")


@pytest.fixture(scope="module")
def task_model():
    model = models.build("mnist", preset="cpu", seed=11)
    model.get_layer("conv2").prune([1, 2, 3])
    return model


def test_benign_keras_file_loads_and_is_not_written(task_model, tmp_path):
    path = tmp_path / "supplier_model.bin"  # the file name is not trusted either
    task_model.save(tmp_path / "m.keras")
    (tmp_path / "m.keras").rename(path)
    before = _snapshot(tmp_path)
    loaded = io.load_model(path)
    assert _snapshot(tmp_path) == before
    x = _x((28, 28, 1))
    np.testing.assert_allclose(loaded(x), task_model(x), atol=1e-6)
    np.testing.assert_array_equal(
        loaded.get_layer("conv2").mask, task_model.get_layer("conv2").mask
    )
    assert isinstance(loaded.get_layer("conv2"), fp.MaskedConv2D)


def test_keras_applications_arithmetic_and_helper_layers_load_and_nothing_else_of_ops(tmp_path):
    # MobileNetV3's hard-swish is bare arithmetic on symbolic tensors (keras.ops Add / Multiply
    # / Divide nodes), ConvNeXt has LayerScale and a Normalization preprocessing layer: all
    # were refused, so the --model CLI could not take those networks.
    layer_scale = fp._keras_compat.applications_channel_layers()["LayerScale"]
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Normalization(mean=0.5, variance=0.25)(inputs)
    x = keras.layers.Conv2D(4, 3, name="conv")(x)
    x = x * keras.layers.ReLU(6.0)(x + 3.0) / 6.0
    x = layer_scale(1e-6, 4)(x) - x
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    model.save(tmp_path / "blocks.keras")
    loaded = io.load_model(tmp_path / "blocks.keras")
    x_in = _x((6, 6, 3))
    np.testing.assert_allclose(loaded(x_in), model(x_in), atol=1e-6)
    # Any other keras.ops node stays refused, numeric or not.
    other = keras.Model(inputs, keras.ops.exp(keras.layers.Flatten()(inputs)))
    other.save(tmp_path / "exp.keras")
    with pytest.raises(UnsafeModelError, match="Exp"):
        io.load_model(tmp_path / "exp.keras")


def test_lambda_that_writes_a_file_is_refused_before_running(tmp_path):
    marker = tmp_path / "pwned.txt"
    inputs = keras.Input((4,), name="x")
    outputs = keras.layers.Lambda(lambda t: t * 2.0, name="evil")(inputs)
    path = tmp_path / "trojan.keras"
    keras.Model(inputs, outputs).save(path)
    # Replace the benign bytecode with a function that writes the marker when it runs (it is
    # never called here: only marshalled).
    payload = eval(
        f"lambda t: (__import__('pathlib').Path({str(marker)!r})"  # noqa: S307
        ".write_text('pwned'), t)[1]"
    )
    code = codecs.encode(marshal.dumps(payload.__code__), "base64").decode("ascii")
    _rewrite_config(
        path, lambda c: _layer_config(c, "evil")["config"]["function"]["config"].update(code=code)
    )
    before = _snapshot(tmp_path)
    with pytest.raises(UnsafeModelError, match=r"Lambda 'evil'") as refused:
        io.load_model(path)
    assert {(f.kind, f.name) for f in refused.value.findings} >= {
        ("Lambda", "evil"),
        ("__lambda__", "evil"),
    }
    assert not marker.exists()
    assert _snapshot(tmp_path) == before


def test_allow_unsafe_loads_a_trusted_lambda(tmp_path):
    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2.0, name="double")(inputs))
    model.save(tmp_path / "trusted.keras")
    loaded = io.load_model(tmp_path / "trusted.keras", allow_unsafe=True)
    np.testing.assert_allclose(loaded(np.ones((1, 4), "float32")), 2.0)


def test_unregistered_custom_object_is_refused_by_name(task_model, tmp_path):
    path = tmp_path / "custom.keras"
    task_model.save(path)

    def edit(config):
        layer = _layer_config(config, "pool1")
        layer.update(
            module="evil_pkg.layers", class_name="Backdoor", registered_name="evil_pkg>Backdoor"
        )

    _rewrite_config(path, edit)
    with pytest.raises(UnsafeModelError, match=r"evil_pkg\.layers\.Backdoor 'pool1'"):
        io.load_model(path)
    # A Keras utility smuggled in as a "layer" is outside the model-building namespaces.
    task_model.save(path)
    _rewrite_config(
        path,
        lambda c: _layer_config(c, "pool1").update(module="keras.utils", class_name="get_file"),
    )
    with pytest.raises(UnsafeModelError, match="keras.utils.get_file"):
        io.load_model(path)


def test_legacy_h5(tmp_path):
    inputs = keras.Input((6, 6, 1), name="x")
    model = keras.Model(inputs, keras.layers.Conv2D(2, 3, name="c")(inputs))
    model.save(tmp_path / "ok.h5")
    loaded = io.load_model(tmp_path / "ok.h5")
    x = _x((6, 6, 1))
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    lam = keras.Model(inputs, keras.layers.Lambda(lambda t: t + 1.0, name="evil_h5")(inputs))
    lam.save(tmp_path / "lambda.h5")
    with pytest.raises(UnsafeModelError, match="evil_h5"):
        io.load_model(tmp_path / "lambda.h5")


class _Hostile(tf.Module):
    """A SavedModel whose signatures touch the file system, Python and checkpoints."""

    def __init__(self, marker: pathlib.Path):
        super().__init__()
        self.marker = str(marker)
        self.v = tf.Variable(1.0)

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def serve(self, x):
        tf.io.write_file(self.marker, "pwned")
        return {"y": x * self.v}

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def probe(self, x):
        tf.print(x, output_stream=f"file://{self.marker}.log")
        contents = tf.io.read_file("/etc/hostname")
        found = tf.io.matching_files("/tmp/*")
        y = tf.py_function(lambda a: a, [x], tf.float32)
        tf.raw_ops.SaveV2(
            prefix=self.marker + ".ckpt", tensor_names=["x"], shape_and_slices=[""], tensors=[x]
        )
        return {"y": y, "n": tf.size(found), "c": tf.strings.length(contents)}


def test_hostile_saved_model_is_refused_with_every_op_listed(tmp_path):
    marker = tmp_path / "pwned.txt"
    module = _Hostile(marker)
    path = tmp_path / "hostile_sm"
    tf.saved_model.save(
        module, str(path), signatures={"serving_default": module.serve, "probe": module.probe}
    )
    assert not marker.exists()  # saving traces, it does not run
    before = _snapshot(path)
    with pytest.raises(UnsafeModelError) as refused:
        io.load_model(path)
    found = {f.kind for f in refused.value.findings}
    assert {"WriteFile", "ReadFile", "MatchingFiles", "PrintV2", "EagerPyFunc", "SaveV2"} <= found
    write = next(f for f in refused.value.findings if f.kind == "WriteFile")
    assert write.where.startswith("function __inference_serve") and write.name
    message = str(refused.value)
    assert "WriteFile" in message and "outside the standard saver sub-graph" in message
    # The saver's own SaveV2/RestoreV2/MergeV2Checkpoints are not reported.
    assert all(
        "traced_save" not in f.where and "traced_restore" not in f.where
        for f in refused.value.findings
    )
    assert not marker.exists() and not pathlib.Path(f"{marker}.log").exists()
    assert _snapshot(path) == before


class _Benign(tf.Module):
    def __init__(self):
        super().__init__()
        self.w = tf.Variable(np.arange(8, dtype="float32").reshape(4, 2))

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="features")])
    def serve(self, features):
        return {"scores": tf.nn.softmax(features @ self.w)}


def test_benign_saved_model_loads_as_an_inference_wrapper(tmp_path):
    module = _Benign()
    path = tmp_path / "benign_sm"
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    before = _snapshot(path)
    assert io.inspect_saved_model(path) == []
    predictor = io.load_model(path)
    assert isinstance(predictor, SavedModelPredictor)
    assert predictor.input_names == ["features"] and predictor.output_names == ["scores"]
    x = _x((4,), n=300)
    want = module.serve(tf.constant(x))["scores"].numpy()
    np.testing.assert_allclose(predictor.predict(x, batch_size=128), want, atol=1e-6)
    np.testing.assert_allclose(predictor(x[:3]), want[:3], atol=1e-6)
    assert _snapshot(path) == before


def test_exported_model_loads_back_as_keras_or_as_predictor(task_model, tmp_path):
    path = tmp_path / "exported"
    export.export_saved_model(task_model, path)
    before = _snapshot(path)
    x = _x((28, 28, 1))
    want = np.asarray(task_model(x))
    as_keras = io.load_model(path)
    assert isinstance(as_keras, keras.Model) and not fp.layers.masked_layers(as_keras)
    np.testing.assert_allclose(as_keras(x), want, atol=1e-5)
    as_graph = io.load_model(path, prefer_keras=False)
    np.testing.assert_allclose(as_graph.predict(x), want, atol=1e-5)
    assert _snapshot(path) == before


def test_saver_ops_reachable_from_a_signature_are_not_exempt(tmp_path):
    # Point an extra signature at the saver's save node: serving it would write a checkpoint,
    # so the saver sub-graph's SaveV2 is no longer "saver only".
    module = _Benign()
    path = tmp_path / "sneaky_sm"
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "saved_model.pb").read_bytes())
    meta_graph = proto.meta_graphs[0]
    sneaky = meta_graph.signature_def["sneaky"]
    sneaky.outputs["path"].name = meta_graph.saver_def.save_tensor_name
    sneaky.outputs["path"].dtype = tf.string.as_datatype_enum
    (path / "saved_model.pb").write_bytes(proto.SerializeToString())
    kinds = {f.kind for f in io.inspect_saved_model(path)}
    assert {"SaveV2", "MergeV2Checkpoints"} <= kinds
    with pytest.raises(UnsafeModelError, match="outside the standard saver"):
        io.load_model(path)


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        io.load_model(tmp_path / "missing.keras")
    text = tmp_path / "notes.txt"
    text.write_text("definitely not a model")
    with pytest.raises(ModelFormatError, match="not a model"):
        io.load_model(text)
    empty = tmp_path / "empty.keras"
    empty.write_bytes(b"")
    with pytest.raises(ModelFormatError, match="empty file"):
        io.load_model(empty)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "variables").mkdir()
    with pytest.raises(ModelFormatError, match="without saved_model.pb"):
        io.load_model(tmp_path / "dir")
    (tmp_path / "dir" / "saved_model.pb").write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(ModelFormatError, match="corrupt"):
        io.load_model(tmp_path / "dir")
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ModelFormatError, match="without config.json"):
        io.load_model(tmp_path / "other.keras")
    with zipfile.ZipFile(tmp_path / "slip.keras", "w") as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("../../escape.txt", "x")
    with pytest.raises(UnsafeModelError, match="'..' path"):
        io.load_model(tmp_path / "slip.keras")
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["notes.txt", "empty.keras", "dir", "other.keras", "slip.keras"]
    )
