"""Performance benchmarks of fineprune_tf, measured side by side in one run.

  (a) the full per-channel pruning curve: ``curves.pruning_curve`` vs the naive loop
      (``curves.naive_pruning_curve``: set the mask, ``model.predict``, per channel) on the
      speech and face models, against one plain forward pass and an arithmetic lower bound;
  (b) the fused op ``ops.masked_activation`` vs the same computation in plain TensorFlow ops
      (``ops.reference_masked_activation``), forward and backward;
  (c) a training step of a MaskedConv2D/MaskedDense model vs the same model with plain
      Conv2D/Dense layers and the same weights;
  (d) a statistics pass (``stats.collect``) vs a plain inference pass over the same data.

Every timing is the median of ``--repeats`` runs after a warm-up run; competing measurements
are interleaved run by run so that load from other processes hits both alike.  Writes
``BENCHMARKS.md`` and ``benchmarks.json`` to ``--output_dir`` (default: the repository root).

  python -m scripts.benchmark                 # full run, a few minutes on 2 cores
  python -m scripts.benchmark --quick         # CI: under ~3 minutes
  python -m scripts.benchmark --sections a,b
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "CI mode: fewer repeats, smaller sizes, the naive loop timed "
                  "on a prefix of the order and scaled (whole run < ~3 min on 2 cores).")
flags.DEFINE_string("output_dir", None, "Where BENCHMARKS.md and benchmarks.json go "
                    "(default: the repository root).")
flags.DEFINE_integer("repeats", None, "Timed runs per measurement, median reported "
                     "(default 5; 3 with --quick).")
flags.DEFINE_list("sections", ["a", "b", "c", "d", "e"], "Sections to run: a (pruning curve), "
                  "b (fused op), c (training step), d (statistics pass).")
flags.DEFINE_integer("train_epochs", None, "Epochs of backdoor training of the section (a) "
                     "models before their curve, so activations and the pruning order are "
                     "realistic (default: the task's models.default_training epochs; 2 with "
                     "--quick; 0 = random initialisation).")

REPO = pathlib.Path(__file__).resolve().parent.parent

# Targets: (key, comparison, threshold, description).
TARGETS = {
    "curve_speedup_vs_naive": (">=", 20.0, "engine >= 20x faster than the naive loop"),
    "curve_cost_vs_bound": ("<=", 2.0, "engine within 2x of the arithmetic lower bound"),
    "op_speedup_vs_tf": (">=", 2.0, "fused op forward >= 2x plain TF (large activation)"),
    "op_grad_speedup_vs_tf": (">=", 1.5, "fused op backward >= 1.5x plain TF (large)"),
    "op_small_min_speedup": (">=", 1.0, "fused op never slower at small sizes (fwd with "
                             "statistics, bwd)"),
    "masked_train_overhead": ("<=", 1.10, "masked training step <= 1.10x plain Conv2D"),
    "stats_pass_vs_inference": ("<=", 1.10, "statistics pass (pruned layer, as the "
                                "defense runs it) <= 1.1x inference"),
}


# ----------------------------------------------------------------------------- utilities


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int,
                 warmup: int = 1) -> dict[str, list[float]]:
    """Times every function ``repeats`` times, alternating between them run by run."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    return times


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def _check(key: str, value: float) -> str:
    op, threshold, _ = TARGETS[key]
    ok = value >= threshold if op == ">=" else value <= threshold
    return "pass" if ok else "MISS"


_GEMM = 1024


def _gemm_fn() -> Callable[[], Any]:
    """A 1024^3 float32 matmul (2 * 1024^3 FLOPs): this machine's dense-kernel peak, roughly."""
    import tensorflow as tf

    a = tf.random.normal([_GEMM, _GEMM])
    b = tf.random.normal([_GEMM, _GEMM])
    matmul = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)))
    return lambda: matmul(a, b).numpy()


def _op_profile(fn: Callable[[], Any], runs: int) -> dict[str, float]:
    """Seconds per run of each TensorFlow op type, from a ``tf.profiler`` trace of ``runs``
    calls of ``fn`` (kernel time summed over the compute threads)."""
    import glob
    import shutil
    import tempfile
    from collections import Counter

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    logdir = tempfile.mkdtemp(prefix="fineprune_profile_")
    try:
        tf.profiler.experimental.start(logdir)
        try:
            for _ in range(runs):
                fn()
        finally:
            tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        for path in glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True):
            space.ParseFromString(pathlib.Path(path).read_bytes())
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    totals: Counter = Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" in name and "::" not in name:  # "<node name>:<op type>" only
                    totals[name.rsplit(":", 1)[1]] += event.duration_ps / 1e12 / runs
    return dict(totals)


def _profile_diff(a: dict[str, float], b: dict[str, float], top: int = 6) -> list:
    """The op types whose time differs most between two profiles: (op, a_s, b_s)."""
    keys = sorted(set(a) | set(b), key=lambda k: -abs(a.get(k, 0.0) - b.get(k, 0.0)))
    return [(k, a.get(k, 0.0), b.get(k, 0.0)) for k in keys[:top]]


# ------------------------------------------------------------------- (a) pruning curve


def _trained_model(task: str, epochs: int | None):
    import keras

    from fineprune_tf import data, models, poison, training

    task_data = data.load(task)
    trigger, policy, count = poison.default_attack(task, task_data, seed=0)
    keras.utils.set_random_seed(0)
    model = models.build(task, preset="cpu", seed=0)
    config = models.default_training(task)
    epochs = config["epochs"] if epochs is None else epochs
    if epochs:
        train = poison.poison_training_set(task_data.train, trigger, policy, count=count, seed=0)
        training.fit(model, train.x, train.y, epochs=epochs, batch_size=config["batch_size"],
                     learning_rate=config["learning_rate"], optimizer=config["optimizer"],
                     seed=0)
    backdoor = poison.backdoor_test_set(task_data.validation, trigger, policy)
    return model, task_data, backdoor, epochs


def section_curve(task: str, repeats: int, quick: bool, epochs: int | None) -> dict:
    import numpy as np
    import tensorflow as tf

    from fineprune_tf import curves, models, stats

    model, task_data, backdoor, epochs = _trained_model(task, epochs)
    name = models.PRUNED_LAYER[task]
    clean = (task_data.validation.x, task_data.validation.y)
    layer = model.get_layer(name)
    # The defense's order: increasing mean activation on the clean validation data (§3.1).
    means = stats.collect(model, clean[0], layer_names=[name])[name].mean
    order = np.argsort(means, kind="stable")
    steps = len(order) + 1
    x_all = np.concatenate([clean[0], backdoor.x])
    samples = len(x_all)

    forward_fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def forward() -> list:
        return [forward_fn(x_all[i:i + 256]) for i in range(0, samples, 256)]

    def naive_compiled_step() -> None:
        np.argmax(np.concatenate([o.numpy() for o in forward()]), axis=-1)

    first = _timed(lambda: curves.pruning_curve(model, name, order, clean, backdoor))
    engine_results: list = []
    # The FLOP rates of the bound are measured interleaved with the engine, under the same
    # load; these runs are short, so twice the repeats.
    times = _interleaved({
        "engine": lambda: engine_results.append(
            curves.pruning_curve(model, name, order, clean, backdoor)),
        "forward": forward,
        "gemm": _gemm_fn(),
    }, 2 * repeats)
    # The run whose time is the median, for its phase split (the warm-up run is first).
    runs = engine_results[1:]
    engine = runs[int(np.argsort(times["engine"])[len(runs) // 2])]

    # The naive loop: model.predict per step (the reference); with --quick on a prefix of the
    # order, scaled: every step costs the same two predict calls.
    naive_steps = min(len(order), 8) if quick else len(order)
    # The naive loop is long (2 predict calls per step) and each step costs the same: one run
    # already averages over every step.
    naive_runs = 1
    naive_curves: list = []
    curves.naive_pruning_curve(model, name, order[:1], clean, backdoor)  # traces predict
    naive_times = [_timed(lambda: naive_curves.append(curves.naive_pruning_curve(
        model, name, order[:naive_steps], clean, backdoor))) for _ in range(naive_runs)]
    naive = _median(naive_times) * steps / (naive_steps + 1)
    # A stricter baseline: the same loop with a compiled forward instead of model.predict.
    compiled_times = []
    saved = layer.mask
    try:
        for _ in range(1 if quick else 2):
            mask = saved.copy()
            tic = time.perf_counter()
            for k in range(naive_steps + 1):
                if k:
                    mask[order[k - 1]] = 0.0
                    layer.set_mask(mask)
                naive_compiled_step()
            compiled_times.append((time.perf_counter() - tic) * steps / (naive_steps + 1))
            layer.set_mask(saved)
    finally:
        layer.set_mask(saved)

    reference = naive_curves[-1]
    k = naive_steps + 1
    mismatches = int(np.sum(engine.predictions_clean[:k] != reference.predictions_clean)
                     + np.sum(engine.predictions_backdoor[:k] != reference.predictions_backdoor))

    info = curves.describe(model, name)
    t_engine = _median(times["engine"])
    t_forward = _median(times["forward"])
    forward_rate = info.forward_flops * samples / t_forward
    gemm_rate = 2.0 * _GEMM**3 / _median(times["gemm"])
    rows = engine.info["evaluated_rows"]
    bound_flops = info.bound_flops(samples, rows)
    # The prefix (convolutions) at the rate the plain forward pass achieves on them; the
    # per-step layers (dense layers over many rows) at the better of that and the GEMM rate.
    once = samples * (info.prefix_flops + info.frontier_flops)
    rest_rate = max(forward_rate, gemm_rate)
    bound = once / forward_rate + rows * info.rest_flops / rest_rate
    bound_all_rows = once / forward_rate + steps * samples * info.rest_flops / rest_rate
    phases = engine.info["phase_seconds"]
    return {
        "task": task, "layer": name, "channels": layer.channels, "steps": steps,
        "clean_samples": len(clean[0]), "backdoor_samples": len(backdoor.x),
        "train_epochs": epochs, "mode": info.mode, "frontier": list(info.frontier),
        "engine_s": t_engine, "engine_min_s": min(times["engine"]),
        "engine_first_call_s": first, "engine_runs": times["engine"],
        "forward_min_s": min(times["forward"]),
        "naive_s": naive, "naive_measured_steps": naive_steps + 1,
        "naive_compiled_s": _median(compiled_times), "forward_s": t_forward,
        "speedup_vs_naive": naive / t_engine,
        "speedup_vs_naive_compiled": _median(compiled_times) / t_engine,
        "cost_vs_forward": t_engine / t_forward,
        "forward_flops_per_sample": info.forward_flops,
        "prefix_flops_per_sample": info.prefix_flops,
        "frontier_flops_per_sample": info.frontier_flops,
        "rest_flops_per_step_sample": info.rest_flops,
        "evaluated_rows": rows, "all_rows": steps * samples,
        "forward_flop_rate": forward_rate, "gemm_flop_rate": gemm_rate,
        "bound_s": bound, "bound_all_rows_s": bound_all_rows,
        "bound_at_forward_rate_s": bound_flops / forward_rate,
        "bound_at_gemm_peak_s": bound_flops / gemm_rate,
        "cost_vs_bound": t_engine / bound,
        "phase_seconds": phases,
        "prediction_mismatches_vs_naive": mismatches,
        "clean_acc_start": float(engine.clean_acc[0]), "asr_start": float(engine.asr[0]),
    }


# ------------------------------------------------------------------------ (b) fused op


def section_op(repeats: int, quick: bool) -> dict:
    import numpy as np
    import tensorflow as tf

    from fineprune_tf import ops

    shapes = [(32, 27, 27, 96), (64, 27, 27, 96), (128, 13, 13, 256), (64, 56, 56, 256)]
    if quick:
        shapes = [(32, 27, 27, 96), (128, 13, 13, 256), (32, 56, 56, 256)]

    def forward(fn):
        return tf.function(lambda z, m: tuple(fn(z, m, "relu", True)))

    def forward_nostats(fn):
        return tf.function(lambda z, m: fn(z, m, "relu", False).y)

    def backward(fn):
        @tf.function
        def grad(z, m, w):
            with tf.GradientTape() as tape:
                tape.watch(z)
                y = fn(z, m, "relu", False).y
                loss = tf.reduce_sum(y * w)
            return tape.gradient(loss, z)
        return grad

    compiled, reference = ops.masked_activation, ops.reference_masked_activation
    results = []
    rng = np.random.default_rng(0)
    for shape in shapes:
        z = tf.constant(rng.standard_normal(shape, dtype=np.float32))
        w = tf.constant(rng.standard_normal(shape, dtype=np.float32))
        mask = tf.constant((rng.random(shape[-1]) > 0.25).astype(np.float32))
        fns = {
            "fwd_compiled": forward(compiled), "fwd_tf": forward(reference),
            "fwd_nostats_compiled": forward_nostats(compiled),
            "fwd_nostats_tf": forward_nostats(reference),
            "bwd_compiled": backward(compiled), "bwd_tf": backward(reference),
        }
        calls = {name: functools.partial(fn, z, mask, w) if name.startswith("bwd")
                 else functools.partial(fn, z, mask) for name, fn in fns.items()}
        # Same results from both implementations (sanity).
        got, want = calls["fwd_compiled"](), calls["fwd_tf"]()
        fwd_err = max(float(tf.reduce_max(tf.abs(tf.cast(a, tf.float64) - tf.cast(b, tf.float64))
                                          / (1.0 + tf.reduce_max(tf.abs(tf.cast(b, tf.float64))))))
                      for a, b in zip(got, want, strict=True))
        bwd_err = float(tf.reduce_max(tf.abs(calls["bwd_compiled"]() - calls["bwd_tf"]())))
        times = _interleaved(calls, repeats if quick else max(repeats, 7))
        med = {name: _median(t) for name, t in times.items()}
        best = {name: min(t) for name, t in times.items()}
        elements = int(np.prod(shape))
        results.append({
            "shape": list(shape), "megabytes": elements * 4 / 2**20,
            **{f"{name}_s": value for name, value in med.items()},
            "fwd_speedup": med["fwd_tf"] / med["fwd_compiled"],
            "fwd_nostats_speedup": med["fwd_nostats_tf"] / med["fwd_nostats_compiled"],
            "bwd_speedup": med["bwd_tf"] / med["bwd_compiled"],
            "best_of_fwd_speedup": best["fwd_tf"] / best["fwd_compiled"],
            "best_of_fwd_nostats_speedup": best["fwd_nostats_tf"] / best["fwd_nostats_compiled"],
            "best_of_bwd_speedup": best["bwd_tf"] / best["bwd_compiled"],
            "fwd_compiled_gbps": 2 * elements * 4 / med["fwd_compiled"] / 1e9,
            "bwd_compiled_gbps": 4 * elements * 4 / med["bwd_compiled"] / 1e9,
            "max_rel_diff_fwd": fwd_err, "max_abs_diff_bwd": bwd_err,
        })
    large, small = results[-1], results[:-1]
    return {
        "backend": ops.backend(), "sizes": results,
        "op_speedup_vs_tf": large["fwd_speedup"], "op_grad_speedup_vs_tf": large["bwd_speedup"],
        "op_small_min_speedup": min(min(r["fwd_speedup"], r["bwd_speedup"]) for r in small),
        "op_nostats_min_speedup": min(r["fwd_nostats_speedup"] for r in results),
    }


# --------------------------------------------------------------------- (c) training step


def _plain_copy(model):
    """The same network with keras Conv2D/Dense in place of the masked layers, same weights."""
    import keras

    from fineprune_tf.layers import MaskedConv2D, MaskedDense

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, MaskedConv2D):
            return keras.layers.Conv2D.from_config(config)
        if isinstance(layer, MaskedDense):
            return keras.layers.Dense.from_config(config)
        return layer.__class__.from_config(config)

    plain = keras.models.clone_model(model, clone_function=clone)
    for source, target in zip(model.layers, plain.layers, strict=True):
        target.set_weights(source.get_weights()[:len(target.weights)])
    return plain


def section_train(task: str, repeats: int, quick: bool) -> dict:
    import keras
    import numpy as np

    from fineprune_tf import data, models

    task_data = data.load(task)
    batch = models.default_training(task)["batch_size"]
    masked = models.build(task, preset="cpu", seed=0)
    plain = _plain_copy(masked)
    x, y = task_data.train.x[:batch], task_data.train.y[:batch]
    same = float(np.max(np.abs(np.asarray(masked(x)) - np.asarray(plain(x)))))
    for model in (masked, plain):
        model.compile(optimizer=keras.optimizers.Adam(1e-4),
                      loss="sparse_categorical_crossentropy", jit_compile=False)
    steps = 5
    # Training steps are short (tens of ms): many interleaved rounds, or other processes'
    # load decides the ratio.
    rounds = 2 * repeats if quick else max(2 * repeats, 10)

    def run(model):
        def fn():
            for _ in range(steps):
                model.train_on_batch(x, y)
        return fn

    times = _interleaved({"masked": run(masked), "plain": run(plain)}, rounds, warmup=2)
    t_masked, t_plain = _median(times["masked"]) / steps, _median(times["plain"]) / steps
    result = {"task": task, "batch_size": batch, "masked_step_s": t_masked,
              "plain_step_s": t_plain, "ratio": t_masked / t_plain,
              "masked_min_s": min(times["masked"]) / steps,
              "plain_min_s": min(times["plain"]) / steps,
              "max_output_diff": same}
    if not quick:
        profiles = {name: _op_profile(lambda m=model: m.train_on_batch(x, y), 10)
                    for name, model in (("masked", masked), ("plain", plain))}
        kernels = {
            "masked_op": profiles["masked"].get("FinepruneMaskedActivation", 0.0),
            "masked_grad": profiles["masked"].get("FinepruneMaskedActivationGrad", 0.0),
            "relu_grad": profiles["plain"].get("ReluGrad", 0.0),
        }
        kernels["extra"] = kernels["masked_op"] + kernels["masked_grad"] - kernels["relu_grad"]
        result["op_kernels"] = kernels
        result["op_profile_diff"] = _profile_diff(profiles["masked"], profiles["plain"])
    return result


# ----------------------------------------------------------------- (d) statistics pass


def section_stats(repeats: int, quick: bool) -> dict:
    import tensorflow as tf

    from fineprune_tf import data, models, stats

    task_data = data.load("speech")
    model = models.build("speech", preset="cpu", seed=0)
    x = task_data.validation.x if quick else task_data.train.x
    name = models.PRUNED_LAYER["speech"]
    batch = 128

    forward_fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def inference() -> None:
        for xb in stats.as_dataset(x, batch):
            forward_fn(xb)

    def predict() -> None:
        model.predict(x, batch_size=batch, verbose=0)

    def collect_one() -> None:
        stats.collect(model, x, layer_names=[name], batch_size=batch)

    def collect_all() -> None:
        stats.collect(model, x, batch_size=batch)

    # Passes are short: many interleaved rounds, or other processes' load decides the ratio.
    times = _interleaved({"inference": inference, "predict": predict,
                          "collect_pruned_layer": collect_one,
                          "collect_all_layers": collect_all},
                         2 * repeats if quick else max(3 * repeats, 15))
    med = {k: _median(v) for k, v in times.items()}
    result = {
        "samples": len(x), "batch_size": batch,
        **{f"{k}_s": v for k, v in med.items()},
        **{f"{k}_min_s": min(v) for k, v in times.items()},
        "stats_pass_vs_inference": med["collect_pruned_layer"] / med["inference"],
        "collect_all_vs_inference": med["collect_all_layers"] / med["inference"],
        "collect_vs_predict": med["collect_pruned_layer"] / med["predict"],
        "min_ratio_pruned_layer": min(times["collect_pruned_layer"]) / min(times["inference"]),
        "min_ratio_all_layers": min(times["collect_all_layers"]) / min(times["inference"]),
    }
    if not quick:
        profiles = {"collect_all": _op_profile(collect_all, 3),
                    "inference": _op_profile(inference, 3)}
        collect_ops, inference_ops = profiles["collect_all"], profiles["inference"]
        op = "FinepruneMaskedActivation"
        # What the statistics add: the op's reductions, and the ops only the statistics pass
        # runs (accumulator updates and their casts).
        only = {k: v for k, v in collect_ops.items() if k not in inference_ops}
        result["op_kernels"] = {
            "masked_op_stats": collect_ops.get(op, 0.0),
            "masked_op_inference": inference_ops.get(op, 0.0),
            "stats_only_ops": sum(only.values()),
            "stats_only_top": sorted(only.items(), key=lambda kv: -kv[1])[:4],
        }
        result["op_profile_diff"] = _profile_diff(collect_ops, inference_ops)
    return result


def section_shrink(task: str, repeats: int, quick: bool, fraction: float = 0.7) -> dict:
    """(e) The physically shrunk model vs the masked one: parameters, FLOPs, inference time.

    Prunes ``fraction`` of the task's pruned layer in the defense's order (increasing mean
    activation on the validation data) and times a compiled forward pass over the validation
    split, interleaved.
    """
    import numpy as np
    import tensorflow as tf

    from fineprune_tf import data, export, models, stats

    task_data = data.load(task)
    model = models.build(task, preset="cpu", seed=0)
    name = models.PRUNED_LAYER[task]
    x = task_data.validation.x
    means = stats.collect(model, x, layer_names=[name])[name].mean
    layer = model.get_layer(name)
    layer.prune(np.argsort(means, kind="stable")[:int(round(fraction * layer.channels))])
    small = export.shrink(model)
    params, flops = export.count_params_and_flops(model)
    small_params, small_flops = export.count_params_and_flops(small)
    batch = 256
    masked_fn = tf.function(lambda b: model(b, training=False), reduce_retracing=True)
    small_fn = tf.function(lambda b: small(b, training=False), reduce_retracing=True)

    def run(fn):
        return lambda: [fn(x[i:i + batch]) for i in range(0, len(x), batch)]

    times = _interleaved({"masked": run(masked_fn), "shrunk": run(small_fn)},
                         2 * repeats if quick else 4 * repeats)
    med = {k: _median(v) for k, v in times.items()}
    return {"task": task, "layer": name, "pruned_fraction": fraction,
            "params": [params, small_params], "flops": [flops, small_flops],
            "params_reduction": 1 - small_params / params,
            "flops_reduction": 1 - small_flops / flops,
            "masked_s": med["masked"], "shrunk_s": med["shrunk"],
            "inference_speedup": med["masked"] / med["shrunk"], "samples": len(x)}


# --------------------------------------------------------------------------- reporting


def _machine() -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from fineprune_tf import ops

    return {
        "cores": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version(),
        "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
        "op_backend": ops.backend(), "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m scripts.benchmark"
        + (" --quick" if result["quick"] else "") + "`; do not edit by hand.",
        "",
        f"Machine: {m['cores']} cores, {m['cpu']}; Python {m['python']}, TensorFlow "
        f"{m['tensorflow']}, Keras {m['keras']}, NumPy {m['numpy']}; fused-op backend "
        f"`{m['op_backend']}`; {m['date']}.",
        f"Load average (1/5/15 min) at start: {result['load_start']}; at end: "
        f"{result['load_end']}.  Other processes shared the 2 cores during the run: absolute "
        "times are noisy, ratios are interleaved run by run.",
        f"Timings are medians of {result['repeats']} runs after a warm-up run.",
        "",
        "## Summary",
        "",
        "| metric | value | target | status |",
        "|---|---|---|---|",
    ]
    for key, (op, threshold, text) in TARGETS.items():
        if key in result["summary"]:
            value = result["summary"][key]
            lines.append(f"| `{key}` | {value:.3g} | {op} {threshold:g} ({text}) | "
                         f"{_check(key, value)} |")
    if "curve_cost_vs_forward" in result["summary"]:
        value = result["summary"]["curve_cost_vs_forward"]
        lines.append(f"| `curve_cost_vs_forward` | {value:.3g} | (informative: engine time / "
                     "one forward pass) | |")
    lines.append("")

    if "curve" in result:
        lines += [
            "## (a) Full per-channel pruning curve",
            "",
            "Clean data: the task's validation split; backdoored data: the validation split "
            "with the task's default trigger (`poison.backdoor_test_set`).  The model is "
            "first trained on the task's poisoned training set (epochs below), and channels "
            "are pruned in increasing order of mean clean activation (the defense's order).  "
            "Naive = `curves.naive_pruning_curve` (set mask + `model.predict` per step); "
            "naive-compiled = the same loop with a traced forward function instead of "
            "`predict`.",
            "",
            "| | " + " | ".join(r["task"] for r in result["curve"]) + " |",
            "|---|" + "---|" * len(result["curve"]),
        ]

        def row(label, fn):
            lines.append(f"| {label} | " + " | ".join(fn(r) for r in result["curve"]) + " |")

        row("pruned layer (channels)", lambda r: f"{r['layer']} ({r['channels']})")
        row("training epochs (poisoned set)", lambda r: str(r["train_epochs"]))
        row("samples (clean + backdoor)",
            lambda r: f"{r['clean_samples']} + {r['backdoor_samples']}")
        row("steps K+1", lambda r: str(r["steps"]))
        row("engine mode / frontier", lambda r: f"{r['mode']} / {', '.join(r['frontier'])}")
        row("naive loop (predict)", lambda r: _fmt(r["naive_s"]) + (
            f" (timed {r['naive_measured_steps']} steps, scaled)"
            if r["naive_measured_steps"] < r["steps"] else ""))
        row("naive loop (compiled forward)", lambda r: _fmt(r["naive_compiled_s"]))
        row("**engine**", lambda r: f"**{_fmt(r['engine_s'])}**")
        row("engine first call (incl. tracing)", lambda r: _fmt(r["engine_first_call_s"]))
        row("one forward pass", lambda r: _fmt(r["forward_s"]))
        row("**speedup vs naive**", lambda r: f"**{r['speedup_vs_naive']:.1f}x**")
        row("speedup vs naive-compiled", lambda r: f"{r['speedup_vs_naive_compiled']:.1f}x")
        row("engine / forward pass", lambda r: f"{r['cost_vs_forward']:.2f}")
        row("FLOPs/sample: forward / prefix / frontier / rest per step",
            lambda r: f"{r['forward_flops_per_sample'] / 1e6:.2f}M / "
                      f"{r['prefix_flops_per_sample'] / 1e6:.2f}M / "
                      f"{r['frontier_flops_per_sample'] / 1e6:.3f}M / "
                      f"{r['rest_flops_per_step_sample'] / 1e6:.3f}M")
        row("evaluated (step, sample) rows", lambda r: f"{r['evaluated_rows']} of {r['all_rows']}")
        row("achieved forward FLOP/s (GEMM peak)",
            lambda r: f"{r['forward_flop_rate'] / 1e9:.1f} G ({r['gemm_flop_rate'] / 1e9:.1f} G)")
        row("**lower bound**", lambda r: f"**{_fmt(r['bound_s'])}**")
        row("bound if every row were evaluated", lambda r: _fmt(r["bound_all_rows_s"]))
        row("bound, all work at the forward rate", lambda r: _fmt(r["bound_at_forward_rate_s"]))
        row("bound, all work at the GEMM rate", lambda r: _fmt(r["bound_at_gemm_peak_s"]))
        row("**engine / bound**", lambda r: f"**{r['cost_vs_bound']:.2f}**")
        row("engine phases: prefix pass / steps",
            lambda r: " / ".join(_fmt(r["phase_seconds"][k]) for k in ("prefix", "steps")))
        row("prediction mismatches vs naive", lambda r: str(r["prediction_mismatches_vs_naive"]))
        row("clean acc / ASR before pruning",
            lambda r: f"{r['clean_acc_start']:.3f} / {r['asr_start']:.3f}")
        lines += [
            "",
            "Lower bound = the work no exact method can skip, in FLOPs (conv/dense "
            "multiply-adds x 2): one pass of the layers up to and including the pruned layer "
            "over all samples, plus the frontier layers' per-channel updates (one frontier "
            "pass in all), both converted to seconds at the FLOP rate the plain forward pass "
            "of the same model achieves on the same data in this run; plus the layers after "
            "the frontier for every (step, sample) pair the removed channel can change, at the "
            "better of that rate and a 1024^3 GEMM's (they are dense layers over many rows).  "
            "Rates are measured interleaved with the engine runs.",
            "",
        ]

    if "op" in result:
        op = result["op"]
        lines += [
            "## (b) Fused op vs plain TensorFlow",
            "",
            f"Backend: `{op['backend']}`."
            + (" **The compiled library is not loaded: both columns run the pure TensorFlow "
               "fallback, so the ratios are ~1 by construction.**"
               if op["backend"] == "tensorflow" else ""),
            "Forward = `y` and the three per-channel statistics; backward = gradient of "
            "`sum(y * w)` w.r.t. `z`; both inside `tf.function`.",
            "",
            "| activation | MiB | fwd compiled | fwd TF | speedup | fwd (no stats) speedup | "
            "bwd compiled | bwd TF | speedup | best-of-run speedups fwd / no stats / bwd |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in op["sizes"]:
            lines.append(
                f"| {'x'.join(map(str, r['shape']))} | {r['megabytes']:.0f} | "
                f"{_fmt(r['fwd_compiled_s'])} | {_fmt(r['fwd_tf_s'])} | "
                f"{r['fwd_speedup']:.2f}x | {r['fwd_nostats_speedup']:.2f}x | "
                f"{_fmt(r['bwd_compiled_s'])} | {_fmt(r['bwd_tf_s'])} | "
                f"{r['bwd_speedup']:.2f}x | {r['best_of_fwd_speedup']:.2f}x / "
                f"{r['best_of_fwd_nostats_speedup']:.2f}x / {r['best_of_bwd_speedup']:.2f}x |")
        lines += [
            "",
            "No stats = `compute_stats=False` (inference and training) vs TF's `relu(z) * mask`.",
            "",
        ]

    if "train" in result:
        lines += [
            "## (c) Training step: masked layers vs plain Conv2D/Dense",
            "",
            "`train_on_batch` (Adam, `jit_compile=False`) on the cpu-preset model with "
            "MaskedConv2D/MaskedDense vs a clone with keras Conv2D/Dense and the same weights.",
            "",
            "| model | batch | masked step | plain step | ratio |",
            "|---|---|---|---|---|",
        ]
        for r in result["train"]:
            lines.append(f"| {r['task']} | {r['batch_size']} | {_fmt(r['masked_step_s'])} | "
                         f"{_fmt(r['plain_step_s'])} | {r['ratio']:.3f} |")
        lines.append("")

    if "stats" in result:
        s = result["stats"]
        lines += [
            "## (d) Statistics pass vs inference",
            "",
            f"Speech cpu model, {s['samples']} inputs in batches of {s['batch_size']}.",
            "",
            "| pass | time | / inference |",
            "|---|---|---|",
            f"| inference (traced forward over `stats.as_dataset`) | {_fmt(s['inference_s'])} "
            "| 1.00 |",
            f"| `model.predict` | {_fmt(s['predict_s'])} | "
            f"{s['predict_s'] / s['inference_s']:.2f} |",
            f"| `stats.collect(layer_names=[conv5])` | {_fmt(s['collect_pruned_layer_s'])} | "
            f"{s['stats_pass_vs_inference']:.2f} |",
            f"| `stats.collect()` (all 7 masked layers) | {_fmt(s['collect_all_layers_s'])} | "
            f"{s['collect_all_vs_inference']:.2f} |",
            "",
            f"Ratios of the fastest runs instead of the medians: pruned layer "
            f"{s['min_ratio_pruned_layer']:.2f}, all layers {s['min_ratio_all_layers']:.2f} "
            "(one undisturbed run of either pass moves these; see the kernel-time split in "
            "the analysis for the work the statistics add).",
            "",
        ]

    if result.get("notes"):
        lines += ["## Analysis", ""]
        lines += [f"- {note}" for note in result["notes"]]
        lines.append("")
    return "\n".join(lines)


def _notes(result: dict) -> list[str]:
    """Measured explanations of what bounds each result (filled from this run's numbers)."""
    notes = []
    for r in result.get("curve", []):
        ph = r["phase_seconds"]
        forward = r["forward_flops_per_sample"]
        rest = r["rest_flops_per_step_sample"] / forward
        once = (r["prefix_flops_per_sample"] + r["frontier_flops_per_sample"]) / forward
        per_sample = r["evaluated_rows"] / (r["clean_samples"] + r["backdoor_samples"])
        notes.append(
            f"(a) {r['task']}: the engine spends {_fmt(ph['prefix'])} in the prefix pass and "
            f"{_fmt(ph['steps'])} in the steps (per-channel updates and the layers after the "
            f"frontier; {r['evaluated_rows']} of {r['all_rows']} rows evaluated, the "
            f"rest are steps whose channel is zero on that sample).  Per step the engine runs "
            f"{rest:.1%} of a forward pass per sample, so in FLOPs its floor is "
            f"{once:.2f} + {per_sample:.1f} x {rest:.4f} = {once + per_sample * rest:.2f} "
            "forward passes.")
    op = result.get("op")
    if op and op["backend"] != "tensorflow":
        slow = [r for r in op["sizes"] if r["fwd_nostats_speedup"] < 1.0]
        if slow:
            cases = ", ".join(
                f"{'x'.join(map(str, r['shape']))}: median {r['fwd_nostats_speedup']:.2f}x, "
                f"best-of-run {r['best_of_fwd_nostats_speedup']:.2f}x" for r in slow)
            notes.append(
                "(b) without statistics the compiled forward was not faster than TF's "
                f"`relu(z) * mask` at {cases} (kernels/masked_activation_op.cc, another "
                "engineer's); compare the best-of-run column, which other processes' load "
                "disturbs least, before acting on it.")
    if op and op["backend"] == "tensorflow":
        notes.append("(b) `fineprune_tf.ops.backend()` is \"tensorflow\": the compiled kernel "
                     "(kernels/, another engineer's) was not built or not loadable, so (b) "
                     "compares the fallback with itself.")
    for r in result.get("train", []):
        if "op_kernels" in r:
            k = r["op_kernels"]
            notes.append(
                f"(c) {r['task']}: per training step (tf.profiler kernel time) the masked model "
                f"spends {_fmt(k['masked_op'])} in FinepruneMaskedActivation and "
                f"{_fmt(k['masked_grad'])} in its gradient op, where the plain model spends "
                f"{_fmt(k['relu_grad'])} in ReluGrad (its forward ReLU is fused into "
                f"`_FusedConv2D` by Grappler): {_fmt(k['extra'])} extra, "
                f"{k['extra'] / r['plain_step_s']:.1%} of a plain step.  The rest of any "
                "measured difference is the load of other processes (the conv kernels are the "
                "same).")
    s = result.get("stats")
    if s and "op_kernels" in s:
        k = s["op_kernels"]
        extra = k["masked_op_stats"] - k["masked_op_inference"] + k["stats_only_ops"]
        top = ", ".join(f"{name} {_fmt(v)}" for name, v in k["stats_only_top"])
        notes.append(
            f"(d) per pass (tf.profiler kernel time, all 7 layers measured): "
            f"FinepruneMaskedActivation {_fmt(k['masked_op_stats'])} with statistics vs "
            f"{_fmt(k['masked_op_inference'])} without, plus {_fmt(k['stats_only_ops'])} in "
            f"ops only the statistics pass runs ({top}): {_fmt(extra)} of extra work, "
            f"{extra / s['inference_s']:.1%} of an inference pass.  The rest of any measured "
            "difference is host-side or the load of other processes.")
    return notes


def main(argv: list[str]) -> None:
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    quick = FLAGS.quick
    repeats = FLAGS.repeats or (3 if quick else 5)
    epochs = FLAGS.train_epochs if FLAGS.train_epochs is not None else (2 if quick else None)
    sections = {s.strip().lower() for s in FLAGS.sections}
    unknown = sections - set("abcde")
    if unknown:
        raise app.UsageError(f"unknown sections {sorted(unknown)}; use a, b, c, d, e")
    output_dir = pathlib.Path(FLAGS.output_dir) if FLAGS.output_dir else REPO
    output_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    result: dict[str, Any] = {"machine": _machine(), "quick": quick, "repeats": repeats,
                              "load_start": _load()}
    summary: dict[str, float] = {}
    print(f"fineprune_tf benchmarks ({'quick' if quick else 'full'}), repeats={repeats}, "
          f"op backend={result['machine']['op_backend']}, load {result['load_start']}")
    if result["machine"]["op_backend"] == "tensorflow":
        print("  NOTE: fineprune_tf.ops.backend() is 'tensorflow' (compiled op not loaded).")

    if "a" in sections:
        result["curve"] = []
        for task in ("speech", "face"):
            tic = time.perf_counter()
            r = section_curve(task, repeats, quick, epochs)
            result["curve"].append(r)
            print(f"(a) {task}: engine {_fmt(r['engine_s'])}, naive {_fmt(r['naive_s'])} "
                  f"-> {r['speedup_vs_naive']:.1f}x (vs compiled naive "
                  f"{r['speedup_vs_naive_compiled']:.1f}x); forward {_fmt(r['forward_s'])} -> "
                  f"{r['cost_vs_forward']:.2f} forward passes; bound {_fmt(r['bound_s'])} -> "
                  f"{r['cost_vs_bound']:.2f}x bound; mismatches "
                  f"{r['prediction_mismatches_vs_naive']} [{time.perf_counter() - tic:.0f} s]")
        by_task = {r["task"]: r for r in result["curve"]}
        summary["curve_speedup_vs_naive"] = min(r["speedup_vs_naive"] for r in result["curve"])
        summary["curve_cost_vs_forward"] = max(r["cost_vs_forward"] for r in result["curve"])
        summary["curve_cost_vs_bound"] = max(r["cost_vs_bound"] for r in result["curve"])
        for task, r in by_task.items():
            summary[f"curve_speedup_vs_naive_{task}"] = r["speedup_vs_naive"]
            summary[f"curve_speedup_vs_naive_compiled_{task}"] = r["speedup_vs_naive_compiled"]
            summary[f"curve_cost_vs_forward_{task}"] = r["cost_vs_forward"]
            summary[f"curve_cost_vs_bound_{task}"] = r["cost_vs_bound"]

    if "b" in sections:
        tic = time.perf_counter()
        op = section_op(repeats, quick)
        result["op"] = op
        for r in op["sizes"]:
            print(f"(b) {'x'.join(map(str, r['shape']))}: fwd {r['fwd_speedup']:.2f}x "
                  f"(no stats {r['fwd_nostats_speedup']:.2f}x), bwd {r['bwd_speedup']:.2f}x")
        print(f"    [{time.perf_counter() - tic:.0f} s]")
        summary["op_speedup_vs_tf"] = op["op_speedup_vs_tf"]
        summary["op_grad_speedup_vs_tf"] = op["op_grad_speedup_vs_tf"]
        summary["op_small_min_speedup"] = op["op_small_min_speedup"]

    if "c" in sections:
        tic = time.perf_counter()
        result["train"] = [section_train(task, repeats, quick) for task in ("speech", "face")]
        for r in result["train"]:
            print(f"(c) {r['task']}: masked {_fmt(r['masked_step_s'])}, plain "
                  f"{_fmt(r['plain_step_s'])} -> {r['ratio']:.3f}")
        print(f"    [{time.perf_counter() - tic:.0f} s]")
        summary["masked_train_overhead"] = max(r["ratio"] for r in result["train"])
        for r in result["train"]:
            summary[f"masked_train_overhead_{r['task']}"] = r["ratio"]

    if "d" in sections:
        tic = time.perf_counter()
        s = section_stats(repeats, quick)
        result["stats"] = s
        print(f"(d) collect {_fmt(s['collect_pruned_layer_s'])}, inference "
              f"{_fmt(s['inference_s'])} -> {s['stats_pass_vs_inference']:.2f}; all layers "
              f"{s['collect_all_vs_inference']:.2f} [{time.perf_counter() - tic:.0f} s]")
        summary["stats_pass_vs_inference"] = s["stats_pass_vs_inference"]
        summary["stats_pass_vs_inference_all_layers"] = s["collect_all_vs_inference"]

    if "e" in sections:
        tic = time.perf_counter()
        result["shrink"] = [section_shrink(task, repeats, quick) for task in ("speech", "face")]
        for r in result["shrink"]:
            print(f"(e) {r['task']}: 70% of {r['layer']} removed: params "
                  f"-{r['params_reduction']:.1%}, FLOPs -{r['flops_reduction']:.1%}, "
                  f"inference {_fmt(r['masked_s'])} -> {_fmt(r['shrunk_s'])} = "
                  f"{r['inference_speedup']:.2f}x")
            summary[f"shrink_params_reduction_{r['task']}"] = r["params_reduction"]
            summary[f"shrink_flops_reduction_{r['task']}"] = r["flops_reduction"]
            summary[f"shrink_inference_speedup_{r['task']}"] = r["inference_speedup"]
        print(f"    [{time.perf_counter() - tic:.0f} s]")

    result["load_end"] = _load()
    result["seconds"] = time.perf_counter() - start
    result["summary"] = summary
    result["notes"] = _notes(result)
    result["targets"] = {
        key: {"op": op, "threshold": threshold, "status": _check(key, summary[key])}
        for key, (op, threshold, _) in TARGETS.items() if key in summary}
    (output_dir / "benchmarks.json").write_text(
        json.dumps({**summary, "details": result}, indent=2, default=float) + "\n")
    markdown = _markdown(result)
    if result.get("shrink"):
        markdown += ("\n## (e) Shrunk model (pruned channels removed for real)\n\n"
                     "| task | layer | params | multiply-adds | masked | shrunk | speed-up |\n"
                     "|---|---|---|---|---|---|---|\n")
        for r in result["shrink"]:
            markdown += (f"| {r['task']} | {r['layer']} (70% pruned) | {r['params'][0]:,} -> "
                         f"{r['params'][1]:,} (-{r['params_reduction']:.1%}) | "
                         f"{r['flops'][0]:,} -> {r['flops'][1]:,} (-{r['flops_reduction']:.1%})"
                         f" | {_fmt(r['masked_s'])} | {_fmt(r['shrunk_s'])} | "
                         f"{r['inference_speedup']:.2f}x |\n")
    (output_dir / "BENCHMARKS.md").write_text(markdown)
    print(f"wrote {output_dir / 'BENCHMARKS.md'} and benchmarks.json "
          f"[{result['seconds']:.0f} s total]")
    logging.info("summary: %s", summary)


if __name__ == "__main__":
    app.run(main)
