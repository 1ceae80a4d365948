"""The demo end to end: trains unet-tiny on the digits, checks the samples look like digits.

Slow (about 10 minutes on 2 CPU cores): run with ``make test-all`` or ``pytest -m slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffattr.cli import main


@pytest.mark.slow
def test_demo_samples_are_recognisable_digits(tmp_path: Path) -> None:
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    figures = summary["class_confidence"]
    assert figures["generated"] >= 0.7
    assert figures["held-out real"] >= 0.85
    assert figures["noise"] <= 0.45
    assert (tmp_path / "samples" / "grid.png").is_file()
    assert (tmp_path / "attribution" / "top.png").is_file()
    top = json.loads((tmp_path / "attribution" / "top.json").read_text())["top5"]
    assert len(top) == 64
    assert all(len(ids) == 5 for ids in top.values())
    assert summary["report"] == str(tmp_path / "report.html")
    assert (tmp_path / "report" / "top-das.png").is_file()
    assert '<article class="query" id="query-49">' in (tmp_path / "report.html").read_text()
