"""(e) The physically shrunk model vs the masked one: parameters, multiply-adds, inference."""

from __future__ import annotations

from fineprune_tf.benchmarks.timing import fmt, interleaved, median

TITLE = "(e) Shrunk model (pruned channels removed for real)"
TASKS = ("speech", "face")
FRACTION = 0.7
TARGETS: dict = {}


def _task(task: str, repeats: int, quick: bool) -> dict:
    """Prunes :data:`FRACTION` of the task's pruned layer in the defense's order (increasing
    mean activation on the validation data), shrinks, and times a compiled forward pass over
    the validation split, interleaved."""
    import numpy as np
    import tensorflow as tf

    from fineprune_tf import data, export, models, stats

    task_data = data.load(task)
    model = models.build(task, preset="cpu", seed=0)
    name = models.PRUNED_LAYER[task]
    x = task_data.validation.x
    means = stats.collect(model, x, layer_names=[name])[name].mean
    layer = model.get_layer(name)
    layer.prune(np.argsort(means, kind="stable")[: int(round(FRACTION * layer.channels))])
    small = export.shrink(model)
    params, macs = export.count_params_and_flops(model)
    small_params, small_macs = export.count_params_and_flops(small)
    masked_fn = tf.function(lambda b: model(b, training=False), reduce_retracing=True)
    small_fn = tf.function(lambda b: small(b, training=False), reduce_retracing=True)

    def run(fn):
        return lambda: [fn(x[i : i + 256]) for i in range(0, len(x), 256)]

    times = interleaved(
        {"masked": run(masked_fn), "shrunk": run(small_fn)}, 2 * repeats if quick else 4 * repeats
    )
    med = {k: median(v) for k, v in times.items()}
    return {
        "task": task,
        "layer": name,
        "pruned_fraction": FRACTION,
        "params": [params, small_params],
        "multiply_adds": [macs, small_macs],
        "params_reduction": 1 - small_params / params,
        "flops_reduction": 1 - small_macs / macs,
        "masked_s": med["masked"],
        "shrunk_s": med["shrunk"],
        "inference_speedup": med["masked"] / med["shrunk"],
        "samples": len(x),
    }


def measure(quick: bool, repeats: int) -> dict:
    rows = [_task(task, repeats, quick) for task in TASKS]
    summary = {}
    for r in rows:
        print(
            f"(e) {r['task']}: {r['pruned_fraction']:.0%} of {r['layer']} removed: params "
            f"-{r['params_reduction']:.1%}, multiply-adds -{r['flops_reduction']:.1%}, "
            f"inference {fmt(r['masked_s'])} -> {fmt(r['shrunk_s'])} = "
            f"{r['inference_speedup']:.2f}x",
            flush=True,
        )
        for key in ("params_reduction", "flops_reduction", "inference_speedup"):
            summary[f"shrink_{key}_{r['task']}"] = r[key]
    return {"rows": rows, "summary": summary, "notes": []}


def markdown(result: dict) -> str:
    lines = [
        "`fineprune_tf.export.shrink` after pruning the pruned layer's lowest-activation "
        "channels (untrained cpu-preset model); multiply-adds as counted by "
        "`fineprune_tf.graph.cost`; inference = a traced forward pass over the validation "
        "split, interleaved.",
        "",
        "| task | layer | params | multiply-adds | masked | shrunk | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        p, m = r["params"], r["multiply_adds"]
        lines.append(
            f"| {r['task']} | {r['layer']} ({r['pruned_fraction']:.0%} pruned) | {p[0]:,} -> "
            f"{p[1]:,} (-{r['params_reduction']:.1%}) | {m[0]:,} -> {m[1]:,} "
            f"(-{r['flops_reduction']:.1%}) | {fmt(r['masked_s'])} | {fmt(r['shrunk_s'])} | "
            f"{r['inference_speedup']:.2f}x |"
        )
    return "\n".join(lines)
