"""Per-test timings for bench_suite.py (plugin/_timings.py): pure logic, no VM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_microsandbox.guest.messages import Done, Report
from pytest_microsandbox.plugin._timings import (
    TIMINGS_ENV,
    StepTimer,
    check_timings_path,
    timer_for,
)

pytest_plugins = ["pytester"]


def _report(when: str, start: float, duration: float, subtest: bool = False) -> Report:
    data = {
        **{"$report_type": "TestReport", "nodeid": "t.py::x", "when": when, "outcome": "passed"},
        **{"start": start, "stop": start + duration, "duration": duration},
    }
    return Report("t.py::x", when, "passed", data, subtest)  # type: ignore[arg-type]


def test_off_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TIMINGS_ENV, raising=False)
    assert timer_for("t.py::x", "process") is None


def test_one_line_per_test_with_host_steps_and_guest_phases(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "timings.jsonl"
    monkeypatch.setenv(TIMINGS_ENV, str(path))
    for _ in range(2):
        timer = timer_for("t.py::x", "process")
        assert timer is not None
        timer.add("replay", 0.001)
        timer.add("replay", 0.002)  # a step met twice adds up
        timer.add("sent_at", 100.0)
        timer.add("done_at", 100.5)
        messages = [
            _report("setup", 100.1, 0.01),
            _report("call", 100.2, 5.0, subtest=True),  # a subtest's: not the phase
            _report("call", 100.2, 0.1),
            _report("teardown", 100.35, 0.05),
            Done(status=0),
        ]
        timer.guest(messages)
        timer.write()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2
    row = rows[0]
    assert row["nodeid"] == "t.py::x" and row["isolation"] == "process"
    assert row["replay"] == pytest.approx(0.003)
    assert (row["setup"], row["call"], row["teardown"]) == (0.01, 0.1, 0.05)
    assert row["guest_span"] == pytest.approx(0.3)
    assert row["handoff"] == pytest.approx(0.1)
    assert row["tail"] == pytest.approx(0.1)
    assert "sent_at" not in row and row["total"] >= 0


def test_reports_without_times_leave_the_guest_steps_out(tmp_path: Path) -> None:
    timer = StepTimer(str(tmp_path / "t.jsonl"), "t.py::x", "vm")
    report = Report("t.py::x", "setup", "passed", {"$report_type": "TestReport"})
    timer.guest([report])
    assert "setup" not in timer.steps and "guest_span" not in timer.steps


def test_an_absolute_path_or_none_passes_the_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(TIMINGS_ENV, raising=False)
    check_timings_path()
    monkeypatch.setenv(TIMINGS_ENV, str(tmp_path / "t.jsonl"))
    check_timings_path()


@pytest.mark.parametrize("value", ["1", "timings.jsonl", "../t.jsonl"])
def test_a_relative_path_is_refused_before_it_lands_in_the_project(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(TIMINGS_ENV, value)
    with pytest.raises(pytest.UsageError, match=r"absolute path, got .*/tmp/timings\.jsonl"):
        check_timings_path()


def test_the_plugin_refuses_it_at_configure(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TIMINGS_ENV, "1")
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*MICROSANDBOX_TIMINGS must name the file*got '1'*"])
    assert not (pytester.path / "1").exists()
