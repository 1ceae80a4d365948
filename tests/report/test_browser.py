"""The report in a real browser: headless Chromium loads it offline and every image decodes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from diffattr.report import write_report

from .browser import ARTIFACTS, chromium, open_in_chromium
from .helpers import digit_sets, write_heatmaps, write_lds, write_scores

SECTIONS = ["summary", "lds", "agreement", "queries", "figures", "settings"]
FIVE_METHODS = ["das", "dtrak", "nda", "pixel-cos", "trak"]


def test_report_opens_in_chromium_with_every_image(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train, queries = digit_sets(8, 60)
    scores = write_scores(run, ["das", "nda", "trak"], train, queries)
    write_heatmaps(run, scores["nda"], queries, train)
    write_lds(run / "lds.json", ["das", "nda", "trak"])
    page = write_report(run, train=train, queries=queries)

    loaded = open_in_chromium(page, ARTIFACTS / "report.png", tmp_path)

    assert loaded.broken == 0, f"images that did not load: {loaded.first_broken}"
    # 8 queries x (query + 3 methods x 10 thumbnails), 2 x 2 heatmaps, 3 grids, the LDS chart
    # in its section and among the figures.
    assert loaded.images == 8 * 31 + 4 + 3 + 2
    assert loaded.sections == SECTIONS
    assert loaded.queries == 8


def test_report_of_50_queries_and_5_methods_is_small_and_quick_to_open(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train, queries = digit_sets(50, 1000)
    write_scores(run, FIVE_METHODS, train, queries)
    write_lds(run / "lds.json", FIVE_METHODS)
    page = write_report(run, train=train, queries=queries, max_queries=50)
    size_mb = page.stat().st_size / 2**20

    loaded = open_in_chromium(page, ARTIFACTS / "report-50x5.png", tmp_path)

    print(
        f"50 x 5 report: {size_mb:.2f} MiB, load event after {loaded.load_ms:.0f} ms, "
        f"browser run {loaded.seconds:.1f} s, {loaded.images} images"
    )
    assert size_mb < 20
    assert loaded.load_ms < 10_000
    assert loaded.broken == 0, f"images that did not load: {loaded.first_broken}"
    assert loaded.images == 50 * (1 + 5 * 10) + 5 + 2
    assert loaded.queries == 50


def test_browser_tests_fail_in_ci_without_chromium(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run them"):
        chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        chromium()
