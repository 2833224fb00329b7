"""(d) A statistics pass (``stats.collect``) vs a plain inference pass over the same data."""

from __future__ import annotations

from fineprune_tf.benchmarks.timing import fmt, interleaved, median, op_profile, profile_diff

TITLE = "(d) Statistics pass vs inference"
TARGETS = {
    "stats_pass_vs_inference": (
        "<=",
        1.10,
        "statistics pass (pruned layer, as the defense runs it) <= 1.1x inference",
    )
}
OP = "FinepruneMaskedActivation"


def _kernel_split(collect_all, inference, inference_s: float) -> dict:
    """What the statistics add (tf.profiler kernel time): the op's reductions, and the ops only
    the statistics pass runs (accumulator updates and their casts)."""
    collect_ops, inference_ops = op_profile(collect_all, 3), op_profile(inference, 3)
    only = {k: v for k, v in collect_ops.items() if k not in inference_ops}
    return {
        "op_kernels": {
            "masked_op_stats": collect_ops.get(OP, 0.0),
            "masked_op_inference": inference_ops.get(OP, 0.0),
            "stats_only_ops": sum(only.values()),
            "stats_only_top": sorted(only.items(), key=lambda kv: -kv[1])[:4],
        },
        "op_profile_diff": profile_diff(collect_ops, inference_ops),
    }


def measure(quick: bool, repeats: int) -> dict:
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

    # Collectors trace once, as a user collecting repeatedly would; collect() traces anew.
    one = stats.StatsCollector(model, [name])
    every = stats.StatsCollector(model)
    calls = {
        "inference": inference,
        "predict": lambda: model.predict(x, batch_size=batch, verbose=0),
        "collect_pruned_layer": lambda: one.collect(x, batch_size=batch),
        "collect_all_layers": lambda: every.collect(x, batch_size=batch),
    }
    # Passes are short: many interleaved rounds, or other processes' load decides the ratio.
    times = interleaved(calls, 2 * repeats if quick else max(3 * repeats, 15))
    med = {k: median(v) for k, v in times.items()}
    result = {
        "samples": len(x),
        "batch_size": batch,
        "layer": name,
        "masked_layers": sum(1 for layer in model.layers if hasattr(layer, "channels")),
        **{f"{k}_s": v for k, v in med.items()},
        **{f"{k}_min_s": min(v) for k, v in times.items()},
        "stats_pass_vs_inference": med["collect_pruned_layer"] / med["inference"],
        "collect_all_vs_inference": med["collect_all_layers"] / med["inference"],
        "collect_vs_predict": med["collect_pruned_layer"] / med["predict"],
        "min_ratio_pruned_layer": min(times["collect_pruned_layer"]) / min(times["inference"]),
        "min_ratio_all_layers": min(times["collect_all_layers"]) / min(times["inference"]),
    }
    if not quick:
        result.update(_kernel_split(calls["collect_all_layers"], inference, med["inference"]))
    print(
        f"(d) collect {fmt(result['collect_pruned_layer_s'])}, inference "
        f"{fmt(result['inference_s'])} -> {result['stats_pass_vs_inference']:.2f}; all "
        f"layers {result['collect_all_vs_inference']:.2f}",
        flush=True,
    )
    result["summary"] = {
        "stats_pass_vs_inference": result["stats_pass_vs_inference"],
        "stats_pass_vs_inference_all_layers": result["collect_all_vs_inference"],
    }
    result["notes"] = _notes(result)
    return result


def _notes(s: dict) -> list[str]:
    if "op_kernels" not in s:
        return []
    k = s["op_kernels"]
    extra = k["masked_op_stats"] - k["masked_op_inference"] + k["stats_only_ops"]
    top = ", ".join(f"{name} {fmt(v)}" for name, v in k["stats_only_top"])
    return [
        f"(d) per pass (tf.profiler kernel time, all {s['masked_layers']} layers measured): "
        f"FinepruneMaskedActivation {fmt(k['masked_op_stats'])} with statistics vs "
        f"{fmt(k['masked_op_inference'])} without, plus {fmt(k['stats_only_ops'])} in ops only "
        f"the statistics pass runs ({top}): {fmt(extra)} of extra work, "
        f"{extra / s['inference_s']:.1%} of an inference pass.  The rest of any measured "
        "difference is host-side or the load of other processes."
    ]


def markdown(s: dict) -> str:
    return "\n".join(
        [
            f"Speech cpu model, {s['samples']} inputs in batches of {s['batch_size']}.",
            "",
            "| pass | time | / inference |",
            "|---|---|---|",
            f"| inference (traced forward over `stats.as_dataset`) | {fmt(s['inference_s'])} "
            "| 1.00 |",
            f"| `model.predict` | {fmt(s['predict_s'])} | "
            f"{s['predict_s'] / s['inference_s']:.2f} |",
            f"| `stats.collect(layer_names=[{s['layer']}])` | {fmt(s['collect_pruned_layer_s'])} "
            f"| {s['stats_pass_vs_inference']:.2f} |",
            f"| `stats.collect()` (all {s['masked_layers']} masked layers) | "
            f"{fmt(s['collect_all_layers_s'])} | {s['collect_all_vs_inference']:.2f} |",
            "",
            f"Ratios of the fastest runs instead of the medians: pruned layer "
            f"{s['min_ratio_pruned_layer']:.2f}, all layers {s['min_ratio_all_layers']:.2f} (one "
            "undisturbed run of either pass moves these; see the kernel-time split in the "
            "analysis for the work the statistics add).",
        ]
    )
