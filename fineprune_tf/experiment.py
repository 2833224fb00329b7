"""One Fine-Pruning experiment: both attacks x every defense on one task, with the paper's
tables and figures, checkpointed stage by stage so an interrupted run resumes.

Stages (each one's outputs are written atomically, then the stage is marked done in
``stages.json``): ``attack/<attack>`` (the backdoored model), ``analysis/<attack>`` (activation
statistics and the full pruning curve), ``defense/<attack>/<defense>`` (the defended model and
its numbers), and ``report`` (``results.json``, ``table1.md``, ``table2.md``, figures).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import time
from collections.abc import Callable

import keras
import tensorflow as tf
from absl import logging

from fineprune_tf import attacks, curves, data, defenses, models, poison, reporting, stats, triggers

__all__ = ["ExperimentConfig", "OutputDirError", "run", "save_model", "QUICK_OVERRIDES"]

RESULT_FILES = ("results.json", "stages.json")


class OutputDirError(ValueError):
    """The output directory holds another run's results."""


@dataclasses.dataclass
class ExperimentConfig:
    """Everything that determines an experiment's numbers."""

    task: str = "speech"
    source: str = "default"
    data_dir: str | None = None
    seed: int = 0
    preset: str = "cpu"
    attacks: tuple[str, ...] = attacks.ATTACKS
    defenses: tuple[str, ...] = defenses.DEFENSES
    threshold: float = 4.0
    epochs: int | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    prune_fraction: float = 0.75
    fine_tune_learning_rate: float = 1e-3
    fine_tune_epochs: int = 30
    patience: int = 5
    noise_stddev: float = 0.0
    fmp_fraction: float = 0.1
    fmp_epsilon: float = 0.03
    engine: str = "fast"
    quick: bool = False

    def validate(self) -> None:
        if self.task not in data.TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {data.TASKS}")
        unknown = [a for a in self.attacks if a not in attacks.ATTACKS]
        if unknown or not self.attacks:
            raise ValueError(f"unknown attack(s) {unknown}; expected some of {attacks.ATTACKS}")
        unknown = [d for d in self.defenses if d not in defenses.DEFENSES]
        if unknown or not self.defenses:
            raise ValueError(
                f"unknown defense(s) {unknown}; expected some of {defenses.DEFENSES}")
        if not 0.0 < self.threshold < 100.0:
            raise ValueError(f"threshold must be in (0, 100) percentage points, "
                             f"got {self.threshold}")
        if not 0.0 < self.prune_fraction < 1.0:
            raise ValueError(f"prune_fraction must be in (0, 1), got {self.prune_fraction}")
        if not 0.0 < self.fmp_fraction < 1.0:
            raise ValueError(f"fmp_fraction must be in (0, 1), got {self.fmp_fraction}")

    def fingerprint(self) -> str:
        """Hash of the settings that determine each stage's numbers; which attacks and
        defenses run is left out, so a resumed run may add some."""
        values = {k: v for k, v in dataclasses.asdict(self).items()
                  if k not in ("attacks", "defenses")}
        text = json.dumps(values, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


#: What ``--quick`` changes: a smoke run in well under two minutes on 2 cores.
QUICK_OVERRIDES = {"epochs": 2, "fine_tune_epochs": 2, "patience": 1}


def save_model(model: keras.Model, path: pathlib.Path) -> None:
    """Saves a ``.keras`` file atomically (a temporary file renamed over ``path``)."""
    temporary = path.with_name(f".{path.stem}.tmp.keras")
    try:
        model.save(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class _Stages:
    """The stage manifest: which stages are done, with their (JSON) results."""

    def __init__(self, directory: pathlib.Path, config: ExperimentConfig, resume: bool,
                 progress: Callable[[str], None]):
        self.path = directory / "stages.json"
        self.fingerprint = config.fingerprint()
        self.done: dict[str, dict] = {}
        if resume and self.path.exists():
            try:
                manifest = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                progress(f"warning: stages.json is unreadable ({error}): starting over")
                manifest = {}
            if manifest.get("fingerprint") not in (None, self.fingerprint):
                raise OutputDirError(
                    f"{directory} holds a run with a different configuration; use a new "
                    "--output_dir or --overwrite")
            self.done = manifest.get("done", {})

    def get(self, name: str) -> dict | None:
        return self.done.get(name)

    def mark(self, name: str, result: dict) -> None:
        self.done[name] = result
        reporting.atomic_write_json(self.path, {"fingerprint": self.fingerprint,
                                                "done": self.done})


def prepare_output_dir(directory: str | os.PathLike, overwrite: bool, resume: bool
                       ) -> pathlib.Path:
    """Creates ``directory``; refuses one that holds another run's results unless ``overwrite``
    (which deletes only this project's result files) or ``resume``."""
    path = pathlib.Path(directory)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"--output_dir {path} exists and is not a directory")
    existing = [name for name in RESULT_FILES if (path / name).exists()]
    if existing and not (overwrite or resume):
        raise OutputDirError(
            f"{path} already holds a run's results ({', '.join(existing)}); pass --resume to "
            "continue it, --overwrite to replace it, or choose another --output_dir")
    if existing and overwrite:
        for name in ("results.json", "stages.json", "table1.md", "table2.md", "run.log"):
            (path / name).unlink(missing_ok=True)
        for sub in ("models", "stages"):
            shutil.rmtree(path / sub, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _settings(config: ExperimentConfig) -> attacks.AttackSettings:
    return attacks.AttackSettings(
        preset=config.preset, epochs=config.epochs, batch_size=config.batch_size,
        learning_rate=config.learning_rate, seed=config.seed,
        prune_fraction=config.prune_fraction,
        max_reinstated=1 if config.quick else attacks.AttackSettings.max_reinstated)


def _fine_tune_settings(config: ExperimentConfig) -> defenses.FineTuneSettings:
    return defenses.FineTuneSettings(
        learning_rate=config.fine_tune_learning_rate, max_epochs=config.fine_tune_epochs,
        patience=config.patience, noise_stddev=config.noise_stddev, seed=config.seed)


def _load_stage_model(path: pathlib.Path, progress: Callable[[str], None]) -> keras.Model | None:
    try:
        return keras.models.load_model(path)
    except Exception as error:  # noqa: BLE001 - any corruption means "redo the stage"
        progress(f"warning: checkpoint {path} is unreadable ({error}): redoing that stage")
        return None


def run(config: ExperimentConfig, output_dir: str | os.PathLike, *, overwrite: bool = False,
        resume: bool = False, progress: Callable[[str], None] = logging.info) -> dict:
    """Runs the experiment and writes its results; returns the ``results.json`` content."""
    if config.quick:
        config = dataclasses.replace(
            config, **{k: v for k, v in QUICK_OVERRIDES.items()
                       if getattr(config, k) == getattr(ExperimentConfig, k, None)
                       or getattr(config, k) is None})
    config.validate()
    directory = prepare_output_dir(output_dir, overwrite, resume)
    # Same flags and seed, same numbers: deterministic kernels and seeded everything.
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    stages = _Stages(directory, config, resume, progress)
    models_dir = directory / "models"
    models_dir.mkdir(exist_ok=True)
    run_start = time.perf_counter()
    timings: dict[str, float] = {}

    def stage_timer(name: str, seconds: float) -> None:
        timings[name] = seconds
        progress(f"[{time.perf_counter() - run_start:7.1f}s] {name} done in {seconds:.1f}s")

    task_data = data.load(config.task, source=config.source, data_dir=config.data_dir,
                          seed=config.seed)
    trigger, policy, count = poison.default_attack(config.task, task_data)
    triggers.save(trigger, directory / "trigger.json")
    validation = (task_data.validation.x, task_data.validation.y)
    backdoor_validation = poison.backdoor_test_set(task_data.validation, trigger, policy,
                                                   seed=config.seed)
    backdoor_test = poison.backdoor_test_set(task_data.test, trigger, policy, seed=config.seed)
    evaluation = ((task_data.test.x, task_data.test.y), backdoor_test)

    table1: dict[str, dict[str, dict]] = {}
    curves_out: dict[str, dict] = {}
    attack_reports: dict[str, dict] = {}
    for attack_name in config.attacks:
        stage = f"attack/{attack_name}"
        model_path = models_dir / f"{attack_name}.keras"
        model = None
        if stages.get(stage) and model_path.exists():
            model = _load_stage_model(model_path, progress)
        if model is None:
            progress(f"{stage}: training ({config.task}, preset {config.preset})")
            start = time.perf_counter()
            attack_fn = attacks.baseline if attack_name == "baseline" else attacks.pruning_aware
            result = attack_fn(task_data, trigger, policy, count, settings=_settings(config))
            model = result.model
            save_model(model, model_path)
            stages.mark(stage, {"clean_acc": result.clean_acc, "asr": result.asr,
                                "seconds": result.seconds,
                                "report": reporting._jsonable(result.report)})
            stage_timer(stage, time.perf_counter() - start)
        attack_info = stages.get(stage)
        attack_reports[attack_name] = attack_info
        table1[attack_name] = {}

        stage = f"analysis/{attack_name}"
        if not stages.get(stage):
            start = time.perf_counter()
            layer_name = models.last_conv_layer(model)
            order, means = defenses.rank_channels(model, layer_name, validation[0])
            backdoor_stats = stats.collect(model, backdoor_validation.x,
                                           layer_names=[layer_name])[layer_name]
            curve = curves.pruning_curve(model, layer_name, order, validation,
                                         backdoor_validation)
            stages.mark(stage, {"layer": layer_name, "order": order.tolist(),
                                "clean_mean": means.tolist(),
                                "backdoor_mean": backdoor_stats.mean.tolist(),
                                "channels": int(model.get_layer(layer_name).channels),
                                "curve": reporting._jsonable(curve.as_dict())})
            stage_timer(stage, time.perf_counter() - start)
        curves_out[attack_name] = stages.get(stage)

        for defense_name in config.defenses:
            stage = f"defense/{attack_name}/{defense_name}"
            if stages.get(stage):
                table1[attack_name][defense_name] = stages.get(stage)["summary"]
                continue
            progress(f"{stage}: running")
            result = _run_defense(defense_name, model, validation, backdoor_validation,
                                  evaluation, config)
            if defense_name != "none":
                save_model(result.model, models_dir / f"{attack_name}_{defense_name}.keras")
            summary = result.summary()
            stages.mark(stage, {"summary": summary,
                                "details": reporting._jsonable(_brief(result.details))})
            table1[attack_name][defense_name] = summary
            stage_timer(stage, result.seconds)

    results = {
        "task": config.task, "config": dataclasses.asdict(config),
        "data": {"train": len(task_data.train.x), "validation": len(task_data.validation.x),
                 "test": len(task_data.test.x), "input_shape": list(task_data.input_shape),
                 "classes": task_data.num_classes},
        "trigger": trigger.get_config(), "policy": poison.policy_to_dict(policy),
        "table1": table1, "curves": curves_out, "attacks": attack_reports,
        "defenses": {f"{a}/{d}": stages.get(f"defense/{a}/{d}")["details"]
                     for a in config.attacks for d in config.defenses},
        "timings": timings,
    }
    _write_report(directory, config, results)
    results["total_seconds"] = time.perf_counter() - run_start
    reporting.atomic_write_json(directory / "results.json", results)
    progress(f"total time {results['total_seconds']:.1f}s; results in {directory}")
    return results


def _brief(details: dict) -> dict:
    """Drops bulky per-channel arrays the report does not need twice."""
    return {k: v for k, v in details.items() if k not in ("mean_activation",)}


def _run_defense(name: str, model, validation, backdoor_validation, evaluation,
                 config: ExperimentConfig) -> defenses.DefenseResult:
    settings = _fine_tune_settings(config)
    if name == "none":
        start = time.perf_counter()
        result = defenses.DefenseResult("none", model, 0.0)
        result = defenses._finish(result, evaluation)
        result.seconds = time.perf_counter() - start
        return result
    if name == "pruning":
        return defenses.prune(model, validation, threshold=config.threshold,
                              backdoor_validation=backdoor_validation, evaluation=evaluation,
                              engine=config.engine)
    if name == "fine_tuning":
        return defenses.fine_tune(model, validation, settings=settings, evaluation=evaluation)
    if name == "fine_pruning":
        return defenses.fine_prune(model, validation, threshold=config.threshold,
                                   settings=settings, backdoor_validation=backdoor_validation,
                                   evaluation=evaluation, engine=config.engine)
    return defenses.fmp(model, validation, prune_fraction=config.fmp_fraction,
                        epsilon=config.fmp_epsilon, settings=settings, evaluation=evaluation)


def _write_report(directory: pathlib.Path, config: ExperimentConfig, results: dict) -> None:
    table1 = results["table1"]
    reporting.atomic_write_text(directory / "table1.md",
                                reporting.table1_markdown(table1, config.task))
    reporting.atomic_write_text(directory / "table2.md",
                                reporting.table2_markdown(table1, config.task))
    for attack_name, analysis in results["curves"].items():
        pruning = results["defenses"].get(f"{attack_name}/pruning") or {}
        reporting.plot_pruning_curve(
            analysis["curve"], analysis["channels"], directory / f"fig6_{attack_name}.png",
            title=f"{config.task}: {reporting.ATTACK_TITLES[attack_name]}",
            stop=pruning.get("pruned_count"))
        reporting.plot_activations(
            analysis["clean_mean"], analysis["backdoor_mean"],
            directory / f"fig4_{attack_name}.png",
            title=f"{config.task} {analysis['layer']}: {reporting.ATTACK_TITLES[attack_name]}")
