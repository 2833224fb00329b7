"""Every defense under the defender-realistic protocol (issue 11, point 4 and the Targets).

    python -m scripts.defense_eval [--seeds=0,1,2] [--defenses=...] [--output_dir=results]
        [--cache_dir=runs/defense_cache] [--clean_seeds=0]

For speech (baseline and pruning-aware attacks), traffic (untargeted) and mnist, per seed: the
cached backdoored model (``scripts.model_cache``), the defender's clean validation split as a
``DefenderData`` (80% fit / 20% holdout), and every defense of ``fineprune_tf.defenses.REGISTRY``
with its clean-data choices.  Reported on the test split (``ReportOnly``, read after the
choices): clean accuracy, ASR, robust accuracy, DER against the undefended model, seconds and
example forward/backward passes, the weight change (``protocol.weight_change``, what the
protocol prefers) and the clean-output change; then the protocol's choice (``defenses.choose``:
clean holdout and weight change only; the fixed-priority and output-change rules' picks are
listed beside it) and whether the Targets are met:

* the protocol's choice reaches ASR <= 0.05 losing <= 2 points of clean test accuracy;
* fine-pruning reaches ASR <= 0.10 on the speech baseline attack.

Models that were never backdoored (``clean`` in the cache, ``--clean_seeds``) go through the
same defenses: the clean accuracy each costs.

Writes ``defense_eval.json`` and ``defense_eval.md``; rows are appended to
``<cache_dir>/defense_eval_rows.jsonl`` as they finish, so an interrupted run resumes (rows of
an older ``ROW_VERSION`` are ignored), and every defended model is saved under
``<cache_dir>/defended/``.  Face: ``--models=face/baseline --clean_seeds=`` (the model is
trained into the cache on first use).
"""

from __future__ import annotations

import pathlib
import sys
import time

import numpy as np
from absl import app, flags

from scripts._rows import RowFile, defenses_error, machine_line, mean_sd

FLAGS = flags.FLAGS
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the backdoored models.")
flags.DEFINE_list("clean_seeds", ["0"], "Seeds of the never-backdoored models.")
flags.DEFINE_list(
    "defenses",
    ["none", "pruning", "fine_tuning", "fine_pruning", "fmp", "fst", "anp", "rnp", "clp"],
    "Defenses (REGISTRY names).",
)
flags.DEFINE_list(
    "models",
    ["speech/baseline", "speech/pruning_aware", "traffic/baseline", "mnist/baseline"],
    "task/attack pairs.",
)
flags.DEFINE_float("tolerance", 2.0, "Clean holdout points a choice may cost.")
flags.DEFINE_string("output_dir", "results", "Where defense_eval.md/json go.")
flags.DEFINE_string("cache_dir", "runs/defense_cache", "Model cache and resumable rows.")
flags.DEFINE_bool("report_only", False, "Only summarise the rows already measured.")

ASR_TARGET, DROP_TARGET, FP_SPEECH_TARGET = 0.05, 2.0, 0.10
# Rows measured with an older library rule are kept in the rows file but not reused: 2 = the
# fine-tuning learning-rate rule and the protocol's change-preferring choice (this round); 3 = the
# weight distance recorded too.
ROW_VERSION = 3


def run_model(task: str, kind: str, seed: int, names, cache_dir, done, sink) -> None:
    """Every defense on one cached model; one row per defense."""
    from fineprune_tf import defenses
    from fineprune_tf.defenses.guard import selecting
    from fineprune_tf.defenses.protocol import output_change, weight_change
    from scripts import model_cache

    data = model_cache.bundle(task, seed)
    model = model_cache.load_or_train(task, kind, seed, cache_dir)
    defender = defenses.DefenderData(*data.validation, seed=seed)
    report = defenses.ReportOnly(data.test, data.backdoor_test)
    clean_x = np.concatenate([defender.fit[0], defender.holdout[0]])
    defended_dir = pathlib.Path(cache_dir) / "defended"
    defended_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        key = (task, kind, seed, name)
        if key in done:
            continue
        result = defenses.run_defense(
            name, model, defender, seed=seed, tolerance=FLAGS.tolerance, evaluation=report
        )
        details = result.details
        with selecting():
            change = output_change(model, result.model, clean_x)
        # Kept so that any later clean-data measure can be computed without re-running.
        result.model.save(defended_dir / f"{task}_{kind}_{seed}_{name}.keras")
        tuning = details.get("fine_tuning", details)
        sink(
            {
                "task": task,
                "kind": kind,
                "seed": seed,
                "defense": name,
                "version": ROW_VERSION,
                "output_change": change,
                "weight_change": weight_change(model, result.model),
                "learning_rate": tuning.get("learning_rate"),
                **{k: float(v) for k, v in result.summary().items()},
                "pruned_count": details.get(
                    "pruned_count", details.get("pruning", {}).get("pruned_count")
                ),
                "why": details.get("why", details.get("fine_tuning", {}).get("why")),
            }
        )


def _row_line(row: dict) -> str:
    return (
        f"{row['task']}/{row['kind']} s{row['seed']} {row['defense']}: clean "
        f"{row['clean_acc']:.3f} ASR {row['asr']:.3f} holdout {row['holdout_acc']:.3f} "
        f"({row['seconds']:.1f}s)"
    )


def evaluate_rows(rows: list[dict], tolerance: float) -> dict:
    """DER per row, the protocol's choice per (model, seed), and per-cell mean ± sd."""
    from fineprune_tf import defenses

    groups: dict = {}
    for row in rows:
        groups.setdefault((row["task"], row["kind"], row["seed"]), {})[row["defense"]] = row
    choices, incomplete = [], []
    for (task, kind, seed), by_name in sorted(groups.items()):
        base = by_name.get("none")
        if base is None:
            continue
        for row in by_name.values():
            row["der"] = defenses.der(base, row) if kind != "clean" else float("nan")
            row["clean_drop"] = (base["clean_acc"] - row["clean_acc"]) * 100.0
        candidates = {n: _Holdout(r["holdout_acc"]) for n, r in by_name.items() if n != "none"}
        changes = {n: r["weight_change"] for n, r in by_name.items() if n != "none"}
        if set(by_name) != set(FLAGS.defenses):
            incomplete.append(
                f"{task}/{kind} seed {seed}: missing {sorted(set(FLAGS.defenses) - set(by_name))}"
            )
            continue  # Incomplete: the protocol chooses among every requested defense only.
        name, why, _ = defenses.choose(
            candidates, base["holdout_acc"], tolerance=tolerance, changes=changes
        )
        others = {
            rule: defenses.choose(
                candidates,
                base["holdout_acc"],
                tolerance=tolerance,
                changes=None
                if rule == "priority"
                else {n: r["output_change"] for n, r in by_name.items() if n != "none"},
            )[0]
            for rule in ("priority", "output_change")
        }
        chosen = by_name[name]
        choices.append(
            {
                "task": task,
                "kind": kind,
                "seed": seed,
                "chosen": name,
                "why": why,
                "other_rules": {
                    rule: {
                        "chosen": n,
                        "asr": by_name[n]["asr"],
                        "clean_drop": by_name[n]["clean_drop"],
                    }
                    for rule, n in others.items()
                },
                "clean_acc": chosen["clean_acc"],
                "asr": chosen["asr"],
                "clean_drop": chosen["clean_drop"],
                "base_asr": base["asr"],
                "base_clean_acc": base["clean_acc"],
                "met": None
                if kind == "clean"
                else bool(chosen["asr"] <= ASR_TARGET and chosen["clean_drop"] <= DROP_TARGET),
            }
        )
    table = _cell_table(rows)
    return {"choices": choices, "table": table, "incomplete": incomplete}


def _cell_table(rows: list[dict]) -> list[dict]:
    """Per (task, kind, defense): the seeds measured and mean ± sd of every reported number."""
    cells: dict = {}
    for row in rows:
        cells.setdefault((row["task"], row["kind"], row["defense"]), []).append(row)
    table = []
    for (task, kind, name), cell_rows in sorted(cells.items()):
        table.append(
            {
                "task": task,
                "kind": kind,
                "defense": name,
                "seeds": len(cell_rows),
                **{
                    k: mean_sd([r[k] for r in cell_rows])
                    for k in (
                        "clean_acc",
                        "asr",
                        "robust_acc",
                        "der",
                        "clean_drop",
                        "holdout_acc",
                        "output_change",
                        "weight_change",
                        "seconds",
                        "forward_passes",
                        "backward_passes",
                    )
                },
            }
        )
    return table


class _Holdout:
    """The only field ``defenses.choose`` reads: the clean holdout accuracy."""

    def __init__(self, holdout_acc: float):
        self.holdout_acc = holdout_acc


def markdown(summary: dict, meta: dict) -> str:
    def fmt(pair, digits=3):
        return "n/a" if np.isnan(pair[0]) else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    lines = [
        "# Defenses under the defender-realistic protocol (issue 11)",
        "",
        f"Written by `python -m scripts.defense_eval` on {meta['machine']}; seeds "
        f"{meta['seeds']} (never-backdoored models: {meta['clean_seeds']}); tolerance "
        f"{meta['tolerance']} points.  Every threshold, u, step count and learning rate "
        "comes from the defender's clean validation split (80% fit / 20% holdout); the "
        "test split and its triggered copy only report.  Weight change = relative L2 "
        "distance of the effective weights from the undefended model's (what the protocol "
        "prefers within the holdout budget); output change = mean total variation of the "
        "class probabilities on the defender's clean inputs (the first, rejected, "
        "measure).  Mean ± sd over seeds.  Passes = examples through the network "
        "(forward / backward).",
        "",
        "| task | model | defense | clean acc | ASR | robust acc | DER | clean drop (pts) "
        "| weight change | output change | seconds | forward / backward passes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary["table"]:
        lines.append(
            f"| {e['task']} | {e['kind']} | {e['defense']} | {fmt(e['clean_acc'])} | "
            f"{fmt(e['asr'])} | {fmt(e['robust_acc'])} | {fmt(e['der'])} | "
            f"{fmt(e['clean_drop'], 1)} | {fmt(e['weight_change'])} | "
            f"{fmt(e['output_change'])} | "
            f"{e['seconds'][0]:.1f} | "
            f"{e['forward_passes'][0]:.3g} / {e['backward_passes'][0]:.3g} |"
        )
    lines += [
        "",
        "## The protocol's choice (clean holdout only) and the Targets",
        "",
        f"Target: ASR <= {ASR_TARGET} with <= {DROP_TARGET} points of clean accuracy lost.",
        "",
        "| task | model | seed | chosen | clean acc | ASR | clean drop | met | "
        "other clean-data rules: priority / output change (ASR, drop) | why |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in summary["choices"]:
        lines.append(
            f"| {c['task']} | {c['kind']} | {c['seed']} | {c['chosen']} | "
            f"{c['clean_acc']:.3f} | {c['asr']:.3f} | {c['clean_drop']:.1f} | "
            f"{ {True: 'yes', False: 'NO', None: 'n/a (clean model)'}[c['met']] } | "
            + " / ".join(
                f"{o['chosen']} ({o['asr']:.3f}, {o['clean_drop']:.1f})"
                for o in c["other_rules"].values()
            )
            + f" | {c['why']} |"
        )
    if summary["incomplete"]:
        lines += [
            "",
            "Not measured (no protocol choice for these): "
            + "; ".join(summary["incomplete"])
            + ".",
        ]
    fp = [
        e
        for e in summary["table"]
        if e["task"] == "speech" and e["kind"] == "baseline" and e["defense"] == "fine_pruning"
    ]
    if fp:
        asr = fp[0]["asr"]
        lines += [
            "",
            f"Fine-pruning on the speech baseline attack: ASR {fmt(asr)} "
            f"(target <= {FP_SPEECH_TARGET}: "
            f"{'met' if asr[0] <= FP_SPEECH_TARGET else 'NOT met'} on the mean).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    del argv
    from fineprune_tf import reporting

    error = defenses_error(FLAGS.defenses)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        pairs = [tuple(m.split("/")) for m in FLAGS.models]
        if any(len(p) != 2 for p in pairs):
            raise ValueError
    except ValueError:
        print(f"error: --models takes task/attack pairs, got {FLAGS.models}", file=sys.stderr)
        return 2
    cache_dir = pathlib.Path(FLAGS.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    row_file = RowFile(cache_dir / "defense_eval_rows.jsonl", ROW_VERSION, _row_line)
    done = {(r["task"], r["kind"], r["seed"], r["defense"]) for r in row_file.rows}
    start = time.perf_counter()

    seeds = [int(s) for s in FLAGS.seeds]
    clean_seeds = [int(s) for s in FLAGS.clean_seeds]
    plan = [(task, kind, seed) for seed in seeds for task, kind in pairs]
    plan += [
        (task, "clean", seed) for seed in clean_seeds for task in sorted({t for t, _ in pairs})
    ]
    for task, kind, seed in plan if not FLAGS.report_only else ():
        run_model(task, kind, seed, FLAGS.defenses, cache_dir, done, row_file.add)
    wanted = set(plan)
    rows = [
        r
        for r in row_file.latest(lambda r: (r["task"], r["kind"], r["seed"], r["defense"]))
        if (r["task"], r["kind"], r["seed"]) in wanted and r["defense"] in FLAGS.defenses
    ]
    summary = evaluate_rows(rows, FLAGS.tolerance)
    measured = {(r["task"], r["kind"], r["seed"]) for r in rows}
    summary["incomplete"] += [
        f"{task}/{kind} seed {seed}: nothing measured"
        for task, kind, seed in plan
        if (task, kind, seed) not in measured
    ]
    meta = {
        "machine": machine_line(),
        "seeds": seeds,
        "clean_seeds": clean_seeds,
        "tolerance": FLAGS.tolerance,
        "seconds": time.perf_counter() - start,
    }
    output = pathlib.Path(FLAGS.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    reporting.atomic_write_json(
        output / "defense_eval.json", {"meta": meta, "rows": rows, **summary}
    )
    reporting.atomic_write_text(output / "defense_eval.md", markdown(summary, meta))
    return 0


if __name__ == "__main__":
    app.run(main)
