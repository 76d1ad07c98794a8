"""The log line format of DESIGN.md, JSON lines, and the daily file."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from smart_monitor.outputs.log import make_logger


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 29, 23, 59, 59, 123456, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_text_line_matches_the_contract(tmp_path: Path) -> None:
    clock = Clock()
    err = io.StringIO()
    log, _ = make_logger(tmp_path, "text", "info", stderr=err, clock=clock)
    log.warning(
        "Created snapshot",
        step=17500,
        triggers=["loss_zscore_43.20"],
        severity="warning",
        checkpoint="checkpoint-17500",
        path="snapshots/anomaly_20261129_170000_loss_zscore_43.20",
    )
    want = (
        "2026-11-29T23:59:59.123Z warning Created snapshot step=17500 triggers=loss_zscore_43.20"
        " severity=warning checkpoint=checkpoint-17500"
        " path=snapshots/anomaly_20261129_170000_loss_zscore_43.20\n"
    )
    assert (tmp_path / "smart_monitor_20261129.log").read_text() == want
    assert err.getvalue() == want


def test_values_with_spaces_are_quoted_and_none_dropped(tmp_path: Path) -> None:
    err = io.StringIO()
    log, _ = make_logger(None, "text", "info", stderr=err, clock=Clock())
    log.info("Snapshot failed", step=3, triggers=["a_1", "b_2"], detail='no "space" left', x=None)
    line = err.getvalue().strip()
    assert line.endswith('step=3 triggers=a_1,b_2 detail="no \\"space\\" left"')
    assert re.search(r"triggers=([^ ]*)", line).group(1) == "a_1,b_2"  # type: ignore[union-attr]


def test_level_filter(tmp_path: Path) -> None:
    err = io.StringIO()
    log, _ = make_logger(None, "text", "warning", stderr=err, clock=Clock())
    log.info("Checkpoint complete", step=1)
    log.error("Snapshot failed", step=2)
    assert err.getvalue().count("\n") == 1 and "Snapshot failed" in err.getvalue()


def test_json_lines_carry_the_same_event(tmp_path: Path) -> None:
    log, _ = make_logger(tmp_path, "json", "info", stderr=None, clock=Clock())
    log.critical("Created snapshot", step=5, triggers=["loss_nonfinite"], severity="critical")
    event = json.loads((tmp_path / "smart_monitor_20261129.log").read_text())
    assert event == {
        "event": "Created snapshot",
        "step": 5,
        "triggers": ["loss_nonfinite"],
        "severity": "critical",
        "timestamp": "2026-11-29T23:59:59.123Z",
        "level": "critical",
    }


def test_daily_file_follows_the_utc_date_and_reopens(tmp_path: Path) -> None:
    clock = Clock()
    log, daily = make_logger(tmp_path, "text", "info", stderr=None, clock=clock)
    log.info("Started")
    clock.now += timedelta(seconds=1)  # midnight UTC
    log.info("Detected anomaly", step=1)
    assert (tmp_path / "smart_monitor_20261129.log").read_text().count("\n") == 1
    assert (tmp_path / "smart_monitor_20261130.log").read_text().count("\n") == 1
    (tmp_path / "smart_monitor_20261130.log").rename(tmp_path / "rotated.log")  # logrotate
    assert daily is not None
    daily.reopen()  # SIGHUP
    log.info("Stopped")
    assert "Stopped" in (tmp_path / "smart_monitor_20261130.log").read_text()
    assert "Stopped" not in (tmp_path / "rotated.log").read_text()
