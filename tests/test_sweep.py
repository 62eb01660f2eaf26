"""flwr_ext.sweep.run_isolated: which cells count as finished."""

from __future__ import annotations

import sys

from flwr_ext import sweep


def test_a_failed_rerun_is_not_taken_for_finished(tmp_path) -> None:
    """A cell finished by an earlier run and re-run by a child that fails stays missing."""
    done = sweep.cell_dir(tmp_path, "a", 0) / sweep.DONE
    done.parent.mkdir(parents=True)
    done.write_text("{}")

    def fail(cells: list[str]) -> list[str]:
        return [sys.executable, "-c", "raise SystemExit(1)"]

    wall = sweep.run_isolated(fail, ["a"], 0, tmp_path, timeout=60, attempts=1)
    assert wall != wall  # NaN: the cell is still missing
    assert not sweep.is_done(tmp_path, "a", 0)


def test_a_child_that_finishes_its_cells(tmp_path) -> None:
    def finish(cells: list[str]) -> list[str]:
        paths = [str(sweep.cell_dir(tmp_path, c, 0) / sweep.DONE) for c in cells]
        code = "import pathlib, sys\nfor p in sys.argv[1:]:\n"
        code += "    pathlib.Path(p).parent.mkdir(parents=True, exist_ok=True)\n"
        code += "    pathlib.Path(p).write_text('{}')\n"
        return [sys.executable, "-c", code, *paths]

    wall = sweep.run_isolated(finish, ["a", "b"], 0, tmp_path, timeout=60)
    assert wall >= 0
    assert sweep.is_done(tmp_path, "a", 0) and sweep.is_done(tmp_path, "b", 0)
