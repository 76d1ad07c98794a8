"""``report``: the page is written by the real command and rendered by a real headless
Chromium, which must decode every plot. No Chromium is a failure, not a skip: ``make
test`` installs it."""

from __future__ import annotations

import html
import html.parser
import json
import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from test_listing import replayed_run

from smart_monitor.tools.report import _reduce, load_series
from smart_monitor.triggers import kind_of, stats_label

PLOTS = ("plot-loss", "plot-lr", "plot-accuracy")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return replayed_run(tmp_path_factory.mktemp("report"))


def sm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smart_monitor", *map(str, args)],
        capture_output=True, text=True, check=True, timeout=120,
    )


class Images(html.parser.HTMLParser):
    """Every ``<img>``'s attributes, by id."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, dict[str, str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            a = {k: v or "" for k, v in attrs}
            self.images[a.get("id", "")] = a


def images(page: str) -> dict[str, dict[str, str]]:
    parser = Images()
    parser.feed(page)
    return parser.images


def chromium_dom(page: Path, profile: Path) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed: `make test` installs it (apt-get install chromium)"
    done = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return done.stdout


def test_report_renders_every_plot_in_chromium(run: tuple[Path, Path], tmp_path: Path) -> None:
    metrics, out = run
    assert sm("report", "--output", out, "--metrics", metrics).stdout.strip() == (
        f"wrote {out / 'report.html'}"
    )
    page = out / "report.html"
    written = images(page.read_text())
    snapshot_plots = {f"snap-{n}" for n in range(len(list((out / "snapshots").iterdir())))}
    assert set(written) == set(PLOTS) | snapshot_plots
    for img in written.values():  # self-contained: every image inline
        assert img["src"].startswith("data:image/png;base64,")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.read_text())

    rendered = images(chromium_dom(page, tmp_path / "profile"))
    steps = sorted(
        json.loads((p / "metadata.json").read_text())["step"]
        for p in (out / "snapshots").iterdir()
    )
    for plot in PLOTS:  # the browser decoded the image: onload stored its natural width
        assert rendered[plot].get("data-rendered") == "900", plot
        assert sorted(map(int, rendered[plot]["data-snapshot-steps"].split(","))) == steps
    for plot in snapshot_plots:  # each snapshot's loss_history.png, beside its explanation
        assert rendered[plot].get("data-rendered") == "900", plot


def test_report_explains_each_snapshot_beside_its_plot(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    metrics, out = run
    target = tmp_path / "explained.html"
    sm("report", "--output", out, "--metrics", metrics, "--html", target)
    blocks = re.findall(r'<div class="snap" id="explain-\d+">(.*?)</div></div>', target.read_text(),
                        re.S)
    metas = sorted((json.loads((p / "metadata.json").read_text()) for p in
                    (out / "snapshots").iterdir()), key=lambda m: m["created_at"])
    assert len(blocks) == len(metas) >= 3
    for block, meta in zip(blocks, metas, strict=True):
        assert block.startswith('<img class="snap-plot"')
        assert f"{', '.join(meta['triggers'])} at step {meta['step']}" in block
        explanation = meta["explanation"]  # the same words as the snapshot's metadata
        assert html.escape(explanation["meaning"]) in block
        assert html.escape(explanation["rollback"]) in block


def test_report_tables_and_links_from_elsewhere(run: tuple[Path, Path], tmp_path: Path) -> None:
    metrics, out = run
    target = tmp_path / "pages" / "run.html"
    sm("report", "--output", out, "--metrics", metrics, "--html", target)
    page = target.read_text()
    names = {p.name for p in (out / "snapshots").iterdir()}
    links = re.findall(r"href='([^']+)'", page)
    assert {Path(link).parent.name for link in links} == names
    for link in links:  # relative to the page, wherever it was written
        assert (target.parent / link).resolve().is_file()
    stats = re.search(r'<table id="stats">(.*?)</table>', page, re.S)
    assert stats is not None
    rows = re.findall(r"<td class=\"n\">(\d+)</td><td>([^<]+)</td>", stats.group(1))
    kinds = Counter(
        stats_label(kind_of(t))
        for p in (out / "snapshots").iterdir()
        for t in json.loads((p / "metadata.json").read_text())["triggers"]
    )
    assert {k: int(n) for n, k in rows} == kinds
    assert kinds["loss_nonfinite"] == 1  # the NaN at step 900


def test_report_reads_trainer_state_json(tmp_path: Path) -> None:
    state = tmp_path / "trainer_state.json"
    history = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-4} for s in range(1, 40)]
    history += [{"step": 39, "eval_loss": 0.4, "eval_accuracy": 0.8},
                {"step": 39, "train_runtime": 10.0, "train_loss": 0.3}]
    state.write_text(json.dumps({"global_step": 39, "log_history": history}))
    series = load_series(state, {}, 1 << 20)
    assert len(series.loss) == 39 and series.accuracy == [(39, 0.8)]
    sm("report", "--metrics", state, "--output", tmp_path / "out")
    written = images((tmp_path / "out" / "report.html").read_text())
    assert set(written) == set(PLOTS)


def test_malformed_lines_are_counted_not_plotted(tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    metrics.write_bytes(b'{"step": 1, "loss": 1.0}\n{oops\n{"step": 2, "loss": NaN}\n')
    series = load_series(metrics, {}, 1 << 20)
    assert (series.records, series.malformed) == (2, 1)
    assert _reduce(series.loss) == ([1], [1.0])  # NaN is not drawn


def test_a_one_step_spike_survives_the_reduction() -> None:
    points = [(s, 1.0 + 0.001 * math.sin(s)) for s in range(1_000_000)]
    points[777_777] = (777_777, 50.0)
    xs, ys = _reduce(points)
    assert len(xs) <= 4000 and max(ys) == 50.0 and xs[ys.index(50.0)] == 777_777
