"""The ``flwr-ext`` command from anywhere: bench, report, stop-superlink (issue 15, items 8, 9)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flwr_ext import cli

ROOT = Path(__file__).resolve().parents[1]


def _run(argv: list[str], cwd: Path, capsys) -> tuple[int, str, str]:
    old = Path.cwd()
    os.chdir(cwd)
    try:
        rc = cli.main(argv)
    finally:
        os.chdir(old)
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- bench -------------------------------------------------------------------------------------
def test_bench_finds_the_checkout_benchmarks_from_anywhere(tmp_path) -> None:
    assert cli.find_bench_dir() is not None
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        found = cli.find_bench_dir()
    finally:
        os.chdir(old)
    assert found == ROOT / "bench"
    assert any(found.glob("bench_*.py"))


def test_bench_says_what_it_expects(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli, "CHECKOUT", tmp_path / "wheel-install")  # no bench/ anywhere
    rc, _, err = _run(["bench"], tmp_path, capsys)
    assert rc == 2
    assert "source checkout" in err and "--dir" in err
    rc, _, err = _run(["bench", "--dir", str(ROOT / "bench"), "--only", "nope"], tmp_path, capsys)
    assert rc == 2 and "matching 'nope'" in err


def test_bench_scripts_see_their_own_argv(tmp_path, capsys) -> None:
    (tmp_path / "bench_echo.py").write_text("import sys\nprint('argv', sys.argv[1:])\n")
    rc, out, _ = _run(["bench", "--dir", str(tmp_path)], tmp_path, capsys)
    assert rc == 0 and "argv []" in out


# -- report ------------------------------------------------------------------------------------
def test_report_every_kind_of_app_output_and_clear_errors(tmp_path, capsys) -> None:
    good = tmp_path / "fedbuff.json"
    good.write_text(json.dumps({"evaluate_metrics_serverapp": {"0": {"a": 0.1}, "2": {"a": 0.9}}}))
    counters = tmp_path / "fedbuff-counters.json"
    counters.write_text(
        json.dumps(
            {
                "counters": {"updates-accepted": 12, "jobs-sent": 14},
                "reasons": {"stale": 2},
                "stop_reason": "num_rounds",
            }
        )
    )
    summary = tmp_path / "results.json"
    summary.write_text(json.dumps({"config": {}, "rounds": [{"round": 1, "eval-loss": 2.5}]}))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    missing = tmp_path / "missing.json"

    rc, out, err = _run(["report", str(good), str(counters), str(summary)], tmp_path, capsys)
    assert rc == 0, err
    assert "2 evaluations, last: {'a': 0.9}" in out
    assert "updates-accepted 12" in out and "stale 2" in out and "num_rounds" in out
    assert "1 rounds, last: {'round': 1, 'eval-loss': 2.5}" in out

    rc, out, err = _run(["report", str(missing), str(bad), str(other)], tmp_path, capsys)
    assert rc == 1
    assert "Traceback" not in out + err
    assert f"{missing}: no such file" in err
    assert f"{bad}: not JSON" in err and "line 1" in err
    assert f"{other}: not a result file flwr-ext knows; expected" in err


# -- stop-superlink ----------------------------------------------------------------------------
def _fake_superlink(bin_dir: Path, home: Path) -> subprocess.Popen:
    """A process whose command line is that of the SuperLink `flwr run` starts for ``home``."""
    script = bin_dir / "flower-superlink"
    if not script.exists():
        script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(120)\n")
        script.chmod(0o755)
    log = home / "local-superlink" / "superlink.log"
    return subprocess.Popen(
        [str(script), "--insecure", "--simulation", "--log-file", str(log)],
        start_new_session=True,
    )


def test_stop_superlink_stops_only_this_homes_superlink(tmp_path, capsys) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mine, other = tmp_path / "mine", tmp_path / "other"
    a, b = _fake_superlink(bin_dir, mine), _fake_superlink(bin_dir, other)
    try:
        for _ in range(50):  # the interpreter replaced the shebang line
            if cli.local_superlink_pids(mine) and cli.local_superlink_pids(other):
                break
            time.sleep(0.1)
        assert cli.local_superlink_pids(mine) == [a.pid]
        rc, out, _ = _run(["stop-superlink", "--flwr-home", str(mine)], tmp_path, capsys)
        assert rc == 0 and f"pid {a.pid}" in out
        assert a.wait(timeout=10) is not None
        assert b.poll() is None, "another home's SuperLink was stopped"
        rc, out, _ = _run(["stop-superlink", "--flwr-home", str(mine)], tmp_path, capsys)
        assert rc == 0 and "no local SuperLink" in out
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_no_pkill_or_killall_in_the_project() -> None:
    pattern = re.compile(r"\b(pkill|killall)\b")
    hits = []
    for path in [
        ROOT / "Makefile",
        *(ROOT / "flwr_ext").rglob("*.py"),
        *ROOT.glob("tests/**/*.py"),
    ]:
        if path.resolve() == Path(__file__).resolve():
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, hits
    make = (ROOT / "Makefile").read_text()
    assert "flwr-ext stop-superlink" in make


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_local_superlink_pids_ignores_other_commands(tmp_path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(30)",
            "flower-superlink",
            "--log-file",
            str(tmp_path / "local-superlink" / "superlink.log"),
        ],  # fmt: skip
    )
    try:
        time.sleep(0.3)
        assert cli.local_superlink_pids(tmp_path) == []
    finally:
        proc.kill()
        proc.wait()
