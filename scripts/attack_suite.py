"""Every attack of ``fineprune_tf.attack_zoo`` on every task: clean accuracy, ASR and the
clean-accuracy cost against a model trained without poison, mean ± sd over seeds.

    python -m scripts.attack_suite [--tasks=mnist,traffic,face,speech] [--seeds=0,1,2]
        [--rates=0.1] [--low_rates=0.01,0.05 --low_rate_tasks=mnist]
        [--budget_minutes=25] [--output_dir=runs/attacks] [--resume]

The grid runs seed by seed (all tasks and attacks for seed 0, then seed 1, ...), so when
``--budget_minutes`` runs out it is seeds that are cut, never attacks; the cut is recorded.
Every finished cell is written at once to ``attacks.json`` and ``--resume`` skips it. The
target (issue 14): ASR >= 0.9 at 10 % poisoning with at most 2 points of clean-accuracy cost,
on the tasks where BadNets meets it. ``attacks.md`` says which attack meets it where.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from scripts import _quiet

_quiet.quiet_tensorflow()  # before anything imports TensorFlow

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("tasks", ["mnist", "traffic", "face", "speech"], "Tasks.")
flags.DEFINE_list("attacks", ["badnets", "blended", "sig", "wanet"], "Attacks (attack_zoo).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (data split, poisoning, training).")
flags.DEFINE_list("rates", ["0.1"], "Poison rates for every task.")
flags.DEFINE_list("low_rates", ["0.01", "0.05"], "Extra poison rates for --low_rate_tasks.")
flags.DEFINE_list("low_rate_tasks", ["mnist"], "Tasks that also run --low_rates.")
flags.DEFINE_integer("epochs", None, "Override every training's epochs (smoke runs).")
flags.DEFINE_float("budget_minutes", 25.0, "Start no new seed after this many minutes.")
flags.DEFINE_string("output_dir", "runs/attacks", "Where attacks.json and attacks.md go.")
flags.DEFINE_bool("resume", False, "Keep the finished cells of an earlier run in --output_dir.")

TARGET_ASR = 0.9
TARGET_COST_POINTS = 2.0


def _cells(seeds, tasks, attacks, rates, low_rates, low_rate_tasks):
    """(seed, task, attack, rate); attack ``"clean"`` is the unpoisoned reference."""
    for seed in seeds:
        for task in tasks:
            yield seed, task, "clean", 0.0
            task_rates = rates + (low_rates if task in low_rate_tasks else [])
            for rate in task_rates:
                for attack in attacks:
                    yield seed, task, attack, rate


def _key(seed, task, attack, rate) -> str:
    return f"{task}/{attack}/{rate:g}/seed{seed}"


def _run_cell(seed: int, task: str, attack: str, rate: float, cache: dict) -> dict:
    from fineprune_tf import attack_zoo, attacks, data, poison

    if (task, seed) not in cache:
        cache.clear()  # one task's data in memory at a time
        cache[(task, seed)] = data.load(task, seed=seed)
    task_data = cache[(task, seed)]
    settings = attacks.AttackSettings(epochs=FLAGS.epochs, seed=seed)
    start = time.perf_counter()
    if attack == "clean":
        trigger, policy, _ = poison.default_attack(task, task_data, seed=seed)
        result = attacks.baseline(task_data, trigger, policy, 0, settings=settings)
        extra = {"count": 0, "effective_rate": 0.0, "asr_of_badnets_trigger": result.asr}
        asr = float("nan")
    else:
        poisoning = attack_zoo.make(attack, task_data, rate, seed=seed)
        result = attack_zoo.train(poisoning, task_data, seed=seed, settings=settings)
        extra = {
            "count": poisoning.count,
            "effective_rate": poisoning.effective_rate,
            "targeted": poisoning.policy.targeted,
            "policy": type(poisoning.policy).__name__,
            "trigger": type(poisoning.trigger).__name__,
        }
        asr = result.asr
    return {
        "task": task,
        "attack": attack,
        "rate": rate,
        "seed": seed,
        "clean_acc": result.clean_acc,
        "asr": asr,
        "epochs": result.report["epochs"],
        "seconds": time.perf_counter() - start,
        **extra,
    }


def _mean_sd(values: list[float]) -> tuple[float, float]:
    import numpy as np

    array = np.asarray(values, float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def summarize(rows: list[dict]) -> list[dict]:
    """Per (task, attack, rate): mean ± sd of clean accuracy, ASR and cost (points) over the
    seeds, the cost paired with the same seed's clean model, and whether the target is met."""
    clean = {(r["task"], r["seed"]): r["clean_acc"] for r in rows if r["attack"] == "clean"}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["attack"] != "clean" and (row["task"], row["seed"]) in clean:
            groups.setdefault((row["task"], row["attack"], row["rate"]), []).append(row)
    summary = []
    for (task, attack, rate), members in sorted(groups.items()):
        costs = [100 * (clean[(task, r["seed"])] - r["clean_acc"]) for r in members]
        acc, acc_sd = _mean_sd([r["clean_acc"] for r in members])
        asr, asr_sd = _mean_sd([r["asr"] for r in members])
        cost, cost_sd = _mean_sd(costs)
        summary.append(
            {
                "task": task,
                "attack": attack,
                "rate": rate,
                "effective_rate": members[0]["effective_rate"],
                "seeds": sorted(r["seed"] for r in members),
                "clean_acc": acc,
                "clean_acc_sd": acc_sd,
                "asr": asr,
                "asr_sd": asr_sd,
                "cost_points": cost,
                "cost_points_sd": cost_sd,
                "clean_model_acc": _mean_sd([clean[(task, r["seed"])] for r in members])[0],
                "target_met": bool(asr >= TARGET_ASR and cost <= TARGET_COST_POINTS),
            }
        )
    return summary


def _markdown(summary: list[dict], meta: dict) -> str:
    from fineprune_tf.machine import summary_line

    lines = [
        "# Attacks: clean accuracy, ASR and clean-accuracy cost",
        "",
        f"Machine: {summary_line(meta['machine'])}. "
        f"Seeds run: {meta['seeds_run']} (asked: {meta['seeds_asked']}"
        + (f"; cut by the {meta['budget_minutes']:g}-minute budget" if meta["seeds_cut"] else "")
        + f"). Training and evaluation time {meta['cell_seconds_total'] / 60:.1f} "
        f"min ({len(summary)} rows).",
        "",
        "Mean ± sd over seeds. Cost = clean accuracy of the same seed's model trained without "
        "poison minus the attacked model's, in points. ASR is targeted (fraction sent to the "
        "attacker's label) except BadNets on traffic (untargeted, 1 - A_backdoor/A_clean). "
        f"Target: ASR >= {TARGET_ASR} at <= {TARGET_COST_POINTS:g} points cost.",
        "",
        "| task | attack | poison rate (effective) | clean acc | ASR | cost (points) | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['task']} | {s['attack']} | {s['rate']:g} ({s['effective_rate']:.3f}) | "
            f"{s['clean_acc']:.3f} ± {s['clean_acc_sd']:.3f} | {s['asr']:.3f} ± "
            f"{s['asr_sd']:.3f} | {s['cost_points']:.1f} ± {s['cost_points_sd']:.1f} | "
            f"{'yes' if s['target_met'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def _write(output_dir: pathlib.Path, rows: list[dict], meta: dict) -> None:
    from fineprune_tf import reporting

    summary = summarize(rows)
    meta["cell_seconds_total"] = sum(r["seconds"] for r in rows)  # also across --resume
    reporting.atomic_write_json(
        output_dir / "attacks.json", {"meta": meta, "rows": rows, "summary": summary}
    )
    (output_dir / "attacks.md").write_text(_markdown(summary, meta))


def main(argv: list[str]) -> int:
    del argv
    try:
        seeds = [int(s) for s in FLAGS.seeds]
        rates = [float(r) for r in FLAGS.rates]
        low_rates = [float(r) for r in FLAGS.low_rates]
    except ValueError as error:
        print(f"error: --seeds, --rates and --low_rates take numbers: {error}", file=sys.stderr)
        return 2
    from fineprune_tf import attack_zoo, data, machine

    unknown = [t for t in FLAGS.tasks if t not in data.TASKS] + [
        a for a in FLAGS.attacks if a not in attack_zoo.NAMES
    ]
    if unknown or not all(0 < r <= 1 for r in rates + low_rates):
        print(f"error: unknown task/attack {unknown} or a rate outside (0, 1]", file=sys.stderr)
        return 2
    import keras
    from absl import logging

    # Per-cell library logs would break the progress bar; --verbosity=1 brings them back.
    logging.set_verbosity(logging.INFO if FLAGS.verbosity >= 1 else logging.WARNING)
    output_dir = pathlib.Path(FLAGS.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    previous = output_dir / "attacks.json"
    rows = json.loads(previous.read_text())["rows"] if FLAGS.resume and previous.exists() else []
    done = {_key(r["seed"], r["task"], r["attack"], r["rate"]) for r in rows}
    cells = list(_cells(seeds, FLAGS.tasks, FLAGS.attacks, rates, low_rates, FLAGS.low_rate_tasks))
    meta = {
        "machine": machine.describe(),
        "seeds_asked": seeds,
        "seeds_run": [],
        "seeds_cut": [],
        "budget_minutes": FLAGS.budget_minutes,
        "epochs_override": FLAGS.epochs,
        "seconds": 0.0,
    }
    start = time.perf_counter()
    progress = keras.utils.Progbar(len(cells), unit_name="cell", stateful_metrics=["seed"])
    cache: dict = {}
    seed_start, longest_seed = start, 0.0
    for index, (seed, task, attack, rate) in enumerate(cells):
        if index == 0 or cells[index - 1][0] != seed:
            now = time.perf_counter()
            longest_seed = max(longest_seed, now - seed_start) if index else 0.0
            seed_start = now
            # Start a seed only if one more seed, as long as the slowest so far, fits.
            if (now - start + longest_seed) / 60 > FLAGS.budget_minutes:
                meta["seeds_cut"] = sorted({c[0] for c in cells[index:]})
                break
        if seed not in meta["seeds_run"]:
            meta["seeds_run"].append(seed)
        if _key(seed, task, attack, rate) not in done:
            rows.append(_run_cell(seed, task, attack, rate, cache))
            meta["seconds"] = time.perf_counter() - start
            _write(output_dir, rows, meta)
        progress.update(index + 1, values=[("seed", seed)])
    meta["seconds"] = time.perf_counter() - start
    _write(output_dir, rows, meta)
    print()
    print((output_dir / "attacks.md").read_text())
    return 0


if __name__ == "__main__":
    app.run(main)
