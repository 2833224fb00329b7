"""The third-party BadNets script is independent of fineprune_tf and does what it says."""

import ast
import pathlib

import numpy as np

from scripts import third_party_badnets as badnets


def test_the_third_party_attack_imports_nothing_from_this_project():
    tree = ast.parse(pathlib.Path(badnets.__file__).read_text())
    modules = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules <= {"__future__", "argparse", "sys", "keras", "numpy"}, modules


def test_badnets_poisons_the_stated_fraction_with_the_corner_square():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 0.5, (200, 12, 12, 3)).astype(np.float32)
    y = np.arange(200) % 4
    px, py = badnets.poison(x, y, seed=0)
    changed = np.flatnonzero(np.any(px != x, axis=(1, 2, 3)))
    assert len(changed) == int(badnets.POISON_RATE * 200)
    assert np.all(py[changed] == badnets.TARGET) and np.all(y[changed] != badnets.TARGET)
    unchanged = np.setdiff1d(np.arange(200), changed)
    np.testing.assert_array_equal(py[unchanged], y[unchanged])
    square = px[changed][:, -badnets.PATCH - 1 : -1, -badnets.PATCH - 1 : -1, :]
    assert np.all(square == 1.0)
    np.testing.assert_array_equal(px[changed][:, :6], x[changed][:, :6])  # Only the corner.
    assert x.max() <= 0.5  # The input was copied, not stamped in place.
