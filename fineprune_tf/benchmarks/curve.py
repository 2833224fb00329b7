"""(a) The full per-channel pruning curve: ``curves.pruning_curve`` vs the naive loop
(``curves.naive_pruning_curve``: set the mask, ``model.predict``, per channel) on the speech and
face models, against one plain forward pass and an arithmetic lower bound."""

from __future__ import annotations

import time

from fineprune_tf.benchmarks.timing import GEMM, fmt, gemm_fn, interleaved, median, timed

TITLE = "(a) Full per-channel pruning curve"
TASKS = ("speech", "face")
TARGETS = {
    "curve_speedup_vs_naive": (">=", 20.0, "engine >= 20x faster than the naive loop"),
    "curve_cost_vs_bound": ("<=", 2.0, "engine within 2x of the arithmetic lower bound"),
}


def _backdoored_model(task: str, epochs: int | None):
    """The task's baseline backdoored model (``attacks.baseline``), or with ``epochs=0`` the
    untrained network with the same trigger; the backdoored validation split."""
    import keras

    from fineprune_tf import attacks, data, models, poison

    task_data = data.load(task)
    if epochs == 0:
        trigger, policy, _ = poison.default_attack(task, task_data, seed=0)
        keras.utils.set_random_seed(0)
        model = models.build(task, preset="cpu", seed=0)
    else:
        result = attacks.baseline(task_data, settings=attacks.AttackSettings(epochs=epochs))
        model, trigger, policy = result.model, result.trigger, result.policy
        epochs = result.report["epochs"]
    backdoor = poison.backdoor_test_set(task_data.validation, trigger, policy)
    return model, task_data, backdoor, epochs


def _naive_compiled(model, layer, order, x_all, steps: int, naive_steps: int, runs: int):
    """The naive loop with a traced forward function instead of ``model.predict`` (a stricter
    baseline), timed on ``naive_steps + 1`` steps and scaled to ``steps``."""
    import numpy as np
    import tensorflow as tf

    forward_fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    batches = [x_all[i : i + 256] for i in range(0, len(x_all), 256)]
    saved = layer.mask
    times = []
    try:
        for _ in range(runs):
            mask = saved.copy()
            tic = time.perf_counter()
            for k in range(naive_steps + 1):
                if k:
                    mask[order[k - 1]] = 0.0
                    layer.set_mask(mask)
                np.argmax(np.concatenate([forward_fn(b).numpy() for b in batches]), axis=-1)
            times.append((time.perf_counter() - tic) * steps / (naive_steps + 1))
            layer.set_mask(saved)
    finally:
        layer.set_mask(saved)
    return median(times), forward_fn, batches


def _naive_loop(model, name: str, order, clean, backdoor, naive_steps: int) -> tuple[float, object]:
    """The naive loop's seconds for the whole curve and its run: ``model.predict`` per step;
    with --quick on a prefix of ``naive_steps`` channels of the order, scaled to every step
    (each step costs the same two predict calls, so one run averages over the steps)."""
    from fineprune_tf import curves

    curves.naive_pruning_curve(model, name, order[:1], clean, backdoor)  # traces predict
    runs: list = []
    seconds = timed(
        lambda: runs.append(
            curves.naive_pruning_curve(model, name, order[:naive_steps], clean, backdoor)
        )
    )
    return seconds * (len(order) + 1) / (naive_steps + 1), runs[0]


def _task(task: str, repeats: int, quick: bool, epochs: int | None) -> dict:
    """One task's curve, naive loops, forward pass and lower bound (a flat dict of numbers)."""
    import numpy as np

    from fineprune_tf import curves, models, stats

    model, task_data, backdoor, epochs = _backdoored_model(task, epochs)
    name = models.PRUNED_LAYER[task]
    clean = (task_data.validation.x, task_data.validation.y)
    layer = model.get_layer(name)
    # The defense's order: increasing mean activation on the clean validation data (§3.1).
    order = np.argsort(stats.collect(model, clean[0], layer_names=[name])[name].mean, kind="stable")
    steps = len(order) + 1
    x_all = np.concatenate([clean[0], backdoor.x])
    naive_steps = min(len(order), 8) if quick else len(order)
    compiled_s, forward_fn, batches = _naive_compiled(
        model, layer, order, x_all, steps, naive_steps, 1 if quick else 2
    )
    first = timed(lambda: curves.pruning_curve(model, name, order, clean, backdoor))
    runs: list = []
    # The FLOP rates of the bound are measured interleaved with the engine, under the same
    # load; these runs are short, so twice the repeats.
    times = interleaved(
        {
            "engine": lambda: runs.append(
                curves.pruning_curve(model, name, order, clean, backdoor)
            ),
            "forward": lambda: [forward_fn(b) for b in batches],
            "gemm": gemm_fn(),
        },
        2 * repeats,
    )
    engine = runs[1:][int(np.argsort(times["engine"])[len(runs[1:]) // 2])]  # median run
    naive, naive_run = _naive_loop(model, name, order, clean, backdoor, naive_steps)
    k = naive_steps + 1
    mismatches = int(
        np.sum(engine.predictions_clean[:k] != naive_run.predictions_clean)
        + np.sum(engine.predictions_backdoor[:k] != naive_run.predictions_backdoor)
    )
    return {
        "task": task,
        "layer": name,
        "channels": layer.channels,
        "steps": steps,
        "clean_samples": len(clean[0]),
        "backdoor_samples": len(backdoor.x),
        "train_epochs": epochs,
        "engine_runs": times["engine"],
        "engine_s": median(times["engine"]),
        "engine_min_s": min(times["engine"]),
        "engine_first_call_s": first,
        "forward_s": median(times["forward"]),
        "forward_min_s": min(times["forward"]),
        "gemm_s": median(times["gemm"]),
        "naive_s": naive,
        "naive_measured_steps": naive_steps + 1,
        "naive_compiled_s": compiled_s,
        "evaluated_rows": engine.info["evaluated_rows"],
        "phase_seconds": engine.info["phase_seconds"],
        "prediction_mismatches_vs_naive": mismatches,
        "clean_acc_start": float(engine.clean_acc[0]),
        "asr_start": float(engine.asr[0]),
        **_bound(
            curves.describe(model, name),
            len(x_all),
            steps,
            engine.info["evaluated_rows"],
            median(times["forward"]),
            median(times["gemm"]),
            median(times["engine"]),
        ),
    }


def _bound(
    info, samples: int, steps: int, rows: int, t_forward: float, t_gemm: float, t_engine: float
) -> dict:
    """The arithmetic lower bound: the prefix (convolutions) at the rate the plain forward pass
    achieves on them; the per-step layers (dense layers over many rows) at the better of that
    and the GEMM rate."""
    forward_rate = info.forward_flops * samples / t_forward
    gemm_rate = 2.0 * GEMM**3 / t_gemm
    once = samples * (info.prefix_flops + info.frontier_flops)
    rest_rate = max(forward_rate, gemm_rate)
    bound = once / forward_rate + rows * info.rest_flops / rest_rate
    bound_flops = info.bound_flops(samples, rows)
    return {
        "mode": info.mode,
        "frontier": list(info.frontier),
        "forward_flops_per_sample": info.forward_flops,
        "prefix_flops_per_sample": info.prefix_flops,
        "frontier_flops_per_sample": info.frontier_flops,
        "rest_flops_per_step_sample": info.rest_flops,
        "all_rows": steps * samples,
        "forward_flop_rate": forward_rate,
        "gemm_flop_rate": gemm_rate,
        "bound_s": bound,
        "bound_all_rows_s": once / forward_rate + steps * samples * info.rest_flops / rest_rate,
        "bound_at_forward_rate_s": bound_flops / forward_rate,
        "bound_at_gemm_peak_s": bound_flops / gemm_rate,
        "cost_vs_bound": t_engine / bound,
    }


def measure(quick: bool, repeats: int, epochs: int | None = None) -> dict:
    """Section (a) on the speech and face models; ``epochs`` of backdoor training first
    (default: the task's; 0 = random initialisation)."""
    rows = []
    for task in TASKS:
        tic = time.perf_counter()
        r = _task(task, repeats, quick, epochs)
        r["speedup_vs_naive"] = r["naive_s"] / r["engine_s"]
        r["speedup_vs_naive_compiled"] = r["naive_compiled_s"] / r["engine_s"]
        r["cost_vs_forward"] = r["engine_s"] / r["forward_s"]
        rows.append(r)
        print(
            f"(a) {task}: engine {fmt(r['engine_s'])}, naive {fmt(r['naive_s'])} -> "
            f"{r['speedup_vs_naive']:.1f}x (vs compiled naive "
            f"{r['speedup_vs_naive_compiled']:.1f}x); {r['cost_vs_forward']:.2f} forward "
            f"passes; {r['cost_vs_bound']:.2f}x bound; mismatches "
            f"{r['prediction_mismatches_vs_naive']} [{time.perf_counter() - tic:.0f} s]",
            flush=True,
        )
    summary = {
        "curve_speedup_vs_naive": min(r["speedup_vs_naive"] for r in rows),
        "curve_cost_vs_forward": max(r["cost_vs_forward"] for r in rows),
        "curve_cost_vs_bound": max(r["cost_vs_bound"] for r in rows),
    }
    for r in rows:
        for key in (
            "speedup_vs_naive",
            "speedup_vs_naive_compiled",
            "cost_vs_forward",
            "cost_vs_bound",
        ):
            summary[f"curve_{key}_{r['task']}"] = r[key]
    return {"rows": rows, "summary": summary, "notes": _notes(rows)}


def _notes(rows: list[dict]) -> list[str]:
    notes = []
    for r in rows:
        ph = r["phase_seconds"]
        forward = r["forward_flops_per_sample"]
        rest = r["rest_flops_per_step_sample"] / forward
        once = (r["prefix_flops_per_sample"] + r["frontier_flops_per_sample"]) / forward
        per_sample = r["evaluated_rows"] / (r["clean_samples"] + r["backdoor_samples"])
        notes.append(
            f"(a) {r['task']}: the engine spends {fmt(ph['prefix'])} in the prefix pass and "
            f"{fmt(ph['steps'])} in the steps (per-channel updates and the layers after the "
            f"frontier; {r['evaluated_rows']} of {r['all_rows']} rows evaluated, the "
            f"rest are steps whose channel is zero on that sample).  Per step the engine runs "
            f"{rest:.1%} of a forward pass per sample, so in FLOPs its floor is "
            f"{once:.2f} + {per_sample:.1f} x {rest:.4f} = {once + per_sample * rest:.2f} "
            "forward passes."
        )
    return notes


_ROWS = (
    ("pruned layer (channels)", lambda r: f"{r['layer']} ({r['channels']})"),
    ("training epochs (poisoned set)", lambda r: str(r["train_epochs"])),
    ("samples (clean + backdoor)", lambda r: f"{r['clean_samples']} + {r['backdoor_samples']}"),
    ("steps K+1", lambda r: str(r["steps"])),
    ("engine mode / frontier", lambda r: f"{r['mode']} / {', '.join(r['frontier'])}"),
    (
        "naive loop (predict)",
        lambda r: (
            fmt(r["naive_s"])
            + (
                f" (timed {r['naive_measured_steps']} steps, scaled)"
                if r["naive_measured_steps"] < r["steps"]
                else ""
            )
        ),
    ),
    ("naive loop (compiled forward)", lambda r: fmt(r["naive_compiled_s"])),
    ("**engine**", lambda r: f"**{fmt(r['engine_s'])}**"),
    ("engine first call (incl. tracing)", lambda r: fmt(r["engine_first_call_s"])),
    ("one forward pass", lambda r: fmt(r["forward_s"])),
    ("**speedup vs naive**", lambda r: f"**{r['speedup_vs_naive']:.1f}x**"),
    ("speedup vs naive-compiled", lambda r: f"{r['speedup_vs_naive_compiled']:.1f}x"),
    ("engine / forward pass", lambda r: f"{r['cost_vs_forward']:.2f}"),
    (
        "FLOPs/sample: forward / prefix / frontier / rest per step",
        lambda r: (
            f"{r['forward_flops_per_sample'] / 1e6:.2f}M / "
            f"{r['prefix_flops_per_sample'] / 1e6:.2f}M / "
            f"{r['frontier_flops_per_sample'] / 1e6:.3f}M / "
            f"{r['rest_flops_per_step_sample'] / 1e6:.3f}M"
        ),
    ),
    ("evaluated (step, sample) rows", lambda r: f"{r['evaluated_rows']} of {r['all_rows']}"),
    (
        "achieved forward FLOP/s (GEMM peak)",
        lambda r: f"{r['forward_flop_rate'] / 1e9:.1f} G ({r['gemm_flop_rate'] / 1e9:.1f} G)",
    ),
    ("**lower bound**", lambda r: f"**{fmt(r['bound_s'])}**"),
    ("bound if every row were evaluated", lambda r: fmt(r["bound_all_rows_s"])),
    ("bound, all work at the forward rate", lambda r: fmt(r["bound_at_forward_rate_s"])),
    ("bound, all work at the GEMM rate", lambda r: fmt(r["bound_at_gemm_peak_s"])),
    ("**engine / bound**", lambda r: f"**{r['cost_vs_bound']:.2f}**"),
    (
        "engine phases: prefix pass / steps",
        lambda r: " / ".join(fmt(r["phase_seconds"][k]) for k in ("prefix", "steps")),
    ),
    ("prediction mismatches vs naive", lambda r: str(r["prediction_mismatches_vs_naive"])),
    (
        "clean acc / ASR before pruning",
        lambda r: f"{r['clean_acc_start']:.3f} / {r['asr_start']:.3f}",
    ),
)


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "Clean data: the task's validation split; backdoored data: the validation split with "
        "the task's default trigger (`poison.backdoor_test_set`).  The model is the task's "
        "baseline backdoored model (`attacks.baseline`, epochs below), and channels are pruned "
        "in increasing order of mean clean activation (the defense's order).  Naive = "
        "`curves.naive_pruning_curve` (set mask + `model.predict` per step); naive-compiled = "
        "the same loop with a traced forward function instead of `predict`.",
        "",
        "| | " + " | ".join(r["task"] for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    lines += [f"| {label} | " + " | ".join(fn(r) for r in rows) + " |" for label, fn in _ROWS]
    lines += [
        "",
        "Lower bound = the work no exact method can skip, in FLOPs (conv/dense multiply-adds "
        "x 2, `fineprune_tf.graph.cost`): one pass of the layers up to and including the "
        "pruned layer over all samples, plus the frontier layers' per-channel updates (one "
        "frontier pass in all), both converted to seconds at the FLOP rate the plain forward "
        "pass of the same model achieves on the same data in this run; plus the layers after "
        "the frontier for every (step, sample) pair the removed channel can change, at the "
        "better of that rate and a 1024^3 GEMM's (they are dense layers over many rows).  "
        "Rates are measured interleaved with the engine runs.",
    ]
    return "\n".join(lines)
