"""Clean a user's own model: the pruning and fine-pruning defenses on their clean data.

``clean_model`` loads the (untrusted) model safely, converts its convolutions to masked
layers, ranks the chosen layer's channels by mean activation on the user's clean data, runs the
pruning defense (full per-channel curve) and fine-pruning, and writes the cleaned models, a
SavedModel for serving and a report.  The user's model and data files are only read.

The output folder is the user's too.  It must be outside every input (not equal to, inside or
containing the model, the clean data or the backdoor data); when it is not empty it must be a
previous run (it holds ``fineprune_manifest.json``), and ``overwrite`` then deletes exactly the
files that manifest lists -- never anything else.  Every file is entered in the manifest just
before it is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable

import keras
import numpy as np
from absl import logging

from fineprune_tf import conversion, defenses, export, io, metrics, models, reporting
from fineprune_tf.data.user import DataLimits, UserData, load_user_data
from fineprune_tf.experiment import save_model
from fineprune_tf.layers import MaskedConv2D

__all__ = [
    "CleaningError",
    "DEFENSE_CHOICES",
    "MANIFEST",
    "OUTPUT_FILES",
    "clean_model",
    "defended_file",
    "one_line_error",
]

#: The files every run writes; the defended model goes to ``defended_file(defense)`` too
#: (``fine_pruned.keras`` for the default fine-pruning).
OUTPUT_FILES = (
    "report.json",
    "report.md",
    "pruned.keras",
    "pruning_curve.png",
    "activations.png",
    "saved_model",
)
#: ``--defense`` values: every registered defense but "none", and "auto" (the protocol).
DEFENSE_CHOICES = tuple(name for name in defenses.REGISTRY if name != "none") + ("auto",)
MANIFEST = "fineprune_manifest.json"
_MANIFEST_KIND = "fineprune_tf.clean_model"


class CleaningError(ValueError):
    """The model, the data or the options cannot be used (the message says why)."""


def _check_model(model) -> tuple[tuple[int, ...], int]:
    if isinstance(model, io.SavedModelPredictor):
        raise CleaningError(
            "this SavedModel has no Keras model inside (no model.keras): it can be evaluated "
            "but its channels cannot be pruned or fine-tuned; export it from Keras as .keras"
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise CleaningError(
            f"the model has {len(model.inputs)} inputs and {len(model.outputs)} "
            "outputs; one image input and one class output are supported"
        )
    input_shape = tuple(model.inputs[0].shape[1:])
    if len(input_shape) != 3 or None in input_shape:
        raise CleaningError(f"the model's input shape {input_shape} is not a fixed [H, W, C]")
    classes = model.outputs[0].shape[-1]
    if classes is None or len(model.outputs[0].shape) != 2 or classes < 2:
        raise CleaningError(
            f"the model's output shape {tuple(model.outputs[0].shape)} is not "
            "[N, classes] with at least 2 classes"
        )
    return input_shape, int(classes)


def _choose_layer(model: keras.Model, layer: str | None, progress: Callable[[str], None]) -> str:
    """The layer to prune in the converted ``model`` (nested models are flattened by then, so a
    backbone's layer is ``backbone.<name>``; ``backbone/<name>`` is accepted too)."""
    convs = [lay.name for lay in model.layers if isinstance(lay, keras.layers.Conv2D)]
    if not convs:
        raise CleaningError("the model has no Conv2D layer: there are no channels to prune")
    if layer is None:
        try:
            choice = models.default_layer(model)
        except ValueError as error:
            raise CleaningError(str(error)) from None
        progress(f"layer: {choice.reason} (give --layer to choose another)")
        return choice.name
    names = [lay.name for lay in model.layers]
    if layer not in names and layer.replace("/", ".") in names:
        layer = layer.replace("/", ".")
    if layer not in names:
        raise CleaningError(f"--layer {layer!r} does not exist; conv layers: {convs}")
    if layer not in convs:
        kind = type(model.get_layer(layer)).__name__
        raise CleaningError(
            f"--layer {layer!r} is a {kind}, not a conv layer; conv layers: {convs}"
        )
    return layer


def _real(path: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(os.path.realpath(path))


def _check_output_dir(
    output_dir: pathlib.Path, inputs: list[pathlib.Path], overwrite: bool
) -> list[str]:
    """Refuses an output folder that overlaps an input or holds anything but a previous run;
    returns the files listed by that run's manifest (to delete when ``overwrite``)."""
    out = _real(output_dir)
    for path in inputs:
        real = _real(path)
        relation = (
            "is"
            if out == real
            else "is inside"
            if out.is_relative_to(real)
            else "contains"
            if real.is_relative_to(out)
            else None
        )
        if relation:
            raise CleaningError(
                f"--output_dir {output_dir} {relation} your input {path}; "
                "choose a folder outside every input"
            )
    if not output_dir.exists():
        return []
    if not output_dir.is_dir():
        raise CleaningError(f"--output_dir {output_dir} exists and is not a directory")
    if not any(output_dir.iterdir()):
        return []
    previous = _read_manifest(output_dir)
    if previous is None:
        raise CleaningError(
            f"--output_dir {output_dir} is not empty and is not a previous "
            f"run (no {MANIFEST}); choose an empty or new folder"
        )
    if not overwrite:
        raise CleaningError(
            f"{output_dir} already holds a report of a previous run; pass "
            "--overwrite to replace the files it lists, or choose another "
            "--output_dir"
        )
    return previous


def _read_manifest(output_dir: pathlib.Path) -> list[str] | None:
    path = output_dir / MANIFEST
    if path.is_symlink() or not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("kind") != _MANIFEST_KIND:
        return None
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return files


def _remove_previous(
    output_dir: pathlib.Path, listed: list[str], writing: tuple[str, ...] = ()
) -> None:
    """Deletes the previous run's listed files (regular files inside ``output_dir`` only),
    then the folders they leave empty; refuses if a result name is still taken."""
    root = _real(output_dir)
    for name in sorted(set(listed), key=lambda n: -n.count("/")):
        target = output_dir / name
        if (
            pathlib.PurePosixPath(name).is_absolute()
            or ".." in pathlib.PurePosixPath(name).parts
            or not _real(target.parent).is_relative_to(root)
        ):
            continue
        if target.is_symlink() or target.is_file():
            target.unlink()
        parent = target.parent
        while (
            parent != output_dir
            and _real(parent).is_relative_to(root)
            and parent.is_dir()
            and not any(parent.iterdir())
        ):
            parent.rmdir()
            parent = parent.parent
    (output_dir / MANIFEST).unlink(missing_ok=True)
    taken = [name for name in (*OUTPUT_FILES, *writing) if (output_dir / name).exists()]
    if taken:
        raise CleaningError(
            f"{output_dir} holds {taken}, which the previous run's manifest "
            "does not list; they are left untouched: move them or choose "
            "another --output_dir"
        )


class _Manifest:
    """The list of files a run wrote, saved before each file is written."""

    def __init__(self, output_dir: pathlib.Path):
        self.output_dir = output_dir
        self.files: list[str] = []

    def add(self, *names: str) -> None:
        self.files.extend(n for n in names if n not in self.files)
        reporting.atomic_write_json(
            self.output_dir / MANIFEST, {"kind": _MANIFEST_KIND, "files": self.files}
        )

    def add_tree(self, name: str) -> None:
        self.add(
            *(
                str(p.relative_to(self.output_dir).as_posix())
                for p in sorted((self.output_dir / name).rglob("*"))
                if p.is_file()
            )
        )


def one_line_error(error: BaseException) -> str:
    """The error as one line for the command line."""
    if isinstance(error, io.UnsafeModelError):
        return error.one_line()
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def _split(data: UserData, fraction: float, seed: int) -> tuple[tuple, tuple]:
    order = np.random.default_rng(seed).permutation(len(data.y))
    count = int(round(len(order) * fraction))
    if fraction > 0 and (count < 1 or len(order) - count < 2):
        raise CleaningError(
            f"clean data has {len(order)} examples: too few to hold out "
            f"{fraction:.0%} for evaluation"
        )
    held, kept = order[:count], order[count:]
    return (data.x[kept], data.y[kept]), (data.x[held], data.y[held])


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

    Returns:
      The report (also written as ``report.json``).  The pruning curve is computed once: the
      pruning row, the chosen defense and ``auto``'s candidates all reuse it.
    """
    start = time.perf_counter()
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
    output_dir = pathlib.Path(output_dir)
    inputs = [pathlib.Path(model_path), pathlib.Path(clean_data)] + (
        [pathlib.Path(backdoor_data)] if backdoor_data else []
    )
    previous = _check_output_dir(output_dir, inputs, overwrite)

    model = _load_masked(model_path, allow_unsafe, load_limits, progress)
    pruning = dataclasses.replace(
        pruning, layer=_choose_layer(model, layer or pruning.layer, progress)
    )
    input_shape, classes = tuple(model.inputs[0].shape[1:]), int(model.outputs[0].shape[-1])
    clean = load_user_data(clean_data, input_shape, classes, "clean data", limits=data_limits)
    backdoor = None
    if backdoor_data is not None:
        backdoor = load_user_data(
            backdoor_data, input_shape, classes, "backdoor data", min_classes=1, limits=data_limits
        )
    defense_data, evaluation_data = _split(clean, eval_fraction, seed)
    if eval_fraction == 0:
        evaluation_data = defense_data
    if np.unique(defense_data[1]).size < 2:
        raise CleaningError("the clean data left for the defense holds a single class")
    defender = defenses.DefenderData(
        *defense_data, holdout_fraction=settings.holdout_fraction, seed=settings.seed
    )
    evaluation = defenses.ReportOnly(evaluation_data, backdoor)

    before = metrics.evaluate(model, evaluation_data, backdoor)
    progress(
        f"original model: clean accuracy {before['clean_acc']:.3f}"
        + ("" if backdoor is None else f", attack success {before['asr']:.3f}")
    )
    outcome = defenses.pruning_outcome(model, defender, pruning, backdoor)
    pruned = defenses.prune(
        model, defender, settings=pruning, outcome=outcome, evaluation=evaluation
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
        backdoor_validation=backdoor,
    )
    chosen, choice = _defend(defense, model, defender, context, evaluation, pruned)
    progress(
        f"{chosen.defense}: clean accuracy {chosen.clean_acc:.3f}"
        + ("" if backdoor is None else f", attack success {chosen.asr:.3f}")
        + f" ({choice['why']})"
    )

    _check_output_dir(output_dir, inputs, overwrite)  # nothing changed while we computed
    defended_name = defended_file(chosen.defense)
    if previous:
        _remove_previous(output_dir, previous, (defended_name,))
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = _Manifest(output_dir)
    serving = _save_models(
        output_dir, manifest, model, pruned, chosen, defended_name, export_serving
    )

    curve = pruned.details["curve"]
    activations = _activation_report(model, pruning.layer, defense_data[0], backdoor, outcome.means)
    manifest.add("pruning_curve.png", "activations.png")
    reporting.plot_pruning_curve(
        curve,
        pruned.details["channels"],
        output_dir / "pruning_curve.png",
        title=pruning.layer,
        stop=pruned.details["pruned_count"],
    )
    reporting.plot_activations(
        activations["clean_mean"],
        activations.get("backdoor_mean", activations["clean_mean"]),
        output_dir / "activations.png",
        title=pruning.layer,
    )
    report = {
        "model": str(model_path),
        "clean_data": str(clean_data),
        "backdoor_data": None if backdoor_data is None else str(backdoor_data),
        "layer": pruning.layer,
        "threshold": pruning.threshold,
        "examples": {
            "defense": len(defense_data[1]),
            "evaluation": len(evaluation_data[1]),
            "backdoor": 0 if backdoor is None else len(backdoor.y),
        },
        "original": before,
        "pruning": {
            **pruned.summary(),
            "pruned": pruned.details["pruned"],
            "pruned_fraction": pruned.details["pruned_fraction"],
        },
        "defense": {**choice, "chosen": chosen.defense, "model_file": defended_name},
        chosen.defense: {**chosen.summary(), **_defense_facts(chosen)},
        "curve": curve,
        "activations": activations,
        "serving": serving,
        "fine_tune_settings": dataclasses.asdict(settings),
        "pruning_settings": dataclasses.asdict(pruning),
        "seconds": time.perf_counter() - start,
    }
    manifest.add("report.json", "report.md")
    reporting.atomic_write_json(output_dir / "report.json", reporting._jsonable(report))
    reporting.atomic_write_text(output_dir / "report.md", _markdown(report))
    progress(f"done in {report['seconds']:.1f}s; results in {output_dir}")
    return report


def _load_masked(model_path, allow_unsafe: bool, load_limits, progress) -> keras.Model:
    """The user's model loaded safely, checked and converted to masked layers."""
    progress(
        f"loading {model_path} ("
        + ("allow_unsafe: refusals skipped, limits kept" if allow_unsafe else "safe mode")
        + ")"
    )
    loaded = io.load_model(model_path, allow_unsafe=allow_unsafe, limits=load_limits)
    _check_model(loaded)
    try:
        return conversion.convert(loaded)  # Flattens nested models: backbone.<layer>.
    except conversion.ConversionError as error:
        raise CleaningError(str(error)) from None


def _save_models(
    output_dir: pathlib.Path,
    manifest: _Manifest,
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


def defended_file(defense: str) -> str:
    """The file the defended model is saved as: ``fine_pruned.keras``, ``pruned.keras`` or
    ``<defense>.keras``."""
    return {"fine_pruning": "fine_pruned.keras", "pruning": "pruned.keras"}.get(
        defense, f"{defense}.keras"
    )


def _defend(
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


def _defense_facts(result: defenses.DefenseResult) -> dict:
    """The JSON-ready facts of a defense's details worth a report (fine-tuning's epochs ...)."""
    keep = ("fine_tuning", "pruned", "pruned_fraction", "why")
    return {k: v for k, v in result.details.items() if k in keep}


def _activation_report(model, layer_name, clean_x, backdoor, means) -> dict:
    layer = model.get_layer(layer_name)
    report = {
        "clean_mean": means.tolist(),
        "dormant_channels": int(np.sum(means <= 1e-6)),
        "channels": layer.channels,
    }
    if isinstance(layer, MaskedConv2D) and layer.activation is keras.activations.relu:
        from fineprune_tf import stats

        clean_stats = stats.collect(model, clean_x, layer_names=[layer_name])[layer_name]
        report["clean_dormant_fraction"] = clean_stats.dormant_fraction.tolist()
        if backdoor is not None:
            triggered = stats.collect(model, backdoor.x, layer_names=[layer_name])[layer_name]
            report["backdoor_mean"] = triggered.mean.tolist()
    elif backdoor is not None:
        _, backdoor_means = defenses.rank_channels(model, layer_name, backdoor.x)
        report["backdoor_mean"] = backdoor_means.tolist()
    return report


def _markdown(report: dict) -> str:
    def fmt(value):
        return (
            "n/a"
            if value is None or (isinstance(value, float) and np.isnan(value))
            else f"{value:.3f}"
        )

    chosen = report["defense"]["chosen"]
    rows = [("original", report["original"]), ("pruning", report["pruning"])]
    if chosen != "pruning":
        rows.append((chosen.replace("_", "-"), report[chosen]))
    lines = [
        f"# Cleaning report: {report['model']}",
        "",
        f"Layer `{report['layer']}`: {report['activations']['channels']} channels, "
        f"{report['activations']['dormant_channels']} dormant on clean data; pruning "
        f"removed {len(report['pruning']['pruned'])} "
        f"(threshold {report['threshold']} points).",
        "",
        f"Defense: **{chosen}** (`{report['defense']['model_file']}`; requested "
        f"`{report['defense']['requested']}`): {report['defense']['why']}.",
        "",
        "| model | clean accuracy | attack success | robust accuracy |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {fmt(r['clean_acc'])} | {fmt(r['asr'])} | {fmt(r['robust_acc'])} |"
        for name, r in rows
    ]
    candidates = report["defense"].get("candidates")
    if candidates:
        lines += [
            "",
            "Candidates of `auto` (clean holdout only; the first qualifying in the "
            "protocol's priority is chosen):",
            "",
            "| defense | holdout accuracy | drop (points) | qualifies |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {fmt(row['holdout_acc'])} | {row['holdout_drop_points']:.1f} | "
            f"{'yes' if row['qualifies'] else 'no'} |"
            for name, row in candidates.items()
        ]
    if report["serving"]:
        params, flops = report["serving"]["params"], report["serving"]["flops"]
        lines += [
            "",
            f"Serving model: `{report['serving']['path']}` (stock TensorFlow), "
            f"{params[0]:,} -> {params[1]:,} parameters, {flops[0]:,} -> {flops[1]:,} "
            "multiply-adds.",
        ]
    return "\n".join(lines) + "\n"
