"""One Fine-Pruning experiment: both attacks x every defense on one task, with the paper's
tables and figures, checkpointed stage by stage so an interrupted run resumes.

Stages (each one's outputs are written atomically, then the stage is marked done in
``stages.json``): ``attack/<attack>`` (the backdoored model), ``analysis/<attack>`` (activation
statistics and the full pruning curve), ``defense/<attack>/<defense>`` (the defended model and
its numbers), and ``report`` (``results.json``, ``table1.md``, ``table2.md``, figures).

Each finished stage is recorded with its inputs (the configuration's fingerprint and the SHA-256
of the model file it read) and the hash of the model file it wrote.  A resumed run reuses a stage
only when those still match the files on disk, so a redone attack (say, after its checkpoint was
found corrupt) invalidates its analysis and every defense run on it: the tables always describe
the models in ``models/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable

import keras
from absl import logging

from fineprune_tf import attacks, data, defenses, memory, poison, reporting, stats, triggers
from fineprune_tf import machine as machine_info
from fineprune_tf.attacks import AttackSettings
from fineprune_tf.defenses import FineTuneSettings, FmpSettings, PruningSettings
from fineprune_tf.determinism import deterministic
from fineprune_tf.stage_store import (
    RESULT_FILES,
    OutputDirError,
    StageStore,
    file_hash,
    load_checkpoint,
    prepare_output_dir,
    save_model,
)

__all__ = [
    "ExperimentConfig",
    "OutputDirError",
    "RESULT_FILES",
    "StageStore",
    "deterministic",
    "file_hash",
    "prepare_output_dir",
    "run",
    "save_model",
    "QUICK_OVERRIDES",
]
# The stage store, checkpoints and output folder live in ``stage_store``, the determinism
# scope in ``determinism``; their public names are re-exported here, where callers know them.


@dataclasses.dataclass
class ExperimentConfig:
    """Everything that determines an experiment's numbers.

    The run's own fields (task, data, seed, which attacks and defenses) and one settings object
    per part, each holding its defaults and validating itself: ``attack``
    (:class:`~fineprune_tf.attacks.AttackSettings`; ``None`` fields take the task's defaults),
    ``pruning`` (:class:`~fineprune_tf.defenses.PruningSettings`), ``fine_tune``
    (:class:`~fineprune_tf.defenses.FineTuneSettings`, used by every defense that fine-tunes)
    and ``fmp`` (:class:`~fineprune_tf.defenses.FmpSettings`).  ``seed`` seeds everything:
    it replaces the nested settings' own seeds (:meth:`resolved`).
    """

    task: str = "speech"
    source: str = "default"
    data_dir: str | None = None
    seed: int = 0
    attacks: tuple[str, ...] = attacks.ATTACKS
    defenses: tuple[str, ...] = defenses.DEFENSES
    quick: bool = False
    # Field names shadow the modules inside the class body: the classes are imported by name.
    attack: AttackSettings = dataclasses.field(default_factory=AttackSettings)
    pruning: PruningSettings = dataclasses.field(default_factory=PruningSettings)
    fine_tune: FineTuneSettings = dataclasses.field(default_factory=FineTuneSettings)
    fmp: FmpSettings = dataclasses.field(default_factory=FmpSettings)

    def validate(self) -> None:
        if self.task not in data.TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {data.TASKS}")
        unknown = [a for a in self.attacks if a not in attacks.ATTACKS]
        if unknown or not self.attacks:
            raise ValueError(f"unknown attack(s) {unknown}; expected some of {attacks.ATTACKS}")
        unknown = [d for d in self.defenses if d not in defenses.REGISTRY]
        if unknown or not self.defenses:
            raise ValueError(
                f"unknown defense(s) {unknown}; expected some of {tuple(defenses.REGISTRY)}"
            )
        for part in (self.attack, self.pruning, self.fine_tune, self.fmp):
            part.validate()

    def resolved(self) -> ExperimentConfig:
        """The configuration as run: ``seed`` in every part, ``--quick``'s overrides applied
        to the parts' fields still at their defaults."""
        parts = {}
        for name, overrides in QUICK_OVERRIDES.items():
            part = getattr(self, name)
            defaults = type(part)()
            changes = {"seed": self.seed}
            if self.quick:
                changes.update(
                    {k: v for k, v in overrides.items() if getattr(part, k) == getattr(defaults, k)}
                )
            parts[name] = dataclasses.replace(part, **changes)
        return dataclasses.replace(self, **parts)

    def fingerprint(self) -> str:
        """Hash of the settings that determine each stage's numbers; which attacks and
        defenses run is left out, so a resumed run may add some."""
        values = {
            k: v for k, v in dataclasses.asdict(self).items() if k not in ("attacks", "defenses")
        }
        text = json.dumps(values, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


#: What ``--quick`` changes, per part: a smoke run in well under two minutes on 2 cores.
QUICK_OVERRIDES = {
    "attack": {"epochs": 2, "max_reinstated": 1},
    "fine_tune": {"max_epochs": 2, "patience": 1},
}


@dataclasses.dataclass
class _Context:
    """What every stage of one run reads."""

    config: ExperimentConfig
    stages: StageStore
    models_dir: pathlib.Path
    task_data: object
    trigger: object
    policy: object
    count: int
    defender: defenses.DefenderData
    backdoor_validation: object
    evaluation: tuple
    progress: Callable[[str], None]
    stage_timer: Callable[[str, float], None]


def run(
    config: ExperimentConfig,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: Callable[[str], None] = logging.info,
) -> dict:
    """Runs the experiment and writes its results; returns the ``results.json`` content.

    Runs with deterministic kernels and the configuration's seed (:func:`deterministic`); the
    caller's determinism setting and random states are restored on return.
    """
    config = config.resolved()
    config.validate()
    directory = prepare_output_dir(output_dir, overwrite, resume)
    # Same flags and seed, same numbers: deterministic kernels and seeded everything.
    with deterministic(config.seed):
        return _run(config, directory, resume, progress)


def _run(
    config: ExperimentConfig, directory: pathlib.Path, resume: bool, progress: Callable[[str], None]
) -> dict:
    stages = StageStore(directory, config, resume, progress)
    models_dir = directory / "models"
    models_dir.mkdir(exist_ok=True)
    run_start = time.perf_counter()
    stage_timer = _StageTimer(run_start, progress)

    task_data = data.load(
        config.task, source=config.source, data_dir=config.data_dir, seed=config.seed
    )
    stage_timer("data", time.perf_counter() - run_start)
    trigger, policy, count = poison.default_attack(config.task, task_data)
    triggers.save(trigger, directory / "trigger.json")
    backdoor_test = poison.backdoor_test_set(task_data.test, trigger, policy, seed=config.seed)
    context = _Context(
        config=config,
        stages=stages,
        models_dir=models_dir,
        task_data=task_data,
        trigger=trigger,
        policy=policy,
        count=count,
        defender=defenses.DefenderData(
            task_data.validation.x,
            task_data.validation.y,
            holdout_fraction=config.fine_tune.holdout_fraction,
            seed=config.seed,
        ),
        backdoor_validation=poison.backdoor_test_set(
            task_data.validation, trigger, policy, seed=config.seed
        ),
        evaluation=((task_data.test.x, task_data.test.y), backdoor_test),
        progress=progress,
        stage_timer=stage_timer,
    )

    table1: dict[str, dict[str, dict]] = {}
    curves_out: dict[str, dict] = {}
    attack_reports: dict[str, dict] = {}
    defense_details: dict[str, dict] = {}
    for attack_name in config.attacks:
        model, model_hash, attack_reports[attack_name] = _attack_stage(context, attack_name)
        inputs = {"config": stages.fingerprint, "model": model_hash}
        curves_out[attack_name] = _analysis_stage(context, attack_name, model, inputs)
        outcome = defenses.PruningOutcome.from_record(curves_out[attack_name])
        table1[attack_name], details = _defense_stages(context, attack_name, model, inputs, outcome)
        defense_details.update(details)

    results = {
        "task": config.task,
        "config": dataclasses.asdict(config),
        "data": {
            "train": len(task_data.train.x),
            "validation": len(task_data.validation.x),
            "test": len(task_data.test.x),
            "input_shape": list(task_data.input_shape),
            "classes": task_data.num_classes,
        },
        "trigger": trigger.get_config(),
        "policy": poison.policy_to_dict(policy),
        "table1": table1,
        "curves": curves_out,
        "attacks": attack_reports,
        "defenses": defense_details,
        "timings": stage_timer.seconds,
        "peak_rss_mb": stage_timer.peak_rss_mb,
        "machine": machine_info.describe(),
    }
    _write_report(directory, config, results)
    results["total_seconds"] = time.perf_counter() - run_start
    reporting.atomic_write_json(directory / "results.json", results)
    progress(f"total time {results['total_seconds']:.1f}s; results in {directory}")
    return results


class _StageTimer:
    """Records each stage's seconds and peak resident memory (MiB) since the previous stage
    ended (the stage's own peak where the platform can reset the peak, Linux; else the
    process's peak so far), and reports them through ``progress``."""

    def __init__(self, run_start: float, progress: Callable[[str], None]):
        self.run_start = run_start
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        memory.reset_peak_rss()

    def __call__(self, name: str, seconds: float) -> None:
        self.seconds[name] = seconds
        self.peak_rss_mb[name] = round(memory.peak_rss_mb(), 1)
        memory.reset_peak_rss()
        self.progress(
            f"[{time.perf_counter() - self.run_start:7.1f}s] {name} done in {seconds:.1f}s, "
            f"peak RSS {self.peak_rss_mb[name]:.0f} MiB"
        )


def _defense_stages(
    context: _Context,
    attack_name: str,
    model: keras.Model,
    inputs: dict,
    outcome: defenses.PruningOutcome,
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Runs every configured defense on the attacked ``model``; returns Table 1's row
    (defense -> summary, with DER against the undefended model) and each defense's details
    keyed ``attack/defense``."""
    row: dict[str, dict] = {}
    details: dict[str, dict] = {}
    for defense_name in context.config.defenses:
        record = _defense_stage(context, attack_name, defense_name, model, inputs, outcome)
        row[defense_name] = record["summary"]
        details[f"{attack_name}/{defense_name}"] = record["details"]
    undefended = row.get("none")
    for entry in row.values():  # DER against the undefended model.
        if undefended and undefended.get("asr") is not None and entry.get("asr") is not None:
            entry["der"] = defenses.der(undefended, entry)
    return row, details


def _attack_stage(context: _Context, attack_name: str) -> tuple[keras.Model, str, dict]:
    """The backdoored model (reused if its checkpoint is the file the stage wrote, else
    trained), the hash of its file, and the attack's report."""
    stages, config = context.stages, context.config
    stage = f"attack/{attack_name}"
    model_path = context.models_dir / f"{attack_name}.keras"
    inputs = {"config": stages.fingerprint}
    model = None
    if stages.current(stage, inputs) is not None:
        model = load_checkpoint(
            model_path, stages.outputs(stage).get(model_path.name), context.progress
        )
    if model is None:
        context.progress(f"{stage}: training ({config.task}, preset {config.attack.preset})")
        start = time.perf_counter()
        attack_fn = attacks.baseline if attack_name == "baseline" else attacks.pruning_aware
        result = attack_fn(
            context.task_data,
            context.trigger,
            context.policy,
            context.count,
            settings=config.attack,
        )
        model = result.model
        save_model(model, model_path)
        stages.mark(
            stage,
            {
                "clean_acc": result.clean_acc,
                "asr": result.asr,
                "seconds": result.seconds,
                "report": reporting._jsonable(result.report),
            },
            inputs,
            {model_path.name: file_hash(model_path)},
        )
        context.stage_timer(stage, time.perf_counter() - start)
    return model, stages.outputs(stage)[model_path.name], stages.result(stage)


def _analysis_stage(context: _Context, attack_name: str, model: keras.Model, inputs: dict) -> dict:
    """Activation statistics and the full pruning curve of the attack's model: the pruning
    outcome (``defenses.PruningOutcome.as_record``) the pruning defenses reuse, plus the
    triggered inputs' mean activations (for figure 4)."""
    stages = context.stages
    stage = f"analysis/{attack_name}"
    if stages.current(stage, inputs) is None:
        start = time.perf_counter()
        outcome = defenses.pruning_outcome(
            model, context.defender, context.config.pruning, context.backdoor_validation
        )
        backdoor_stats = stats.collect(
            model, context.backdoor_validation.x, layer_names=[outcome.layer]
        )[outcome.layer]
        record = outcome.as_record()
        record["curve"] = reporting._jsonable(record["curve"])
        stages.mark(stage, {**record, "backdoor_mean": backdoor_stats.mean.tolist()}, inputs)
        context.stage_timer(stage, time.perf_counter() - start)
    return stages.result(stage)


def _defense_stage(
    context: _Context,
    attack_name: str,
    defense_name: str,
    model: keras.Model,
    inputs: dict,
    outcome: defenses.PruningOutcome,
) -> dict:
    """One defense on the attack's model: ``{"summary", "details"}``, reused only while the
    defended model on disk is the file the stage wrote."""
    stages = context.stages
    stage = f"defense/{attack_name}/{defense_name}"
    model_path = context.models_dir / f"{attack_name}_{defense_name}.keras"
    record = stages.current(stage, inputs)
    if record is not None and defense_name != "none":
        expected = stages.outputs(stage).get(model_path.name)
        if not model_path.exists() or file_hash(model_path) != expected:
            context.progress(
                f"warning: checkpoint {model_path} is not the file its stage "
                "wrote: redoing that stage"
            )
            record = None
    if record is not None:
        return record
    context.progress(f"{stage}: running")
    config = context.config
    defense_context = defenses.DefenseContext(
        seed=config.seed,
        pruning=config.pruning,
        fine_tune=config.fine_tune,
        fmp=config.fmp,
        pruned=outcome,
        backdoor_validation=context.backdoor_validation,
    )
    result = defenses.run_defense(
        defense_name,
        model,
        context.defender,
        context=defense_context,
        evaluation=context.evaluation,
    )
    outputs = {}
    if defense_name != "none":
        save_model(result.model, model_path)
        outputs[model_path.name] = file_hash(model_path)
    record = {"summary": result.summary(), "details": reporting._jsonable(_brief(result.details))}
    stages.mark(stage, record, inputs, outputs)
    context.stage_timer(stage, result.seconds)
    return record


def _brief(details: dict) -> dict:
    """Drops bulky per-channel arrays the report does not need twice."""
    return {k: v for k, v in details.items() if k not in ("mean_activation",)}


def _write_report(directory: pathlib.Path, config: ExperimentConfig, results: dict) -> None:
    table1 = results["table1"]
    reporting.atomic_write_text(
        directory / "table1.md", reporting.table1_markdown(table1, config.task)
    )
    reporting.atomic_write_text(
        directory / "table2.md", reporting.table2_markdown(table1, config.task)
    )
    reporting.atomic_write_text(
        directory / "defenses.md", reporting.defenses_markdown(table1, config.task)
    )
    for attack_name, analysis in results["curves"].items():
        pruning = results["defenses"].get(f"{attack_name}/pruning") or {}
        reporting.plot_pruning_curve(
            analysis["curve"],
            analysis["channels"],
            directory / f"fig6_{attack_name}.png",
            title=f"{config.task}: {reporting.ATTACK_TITLES[attack_name]}",
            stop=pruning.get("pruned_count"),
            threshold=pruning.get("threshold"),
        )
        reporting.plot_activations(
            analysis["clean_mean"],
            analysis["backdoor_mean"],
            directory / f"fig4_{attack_name}.png",
            title=f"{config.task} {analysis['layer']}: {reporting.ATTACK_TITLES[attack_name]}",
        )
