"""absl flags generated from settings dataclasses, so every setting has a flag and its default
and help live in one place (the dataclass).

    define_flags(defenses.PruningSettings)                       # --threshold, --layer, ...
    define_flags(defenses.FineTuneSettings, prefix="fine_tune_",
                 names={"max_epochs": "fine_tune_epochs", "patience": "patience"},
                 skip=("seed",))
    settings = from_flags(defenses.FineTuneSettings, prefix="fine_tune_", ...)

A field's flag is ``names[field]`` if given, else ``prefix + field``; its type comes from the
annotation (``bool``, ``int``, ``float``, ``str``, each optionally ``| None``, or a
``tuple[float, ...]`` given as a comma-separated list), its default
from the dataclass, its help from the ``Attributes:`` section of the class docstring.  Values
are checked by the class's own ``validate()`` when :func:`from_flags` builds it.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from absl import app, flags

__all__ = ["define_flags", "flag_names", "from_flags"]

_DEFINE = {
    bool: flags.DEFINE_bool,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    str: flags.DEFINE_string,
}


def _base_type(annotation: Any) -> tuple[type, bool]:
    """``(int, False)`` for ``int`` and ``int | None``; ``(float, True)`` for
    ``tuple[float, ...]`` (a comma-separated list flag); TypeError for anything else."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            annotation = args[0]
    sequence = typing.get_origin(annotation) is tuple
    if sequence:
        args = typing.get_args(annotation)
        if len(args) != 2 or args[1] is not Ellipsis or args[0] not in (int, float, str):
            raise TypeError(f"no flag type for {annotation!r}. Received: a field of that type")
        annotation = args[0]
    if annotation not in _DEFINE:
        raise TypeError(f"no flag type for {annotation!r}. Received: a field of that type")
    return annotation, sequence


def _define_sequence(
    kind: type, flag: str, default: Any, text: str, flag_values: flags.FlagValues
) -> None:
    """A comma-separated flag whose items parse as ``kind`` (e.g. ``--rates=1e-3,3e-3``)."""
    parser = flags.ListParser()

    class _Items(flags.ArgumentParser):
        def parse(self, argument):
            items = parser.parse(argument) if isinstance(argument, str) else list(argument)
            try:
                return tuple(kind(item) for item in items)
            except ValueError as error:
                raise ValueError(
                    f"expected comma-separated {kind.__name__} values. Received: {argument!r}"
                ) from error

        def flag_type(self):
            return f"comma-separated list of {kind.__name__}"

    flags.DEFINE(
        _Items(),
        flag,
        default,
        text,
        flag_values=flag_values,
        serializer=flags.CsvListSerializer(","),
    )


def _field_help(cls: type) -> dict[str, str]:
    """Field name -> its description in the class docstring's ``Attributes:`` section: lines
    at the section's first indentation start an entry (``a, b: text`` describes both), deeper
    lines continue it."""
    lines = (cls.__doc__ or "").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "Attributes:"]
    if not starts:
        return {}
    helps: dict[str, str] = {}
    current: list[str] = []
    indent = None
    for line in lines[starts[0] + 1 :]:
        if not line.strip():
            break
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        entry = re.match(r"^\s*([\w, ]+):\s*(.*)$", line) if depth == indent else None
        if entry:
            current = [name.strip() for name in entry.group(1).split(",")]
            helps.update({name: entry.group(2).strip() for name in current})
        elif depth > indent:
            for name in current:
                helps[name] = f"{helps[name]} {line.strip()}".strip()
        else:
            break
    return helps


def flag_names(
    cls: type, prefix: str = "", names: Mapping[str, str] | None = None, skip: Iterable[str] = ()
) -> dict[str, str]:
    """Field name -> flag name, for the fields that get a flag."""
    names = dict(names or {})
    skip = set(skip)
    return {
        f.name: names.get(f.name, prefix + f.name)
        for f in dataclasses.fields(cls)
        if f.name not in skip
    }


def define_flags(
    cls: type,
    prefix: str = "",
    names: Mapping[str, str] | None = None,
    skip: Iterable[str] = (),
    flag_values: flags.FlagValues = flags.FLAGS,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Defines one flag per field of the dataclass ``cls``; returns field -> flag name.

    ``defaults`` overrides a field's default for the flag only (e.g. a script whose default
    differs), and is the one place such a difference may be written.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"define_flags needs a dataclass. Received: {cls!r}")
    hints = typing.get_type_hints(cls)
    helps = _field_help(cls)
    instance = cls()
    mapping = flag_names(cls, prefix, names, skip)
    for field, flag in mapping.items():
        kind, sequence = _base_type(hints[field])
        default = (defaults or {}).get(field, getattr(instance, field))
        # The first sentence: the docstring says the rest.
        text = re.split(r"(?<=[.;])\s", helps.get(field, ""), maxsplit=1)[0] or field
        text = f"{text} ({cls.__name__}.{field})"
        if sequence:
            _define_sequence(kind, flag, default, text, flag_values)
        else:
            _DEFINE[kind](flag, default, text, flag_values=flag_values)
    return mapping


def from_flags(
    cls: type,
    prefix: str = "",
    names: Mapping[str, str] | None = None,
    skip: Iterable[str] = (),
    flag_values: flags.FlagValues = flags.FLAGS,
    **fixed: Any,
) -> Any:
    """The ``cls`` instance the parsed flags describe (``fixed`` fields set by the caller,
    e.g. ``seed``), validated by its ``validate()`` when it has one (ValueError if bad)."""
    values = {
        field: flag_values[flag].value
        for field, flag in flag_names(cls, prefix, names, skip).items()
    }
    values.update(fixed)
    settings = cls(**values)
    validate = getattr(settings, "validate", None)
    if validate is not None:
        validate()
    return settings


def define_data_and_strategy_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the flags every training command shares: ``--source`` and ``--data_dir`` (the
    task's data, see :func:`fineprune_tf.data.load`), ``--strategy`` and ``--cpu_replicas``
    (:func:`fineprune_tf.distribute.make_strategy`)."""
    flags.DEFINE_string(
        "source", "default", "Data source (see fineprune_tf.data.load).", flag_values=flag_values
    )
    flags.DEFINE_string(
        "data_dir", None, "Data directory for a non-default source.", flag_values=flag_values
    )
    flags.DEFINE_enum(
        "strategy",
        "default",
        ["default", "mirrored", "multi_worker"],
        "tf.distribute strategy (multi_worker reads TF_CONFIG).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "cpu_replicas",
        0,
        "Split the CPU into this many replicas (mirrored).",
        flag_values=flag_values,
    )


def run_app(main: Callable[[list[str]], int], argv: list[str], command_module: str) -> None:
    """``app.run(main, argv=argv)``, with ``--help`` listing the command's flags.

    absl's ``--help`` lists the key flags of the program's main module (``sys.argv[0]``); a
    command's flags are defined in ``command_module`` and, generated from the settings
    dataclasses, in this module, so they are registered as the main module's key flags too.
    """
    program = sys.argv[0]
    for module in (command_module, __name__):
        for flag in flags.FLAGS.get_key_flags_for_module(module):
            flags.FLAGS.register_key_flag_for_module(program, flag)
    app.run(main, argv=argv)
