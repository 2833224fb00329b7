"""The cleaning run: validate the options, load and check the inputs, prune once, run the
chosen defense (or ``auto``'s protocol), then write the models and the report into the output
folder under its manifest."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from collections.abc import Callable

import keras
import numpy as np
from absl import logging

from fineprune_tf import defenses, export, io, metrics, reporting
from fineprune_tf.cleaning.errors import CleaningError
from fineprune_tf.cleaning.inputs import choose_layer, load_masked, split_clean_data
from fineprune_tf.cleaning.multi_io import ModelSignature, model_signature
from fineprune_tf.cleaning.output_folder import (
    Manifest,
    check_output_dir,
    defended_file,
    remove_previous,
)
from fineprune_tf.cleaning.report import activation_report, defense_facts, markdown
from fineprune_tf.data.user import DataLimits, UserData, load_user_data
from fineprune_tf.stage_store import save_model

__all__ = ["DEFENSE_CHOICES", "clean_model", "defend", "save_models"]

#: ``--defense`` values: every registered defense but "none", and "auto" (the protocol).
DEFENSE_CHOICES = tuple(name for name in defenses.REGISTRY if name != "none") + ("auto",)


# clean_model is ~85 lines, 30 of them the report's dict literal: the run reads in order in one
# place (validate, load, prune and defend, write), and the report names what each step gave.
def clean_model(
    model_path: str | os.PathLike,
    clean_data: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    layer: str | None = None,
    backdoor_data: str | os.PathLike | None = None,
    threshold: float | None = None,
    defense: str = "fine_pruning",
    settings: defenses.FineTuneSettings | None = None,
    pruning: defenses.PruningSettings | None = None,
    fmp: defenses.FmpSettings | None = None,
    tolerance: float = 2.0,
    eval_fraction: float = 0.2,
    allow_unsafe: bool = False,
    export_serving: bool = True,
    overwrite: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] = logging.info,
    load_limits: io.LoadLimits | None = None,
    data_limits: DataLimits | None = None,
    output: str | None = None,
) -> dict:
    """Defends the user's model with ``defense``; writes ``OUTPUT_FILES`` (and the defended
    model, :func:`defended_file`) to ``output_dir``.

    Args:
      model_path: a ``.keras`` / ``.h5`` file or a SavedModel holding ``model.keras``.
      clean_data: ``.npz`` (``x``, ``y``) or an image folder per class (see
        ``fineprune_tf.data.user``); ``eval_fraction`` of it is held out to report on, the rest
        is the defender's data every choice is made from.
      output_dir: where the results go; refused if it overlaps an input, or is not empty and
        not a previous run; a previous run is replaced (its listed files only) when
        ``overwrite``.
      layer, threshold: the conv layer to prune (default: the last conv layer on every path)
        and the clean-accuracy drop pruning may cost (points); override ``pruning``'s fields.
      backdoor_data: optional triggered inputs (``.npz`` with ``x``, true ``y`` and, for a
        targeted backdoor, ``y_attacker``) to measure the attack success rate (report only).
      defense: a name of ``defenses.REGISTRY`` (``fine_pruning`` by default) or ``"auto"``
        (``defenses.auto_defend`` picks one from the clean data only).
      settings, pruning, fmp: fine-tuning, pruning and FMP settings (defaults: the classes').
      tolerance: clean holdout accuracy (points) a defense's own choices, and ``auto``'s
        choice, may cost.
      load_limits, data_limits: size / time / memory limits for the model and the data.
      output: the output the defense reads, for a model with several (default: the one the
        clean ``.npz`` labels as ``y_<name>``, else the only classification head); a model with
        several inputs or outputs is defended through its packed view (``cleaning.multi_io``).

    Returns:
      The report (also written as ``report.json``).  The pruning curve is computed once: the
      pruning row, the chosen defense and ``auto``'s candidates all reuse it.
    """
    start = time.perf_counter()
    pruning, settings = _validated_settings(
        defense, threshold, eval_fraction, pruning, settings, fmp, seed
    )
    output_dir = pathlib.Path(output_dir)
    inputs = [pathlib.Path(model_path), pathlib.Path(clean_data)] + (
        [pathlib.Path(backdoor_data)] if backdoor_data else []
    )
    previous = check_output_dir(output_dir, inputs, overwrite)

    whole = load_masked(model_path, allow_unsafe, load_limits, progress, output, clean_data)
    signature = model_signature(whole, output, clean_data)
    if signature.view is not None:
        progress(
            f"{len(whole.inputs)} input(s), {len(whole.outputs)} output(s): the defense reads "
            f"output {signature.output!r}"
        )
    model = signature.model(whole)  # one input, one output (the packed view when several)
    pruning = dataclasses.replace(
        pruning, layer=choose_layer(model, layer or pruning.layer, progress)
    )
    data = _load_data(
        signature, clean_data, backdoor_data, eval_fraction, settings, seed, data_limits
    )
    backdoor = data.backdoor

    before = metrics.evaluate(model, data.evaluation_xy, backdoor)
    progress(
        f"original model: clean accuracy {before['clean_acc']:.3f}"
        + ("" if backdoor is None else f", attack success {before['asr']:.3f}")
    )
    outcome, pruned, chosen, choice = _prune_and_defend(
        model, data, defense, pruning, settings, fmp, seed, tolerance, progress
    )

    check_output_dir(output_dir, inputs, overwrite)  # nothing changed while we computed
    defended_name = defended_file(chosen.defense)
    if previous:
        remove_previous(output_dir, previous, (defended_name,))
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(output_dir)
    serving = save_models(
        output_dir,
        manifest,
        whole,
        dataclasses.replace(pruned, model=signature.restored(pruned.model)),
        dataclasses.replace(chosen, model=signature.restored(chosen.model)),
        defended_name,
        export_serving,
    )
    activations = activation_report(
        model, pruning.layer, data.defense_xy[0], backdoor, outcome.means
    )
    _write_figures(output_dir, manifest, pruning.layer, pruned, activations)
    report = {
        "model": str(model_path),
        "clean_data": str(clean_data),
        "backdoor_data": None if backdoor_data is None else str(backdoor_data),
        "layer": pruning.layer,
        "threshold": pruning.threshold,
        "examples": {
            "defense": len(data.defense_xy[1]),
            "evaluation": len(data.evaluation_xy[1]),
            "backdoor": 0 if backdoor is None else len(backdoor.y),
        },
        "original": before,
        "pruning": {
            **pruned.summary(),
            "pruned": pruned.details["pruned"],
            "pruned_fraction": pruned.details["pruned_fraction"],
        },
        "defense": {**choice, "chosen": chosen.defense, "model_file": defended_name},
        chosen.defense: {**chosen.summary(), **defense_facts(chosen)},
        "curve": pruned.details["curve"],
        "activations": activations,
        "serving": serving,
        "fine_tune_settings": dataclasses.asdict(settings),
        "pruning_settings": dataclasses.asdict(pruning),
        "seconds": time.perf_counter() - start,
    }
    manifest.add("report.json", "report.md")
    reporting.atomic_write_json(output_dir / "report.json", reporting._jsonable(report))
    reporting.atomic_write_text(output_dir / "report.md", markdown(report))
    progress(f"done in {report['seconds']:.1f}s; results in {output_dir}")
    return report


def _prune_and_defend(
    model: keras.Model,
    data: _RunData,
    defense: str,
    pruning: defenses.PruningSettings,
    settings: defenses.FineTuneSettings,
    fmp: defenses.FmpSettings | None,
    seed: int,
    tolerance: float,
    progress: Callable[[str], None],
) -> tuple:
    """Ranks and prunes ``pruning.layer`` once, then runs ``defense`` reusing that outcome.

    Returns ``(outcome, pruned, chosen, choice)``: the pruning outcome (ranking and curve), the
    pruning defense's result, the chosen defense's result and what was chosen and why.
    """
    outcome = defenses.pruning_outcome(model, data.defender, pruning, data.backdoor)
    pruned = defenses.prune(
        model, data.defender, settings=pruning, outcome=outcome, evaluation=data.evaluation
    )
    progress(
        f"pruning: {pruned.details['pruned_count']}/{pruned.details['channels']} channels "
        f"of {pruning.layer}, clean accuracy {pruned.clean_acc:.3f}"
    )
    context = defenses.DefenseContext(
        seed=seed,
        tolerance=tolerance,
        pruning=pruning,
        fine_tune=settings,
        fmp=fmp,
        pruned=outcome,
        backdoor_validation=data.backdoor,
    )
    chosen, choice = defend(defense, model, data.defender, context, data.evaluation, pruned)
    progress(
        f"{chosen.defense}: clean accuracy {chosen.clean_acc:.3f}"
        + ("" if data.backdoor is None else f", attack success {chosen.asr:.3f}")
        + f" ({choice['why']})"
    )
    return outcome, pruned, chosen, choice


def _validated_settings(
    defense: str,
    threshold: float | None,
    eval_fraction: float,
    pruning: defenses.PruningSettings | None,
    settings: defenses.FineTuneSettings | None,
    fmp: defenses.FmpSettings | None,
    seed: int,
) -> tuple[defenses.PruningSettings, defenses.FineTuneSettings]:
    """The pruning and fine-tuning settings with their defaults filled in; every option is
    checked before anything is loaded (a :class:`CleaningError` names the bad one)."""
    if defense not in DEFENSE_CHOICES:
        raise CleaningError(
            f"defense must be one of {', '.join(DEFENSE_CHOICES)}. Received: {defense!r}"
        )
    pruning = (pruning or defenses.PruningSettings()).replaced(threshold=threshold)
    settings = settings or defenses.FineTuneSettings(seed=seed)
    try:
        for part in (pruning, settings, fmp or defenses.FmpSettings()):
            part.validate()
    except ValueError as error:
        raise CleaningError(str(error)) from None
    if not 0.0 <= eval_fraction < 1.0:
        raise CleaningError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    return pruning, settings


@dataclasses.dataclass(frozen=True)
class _RunData:
    """The run's data: the defender's share (every choice is made from it), the held-out
    clean share and the optional triggered inputs (both report only)."""

    defense_xy: tuple[np.ndarray, np.ndarray]
    evaluation_xy: tuple[np.ndarray, np.ndarray]
    backdoor: UserData | None
    defender: defenses.DefenderData
    evaluation: defenses.ReportOnly


def _load_data(
    signature: ModelSignature,
    clean_data: str | os.PathLike,
    backdoor_data: str | os.PathLike | None,
    eval_fraction: float,
    settings: defenses.FineTuneSettings,
    seed: int,
    data_limits: DataLimits | None,
) -> _RunData:
    """Loads the user's data for the model's inputs and the classes of the output read, packs
    it for the model's view (several inputs), and splits the clean data into the defender's
    share and the evaluation share (``eval_fraction`` 0: the evaluation reuses the defender's
    share)."""
    shape, classes, output = signature.input_shape, signature.classes, signature.output
    clean = signature.packed(
        load_user_data(clean_data, shape, classes, "clean data", limits=data_limits, output=output)
    )
    backdoor = None
    if backdoor_data is not None:
        backdoor = signature.packed(
            load_user_data(
                backdoor_data,
                shape,
                classes,
                "backdoor data",
                min_classes=1,
                limits=data_limits,
                output=output,
            )
        )
    defense_xy, evaluation_xy = split_clean_data(clean, eval_fraction, seed)
    if eval_fraction == 0:
        evaluation_xy = defense_xy
    if np.unique(defense_xy[1]).size < 2:
        raise CleaningError("the clean data left for the defense holds a single class")
    defender = defenses.DefenderData(
        *defense_xy, holdout_fraction=settings.holdout_fraction, seed=settings.seed
    )
    return _RunData(
        defense_xy, evaluation_xy, backdoor, defender, defenses.ReportOnly(evaluation_xy, backdoor)
    )


def _write_figures(
    output_dir: pathlib.Path,
    manifest: Manifest,
    layer: str,
    pruned: defenses.DefenseResult,
    activations: dict,
) -> None:
    """pruning_curve.png (with the stopping point) and activations.png (clean means, and the
    backdoor means when triggered data was given)."""
    manifest.add("pruning_curve.png", "activations.png")
    reporting.plot_pruning_curve(
        pruned.details["curve"],
        pruned.details["channels"],
        output_dir / "pruning_curve.png",
        title=layer,
        stop=pruned.details["pruned_count"],
        threshold=pruned.details["threshold"],
    )
    reporting.plot_activations(
        activations["clean_mean"],
        activations.get("backdoor_mean"),  # no backdoor data: the clean panel only
        output_dir / "activations.png",
        title=layer,
    )


def save_models(
    output_dir: pathlib.Path,
    manifest: Manifest,
    model: keras.Model,
    pruned: defenses.DefenseResult,
    chosen: defenses.DefenseResult,
    defended_name: str,
    export_serving: bool,
) -> dict | None:
    """Writes pruned.keras, the defended model and its SavedModel; returns the serving
    facts (None without ``export_serving``)."""
    manifest.add("pruned.keras", defended_name)
    save_model(pruned.model, output_dir / "pruned.keras")
    if defended_name != "pruned.keras":
        save_model(chosen.model, output_dir / defended_name)
    if not export_serving:
        return None
    try:
        plain = export.export_saved_model(chosen.model, output_dir / "saved_model")
    finally:
        manifest.add_tree("saved_model")
    params_before, flops_before = export.count_params_and_flops(model)
    params_after, flops_after = export.count_params_and_flops(plain)
    return {
        "path": str(output_dir / "saved_model"),
        "params": [params_before, params_after],
        "flops": [flops_before, flops_after],
    }


def defend(
    name: str,
    model: keras.Model,
    defender: defenses.DefenderData,
    context: defenses.DefenseContext,
    evaluation: defenses.ReportOnly,
    pruned: defenses.DefenseResult,
) -> tuple[defenses.DefenseResult, dict]:
    """Runs ``name`` (or the protocol for ``auto``); returns the result and what was chosen
    and why: ``{"requested", "why", "candidates"}`` (candidates: auto's table, else None)."""
    if name == "pruning":
        return pruned, {"requested": name, "why": pruned.details["why"], "candidates": None}
    if name != "auto":
        result = defenses.run_defense(name, model, defender, context=context, evaluation=evaluation)
        return result, {
            "requested": name,
            "why": result.details.get("why") or f"{name} was requested (--defense)",
            "candidates": None,
        }
    # auto: the protocol's candidates choose their own settings (pruning alone at the
    # tolerance), reusing the pruning curve already computed.
    auto_context = dataclasses.replace(context, pruning=None, fine_tune=None, fmp=None)
    choice = defenses.auto_defend(
        model,
        defender,
        tolerance=context.tolerance,
        seed=context.seed,
        evaluation=evaluation,
        context=auto_context,
    )
    return choice.result, {
        "requested": name,
        "why": choice.why,
        "candidates": choice.table,
        "base_holdout_acc": choice.base_holdout_acc,
    }
