"""Every defense on models backdoored by code this project did not write (issue 11 Targets and
"every defense on a converted keras.applications model").

    python -m scripts.third_party_eval [--archs=cnn,mobilenetv2] [--seeds=0] [--task=traffic]
        [--output_dir=results] [--cache_dir=runs/defense_cache] [--report_only]
    python -m scripts.third_party_eval --archs=cnn --seeds=1 --cli_inputs=DIR   # then the
        printed `fineprune clean --defense=auto` command: the --model CLI on the same model

Per (architecture, seed): ``scripts.third_party_badnets`` (numpy + Keras only, no fineprune_tf)
trains a BadNets model on the task's training split (4x4 white square, target class 0, 10%
poisoned); the model is cached.  The defender then does what a user of this toolkit does:
``fineprune_tf.convert`` the plain Keras model, build ``DefenderData`` from the clean validation
split, and run every registered defense and the protocol's choice (clean data only).  The test
split and its stamped copy (non-target classes; ASR = fraction classified as the target) are
``ReportOnly``.  Target: ASR <= 0.10 losing <= 2 points of clean test accuracy.

Writes ``third_party.md`` and ``third_party.json``; rows go to
``<cache_dir>/third_party_rows.jsonl`` as they finish, so an interrupted run resumes.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
from absl import app, flags

from scripts._rows import RowFile, defenses_error, machine_line

FLAGS = flags.FLAGS
flags.DEFINE_list("archs", ["cnn", "mobilenetv2"], "Architectures of the third-party script.")
flags.DEFINE_list("seeds", ["0"], "Seeds.")
flags.DEFINE_string("task", "traffic", "Embedded task whose data the attacker trains on.")
flags.DEFINE_list(
    "defenses",
    ["none", "pruning", "fine_tuning", "fine_pruning", "fmp", "fst", "anp", "rnp", "clp"],
    "Defenses (REGISTRY names, with none).",
)
flags.DEFINE_float("tolerance", 2.0, "Clean holdout points a choice may cost.")
flags.DEFINE_string("output_dir", "results", "Where third_party.md/json go.")
flags.DEFINE_string("cache_dir", "runs/defense_cache", "Model cache and resumable rows.")
flags.DEFINE_bool("report_only", False, "Only summarise the rows already measured.")
flags.DEFINE_string(
    "cli_inputs",
    None,
    "Instead of evaluating: write each model's suspect.keras, clean.npz and triggered.npz "
    "under DIR/<arch>_<seed>/ and print the `fineprune clean --defense=auto` command for it.",
)

ASR_TARGET, DROP_TARGET = 0.10, 2.0
ROW_VERSION = 2  # 2: weight_change recorded (the protocol's measure) and the model saved.


def backdoored_model(task_data, arch: str, seed: int, cache_dir: pathlib.Path):
    import keras

    from scripts import third_party_badnets

    path = cache_dir / f"third_party_{FLAGS.task}_{arch}_{seed}.keras"
    if not path.exists():
        model = third_party_badnets.train_backdoored(
            task_data.train.x, task_data.train.y, arch, seed
        )
        model.save(path)
    return keras.models.load_model(path)


def stamped_test(task_data):
    """The test split's non-target images with the third-party trigger (report only)."""
    from fineprune_tf import poison
    from scripts import third_party_badnets

    keep = np.flatnonzero(task_data.test.y != third_party_badnets.TARGET)
    return poison.BackdoorSet(
        third_party_badnets.stamp(task_data.test.x[keep]),
        task_data.test.y[keep].astype(np.int64),
        np.full(len(keep), third_party_badnets.TARGET, np.int64),
        False,
        keep,
    )


def write_cli_inputs(arch: str, seed: int, cache_dir: pathlib.Path, folder: pathlib.Path) -> str:
    """What a user of ``fineprune clean`` holds, for one cached model: ``suspect.keras``,
    ``clean.npz`` (validation and test splits: the command keeps ``--eval_fraction`` of it for
    its report) and ``triggered.npz`` (stamped non-target test images); returns the command."""
    from fineprune_tf import data

    task_data = data.load(FLAGS.task, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    backdoored_model(task_data, arch, seed, cache_dir).save(folder / "suspect.keras")
    np.savez(
        folder / "clean.npz",
        x=np.concatenate([task_data.validation.x, task_data.test.x]),
        y=np.concatenate([task_data.validation.y, task_data.test.y]),
    )
    stamped = stamped_test(task_data)
    np.savez(folder / "triggered.npz", x=stamped.x, y=stamped.y_true, y_attacker=stamped.y_attacker)
    return (
        f"fineprune clean --model={folder}/suspect.keras --clean_data={folder}/clean.npz "
        f"--backdoor_data={folder}/triggered.npz --defense=auto --eval_fraction=0.5 "
        f"--seed={seed} --output_dir={folder}/cleaned"
    )


def run_model(arch: str, seed: int, cache_dir: pathlib.Path, done: set, sink) -> None:
    import fineprune_tf as fp
    from fineprune_tf import data, defenses
    from fineprune_tf.defenses.guard import selecting
    from fineprune_tf.defenses.protocol import output_change, weight_change

    task_data = data.load(FLAGS.task, seed=seed)
    model = fp.convert(backdoored_model(task_data, arch, seed, cache_dir))
    defender = defenses.DefenderData(task_data.validation.x, task_data.validation.y, seed=seed)
    report = defenses.ReportOnly((task_data.test.x, task_data.test.y), stamped_test(task_data))
    clean_x = np.concatenate([defender.fit[0], defender.holdout[0]])
    defended_dir = cache_dir / "defended"
    defended_dir.mkdir(parents=True, exist_ok=True)
    for name in FLAGS.defenses:
        if (arch, seed, name) in done:
            continue
        try:
            result = defenses.run_defense(
                name, model, defender, seed=seed, tolerance=FLAGS.tolerance, evaluation=report
            )
        except Exception as error:  # noqa: BLE001  (recorded: "cannot run" is a result)
            sink({"arch": arch, "seed": seed, "defense": name, "error": f"{error}"[:300]})
            continue
        with selecting():
            change = output_change(model, result.model, clean_x)
        result.model.save(defended_dir / f"third_party_{arch}_{seed}_{name}.keras")
        details = result.details
        sink(
            {
                "arch": arch,
                "seed": seed,
                "defense": name,
                "version": ROW_VERSION,
                "output_change": change,
                "weight_change": weight_change(model, result.model),
                **{k: float(v) for k, v in result.summary().items()},
                "pruned_count": details.get(
                    "pruned_count", details.get("pruning", {}).get("pruned_count")
                ),
            }
        )


def _number(value, spec: str) -> str:
    """A measured number, or n/a (e.g. a DER without the undefended row to compare with)."""
    return "n/a" if value is None else format(value, spec)


def summarise(rows: list[dict]) -> dict:
    from fineprune_tf import defenses

    class Holdout:
        def __init__(self, holdout_acc):
            self.holdout_acc = holdout_acc

    groups: dict = {}
    for row in rows:
        groups.setdefault((row["arch"], row["seed"]), {})[row["defense"]] = row
    choices, incomplete = [], []
    for (arch, seed), by_name in sorted(groups.items()):
        base = by_name.get("none")
        ran = {n: r for n, r in by_name.items() if n != "none" and "error" not in r}
        measured = [r for r in by_name.values() if "error" not in r]
        for row in measured if base is not None else ():
            row["clean_drop"] = (base["clean_acc"] - row["clean_acc"]) * 100.0
            row["der"] = defenses.der(base, row)
        if base is None or set(by_name) != set(FLAGS.defenses):
            missing = sorted(set(FLAGS.defenses) - set(by_name))
            incomplete.append(f"{arch} seed {seed}: no protocol choice, missing {missing}")
            continue
        name, why, _ = defenses.choose(
            {n: Holdout(r["holdout_acc"]) for n, r in ran.items()},
            base["holdout_acc"],
            tolerance=FLAGS.tolerance,
            changes={n: r["weight_change"] for n, r in ran.items()},
        )
        chosen = ran[name]
        choices.append(
            {
                "arch": arch,
                "seed": seed,
                "chosen": name,
                "why": why,
                "clean_acc": chosen["clean_acc"],
                "asr": chosen["asr"],
                "clean_drop": chosen["clean_drop"],
                "met": bool(chosen["asr"] <= ASR_TARGET and chosen["clean_drop"] <= DROP_TARGET),
            }
        )
    return {"choices": choices, "incomplete": incomplete}


def markdown(rows: list[dict], summary: dict, meta: dict) -> str:
    lines = [
        "# Defenses on third-party BadNets models (issue 11)",
        "",
        f"Written by `python -m scripts.third_party_eval` on {meta['machine']}; task "
        f"{meta['task']}, seeds {meta['seeds']}.  Models trained by "
        "`scripts/third_party_badnets.py` (numpy + Keras only), converted with "
        "`fineprune_tf.convert`; every choice from the clean validation split; clean "
        "accuracy and ASR on the test split (report only).",
        "",
        "| arch | seed | defense | clean acc | ASR | clean drop (pts) | DER | weight change "
        "| output change | pruned | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["arch"], r["seed"], r["defense"])):
        if "error" in r:
            lines.append(
                f"| {r['arch']} | {r['seed']} | {r['defense']} | cannot run: "
                f"{r['error']} | | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['arch']} | {r['seed']} | {r['defense']} | {r['clean_acc']:.3f} | "
            f"{r['asr']:.3f} | {_number(r.get('clean_drop'), '.1f')} | "
            f"{_number(r.get('der'), '.3f')} | {r['weight_change']:.3f} | "
            f"{r['output_change']:.3f} | "
            f"{r['pruned_count']} | {r['seconds']:.1f} |"
        )
    lines += [
        "",
        f"## The protocol's choice; target ASR <= {ASR_TARGET}, <= {DROP_TARGET} points lost",
        "",
        "| arch | seed | chosen | clean acc | ASR | clean drop | met | why |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in summary["choices"]:
        lines.append(
            f"| {c['arch']} | {c['seed']} | {c['chosen']} | {c['clean_acc']:.3f} | "
            f"{c['asr']:.3f} | {c['clean_drop']:.1f} | "
            f"{'yes' if c['met'] else 'NO'} | {c['why']} |"
        )
    if summary.get("incomplete"):
        lines += ["", "Not chosen (defenses still to run): " + "; ".join(summary["incomplete"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    del argv
    from fineprune_tf import reporting

    error = defenses_error(FLAGS.defenses)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    bad_arch = [a for a in FLAGS.archs if a not in ("cnn", "mobilenetv2")]
    if bad_arch:
        print(f"error: unknown archs {bad_arch}; expected cnn, mobilenetv2", file=sys.stderr)
        return 2
    cache_dir = pathlib.Path(FLAGS.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if FLAGS.cli_inputs:
        for arch in FLAGS.archs:
            for seed in (int(s) for s in FLAGS.seeds):
                folder = pathlib.Path(FLAGS.cli_inputs) / f"{arch}_{seed}"
                print(write_cli_inputs(arch, seed, cache_dir, folder))
        return 0
    row_file = RowFile(cache_dir / "third_party_rows.jsonl", ROW_VERSION)
    done = {(r["arch"], r["seed"], r["defense"]) for r in row_file.rows}

    seeds = [int(s) for s in FLAGS.seeds]
    for arch in FLAGS.archs if not FLAGS.report_only else ():
        for seed in seeds:
            run_model(arch, seed, cache_dir, done, row_file.add)
    rows = [
        r
        for r in row_file.latest(lambda r: (r["arch"], r["seed"], r["defense"]))
        if r["arch"] in FLAGS.archs and r["seed"] in seeds and r["defense"] in FLAGS.defenses
    ]
    summary = summarise(rows)
    meta = {
        "machine": machine_line(),
        "task": FLAGS.task,
        "seeds": seeds,
    }
    output = pathlib.Path(FLAGS.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    reporting.atomic_write_json(
        output / "third_party.json", {"meta": meta, "rows": rows, **summary}
    )
    reporting.atomic_write_text(output / "third_party.md", markdown(rows, summary, meta))
    return 0


if __name__ == "__main__":
    app.run(main)
