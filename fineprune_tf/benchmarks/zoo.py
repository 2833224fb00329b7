"""(g) Model zoo: parameters, FLOPs and CPU inference of ``keras.applications`` models, masked vs
shrunk, after pruning 50% of every dependency group (issue 12; the issue calls this section
"(f)", but (f) is the peak-memory section, so it is (g)).

Per model: ``weights=None`` at a small input, BN statistics calibrated (random gamma / beta,
then one training-mode pass over calibration images with momentum 0, so every BN's moving
statistics are its input's real statistics: without it a pruned channel's BN is near identity
and pruning looks cheaper or dearer than it is), :func:`fineprune_tf.convert` (BN-aware masks,
the default), :func:`fineprune_tf.graph.channel_groups`, half of the coupled channels of every
removable group pruned (a seeded random half: the cost does not depend on which),
:func:`fineprune_tf.export.shrink`.  The stock (unpruned, unconverted) model is timed alongside
as the honest baseline: "masked" computes every channel (the mask only zeroes them), "shrunk"
is the plain Keras model with pruned channels removed and BN folded into the convolutions.

A section of ``fineprune benchmark`` (``TITLE``, ``TARGETS``, ``measure``, ``markdown``).
"""

from __future__ import annotations

from fineprune_tf.benchmarks.timing import fmt, interleaved, median

TITLE = "(g) Model zoo: masked vs shrunk after pruning 50% of every dependency group"
#: Full run: (label, keras.applications constructor, keyword arguments).
MODELS = (
    ("MobileNetV2", "MobileNetV2", {}),
    ("ResNet50", "ResNet50", {}),
    ("DenseNet121", "DenseNet121", {}),
    ("EfficientNetB0", "EfficientNetB0", {}),
)
#: The smoke run's one small model.
QUICK_MODELS = (("MobileNetV2-0.35", "MobileNetV2", {"alpha": 0.35}),)
SIZE, QUICK_SIZE = 96, 64
BATCH = 16
CLASSES = 10
FRACTION = 0.5
TARGETS = {
    f"zoo_{metric}_{model}": (">=", threshold, text.format(model=model))
    for model in ("MobileNetV2", "ResNet50")
    for metric, threshold, text in (
        ("flops_reduction", 0.4, "{model}: >= 40% fewer FLOPs after shrink"),
        ("inference_speedup", 1.5, "{model}: shrunk >= 1.5x faster than masked"),
    )
}


def _calibrated(constructor: str, kwargs: dict, size: int, seed: int):
    """The stock model with random BN affine parameters and moving statistics equal to its
    inputs' statistics on ``2 * BATCH`` random images."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(seed)
    model = getattr(keras.applications, constructor)(
        input_shape=(size, size, 3), weights=None, classes=CLASSES, **kwargs
    )
    rng = np.random.default_rng(seed)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for bn in norms:
        c = int(bn.gamma.shape[0])
        bn.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
        bn.beta.assign(rng.normal(0.0, 0.5, c).astype("float32"))
        bn.momentum = 0.0  # the next training-mode call sets the moving statistics
    x = rng.uniform(0.0, 255.0, (2 * BATCH, size, size, 3)).astype("float32")
    model(x, training=True)
    for bn in norms:
        bn.momentum = 0.99
    return model, x[:BATCH]


def _prune_half_of_every_group(model, seed: int) -> tuple[int, int]:
    """Prunes ``FRACTION`` of the coupled channels of every removable group; returns
    ``(groups pruned, groups)``."""
    import numpy as np

    from fineprune_tf.graph import channel_groups

    rng = np.random.default_rng(seed)
    groups = channel_groups(model)
    pruned = 0
    for group in groups:
        count = int(FRACTION * group.size)
        if group.removable and count:
            group.prune(model, rng.choice(group.size, count, replace=False))
            pruned += 1
    return pruned, len(groups)


def _model(
    label: str, constructor: str, kwargs: dict, size: int, repeats: int, quick: bool
) -> dict:
    import numpy as np
    import tensorflow as tf

    import fineprune_tf as fp
    from fineprune_tf import export

    stock, x = _calibrated(constructor, kwargs, size, seed=0)
    masked = fp.convert(stock)
    pruned_groups, groups = _prune_half_of_every_group(masked, seed=0)
    small = export.shrink(masked)  # verifies against the masked model (relative 1e-4)
    reference = np.asarray(masked(x, training=False))
    diff = float(np.max(np.abs(np.asarray(small(x, training=False)) - reference)))
    counts = {"masked": export.count_params_and_flops(masked)}
    counts["shrunk"] = export.count_params_and_flops(small)
    timed_models = {"masked": masked, "shrunk": small}
    if not quick:  # the smoke run skips the baseline (one trace less: CI time is tight)
        timed_models = {"stock": stock, **timed_models}
    functions = {
        name: tf.function(lambda b, m=m: m(b, training=False)) for name, m in timed_models.items()
    }
    batch = tf.constant(x)
    times = interleaved({k: (lambda f=f: f(batch).numpy()) for k, f in functions.items()}, repeats)
    med = {k: median(v) for k, v in times.items()}
    (params, macs), (small_params, small_macs) = counts["masked"], counts["shrunk"]
    return {
        "model": label,
        "input": [size, size, 3],
        "batch": BATCH,
        "groups": groups,
        "groups_pruned": pruned_groups,
        "params": [params, small_params],
        "flops": [2 * macs, 2 * small_macs],
        "params_reduction": 1 - small_params / params,
        "flops_reduction": 1 - small_macs / macs,
        "stock_s": med.get("stock"),
        "masked_s": med["masked"],
        "shrunk_s": med["shrunk"],
        "inference_speedup": med["masked"] / med["shrunk"],
        "speedup_vs_stock": med["stock"] / med["shrunk"] if "stock" in med else None,
        "max_abs_diff": diff,
        "output_scale": float(np.max(np.abs(reference))),
    }


def measure(quick: bool, repeats: int) -> dict:
    models, size = (QUICK_MODELS, QUICK_SIZE) if quick else (MODELS, SIZE)
    rows, summary = [], {}
    for label, constructor, kwargs in models:
        r = _model(label, constructor, kwargs, size, repeats, quick)
        rows.append(r)
        print(
            f"(g) {label}: params -{r['params_reduction']:.1%}, FLOPs "
            f"-{r['flops_reduction']:.1%}, inference {fmt(r['masked_s'])} -> "
            f"{fmt(r['shrunk_s'])} = {r['inference_speedup']:.2f}x"
            + (f" (stock {fmt(r['stock_s'])})" if r["stock_s"] else ""),
            flush=True,
        )
        for key in ("params_reduction", "flops_reduction", "inference_speedup"):
            summary[f"zoo_{key}_{label}"] = r[key]
    notes = [
        "(g) FLOPs are 2 x the multiply-adds of `fineprune_tf.graph.cost` (convolutions and "
        "dense layers; BN, activations and pooling left out).  Masked and stock models compute "
        "every channel; the shrunk model's gain over the stock one is the pruning's, its gain "
        "over the masked one adds the masking and unfolded-BN overhead."
    ]
    return {"rows": rows, "summary": summary, "notes": notes}


def markdown(result: dict) -> str:
    lines = [
        f"`keras.applications` models, `weights=None`, {CLASSES} classes, BN statistics "
        "calibrated; `fineprune_tf.convert` (BN-aware masks), 50% of every removable "
        "dependency group pruned (`fineprune_tf.graph.channel_groups`), "
        "`fineprune_tf.export.shrink`.  FLOPs = 2 x multiply-adds (`fineprune_tf.graph.cost`) "
        "per image; inference = one traced forward pass of a batch, interleaved, median.",
        "",
        "| model | input, batch | groups pruned | params masked -> shrunk | FLOPs masked -> "
        "shrunk | stock | masked | shrunk | masked / shrunk | stock / shrunk | max diff "
        "(output scale) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        p, f = r["params"], r["flops"]
        stock = fmt(r["stock_s"]) if r["stock_s"] else "-"
        vs_stock = f"{r['speedup_vs_stock']:.2f}x" if r["speedup_vs_stock"] else "-"
        lines.append(
            f"| {r['model']} | {r['input'][0]}x{r['input'][1]}, {r['batch']} | "
            f"{r['groups_pruned']} of {r['groups']} | {p[0]:,} -> {p[1]:,} "
            f"(-{r['params_reduction']:.1%}) | {f[0]:,} -> {f[1]:,} "
            f"(-{r['flops_reduction']:.1%}) | {stock} | {fmt(r['masked_s'])} | "
            f"{fmt(r['shrunk_s'])} | {r['inference_speedup']:.2f}x | {vs_stock} | "
            f"{r['max_abs_diff']:.2g} ({r['output_scale']:.2g}) |"
        )
    return "\n".join(lines)
