"""The report as one HTML page: inline CSS, images as PNG data URIs, no scripts, nothing fetched."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffattr._version import __version__
from diffattr.data import ImageDataset, to_uint8
from diffattr.methods import SIGN_CONVENTION, Scores
from diffattr.report._run import Heatmap, RunContents

#: Embedded images larger than this (pixels a side) are downscaled, to keep the page small.
_MAX_SIDE = 64
_THUMB_PX = 64
_QUERY_PX = 96
_HEATMAP_PX = 96

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1400px; padding: 1em; }
h1, h2, h3 { margin: 0.6em 0 0.3em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.4em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { image-rendering: pixelated; background: #000; }
img.figure { image-rendering: auto; background: #fff; width: 640px; max-width: 100%;
  height: auto; }
figure { display: inline-block; margin: 0 4px 4px 0; text-align: center; }
figcaption { font-size: 11px; color: #444; }
.query { border-top: 2px solid #888; padding: 0.5em 0; }
.query-body { display: flex; gap: 1em; align-items: flex-start; flex-wrap: wrap; }
.strip { display: flex; flex-wrap: nowrap; }
.note { color: #555; font-size: 12px; }
pre { background: #f6f6f6; padding: 0.5em; overflow-x: auto; font-size: 12px; }
"""


def render_report(
    run: RunContents, query_ids: list[int], k: int, figures: dict[str, Path], out: Path
) -> str:
    """Return the report page.

    Args:
        run: What the run directory holds.
        query_ids: The queries to show, in order.
        k: Proponents and opponents shown per query and method.
        figures: Caption -> PNG written for papers; embedded and listed.
        out: Where the page will be written (figure paths are shown relative to it).
    """
    train, queries = _Thumbnails(run.train), _Thumbnails(run.queries)
    sections = [
        _summary(run, len(query_ids), k),
        _lds_section(run, figures.get("lds")),
        _agreement_section(run.scores, k),
        _queries_section(run, query_ids, k, train, queries),
        _figures_section(figures, out),
        _settings_section(run),
    ]
    body = "\n".join(s for s in sections if s)
    links = " ".join(
        f'<a href="#{name}">{label}</a>'
        for name, label in (
            ("summary", "Methods"),
            ("lds", "LDS"),
            ("agreement", "Agreement"),
            ("queries", "Queries"),
            ("figures", "Figures"),
            ("settings", "Settings"),
        )
        if f'<section id="{name}">' in body
    )
    title = f"diffattr report: {run.run_dir}"
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>Attribution report</h1>\n<p>{escape(str(run.run_dir))}, written "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC by diffattr {__version__}</p>\n"
        f"<nav>{links}</nav></header>\n{body}\n</body>\n</html>\n"
    )


class _Thumbnails:
    """PNG data URIs of a dataset's images, each encoded once however often it is shown."""

    def __init__(self, dataset: ImageDataset) -> None:
        self._dataset = dataset
        self._rows = {int(i): row for row, i in enumerate(dataset.ids)}
        self._uris: dict[int, str] = {}
        height, width = dataset.image_size
        self._aspect = width / height

    def uri(self, sample_id: int) -> str:
        if sample_id not in self._uris:
            row = self._rows[sample_id]
            pixels = to_uint8(self._dataset.images[row : row + 1])[0]
            image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
            image.thumbnail((_MAX_SIDE, _MAX_SIDE), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            self._uris[sample_id] = _data_uri(buffer.getvalue())
        return self._uris[sample_id]

    def label(self, sample_id: int) -> str:
        """The image's label as `` (N)`` when the dataset has labels, else nothing."""
        labels = self._dataset.labels
        return "" if labels is None else f" ({int(labels[self._rows[sample_id]])})"

    def prompt(self, sample_id: int) -> str:
        """The image's prompt, for a conditional model's images, else nothing."""
        prompts = self._dataset.prompts
        return "" if prompts is None else prompts[self._rows[sample_id]]

    def img(self, sample_id: int, px: int, alt: str) -> str:
        # The longer side gets ``px`` CSS pixels; small images are upscaled, pixelated.
        if self._aspect >= 1:
            width, height = px, round(px / self._aspect)
        else:
            width, height = round(px * self._aspect), px
        return (
            f'<img src="{self.uri(sample_id)}" width="{width}" height="{height}" '
            f'alt="{escape(alt)}">'
        )


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _file_img(path: Path, alt: str, css_class: str = "", px: int | None = None) -> str:
    size = f' width="{px}"' if px else ""  # the height follows the image's aspect ratio
    cls = f' class="{css_class}"' if css_class else ""
    return f'<img{cls} src="{_data_uri(path.read_bytes())}"{size} alt="{escape(alt)}">'


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], numeric_from: int = 1) -> str:
    """An HTML table of already-escaped cells; columns from ``numeric_from`` align right."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{c}</td>' if i >= numeric_from else f"<th>{c}</th>"
            for i, c in enumerate(row)
        )
        + "</tr>\n"
        for row in rows
    )
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


def _never_negative(scores: Scores) -> bool:
    return bool(scores.values.min() >= 0)


def _query_source(queries: str | dict[str, Any]) -> str:
    """A run.json entry's queries: a path, or (an Attribution's record) the source's path."""
    if isinstance(queries, dict):
        source = queries.get("source") or {}
        return str(source.get("path") or source.get("kind") or "-")
    return queries


def _summary(run: RunContents, n_shown: int, k: int) -> str:
    rows = []
    for method, scores in run.scores.items():
        record = run.records.get(method, {})
        rows.append(
            [
                escape(method),
                str(len(scores.query_ids)),
                str(len(scores.train_ids)),
                f"{scores.values.min():.4g} .. {scores.values.max():.4g}",
                escape(", ".join(record.get("checkpoints", [])) or "-"),
                escape(_query_source(record.get("queries", "-"))),
            ]
        )
    table = _table(
        ["method", "queries", "training images", "score range", "checkpoints", "query source"],
        rows,
    )
    nonnegative = [m for m, s in run.scores.items() if _never_negative(s)]
    note = (
        f"<p class='note'>Scores of {escape(', '.join(nonnegative))} are never negative: their "
        "lowest scores mark the least influential training images, not opponents.</p>"
        if nonnegative
        else ""
    )
    return (
        f'<section id="summary">\n<h2>Methods</h2>\n<p>{len(run.train)} training images '
        f"({escape(run.train.name)}), {len(run.queries)} query images "
        f"({escape(run.queries.name)}); {n_shown} queries shown below with their top {k} "
        f"proponents and opponents per method.</p>\n{table}\n<p class='note'>Sign convention: "
        f"{escape(SIGN_CONVENTION)}.</p>\n{note}\n</section>"
    )


def _lds_section(run: RunContents, figure: Path | None) -> str:
    if run.lds is None:
        return (
            '<section id="lds">\n<h2>Linear datamodeling score</h2>\n<p class="note">No LDS '
            "results for this run. Score a benchmark with <code>diffattr lds score BENCHMARK "
            f"SCORES... --out {escape(str(run.run_dir / 'lds.json'))}</code>.</p>\n</section>"
        )
    rows = []
    for r in run.lds["results"]:
        ceiling = r.get("ceiling")
        split_half = r.get("split_half")
        rows.append(
            [
                escape(str(r["method"])),
                escape(str(r["query_set"])),
                f"{r['lds']:.3f}",
                f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]",
                "-" if ceiling is None else f"{ceiling:.3f}",
                f"{r['lds'] / ceiling:.0%}" if ceiling else "-",
                "-" if split_half is None else f"{split_half:.3f}",
                escape(str(r.get("ceiling_basis") or "-")),
                escape(str(r.get("n_subsets", "-"))),
                escape(str(r.get("n_queries", "-"))),
            ]
        )
    header = ["method", "query set", "LDS", "95% CI", "ceiling", "of ceiling", "split-half"]
    table = _table([*header, "ceiling basis", "subsets", "queries"], rows, numeric_from=2)
    chart = _file_img(figure, "LDS bar chart", "figure") if figure else ""
    return (
        f'<section id="lds">\n<h2>Linear datamodeling score</h2>\n<p>Benchmark '
        f"{escape(str(run.lds.get('benchmark', '?')))}, from {escape(str(run.lds_path))}. LDS is "
        "the mean over queries of the Spearman correlation between predicted and measured "
        "outputs of models retrained on random subsets; the ceiling is the best a perfect "
        f"predictor can reach given the benchmark's own noise.</p>\n{table}\n{chart}\n</section>"
    )


def _overlap_k(scores: dict[str, Scores], k: int) -> int:
    """The top-k size the methods can all fill, for comparing their proponents."""
    return min(k, *(len(s.train_ids) for s in scores.values()))


def _agreement_section(scores: dict[str, Scores], k: int) -> str:
    if len(scores) < 2:
        return ""
    kk = _overlap_k(scores, k)
    # Each method's proponents once per query, not once per pair of methods.
    tops = {m: {int(q): s.top_k(int(q), kk)[0] for q in s.query_ids} for m, s in scores.items()}
    rows = []
    for a in tops:
        cells = [escape(a)]
        for b in tops:
            common = tops[a].keys() & tops[b].keys()
            if a == b or not common:
                cells.append("-")
                continue
            shared = [len(np.intersect1d(tops[a][q], tops[b][q])) for q in common]
            cells.append(f"{np.mean(shared) / kk:.2f}")
        rows.append(cells)
    return (
        f'<section id="agreement">\n<h2>Agreement between methods</h2>\n<p>Mean share of the '
        f"top {kk} proponents two methods have in common, over the queries both scored.</p>\n"
        f"{_table(['', *map(escape, tops)], rows)}\n</section>"
    )


def _queries_section(
    run: RunContents, query_ids: list[int], k: int, train: _Thumbnails, queries: _Thumbnails
) -> str:
    articles = [_query_article(run, q, k, train, queries) for q in query_ids]
    return (
        '<section id="queries">\n<h2>Queries</h2>\n<p class="note">Under each training image: '
        "its sample id (its label, if the data has labels) and its score.</p>\n"
        + "\n".join(articles)
        + "\n</section>"
    )


def _query_article(
    run: RunContents, query_id: int, k: int, train: _Thumbnails, queries: _Thumbnails
) -> str:
    scored = {m: s for m, s in run.scores.items() if query_id in s.query_ids}
    rows = "".join(
        f"<tr><th>{escape(m)}</th><td>{_strip(s, query_id, k, train, 0)}</td>"
        f"<td>{_strip(s, query_id, k, train, 1)}</td></tr>\n"
        for m, s in scored.items()
    )
    name = f"query {query_id}{queries.label(query_id)}"
    query_img = queries.img(query_id, _QUERY_PX, name)
    prompt = queries.prompt(query_id)
    caption = escape(name) + (f"<br><q>{escape(prompt)}</q>" if prompt else "")
    methods = (
        f"<table>\n<tr><th>method</th><th>top {k}: proponents (highest scores)</th>"
        f"<th>bottom {k}: opponents (lowest scores)</th></tr>\n{rows}</table>"
    )
    return (
        f'<article class="query" id="query-{query_id}">\n<h3>Query {query_id}</h3>\n'
        f'<div class="query-body">\n<figure>{query_img}<figcaption>{caption}</figcaption>'
        f"</figure>\n{methods}\n{_heatmap_block(run.heatmaps.get(query_id, []))}"
        f"{_query_agreement(scored, query_id, k)}</div>\n</article>"
    )


def _strip(scores: Scores, query_id: int, k: int, train: _Thumbnails, side: int) -> str:
    """Thumbnails of the top (side 0) or bottom (side 1) ``k`` training images, with scores."""
    ids = scores.top_k(query_id, k)[side]
    row = scores.values[int(np.flatnonzero(scores.query_ids == query_id)[0])]
    sorter = np.argsort(scores.train_ids)
    values = row[sorter[np.searchsorted(scores.train_ids, ids, sorter=sorter)]]
    figures = []
    for sample_id, value in zip(map(int, ids), values, strict=True):
        caption = f"{sample_id}{train.label(sample_id)}<br>{value:.3g}"
        alt = f"training image {sample_id}"
        figures.append(
            f"<figure>{train.img(sample_id, _THUMB_PX, alt)}<figcaption>{caption}</figcaption>"
            "</figure>"
        )
    return f'<div class="strip">{"".join(figures)}</div>'


def _heatmap_block(heatmaps: list[Heatmap]) -> str:
    if not heatmaps:
        return ""
    figures = []
    for h in heatmaps:
        query_map = _file_img(h.query_png, f"NDA map of query {h.query_id}", px=_HEATMAP_PX)
        train_map = _file_img(h.train_png, f"NDA map of image {h.train_id}", px=_HEATMAP_PX)
        figures.append(
            f"<figure>{query_map}<figcaption>query pixels that {h.train_id} explains</figcaption>"
            f"</figure><figure>{train_map}<figcaption>where in {h.train_id} they match"
            "</figcaption></figure>"
        )
    return f'<div class="heatmaps"><h4>NDA heatmaps</h4>{"".join(figures)}</div>\n'


def _query_agreement(scored: dict[str, Scores], query_id: int, k: int) -> str:
    if len(scored) < 2:
        return ""
    kk = _overlap_k(scored, k)
    tops = {m: s.top_k(query_id, kk)[0] for m, s in scored.items()}
    rows = [
        [escape(a)]
        + ["-" if a == b else f"{len(np.intersect1d(tops[a], tops[b]))}/{kk}" for b in tops]
        for a in tops
    ]
    return (
        f'<div class="agreement"><h4>Top-{kk} overlap</h4>'
        f"{_table(['', *map(escape, tops)], rows)}</div>\n"
    )


def _figures_section(figures: dict[str, Path], out: Path) -> str:
    if not figures:
        return ""
    items = []
    for caption, path in figures.items():
        shown = path.relative_to(out.parent) if path.is_relative_to(out.parent) else path
        items.append(
            f"<figure>{_file_img(path, caption, 'figure')}<figcaption>{escape(caption)}: "
            f"{escape(str(shown))}</figcaption></figure>"
        )
    return (
        f'<section id="figures">\n<h2>Figures for papers</h2>\n<p class="note">PNG files '
        f"written beside this page.</p>\n{''.join(items)}\n</section>"
    )


def _settings_section(run: RunContents) -> str:
    blocks = []
    for method, scores in run.scores.items():
        record: dict[str, Any] = run.records.get(method, {})
        command = f"<h4>command (run.json)</h4><pre>{_json(record)}</pre>" if record else ""
        blocks.append(
            f"<details open><summary><b>{escape(method)}</b></summary>\n<h4>scores settings "
            f"and seeds</h4><pre>{_json(scores.settings)}</pre>{command}</details>"
        )
    return f'<section id="settings">\n<h2>Settings and seeds</h2>\n{"".join(blocks)}\n</section>'


def _json(value: Any) -> str:
    return escape(json.dumps(value, indent=2, sort_keys=True))
