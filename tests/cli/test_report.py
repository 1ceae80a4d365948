from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from diffattr._io import read_json
from diffattr.cli import main
from diffattr.methods import Scores, record_run
from diffattr.methods._run import RUN_FILE
from tests.report.browser import ARTIFACTS, open_in_chromium
from tests.report.helpers import write_lds

from .test_cli import TRAIN_ARGS, _expect_error, _write_npz

FAST = ["--timesteps", "1", "--proj-dim", "16", "--quiet", "--device", "cpu"]
NDA = ["--nda-timesteps", "50,150", "--patch-size", "1", "--top-k", "none", "--heatmaps", "2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report-cli")
    data = _write_npz(root / "toy.npz", n=30)
    assert main(["train", "--data", str(data), "--out", str(root / "ckpt"), *TRAIN_ARGS]) == 0
    return root


@pytest.fixture(scope="module")
def run(root: Path) -> Path:
    """Three methods attributed into one run directory, as a user would."""
    out = root / "run"
    base = ["attribute", str(root / "ckpt"), "--out", str(out)]
    assert main([*base, "--method", "das", *FAST]) == 0
    assert main([*base, "--method", "nda", *NDA, "--quiet"]) == 0
    assert main([*base, "--method", "pixel-cos", "--quiet"]) == 0
    return out


def test_attribute_records_where_the_images_are(root: Path, run: Path) -> None:
    doc = read_json(run / RUN_FILE)
    assert sorted(doc["methods"]) == ["das", "nda", "pixel-cos"]
    das = doc["methods"]["das"]
    assert das["checkpoints"] == [str((root / "ckpt").resolve())]
    assert das["queries"] == "held-out"
    assert das["settings"]["timesteps"] == 1
    assert das["settings"]["proj_dim"] == 16
    nda = doc["methods"]["nda"]["settings"]
    assert nda["heatmaps"] == 2
    assert nda["nda_timesteps"] == [50, 150]
    assert nda["top_k"] is None  # given as "none"
    assert "quiet" not in nda


def test_report_writes_a_page_that_opens_in_chromium(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_lds(run / "lds.json", ["das", "nda", "pixel-cos"])
    assert main(["report", str(run), "--k", "3"]) == 0
    out = capsys.readouterr().out
    page = run / "report.html"
    assert out.startswith(f"report: {page} (open it in a browser;")
    assert sorted(p.name for p in (run / "report").iterdir()) == [
        "lds.png",
        "top-das.png",
        "top-nda.png",
        "top-pixel-cos.png",
    ]
    text = page.read_text()
    assert "NDA heatmaps" in text
    assert str((run.parent / "ckpt").resolve()) in text  # the checkpoint, in the summary
    scores = Scores.load(run / "scores" / "pixel-cos")
    best = scores.top_k(int(scores.query_ids[0]), 1)[0][0]
    value = scores.values[0, np.flatnonzero(scores.train_ids == best)[0]]
    assert f"{int(best)}<br>{value:.3g}</figcaption>" in text

    loaded = open_in_chromium(page, ARTIFACTS / "report-cli.png", tmp_path)

    assert loaded.broken == 0, f"images that did not load: {loaded.first_broken}"
    assert loaded.sections == ["summary", "lds", "agreement", "queries", "figures", "settings"]
    assert loaded.queries == 3


def test_report_out_and_max_queries(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "page.html"
    assert main(["report", str(run), "--out", str(out), "--max-queries", "1"]) == 0
    assert out.read_text().count('<article class="query"') == 1
    assert (tmp_path / "page" / "top-das.png").is_file()


def test_report_rejects_bad_input(
    root: Path, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _expect_error(capsys, ["report", str(tmp_path)], str(tmp_path), "no scores")
    _expect_error(capsys, ["report", str(run), "--k", "0"], "k=0 is invalid")
    _expect_error(capsys, ["report", str(run), "--lds", str(tmp_path / "x.json")], "x.json")
    # Scores whose training ids are not the checkpoint's training images.
    wrong = tmp_path / "wrong"
    shutil.copytree(run / "scores" / "nda", wrong / "scores" / "nda")
    shutil.copy(run / RUN_FILE, wrong / RUN_FILE)
    scores = Scores.load(wrong / "scores" / "nda")
    Scores(scores.values, scores.query_ids, scores.train_ids + 1000, "nda").save(
        wrong / "scores" / "nda"
    )
    _expect_error(capsys, ["report", str(wrong)], "training id 100", "different runs")
    # A method run on other queries than the rest.
    mixed = tmp_path / "mixed"
    shutil.copytree(run, mixed)
    queries = root / "toy.npz"
    record_run(mixed, "nda", [root / "ckpt"], str(queries), {})
    _expect_error(capsys, ["report", str(mixed)], "scored on different queries")
    # Scores with no run.json entry.
    (mixed / RUN_FILE).unlink()
    _expect_error(capsys, ["report", str(mixed)], "run.json: missing")
