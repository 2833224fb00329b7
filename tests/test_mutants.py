"""The mutation check's table stays pointed at real code and real tests (scripts/mutants.py):
a target that moved must fail here, not silently stop mutating anything."""

from pathlib import Path

import pytest

from scripts import mutants

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda m: m.name)
def test_every_mutant_targets_existing_code_and_tests(mutant):
    owner, attribute = mutants.resolve(mutant.target)
    original = getattr(owner, attribute)
    assert callable(original)
    assert mutant.replacement(original) is not original
    for selection in mutant.tests:
        path, _, name = selection.partition("::")
        assert (REPO / path).is_file(), selection
        assert f"def {name.split('[')[0]}(" in (REPO / path).read_text(), selection


def test_a_moved_target_is_an_error_not_a_survivor():
    with pytest.raises(LookupError, match="repoint it"):
        mutants.resolve("fineprune_tf.no_such_module.shrink")
    with pytest.raises(LookupError, match="repoint it"):
        mutants.resolve("fineprune_tf.export.no_such_function")


def test_the_mutant_names_are_unique():
    assert len(mutants.BY_NAME) == len(mutants.MUTANTS)
