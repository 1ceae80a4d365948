"""Open a report in headless Chromium and read back what loaded, for the report tests.

Chromium's own ``--dump-dom`` runs the page's load handlers before printing the DOM, so a probe
script added to a copy of the page records what loaded (every image's ``naturalWidth``, the
sections, the load time) into the DOM. The same run writes a screenshot.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Screenshots are kept here (git-ignored) for a person to look at.
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

_PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const broken = images.filter((i) => !(i.complete && i.naturalWidth > 0));
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({
    images: images.length,
    broken: broken.length,
    first_broken: broken.slice(0, 5).map((i) => i.alt),
    load_ms: performance.now(),
    sections: [...document.querySelectorAll("section[id]")].map((s) => s.id),
    queries: document.querySelectorAll("article.query").length,
  });
  document.body.append(probe);
});
</script>"""


@dataclass(frozen=True)
class PageLoad:
    """What Chromium saw when it opened a page."""

    images: int
    broken: int
    first_broken: list[str]
    load_ms: float
    seconds: float
    sections: list[str]
    queries: int


def chromium() -> str:
    """The Chromium executable; skips the test when there is none, except in CI where it fails."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    reason = "chromium is not installed (apt-get install chromium) for the browser tests"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must run them")
    pytest.skip(reason)


def open_in_chromium(page: Path, screenshot: Path, workdir: Path) -> PageLoad:
    """Load ``page`` in headless Chromium, offline; return what loaded and save a screenshot."""
    executable = chromium()
    probed = workdir / f"{page.stem}-probed.html"
    text = page.read_text(encoding="utf-8")
    probed.write_text(text.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)
    argv = [
        executable,
        "--headless",
        "--no-sandbox",  # tests run as root in CI
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={workdir / 'chromium-profile'}",
        # Nothing may come from the network: the page must be self-contained.
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--window-size=1280,2400",
        f"--screenshot={screenshot}",
        "--dump-dom",
        probed.as_uri(),
    ]
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    seconds = time.perf_counter() - began
    match = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout)
    assert match, (
        f"chromium exited {done.returncode} without a probe result:\n{done.stderr[-2000:]}"
    )
    result = json.loads(html.unescape(match[1]))
    assert screenshot.is_file(), f"chromium wrote no screenshot:\n{done.stderr[-2000:]}"
    return PageLoad(seconds=seconds, **result)
