from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from diffattr._io import read_json
from diffattr.errors import ConfigError, ReportError
from diffattr.methods import Scores, record_run
from diffattr.methods._run import RUN_FILE
from diffattr.report import write_report

from .helpers import digit_sets, write_heatmaps, write_lds, write_scores

METHODS = ["das", "nda", "trak"]


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return tmp_path / "run"


def _write(run: Path, methods: list[str] = METHODS, n_queries: int = 6, n_train: int = 40):
    train, queries = digit_sets(n_queries, n_train)
    return write_scores(run, methods, train, queries), train, queries


def _img_sources(page: str) -> list[str]:
    return re.findall(r'<img[^>]* src="([^"]*)"', page)


def test_write_report_shows_each_query_with_each_methods_top_k(run: Path) -> None:
    scores, train, queries = _write(run)
    out = write_report(run, k=3, train=train, queries=queries)
    assert out == run / "report.html"
    page = out.read_text()
    for section in ("summary", "lds", "agreement", "queries", "figures", "settings"):
        assert f'<section id="{section}">' in page
    assert page.count('<article class="query"') == 6
    article = page[page.index('id="query-2"') : page.index('id="query-3"')]
    for method, result in scores.items():
        proponents, opponents = result.top_k(2, 3)
        row = article[article.index(f"<th>{method}</th>") :].split("</tr>")[0]
        assert re.findall(r'alt="training image (\d+)"', row) == [
            str(i) for i in [*proponents, *opponents]
        ]
        best = result.values[2, np.flatnonzero(result.train_ids == proponents[0])[0]]
        assert f"<br>{best:.3g}</figcaption>" in row
    # Self-contained: every image is a PNG data URI, nothing is fetched, nothing runs.
    sources = _img_sources(page)
    assert len(sources) == 6 * (1 + 3 * 2 * 3) + 3  # queries, thumbnails, figures
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page
    assert "<link" not in page
    # The settings and seeds of each method's scores.
    assert page.count("<details open>") == 3
    assert "&quot;seed&quot;: 0" in page
    # One figure of top attributions per method, beside the page.
    assert sorted(p.name for p in (run / "report").iterdir()) == [
        "top-das.png",
        "top-nda.png",
        "top-trak.png",
    ]


def test_write_report_of_one_method_has_no_agreement_section(run: Path) -> None:
    _, train, queries = _write(run, ["das"], n_queries=1, n_train=5)
    page = write_report(run, k=2, train=train, queries=queries).read_text()
    assert '<section id="agreement">' not in page
    assert "overlap" not in page


def test_write_report_shows_lds_results_with_a_chart(run: Path, tmp_path: Path) -> None:
    _, train, queries = _write(run)
    write_lds(run / "lds.json", ["das", "trak"])
    page = write_report(run, train=train, queries=queries).read_text()
    lds = page[page.index('<section id="lds">') : page.index('<section id="agreement">')]
    assert "Benchmark 0123abcd" in lds
    assert "[0.100, 0.210]" in lds  # trak's interval
    assert "0.570" in lds  # the ceiling
    assert 'alt="LDS bar chart"' in lds
    assert (run / "report" / "lds.png").stat().st_size > 1000
    # An explicit file wins over RUN_DIR/lds.json.
    other = write_lds(tmp_path / "other.json", ["nda"])
    page = write_report(run, tmp_path / "x.html", lds=other, train=train, queries=queries)
    text = page.read_text()
    assert str(other) in text
    assert (tmp_path / "x" / "lds.png").is_file()


def test_write_report_without_lds_says_how_to_get_it(run: Path) -> None:
    _, train, queries = _write(run)
    page = write_report(run, train=train, queries=queries).read_text()
    assert "No LDS results for this run" in page
    assert "diffattr lds score" in page
    assert not (run / "report" / "lds.png").exists()


def test_write_report_shows_nda_heatmaps(run: Path) -> None:
    scores, train, queries = _write(run)
    write_heatmaps(run, scores["nda"], queries, train)
    page = write_report(run, train=train, queries=queries).read_text()
    for query_id in (0, 1):
        best = int(scores["nda"].top_k(query_id, 1)[0][0])
        article = page[page.index(f'id="query-{query_id}"') :].split("</article>")[0]
        assert f'alt="NDA map of query {query_id}"' in article
        assert f'alt="NDA map of image {best}"' in article
    assert page.count("NDA heatmaps") == 2


def test_write_report_compares_methods_by_top_k_overlap(run: Path) -> None:
    train, queries = digit_sets(4, 30)
    values = np.random.default_rng(1).normal(size=(4, 30)).astype(np.float32)
    Scores(values, queries.ids, train.ids, "das").save(run / "scores" / "das")
    Scores(values * 2, queries.ids, train.ids, "trak").save(run / "scores" / "trak")
    Scores(-values, queries.ids, train.ids, "tracin").save(run / "scores" / "tracin")
    page = write_report(run, k=5, train=train, queries=queries).read_text()
    agreement = page[page.index('<section id="agreement">') : page.index('<section id="queries">')]
    rows = re.findall(r"<tr><th>(\w+)</th>(.*?)</tr>", agreement)
    table = {name: re.findall(r'<td class="num">([^<]*)</td>', cells) for name, cells in rows}
    # Columns: das, tracin, trak. Opposite scores share nothing; scaled ones share everything.
    assert table == {
        "das": ["-", "0.00", "1.00"],
        "tracin": ["0.00", "-", "0.00"],
        "trak": ["1.00", "0.00", "-"],
    }
    assert page.count("<h4>Top-5 overlap</h4>") == 4
    assert ">5/5</td>" in page


def test_write_report_shows_the_first_max_queries(run: Path) -> None:
    _, train, queries = _write(run, ["das"])
    page = write_report(run, max_queries=2, train=train, queries=queries).read_text()
    assert re.findall(r'<article class="query" id="query-(\d+)"', page) == ["0", "1"]


def test_write_report_rejects_a_run_without_scores(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no scores"):
        write_report(tmp_path)
    with pytest.raises(ReportError, match="no such run directory"):
        write_report(tmp_path / "missing")


def test_write_report_rejects_ids_missing_from_the_images(run: Path) -> None:
    _, train, queries = _write(run)
    with pytest.raises(ReportError, match=r"training id 6 \(6 of 40 ids\).*different runs"):
        write_report(run, train=train.select(train.ids[6:]), queries=queries)
    with pytest.raises(ReportError, match="query id 0"):
        write_report(run, train=train, queries=queries.select(queries.ids[1:]))


def test_write_report_needs_run_json_to_find_the_images(run: Path) -> None:
    _write(run)
    with pytest.raises(ReportError, match=r"run\.json: missing"):
        write_report(run)


def test_write_report_rejects_bad_settings_and_lds_files(run: Path, tmp_path: Path) -> None:
    _, train, queries = _write(run)
    images = {"train": train, "queries": queries}
    with pytest.raises(ConfigError, match="k=0"):
        write_report(run, k=0, **images)
    with pytest.raises(ConfigError, match="max_queries=0"):
        write_report(run, max_queries=0, **images)
    with pytest.raises(ConfigError, match=r"must end in \.html"):
        write_report(run, tmp_path / "report", **images)
    with pytest.raises(ReportError, match="no such LDS results file"):
        write_report(run, lds=tmp_path / "nope.json", **images)
    bad = tmp_path / "bad.json"
    bad.write_text('{"benchmark": "x", "results": [{"method": "das", "lds": 0.1}]}')
    with pytest.raises(ReportError, match="result 0 lacks query_set, ci"):
        write_report(run, lds=bad, **images)


def test_record_run_keeps_one_entry_per_method(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    record_run("run", "das", ["ckpt"], "held-out", {"timesteps": 10})
    record_run("run", "nda", ["ckpt"], "samples", {"heatmaps": 2})
    record_run("run", "das", ["a", "b"], "held-out", {"timesteps": 4})
    doc = read_json(tmp_path / "run" / RUN_FILE)
    assert doc["format"] == "diffattr.run"
    assert doc["methods"] == {
        "das": {
            "checkpoints": [str(tmp_path / "a"), str(tmp_path / "b")],
            "queries": "held-out",
            "settings": {"timesteps": 4},
        },
        "nda": {
            "checkpoints": [str(tmp_path / "ckpt")],
            "queries": str(tmp_path / "samples"),
            "settings": {"heatmaps": 2},
        },
    }


def test_write_report_shows_the_prompts_of_conditional_queries(run: Path) -> None:
    train, queries = digit_sets(3, 20)
    prompted = queries.with_prompts("a handwritten {label} & <more>")
    write_scores(run, ["das"], train, prompted)
    page = write_report(run, k=2, train=train, queries=prompted).read_text()
    label = int(prompted.labels[1])
    assert f"<q>a handwritten {label} &amp; &lt;more&gt;</q>" in page
    plain = write_report(run, k=2, train=train, queries=queries).read_text()
    assert "<q>" not in plain
