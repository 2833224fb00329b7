"""(c) A training step of a MaskedConv2D/MaskedDense model vs the same network with plain
Conv2D/Dense layers and the same weights (``fineprune_tf.export.to_plain``)."""

from __future__ import annotations

from fineprune_tf.benchmarks.timing import fmt, interleaved, median, op_profile, profile_diff

TITLE = "(c) Training step: masked layers vs plain Conv2D/Dense"
TASKS = ("speech", "face")
TARGETS = {"masked_train_overhead": ("<=", 1.10, "masked training step <= 1.10x plain Conv2D")}
STEPS = 5


def _kernel_split(masked, plain, x, y) -> dict:
    """Per training step (tf.profiler kernel time): the masked op and its gradient vs the plain
    model's ReluGrad, and the op types whose time differs most."""
    profiles = {
        name: op_profile(lambda m=model: m.train_on_batch(x, y), 10)
        for name, model in (("masked", masked), ("plain", plain))
    }
    kernels = {
        "masked_op": profiles["masked"].get("FinepruneMaskedActivation", 0.0),
        "masked_grad": profiles["masked"].get("FinepruneMaskedActivationGrad", 0.0),
        "relu_grad": profiles["plain"].get("ReluGrad", 0.0),
    }
    kernels["extra"] = kernels["masked_op"] + kernels["masked_grad"] - kernels["relu_grad"]
    return {
        "op_kernels": kernels,
        "op_profile_diff": profile_diff(profiles["masked"], profiles["plain"]),
    }


def _task(task: str, repeats: int, quick: bool) -> dict:
    import keras
    import numpy as np

    from fineprune_tf import data, export, models

    task_data = data.load(task)
    batch = models.default_training(task)["batch_size"]
    masked = models.build(task, preset="cpu", seed=0)
    plain = export.to_plain(masked)  # every mask is 1: the same network, stock layers
    x, y = task_data.train.x[:batch], task_data.train.y[:batch]
    same = float(np.max(np.abs(np.asarray(masked(x)) - np.asarray(plain(x)))))
    for model in (masked, plain):
        model.compile(
            optimizer=keras.optimizers.Adam(1e-4),
            loss="sparse_categorical_crossentropy",
            jit_compile=False,
        )

    def run(model):
        def fn():
            for _ in range(STEPS):
                model.train_on_batch(x, y)

        return fn

    # Training steps are short (tens of ms): many interleaved rounds, or other processes'
    # load decides the ratio.
    rounds = 2 * repeats if quick else max(2 * repeats, 10)
    times = interleaved({"masked": run(masked), "plain": run(plain)}, rounds, warmup=2)
    t_masked, t_plain = median(times["masked"]) / STEPS, median(times["plain"]) / STEPS
    result = {
        "task": task,
        "batch_size": batch,
        "masked_step_s": t_masked,
        "plain_step_s": t_plain,
        "ratio": t_masked / t_plain,
        "masked_min_s": min(times["masked"]) / STEPS,
        "plain_min_s": min(times["plain"]) / STEPS,
        "max_output_diff": same,
    }
    if not quick:
        result.update(_kernel_split(masked, plain, x, y))
    return result


def measure(quick: bool, repeats: int) -> dict:
    rows = [_task(task, repeats, quick) for task in TASKS]
    for r in rows:
        print(
            f"(c) {r['task']}: masked {fmt(r['masked_step_s'])}, plain "
            f"{fmt(r['plain_step_s'])} -> {r['ratio']:.3f}",
            flush=True,
        )
    summary = {"masked_train_overhead": max(r["ratio"] for r in rows)}
    summary.update({f"masked_train_overhead_{r['task']}": r["ratio"] for r in rows})
    return {"rows": rows, "summary": summary, "notes": _notes(rows)}


def _notes(rows: list[dict]) -> list[str]:
    notes = []
    for r in rows:
        if "op_kernels" not in r:
            continue
        k = r["op_kernels"]
        notes.append(
            f"(c) {r['task']}: per training step (tf.profiler kernel time) the masked model "
            f"spends {fmt(k['masked_op'])} in FinepruneMaskedActivation and "
            f"{fmt(k['masked_grad'])} in its gradient op, where the plain model spends "
            f"{fmt(k['relu_grad'])} in ReluGrad (its forward ReLU is fused into "
            f"`_FusedConv2D` by Grappler): {fmt(k['extra'])} extra, "
            f"{k['extra'] / r['plain_step_s']:.1%} of a plain step.  The rest of any measured "
            "difference is the load of other processes (the conv kernels are the same)."
        )
    return notes


def markdown(result: dict) -> str:
    lines = [
        "`train_on_batch` (Adam, `jit_compile=False`) on the cpu-preset model with "
        "MaskedConv2D/MaskedDense vs `fineprune_tf.export.to_plain` of it (keras Conv2D/Dense, "
        "the same weights).",
        "",
        "| model | batch | masked step | plain step | ratio |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['task']} | {r['batch_size']} | {fmt(r['masked_step_s'])} | "
        f"{fmt(r['plain_step_s'])} | {r['ratio']:.3f} |"
        for r in result["rows"]
    ]
    return "\n".join(lines)
