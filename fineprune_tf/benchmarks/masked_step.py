"""Benchmark section: a MaskedConv2D training step vs the plain Conv2D step, per backend.

Three settings, each in its own subprocess (the Keras backend is fixed at import):

* ``tf-graph``: TensorFlow, ``jit_compile=False`` (the masked model runs the compiled op);
* ``tf-xla``: TensorFlow, ``jit_compile=True`` (the masked model runs the composite, fused by
  XLA);
* ``jax``: JAX (jitted by Keras; the masked model runs the ``keras.ops`` composite).

Both models are the same small CNN (3 conv layers, ReLU, global pooling, a dense head) with the
same weights; half of each masked layer's channels are pruned, which changes no cost.  A step is
``train_on_batch`` (Adam); the two models are timed in interleaved rounds and the median step
time is reported, so load from other processes hits both alike.

A section of ``fineprune benchmark`` (``TITLE``, ``TARGETS``, ``measure``, ``markdown``; see
:mod:`fineprune_tf.benchmarks`).  Run alone:
``python -m fineprune_tf.benchmarks.masked_step [--quick]``.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
SETTINGS = {"tf-graph": ("tensorflow", False), "tf-xla": ("tensorflow", True), "jax": ("jax", None)}
TITLE = "Masked training step vs plain Conv2D step: TF graph, TF with XLA, JAX"
TARGETS = {
    "xla_masked_step_ratio": ("<=", 1.10, "masked step <= 1.10x plain Conv2D with XLA"),
    "jax_masked_step_ratio": ("<=", 1.25, "masked step <= 1.25x plain Conv2D on JAX"),
}
_TARGET_OF = {
    "tf-xla": "xla_masked_step_ratio",
    "jax": "jax_masked_step_ratio",
    "tf-graph": "graph_masked_step_ratio",
}
INPUT_SHAPE, FILTERS, CLASSES = (32, 32, 3), (32, 64, 64), 10


def _models(keras, fp):
    """(masked, plain): the same CNN with masked and with plain layers, same weights."""

    def build(conv, dense):
        inputs = keras.Input(INPUT_SHAPE)
        x = inputs
        for index, filters in enumerate(FILTERS):
            x = conv(filters, 3, padding="same", activation="relu", name=f"conv{index}")(x)
            if index < len(FILTERS) - 1:
                x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        x = dense(64, activation="relu", name="fc")(x)
        return keras.Model(inputs, keras.layers.Dense(CLASSES, name="head")(x))

    keras.utils.set_random_seed(0)
    masked = build(fp.MaskedConv2D, fp.MaskedDense)
    plain = build(keras.layers.Conv2D, keras.layers.Dense)
    for source, target in zip(masked.layers, plain.layers, strict=True):
        target.set_weights(source.get_weights()[: len(target.weights)])
    for layer in fp.layers.masked_layers(masked):
        layer.prune(range(0, layer.channels, 2))
    return masked, plain


def _child(setting: str, quick: bool, rounds: int | None = None) -> dict:
    """Runs in the subprocess: times both models' training steps under ``setting``."""
    import keras
    import numpy as np

    import fineprune_tf as fp

    batch, steps = (32, 3) if quick else (64, 5)
    rounds = rounds or (4 if quick else 12)
    masked, plain = _models(keras, fp)
    _, jit_compile = SETTINGS[setting]
    for model in (masked, plain):
        kwargs = {} if jit_compile is None else {"jit_compile": jit_compile}
        model.compile(
            keras.optimizers.Adam(1e-4),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            **kwargs,
        )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *INPUT_SHAPE)).astype("float32")
    y = rng.integers(0, CLASSES, batch)

    def run(model):
        start = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(x, y)
        return (time.perf_counter() - start) / steps

    for model in (masked, plain):  # Warm-up: trace and compile.
        run(model)
        run(model)
    times = {"masked": [], "plain": []}
    for _ in range(rounds):
        times["masked"].append(run(masked))
        times["plain"].append(run(plain))
    masked_s, plain_s = (statistics.median(times[k]) for k in ("masked", "plain"))
    return {
        "backend": keras.backend.backend(),
        "jit_compile": bool(masked.jit_compile),
        "batch_size": batch,
        "rounds": rounds,
        "masked_step_s": masked_s,
        "plain_step_s": plain_s,
        "ratio": masked_s / plain_s,
        "round_ratios": [m / p for m, p in zip(times["masked"], times["plain"], strict=True)],
    }


def _run_setting(setting: str, quick: bool, rounds: int | None) -> dict:
    backend, _ = SETTINGS[setting]
    if importlib.util.find_spec(backend) is None:
        return {"skipped": f"{backend} is not installed"}
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    code = (
        f"import json; from fineprune_tf.benchmarks.masked_step import _child; "
        f"print('RESULT', json.dumps(_child({setting!r}, {quick!r}, {rounds!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=1800,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1][len("RESULT ") :])


def measure(quick: bool, repeats: int | None = None) -> dict:
    """Times the masked and the plain training step in every setting; see the module doc.

    ``repeats``: interleaved rounds per setting (default 4 with ``quick``, else 12).  With
    ``quick`` the settings' children run at the same time (a smoke run, not a measurement).
    """
    if quick:
        # The smoke run (CI): the three children at once.  Each times its masked and plain
        # steps interleaved, so its ratio stays a side-by-side measurement, only noisier; most
        # of a child's time is its start-up and compilation, which this overlaps.
        with concurrent.futures.ThreadPoolExecutor(len(SETTINGS)) as pool:
            futures = {s: pool.submit(_run_setting, s, quick, repeats) for s in SETTINGS}
        settings = {setting: future.result() for setting, future in futures.items()}
    else:
        settings = {setting: _run_setting(setting, quick, repeats) for setting in SETTINGS}
    summary = {_TARGET_OF[name]: row["ratio"] for name, row in settings.items() if "ratio" in row}
    notes = [
        f"{name}: {row.get('skipped') or row.get('error')}"
        for name, row in settings.items()
        if "ratio" not in row
    ]
    return {
        "settings": settings,
        "summary": summary,
        "notes": notes,
        "quick": quick,
        "model": {
            "input": list(INPUT_SHAPE),
            "conv_filters": list(FILTERS),
            "pruned": "every other channel of each masked layer",
        },
    }


def markdown(result: dict) -> str:
    """The section's part of BENCHMARKS.md."""
    lines = [
        f"### {TITLE}",
        "",
        f"`train_on_batch` (Adam) of a 3-conv CNN on {tuple(result['model']['input'])} inputs; "
        "the masked model has MaskedConv2D/MaskedDense with half the channels pruned, the plain "
        "one Conv2D/Dense with the same weights. Median over interleaved rounds.",
        "",
        "| setting | batch | masked step | plain step | masked / plain | target |",
        "|---|---|---|---|---|---|",
    ]
    for setting, row in result["settings"].items():
        if "ratio" not in row:
            lines.append(f"| {setting} | | {row.get('skipped') or row.get('error')} | | | |")
            continue
        target = TARGETS.get(_TARGET_OF[setting])
        verdict = (
            ""
            if target is None
            else (f"<= {target[1]:.2f}x: {'met' if row['ratio'] <= target[1] else 'NOT met'}")
        )
        lines.append(
            f"| {setting} | {row['batch_size']} | {row['masked_step_s'] * 1e3:.2f} ms "
            f"| {row['plain_step_s'] * 1e3:.2f} ms | {row['ratio']:.3f}x | {verdict} |"
        )
    lines += [f"- {note}" for note in result.get("notes", [])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    outcome = measure(quick="--quick" in sys.argv[1:])
    print(markdown(outcome))
    print(json.dumps(outcome, indent=1))
