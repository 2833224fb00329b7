"""The defense leaderboard: tasks x attacks x defenses x seeds, under the defender-realistic
protocol, with the retuning attack after every defense.

>>> settings = leaderboard.Settings.default()
>>> rows = leaderboard.run(leaderboard.Grid.default(), settings, "runs/leaderboard")

One *cell* is (task, attack, seed, defense):

1. the attacked model for (task, attack, seed) comes from :class:`ModelCache` (trained by
   ``attack_zoo`` once, saved atomically, keyed by the settings that shape it);
2. the defense runs through ``defenses.run_defense`` with a ``DefenderData`` built from the
   task's clean *validation* split only, and *inside* ``guard.selecting()`` with no evaluation
   data passed: any read of report-only data during the defense raises
   ``SelectionLeakError``.  Only afterwards are the test split and its triggered copy
   (``ReportOnly``) opened to report clean accuracy, ASR and robust accuracy;
3. the retuning attack (``retuning.retuning_attack``, Min et al. 2024) re-tunes a copy of the
   defended model and reports the ASR that comes back.

Each finished cell is appended to ``leaderboard.json`` at once (atomic rewrite); a cell whose
key is there is never recomputed, so an interrupted run continues where it stopped.
Summaries, the markdown table and the heat maps live in :mod:`fineprune_tf.leaderboard_report`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from fineprune_tf import attack_zoo, data, poison, reporting

__all__ = [
    "Settings",
    "Grid",
    "Cell",
    "ModelCache",
    "TaskContext",
    "run",
    "run_cell",
    "earlier_runs",
    "load_rows",
    "SettingsMismatchError",
]

FORMAT_VERSION = 1


class SettingsMismatchError(ValueError):
    """The output directory holds a leaderboard computed with other settings."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that shapes a cell's numbers (hashed into the cache and cell keys).

    Attributes:
      poison_rate: poisoned copies added, as a fraction of the attacker's training split.
      epochs: ``{task: attack training epochs}``; a task missing here uses its default.
      train_limit: keep only the first N training examples (None: all); shapes the model.
      test_limit: report on the first N test examples (None: all).
      tolerance: clean holdout points a defense's choices may cost (registry convention).
      retune_steps, retune_samples, retune_poisoned: the retuning attack (steps of 32).
      profile: the defenses' cost profile, a ``leaderboard_profiles.PROFILES`` name
        (``"budget"``: shorter iterative defenses so the default grid fits its time budget;
        ``"full"``: every defense's defaults).
    """

    poison_rate: float = 0.1
    epochs: dict = dataclasses.field(default_factory=dict)
    train_limit: int | None = None
    test_limit: int | None = None
    tolerance: float = 2.0
    retune_steps: int = 30
    retune_samples: int = 200
    retune_poisoned: int = 10
    profile: str = "budget"

    def __post_init__(self) -> None:
        from fineprune_tf import leaderboard_profiles

        leaderboard_profiles.profile(self.profile)  # raises on an unknown name

    @classmethod
    def default(cls, profile: str = "budget") -> Settings:
        # The tasks' default training (models.default_training), as in results/attacks: the
        # attacks must keep their ASR, and each attacked model is trained once (ModelCache).
        return cls(profile=profile)

    @classmethod
    def quick(cls) -> Settings:
        """CI smoke settings: a short-trained mnist model (3 of its 5 epochs: BadNets
        still reaches ASR > 0.9), a 300-example report and a 10-step retuning attack."""
        return cls(
            epochs={"mnist": 3, "speech": 4, "traffic": 1},
            test_limit=300,
            retune_steps=10,
            retune_samples=100,
            retune_poisoned=5,
        )

    def defense_profile(self):
        """The :class:`~fineprune_tf.leaderboard_profiles.DefenseProfile` named ``profile``."""
        from fineprune_tf import leaderboard_profiles

        return leaderboard_profiles.profile(self.profile)

    def to_dict(self) -> dict:
        """JSON-ready, with the profile's knobs spelled out (``defense_costs``)."""
        values = dataclasses.asdict(self)
        values["epochs"] = dict(sorted(self.epochs.items()))
        values["defense_costs"] = self.defense_profile().to_dict()
        return values

    def digest(self, *parts: Any) -> str:
        """A short SHA-256 of these settings (and ``parts``): what a cell depends on."""
        return _sha([FORMAT_VERSION, self.to_dict(), *parts])

    def model_digest(self, *parts: Any) -> str:
        """A short SHA-256 of the settings that shape an attacked model (and ``parts``): the
        defense profile, report and retuning settings do not, so every profile reuses the
        same cached models."""
        shaping = {name: self.to_dict()[name] for name in ("poison_rate", "epochs", "train_limit")}
        return _sha([FORMAT_VERSION, shaping, *parts])


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One grid position."""

    task: str
    attack: str
    seed: int
    defense: str

    def key(self, settings: Settings) -> str:
        return f"{self.task}/{self.attack}/seed{self.seed}/{self.defense}/{settings.digest()}"


@dataclasses.dataclass(frozen=True)
class Grid:
    """The axes; cells run seed by seed, then task, attack and defense (one attacked model in
    memory at a time; a run cut by its time budget has whole seeds first)."""

    tasks: tuple[str, ...]
    attacks: tuple[str, ...]
    defenses: tuple[str, ...]
    seeds: tuple[int, ...]

    @classmethod
    def default(cls) -> Grid:
        from fineprune_tf.defenses import REGISTRY

        return cls(
            tuple(t for t in data.TASKS if t != "face"),
            attack_zoo.NAMES,
            tuple(REGISTRY),
            (0, 1, 2),
        )

    @classmethod
    def quick(cls) -> Grid:
        return cls(("mnist",), ("badnets", "blended"), ("none", "pruning", "clp"), (0,))

    def validate(self) -> None:
        from fineprune_tf.defenses import REGISTRY

        for values, known, name in (
            (self.tasks, data.TASKS, "tasks"),
            (self.attacks, attack_zoo.NAMES, "attacks"),
            (self.defenses, tuple(REGISTRY), "defenses"),
        ):
            unknown = [v for v in values if v not in known]
            if unknown or not values:
                raise ValueError(
                    f"{name} must be a non-empty subset of {list(known)}. "
                    f"Received: {name}={list(values)}"
                )
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be non-negative integers. Received: {self.seeds}")

    def cells(self) -> Iterator[Cell]:
        for seed in self.seeds:
            for task in self.tasks:
                for attack in self.attacks:
                    for defense in self.defenses:
                        yield Cell(task, attack, seed, defense)

    def shard_cells(self, index: int, count: int) -> list[Cell]:
        """The cells of shard ``index`` of ``count``: every ``count``-th attacked model (task,
        attack, seed) in run order, with all of its defenses, so one process trains and
        defends each model and its compiled steps are reused; the shards partition the grid."""
        if not 0 <= index < count:
            raise ValueError(f"shard must satisfy 0 <= index < count. Received: {index}/{count}")
        order: dict[tuple, int] = {}
        chosen = []
        for cell in self.cells():
            position = order.setdefault((cell.seed, cell.task, cell.attack), len(order))
            if position % count == index:
                chosen.append(cell)
        return chosen


@dataclasses.dataclass
class TaskContext:
    """One task's data for a seed, cut to the settings' limits."""

    task_data: Any
    validation: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]

    @classmethod
    def load(cls, task: str, seed: int, settings: Settings) -> TaskContext:
        task_data = data.load(task, seed=seed)
        if settings.train_limit:
            train = task_data.train
            task_data = dataclasses.replace(
                task_data,
                train=poison.Split(
                    train.x[: settings.train_limit], train.y[: settings.train_limit]
                ),
            )
        test = task_data.test
        limit = settings.test_limit or len(test.y)
        task_data = dataclasses.replace(
            task_data, test=poison.Split(test.x[:limit], test.y[:limit])
        )
        return cls(
            task_data,
            (task_data.validation.x, task_data.validation.y),
            (task_data.test.x, task_data.test.y),
        )


class ModelCache:
    """Attacked models on disk: ``<dir>/<task>_<attack>_seed<seed>_<hash>.keras`` plus a
    ``.json`` with the poisoning and the undefended numbers; both written atomically, the
    json last, so a model without its json is retrained."""

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)

    def _paths(self, task: str, attack: str, seed: int, settings: Settings):
        digest = settings.model_digest(task, attack, seed)
        stem = self.directory / f"{task}_{attack}_seed{seed}_{digest}"
        return stem.with_suffix(".keras"), stem.with_suffix(".json")

    def get(self, task: str, attack: str, seed: int, settings: Settings, context: TaskContext):
        """``(model, poisoning, info)``, training and saving the model when it is missing."""
        import keras

        from fineprune_tf import attacks
        from fineprune_tf.experiment import save_model

        model_path, info_path = self._paths(task, attack, seed, settings)
        poisoning = attack_zoo.make(attack, context.task_data, settings.poison_rate, seed=seed)
        if model_path.exists() and info_path.exists():
            return keras.models.load_model(model_path), poisoning, json.loads(info_path.read_text())
        self.directory.mkdir(parents=True, exist_ok=True)
        start, cpu_start = time.perf_counter(), time.process_time()
        attack_settings = attacks.AttackSettings(epochs=settings.epochs.get(task), seed=seed)
        result = attack_zoo.train(poisoning, context.task_data, seed=seed, settings=attack_settings)
        info = {
            "poisoning": poisoning.to_dict(),
            "train_seconds": time.perf_counter() - start,
            "train_cpu_seconds": time.process_time() - cpu_start,
            "epochs": result.report["epochs"],
            "settings": settings.to_dict(),
        }
        save_model(result.model, model_path)
        reporting.atomic_write_json(info_path, info)
        return result.model, poisoning, info


def run_cell(
    cell: Cell,
    model,
    poisoning,
    context: TaskContext,
    settings: Settings,
    undefended: dict | None = None,
) -> dict:
    """Runs one defense and the retuning attack after it; returns the cell's JSON row.

    ``undefended``: the attacked model's ``metrics.evaluate`` numbers on the test split when
    the caller has them (one evaluation per attacked model instead of per cell).

    The defense sees only ``DefenderData`` (the validation split) and runs inside
    ``guard.selecting()``; the report-only data is opened after it returns.
    """
    from fineprune_tf import metrics, retuning
    from fineprune_tf.defenses import DefenderData, ReportOnly, finish, run_defense
    from fineprune_tf.defenses.guard import selecting
    from fineprune_tf.defenses.protocol import weight_change
    from fineprune_tf.defenses.result import holdout_accuracy

    cell_start, cell_cpu_start = time.perf_counter(), time.process_time()
    task_data = context.task_data
    defender = DefenderData(*context.validation, seed=cell.seed)
    backdoor = poison.backdoor_test_set(
        task_data.test, poisoning.trigger, poisoning.policy, seed=cell.seed
    )
    report = ReportOnly(context.test, backdoor)
    defense_context = settings.defense_profile().context(cell.seed, settings.tolerance)
    with selecting():  # the whole defense: reading `report` here raises SelectionLeakError
        base_holdout = holdout_accuracy(model, defender.holdout)
        result = run_defense(
            cell.defense, model, defender, evaluation=None, context=defense_context
        )
    change = weight_change(model, result.model)  # reads no data: the protocol's preference
    report_start = time.perf_counter()
    finish(result, report)
    if undefended is None:
        clean, backdoor_set = report.open()
        undefended = metrics.evaluate(model, clean, backdoor_set)
    retuned = retuning.retuning_attack(
        result.model,
        task_data,
        poisoning.trigger,
        poisoning.policy,
        steps=settings.retune_steps,
        samples=settings.retune_samples,
        poisoned=settings.retune_poisoned,
        seed=cell.seed,
        before={"clean_acc": result.clean_acc, "asr": result.asr, "robust_acc": result.robust_acc},
    )
    return {
        **dataclasses.asdict(cell),
        "key": cell.key(settings),
        **result.summary(),
        "undefended": undefended,
        "undefended_holdout_acc": base_holdout,
        "holdout_size": len(defender.holdout[1]),
        "weight_change": change,
        "retuned_asr": retuned["after"]["asr"],
        "report_seconds": time.perf_counter() - report_start - retuned["seconds"],
        "retune_seconds": retuned["seconds"],
        "cell_seconds": time.perf_counter() - cell_start,
        # CPU time of every thread of the process: what the cell costs on an idle machine
        # (wall ~ CPU / cores used), independent of the other processes' load.
        "cell_cpu_seconds": time.process_time() - cell_cpu_start,
        "details_why": str(result.details.get("why", ""))[:300],
    }


def earlier_runs(output_dir: str | pathlib.Path) -> list[dict]:
    """The invocations that wrote ``output_dir``'s leaderboard so far: ``[{"cells",
    "wall_seconds", "date"}]`` (a file from before this record counts as one run with its
    rows and wall time).  A resumed run appends itself, so the wall time a reader sees is
    the sum over every invocation, not only the last one's."""
    path = pathlib.Path(output_dir) / "leaderboard.json"
    if not path.exists():
        return []
    stored = json.loads(path.read_text())
    if "runs" in stored:
        return list(stored["runs"])
    return [
        {
            "cells": len(stored.get("rows", [])),
            "wall_seconds": float(stored.get("wall_seconds") or 0.0),
            "date": (stored.get("machine") or {}).get("date"),
        }
    ]


def load_rows(output_dir: str | pathlib.Path, settings: Settings) -> list[dict]:
    """The finished rows of an earlier run in ``output_dir`` (empty when there is none).

    Raises:
      SettingsMismatchError: the file was written with other settings.
    """
    path = pathlib.Path(output_dir) / "leaderboard.json"
    if not path.exists():
        return []
    stored = json.loads(path.read_text())
    if stored.get("settings") != json.loads(json.dumps(settings.to_dict())):
        raise SettingsMismatchError(
            f"{path} was computed with other settings ({stored.get('settings')}); use another "
            f"--output_dir or --overwrite"
        )
    return list(stored.get("rows", []))


def run(
    grid: Grid,
    settings: Settings,
    output_dir: str | pathlib.Path,
    *,
    cache_dir: str | pathlib.Path | None = None,
    overwrite: bool = False,
    budget_seconds: float | None = None,
    on_cell: Callable[[int, int, Cell, bool], None] | None = None,
    write: Callable[[pathlib.Path, list[dict], dict], None] | None = None,
    meta: dict | None = None,
    reuse_steps: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> list[dict]:
    """Runs every cell of ``grid`` not already in ``output_dir/leaderboard.json``.

    Args:
      cache_dir: attacked models (default ``output_dir/models``).
      overwrite: discard an earlier leaderboard in ``output_dir`` instead of resuming it.
      budget_seconds: start no new cell after this much wall time; the cells left are
        counted in ``meta["cells_missing"]`` and the next run continues with them.
      on_cell: ``(index, total, cell, computed)`` after each cell (the progress bar).
      write: ``(output_dir, rows, meta)`` called after each computed cell (default: the
        json only; the script also renders markdown and heat maps).
      meta: a dict updated in place with the settings, grid and cell counts.
      reuse_steps: fit through ``step_cache.reuse_compiled_steps()``: one compiled training
        step per model structure for every fine-tuning and retuning attack of the run, instead
        of a fresh trace per fit (same numbers; False only to measure the difference).
      shard: ``(index, count)``: run only :meth:`Grid.shard_cells` (one of ``count``
        processes; :mod:`fineprune_tf.leaderboard_workers` runs and merges them).
    Returns the rows (earlier and new).
    """
    from fineprune_tf import step_cache

    grid.validate()
    with step_cache.reuse_compiled_steps() if reuse_steps else contextlib.nullcontext():
        cells = grid.shard_cells(*shard)
        return _run(
            grid, cells, settings, output_dir, cache_dir, overwrite, budget_seconds, on_cell,
            write, meta,
        )  # fmt: skip


def _run(
    grid, cells, settings, output_dir, cache_dir, overwrite, budget_seconds, on_cell, write, meta
):
    """:func:`run`'s loop (its arguments, positionally; ``cells``: the shard's)."""
    start = time.perf_counter()
    output_dir = pathlib.Path(output_dir)
    rows = [] if overwrite else load_rows(output_dir, settings)
    done = {row["key"] for row in rows}
    cache = ModelCache(cache_dir or output_dir / "models")
    meta = meta if meta is not None else {}
    meta.update(settings=settings.to_dict(), grid=dataclasses.asdict(grid), cells_total=len(cells))
    write = write or _write_json
    context_key, context, attacked_key, attacked = None, None, None, None
    for index, cell in enumerate(cells):
        computed = cell.key(settings) not in done
        if (
            computed
            and budget_seconds is not None
            and (time.perf_counter() - start > budget_seconds)
        ):
            break
        if computed:
            if context_key != (cell.task, cell.seed):
                context_key, context = (
                    (cell.task, cell.seed),
                    TaskContext.load(cell.task, cell.seed, settings),
                )
            if attacked_key != (cell.task, cell.attack, cell.seed):
                attacked_key = (cell.task, cell.attack, cell.seed)
                attacked = (*cache.get(cell.task, cell.attack, cell.seed, settings, context), None)
            model, poisoning, info, undefended = attacked
            row = run_cell(cell, model, poisoning, context, settings, undefended)
            attacked = (model, poisoning, info, row["undefended"])
            row["attack_train_seconds"] = info["train_seconds"]
            row["attack_train_cpu_seconds"] = info.get("train_cpu_seconds")
            rows.append(row)
            done.add(row["key"])
            meta["cells_missing"] = sum(c.key(settings) not in done for c in cells)
            write(output_dir, rows, meta)
        if on_cell is not None:
            on_cell(index, len(cells), cell, computed)
    meta["cells_missing"] = sum(c.key(settings) not in done for c in cells)
    return rows


def _write_json(output_dir: pathlib.Path, rows: list[dict], meta: dict) -> None:
    reporting.atomic_write_json(
        output_dir / "leaderboard.json", {**meta, "format": FORMAT_VERSION, "rows": rows}
    )
