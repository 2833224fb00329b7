"""fineprune_tf.leaderboard_workers: the grid split into shards by attacked model, run in
parallel processes and merged back in the grid's order (no TensorFlow training here)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from fineprune_tf import leaderboard, leaderboard_workers, reporting

SETTINGS = leaderboard.Settings.quick()


@pytest.mark.parametrize("count", [2, 3, 5])
def test_shards_partition_the_grid_by_attacked_model_and_balance_it(count):
    grid = leaderboard.Grid.default()
    every = list(grid.cells())
    shards = [grid.shard_cells(index, count) for index in range(count)]
    assert sorted(map(repr, sum(shards, []))) == sorted(map(repr, every))  # each cell once
    owner = {}
    for index, cells in enumerate(shards):
        assert cells == [cell for cell in every if cell in cells]  # the grid's run order
        for cell in cells:
            assert owner.setdefault((cell.task, cell.attack, cell.seed), index) == index
    models = len(owner)
    sizes = [len({(c.task, c.attack, c.seed) for c in cells}) for cells in shards]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == models
    assert grid.shard_cells(0, 1) == every
    with pytest.raises(ValueError, match="Received: 2/2"):
        grid.shard_cells(2, 2)


def _write_shard(folder, rows, cpu):
    reporting.atomic_write_json(
        folder / "leaderboard.json",
        {"settings": SETTINGS.to_dict(), "rows": rows, "cpu_seconds": cpu, "wall_seconds": 7.0},
    )


def test_merge_puts_the_shards_rows_in_grid_order_and_adds_their_cpu(tmp_path):
    grid = leaderboard.Grid(("mnist",), ("badnets", "blended"), ("none", "clp"), (0, 1))
    folders = leaderboard_workers.shard_dirs(tmp_path, 2)
    for index, folder in enumerate(folders):
        folder.mkdir(parents=True)
        cells = grid.shard_cells(index, 2)[:3]  # shard 1 unfinished: its last cell is missing
        _write_shard(folder, [{"key": c.key(SETTINGS), "cell": repr(c)} for c in cells], 10.0)
    rows, totals = leaderboard_workers.merge_shards(tmp_path, 2, grid, SETTINGS)
    order = [cell.key(SETTINGS) for cell in grid.cells()]
    assert [row["key"] for row in rows] == [key for key in order if key in {r["key"] for r in rows}]
    assert len(rows) == 6 and totals["cells_missing"] == 2
    assert totals["cpu_seconds"] == 20.0 and totals["workers"] == 2


def test_merge_refuses_a_shard_computed_with_other_settings(tmp_path):
    grid = leaderboard.Grid(("mnist",), ("badnets",), ("none",), (0, 1))
    folder = leaderboard_workers.shard_dirs(tmp_path, 2)[0]
    folder.mkdir(parents=True)
    reporting.atomic_write_json(folder / "leaderboard.json", {"settings": {"x": 1}, "rows": []})
    with pytest.raises(leaderboard.SettingsMismatchError):
        leaderboard_workers.merge_shards(tmp_path, 2, grid, SETTINGS)


_FAKE_SHARD = textwrap.dedent(
    """
    import json, pathlib, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
    index, count = map(int, args["shard"].split("/"))
    folder = pathlib.Path(args["output_dir"])
    (folder / "leaderboard.json").write_text(json.dumps({"rows": [{"shard": index}]}))
    print("cache", args["cache_dir"], "nofigures" in " ".join(sys.argv))
    sys.exit(3 if args.get("fail") == str(index) else 0)
    """
)


def test_run_shards_starts_one_process_per_shard_and_reports_a_failed_one(tmp_path):
    script = tmp_path / "fake_shard.py"
    script.write_text(_FAKE_SHARD)
    progress = []
    leaderboard_workers.run_shards(
        [sys.executable, str(script)], 2, tmp_path / "out", tmp_path / "cache",
        on_progress=progress.append, poll_seconds=0.05,
    )  # fmt: skip
    for index, folder in enumerate(leaderboard_workers.shard_dirs(tmp_path / "out", 2)):
        assert json.loads((folder / "leaderboard.json").read_text())["rows"] == [{"shard": index}]
        log = (folder / "log.txt").read_text().split()
        assert log == ["cache", str(tmp_path / "cache"), "True"]
    assert all(0 <= done <= 2 for done in progress)
    with pytest.raises(RuntimeError, match=r"shard 1 exited with status 3 \(see .*1-of-2/log.txt"):
        leaderboard_workers.run_shards(
            [sys.executable, str(script), "--fail=1"], 2, tmp_path / "again", tmp_path / "cache",
            poll_seconds=0.05,
        )  # fmt: skip
