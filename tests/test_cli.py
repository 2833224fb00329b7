"""The ``fineprune`` console command and the flags generated from the settings dataclasses."""

import dataclasses
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest
from absl import flags

from fineprune_tf import cli
from fineprune_tf.attacks import AttackSettings
from fineprune_tf.cli import flags as cli_flags
from fineprune_tf.defenses import FineTuneSettings, FmpSettings, PruningSettings

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_console_script_points_at_the_dispatcher():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["fineprune"].partition(":")
    assert (module, function) == ("fineprune_tf.cli", "main")
    assert cli.main is getattr(sys.modules[module], function)


def test_help_lists_every_subcommand_and_bad_subcommands_exit_2(capsys):
    assert cli.main(["fineprune", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fine-prune", "clean", "attack", "benchmark"):
        assert f"  {name} " in out
    assert cli.main(["fineprune"]) == 2
    assert "usage: fineprune" in capsys.readouterr().err
    assert cli.main(["fineprune", "prune-everything", "--task=mnist"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown subcommand 'prune-everything'" in err[0]


@pytest.mark.slow  # importing fineprune_tf imports TensorFlow: ~10 s idle, minutes loaded
@pytest.mark.subprocess
def test_python_dash_m_fineprune_cli_help():
    result = subprocess.run(
        [sys.executable, "-m", "fineprune_tf.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0 and "usage: fineprune SUBCOMMAND" in result.stdout
    for name in ("fine-prune", "clean", "attack", "benchmark"):
        assert f"  {name} " in result.stdout


@pytest.mark.slow  # one child process importing TensorFlow
@pytest.mark.subprocess
def test_subcommand_help_lists_its_own_and_its_generated_flags():
    # absl's --help lists the main module's key flags only: run_app registers the command's.
    result = subprocess.run(
        [sys.executable, "-m", "fineprune_tf.cli", "attack", "--help"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert "Traceback" not in result.stderr, result.stderr[-2000:]  # absl's --help exits 1
    for flag in ("--attack:", "--strategy:", "--poison_rate:", "--prune_fraction:"):
        assert flag in result.stdout, result.stdout[-3000:]


@pytest.mark.parametrize("cls", [AttackSettings, PruningSettings, FineTuneSettings, FmpSettings])
def test_generated_flags_cover_every_field_with_its_default(cls):
    values = flags.FlagValues()
    mapping = cli_flags.define_flags(cls, prefix="x_", flag_values=values)
    assert set(mapping) == {f.name for f in dataclasses.fields(cls)}
    values(["prog"])
    assert cli_flags.from_flags(cls, prefix="x_", flag_values=values) == cls()
    for field, flag in mapping.items():
        assert values[flag].help.endswith(f"({cls.__name__}.{field})")


def test_generated_flags_parse_validate_and_rename():
    values = flags.FlagValues()
    naming = dict(
        prefix="fine_tune_",
        skip=("seed",),
        names={"max_epochs": "fine_tune_epochs", "patience": "patience"},
    )
    cli_flags.define_flags(FineTuneSettings, flag_values=values, **naming)
    values(
        [
            "prog",
            "--fine_tune_epochs=7",
            "--patience=9",
            "--fine_tune_rule=last",
            "--fine_tune_learning_rate=0.01",
        ]
    )
    settings = cli_flags.from_flags(FineTuneSettings, flag_values=values, seed=4, **naming)
    assert settings == FineTuneSettings(
        max_epochs=7, patience=9, rule="last", learning_rate=0.01, seed=4
    )
    assert "fine_tune_seed" not in values
    values["fine_tune_rule"].value = "magic"
    with pytest.raises(ValueError, match="rule must be one of"):
        cli_flags.from_flags(FineTuneSettings, flag_values=values, **naming)


def test_tuple_fields_are_comma_separated_list_flags():
    values = flags.FlagValues()
    cli_flags.define_flags(FineTuneSettings, prefix="fine_tune_", flag_values=values)
    values(["prog", "--fine_tune_learning_rates=0.001,1e-2"])
    settings = cli_flags.from_flags(FineTuneSettings, prefix="fine_tune_", flag_values=values)
    assert settings.learning_rates == (0.001, 0.01)
    assert values["fine_tune_learning_rates"].default == FineTuneSettings.learning_rates
    with pytest.raises(flags.IllegalFlagValueError, match="comma-separated float"):
        values["fine_tune_learning_rates"].parse("0.001,fast")


def test_fine_prune_command_has_a_flag_for_every_setting_and_the_old_names():
    from fineprune_tf.cli import fine_prune

    for cls, naming in fine_prune.SETTINGS.items():
        for field, flag in cli_flags.flag_names(cls, **naming).items():
            assert flag in flags.FLAGS, (cls.__name__, field)
    for name in (
        "threshold",
        "layer",
        "engine",
        "epochs",
        "learning_rate",
        "batch_size",
        "prune_fraction",
        "preset",
        "fine_tune_epochs",
        "fine_tune_learning_rate",
        "patience",
        "noise_stddev",
        "fmp_fraction",
        "fmp_epsilon",
        "defense",
        "tolerance",
    ):
        assert name in flags.FLAGS, name
    assert flags.FLAGS["threshold"].default == PruningSettings.threshold
    assert flags.FLAGS["prune_fraction"].default == AttackSettings.prune_fraction
    assert flags.FLAGS["fmp_fraction"].default == FmpSettings.prune_fraction


def test_a_refusal_mid_experiment_is_one_error_line(tmp_path, monkeypatch, capsys):
    from fineprune_tf import experiment
    from fineprune_tf.cli import fine_prune

    def refuse(*args, **kwargs):
        raise ValueError("clean accuracy before pruning is 0.025,\n at chance")

    monkeypatch.setattr(experiment, "run", refuse)
    flags.FLAGS(["fineprune fine-prune", "--task=mnist", f"--output_dir={tmp_path / 'run'}"])
    try:
        assert fine_prune.main([]) == 2
    finally:
        flags.FLAGS.unparse_flags()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: clean accuracy before pruning is 0.025, at chance (finished stages "
        "are kept: fix the cause, then --resume)"
    ]
