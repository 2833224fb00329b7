"""(b) The fused op ``ops.masked_activation`` against the best TensorFlow can do without it.

Three implementations of ``y = relu(z) * mask`` plus the per-channel statistics of ``relu(z)``
(sum, sum of squares, positive count), forward and backward, side by side:

* **compiled**: ``fineprune_tf.ops.masked_activation`` with the compiled kernel;
* **TF composite** (the baseline the speed-ups are quoted against): the best-effort plain
  TensorFlow written below -- one reshape, float32 counts, no assertion op, no custom-gradient
  wrapper (autodiff of ``relu(z) * mask`` already gives ``dy * mask * relu'(z)``);
* **fallback**: what a user without a compiler runs -- ``fineprune_tf.ops`` loaded a second time
  with ``FINEPRUNE_FORCE_TF_OPS=1``, so its ``masked_activation`` takes the pure-TF path.
"""

from __future__ import annotations

import functools
import importlib.util
import os

from fineprune_tf.benchmarks.timing import fmt, interleaved, median

TITLE = "(b) Fused op vs plain TensorFlow"
TARGETS = {
    "op_speedup_vs_tf": (
        ">=",
        2.0,
        "fused op forward with statistics >= 2x the best-effort TF composite (large activation)",
    ),
    "op_grad_speedup_vs_tf": (">=", 1.5, "fused op backward >= 1.5x the TF composite (large)"),
    "op_small_min_speedup": (
        ">=",
        1.0,
        "fused op never slower than the composite at small sizes (fwd with statistics, bwd)",
    ),
}
SHAPES = [(32, 27, 27, 96), (64, 27, 27, 96), (128, 13, 13, 256), (64, 56, 56, 256)]
QUICK_SHAPES = [(32, 27, 27, 96), (128, 13, 13, 256), (32, 56, 56, 256)]
IMPLEMENTATIONS = ("compiled", "composite", "fallback")


def composite(z, mask, activation: str = "relu", compute_stats: bool = True):
    """The best-effort TF composite: ``(y, sum, sum_sq, positive)`` or ``y`` alone."""
    import tensorflow as tf

    activated = tf.nn.relu(z)
    y = activated * mask
    if not compute_stats:
        return y
    flat = tf.reshape(activated, [-1, tf.shape(z)[-1]])
    return (
        y,
        tf.reduce_sum(flat, 0),
        tf.reduce_sum(flat * flat, 0),
        tf.reduce_sum(tf.cast(flat > 0, tf.float32), 0),
    )


def fallback_ops():
    """``fineprune_tf.ops`` as a user without the compiled library gets it: a second copy of
    the module, loaded with ``FINEPRUNE_FORCE_TF_OPS=1`` (the first copy is left alone)."""
    from fineprune_tf import ops

    spec = importlib.util.spec_from_file_location("fineprune_tf_ops_forced_tf", ops.__file__)
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.get("FINEPRUNE_FORCE_TF_OPS")
    os.environ["FINEPRUNE_FORCE_TF_OPS"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["FINEPRUNE_FORCE_TF_OPS"]
        else:
            os.environ["FINEPRUNE_FORCE_TF_OPS"] = saved
    if module.backend() != "tensorflow":
        raise RuntimeError("the forced-TF copy of fineprune_tf.ops did not take the TF path")
    return module


def _library(fn):
    """Adapts a ``masked_activation``-like function to the composite's return convention."""

    def call(z, mask, activation, compute_stats):
        result = fn(z, mask, activation, compute_stats)
        return tuple(result) if compute_stats else result.y

    return call


def _programs(impl):
    import tensorflow as tf

    forward = tf.function(lambda z, m: impl(z, m, "relu", True))
    nostats = tf.function(lambda z, m: impl(z, m, "relu", False))

    @tf.function
    def backward(z, m, w):
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = tf.reduce_sum(impl(z, m, "relu", False) * w)
        return tape.gradient(loss, z)

    return {"fwd": forward, "fwd_nostats": nostats, "bwd": backward}


def _max_diff(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (1.0 + np.max(np.abs(b))))


def _shape_row(shape, impls: dict, repeats: int, rng) -> dict:
    import numpy as np
    import tensorflow as tf

    z = tf.constant(rng.standard_normal(shape, dtype=np.float32))
    w = tf.constant(rng.standard_normal(shape, dtype=np.float32))
    mask = tf.constant((rng.random(shape[-1]) > 0.25).astype(np.float32))
    calls = {}
    for impl_name, impl in impls.items():
        for kind, program in _programs(impl).items():
            args = (z, mask, w) if kind == "bwd" else (z, mask)
            calls[f"{kind}_{impl_name}"] = functools.partial(program, *args)
    # Same results from every implementation (sanity), against the composite.
    diffs = {
        name: max(
            _max_diff(a, b)
            for a, b in zip(calls[f"fwd_{name}"](), calls["fwd_composite"](), strict=True)
        )
        for name in impls
        if name != "composite"
    }
    diffs.update(
        {
            f"bwd_{name}": _max_diff(calls[f"bwd_{name}"](), calls["bwd_composite"]())
            for name in impls
            if name != "composite"
        }
    )
    times = interleaved(calls, repeats)
    med = {name: median(t) for name, t in times.items()}
    row = {
        "shape": list(shape),
        "megabytes": int(np.prod(shape)) * 4 / 2**20,
        **{f"{name}_s": value for name, value in med.items()},
        **{f"{name}_min_s": min(t) for name, t in times.items()},
        "max_rel_diff": diffs,
    }
    for kind in ("fwd", "fwd_nostats", "bwd"):
        row[f"{kind}_speedup"] = med[f"{kind}_composite"] / med[f"{kind}_compiled"]
        row[f"{kind}_fallback_vs_composite"] = med[f"{kind}_fallback"] / med[f"{kind}_composite"]
        row[f"best_of_{kind}_speedup"] = min(times[f"{kind}_composite"]) / min(
            times[f"{kind}_compiled"]
        )
    return row


def measure(quick: bool, repeats: int) -> dict:
    """Section (b): the three implementations on each activation shape of :data:`SHAPES`."""
    import numpy as np

    from fineprune_tf import ops

    impls = {
        "compiled": _library(ops.masked_activation),
        "composite": composite,
        "fallback": _library(fallback_ops().masked_activation),
    }
    rng = np.random.default_rng(0)
    rows = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        rows.append(_shape_row(shape, impls, repeats if quick else max(repeats, 7), rng))
        r = rows[-1]
        print(
            f"(b) {'x'.join(map(str, shape))}: vs composite fwd {r['fwd_speedup']:.2f}x "
            f"(no stats {r['fwd_nostats_speedup']:.2f}x), bwd {r['bwd_speedup']:.2f}x; "
            f"fallback / composite fwd {r['fwd_fallback_vs_composite']:.2f}",
            flush=True,
        )
    large, small = rows[-1], rows[:-1]
    summary = {
        "op_speedup_vs_tf": large["fwd_speedup"],
        "op_grad_speedup_vs_tf": large["bwd_speedup"],
        "op_nostats_speedup_vs_tf": large["fwd_nostats_speedup"],
        "op_small_min_speedup": min(min(r["fwd_speedup"], r["bwd_speedup"]) for r in small),
        "op_fallback_vs_composite": large["fwd_fallback_vs_composite"],
        "op_grad_fallback_vs_composite": large["bwd_fallback_vs_composite"],
    }
    result = {"backend": ops.backend(), "sizes": rows, "summary": summary}
    result["notes"] = _notes(result)
    return result


def _notes(result: dict) -> list[str]:
    if result["backend"] == "tensorflow":
        return [
            '(b) `fineprune_tf.ops.backend()` is "tensorflow": the compiled kernel was not '
            "built or not loadable, so the compiled column is the fallback too."
        ]
    large = result["sizes"][-1]
    notes = [
        f"(b) the pure-TF fallback users get without a compiler takes "
        f"{large['fwd_fallback_vs_composite']:.2f}x the composite's time forward and "
        f"{large['bwd_fallback_vs_composite']:.2f}x backward on "
        f"{'x'.join(map(str, large['shape']))} (`fineprune_tf.ops` with "
        "`FINEPRUNE_FORCE_TF_OPS=1`)."
    ]
    slow = [r for r in result["sizes"] if r["fwd_nostats_speedup"] < 1.0]
    if slow:
        cases = ", ".join(
            f"{'x'.join(map(str, r['shape']))}: median "
            f"{r['fwd_nostats_speedup']:.2f}x, best-of-run "
            f"{r['best_of_fwd_nostats_speedup']:.2f}x"
            for r in slow
        )
        notes.append(
            "(b) without statistics the compiled forward was not faster than the "
            f"composite's `relu(z) * mask` at {cases}."
        )
    return notes


def markdown(result: dict) -> str:
    lines = [
        f"Backend: `{result['backend']}`.  Baseline = a best-effort TF composite written in "
        "`fineprune_tf/benchmarks/op.py` (one reshape, float32 counts, no assertion, no "
        "custom-gradient wrapper); fallback = `fineprune_tf.ops` forced to its TF path "
        "(`FINEPRUNE_FORCE_TF_OPS=1`), what users without a compiler run.  Forward = `y` and "
        "the three per-channel statistics; no stats = `y` only; backward = gradient of "
        "`sum(y * w)` w.r.t. `z`; all inside `tf.function`.",
        "",
        "| activation | MiB | fwd compiled | fwd composite | fwd fallback | **speedup** | "
        "no-stats speedup | bwd compiled | bwd composite | bwd fallback | **speedup** | "
        "best-of-run fwd / bwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["sizes"]:
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['megabytes']:.0f} | "
            f"{fmt(r['fwd_compiled_s'])} | {fmt(r['fwd_composite_s'])} | "
            f"{fmt(r['fwd_fallback_s'])} | **{r['fwd_speedup']:.2f}x** | "
            f"{r['fwd_nostats_speedup']:.2f}x | {fmt(r['bwd_compiled_s'])} | "
            f"{fmt(r['bwd_composite_s'])} | {fmt(r['bwd_fallback_s'])} | "
            f"**{r['bwd_speedup']:.2f}x** | {r['best_of_fwd_speedup']:.2f}x / "
            f"{r['best_of_bwd_speedup']:.2f}x |"
        )
    return "\n".join(lines)
