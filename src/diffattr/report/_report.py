from __future__ import annotations

import os
from pathlib import Path

from diffattr._config import is_int
from diffattr._io import atomic_write, check_output
from diffattr.data import ImageDataset
from diffattr.errors import ConfigError
from diffattr.report._figures import attribution_figure, lds_figure
from diffattr.report._html import render_report
from diffattr.report._journey import journey_figures
from diffattr.report._run import RunContents, load_run

REPORT_FILE = "report.html"
#: Queries drawn in each method's figure for papers: more rows would not fit a page.
FIGURE_ROWS = 8


def write_report(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    k: int = 5,
    max_queries: int | None = 50,
    lds: str | os.PathLike[str] | None = None,
    train: ImageDataset | None = None,
    queries: ImageDataset | None = None,
) -> Path:
    """Write a self-contained HTML report of a run, and PNG figures for papers beside it.

    The page shows, for each query, its top-k proponents and opponents by every method with
    their scores, NDA heatmaps where NDA saved some, the overlap of the methods' top-k, the LDS
    results where a benchmark was scored, and each method's settings and seeds. Its images are
    embedded as PNG data URIs, so the one file opens offline. The figures (one grid of top
    attributions per method, and the LDS bar chart) go to a folder named like the page without
    its suffix: ``RUN_DIR/report/`` for ``RUN_DIR/report.html``.

    The report renders saved artifacts only; nothing is recomputed.

    Args:
        run_dir: A directory of ``diffattr attribute``: ``scores/<method>/`` for each method,
            ``run.json``, and optionally ``heatmaps/`` and ``lds.json``.
        out: The HTML file (default: ``RUN_DIR/report.html``); must end in ``.html``.
        k: Proponents and opponents shown per query and method.
        max_queries: Show the first this many queries (in the first method's order); None shows
            all of them.
        lds: LDS results written by ``diffattr lds score --out``; None reads ``RUN_DIR/lds.json``
            when it exists.
        train: The training images the scores refer to; None reloads them through
            ``run.json`` (from the first checkpoint's recorded dataset).
        queries: The query images; None reloads them through ``run.json``.

    Returns:
        The path of the HTML file.

    Raises:
        ConfigError: ``k`` or ``max_queries`` is not a positive int, or ``out`` does not end in
            ``.html``.
        OutputError: ``out`` or the figures folder cannot be written (checked before loading).
        ReportError: The run has no scores, lacks ``run.json`` (unless both image sets are
            given), mixes images across methods, names ids that are not in the images, or has a
            malformed LDS file.
    """
    if not is_int(k) or k < 1:
        raise ConfigError(f"k={k!r} is invalid: must be an int >= 1")
    if max_queries is not None and (not is_int(max_queries) or max_queries < 1):
        raise ConfigError(f"max_queries={max_queries!r} is invalid: must be an int >= 1 or None")
    out = Path(out) if out is not None else Path(run_dir) / REPORT_FILE
    if out.suffix.lower() != ".html":
        raise ConfigError(f"out={str(out)!r} is invalid: the report's file name must end in .html")
    check_output(out, file=True)
    figures_dir = check_output(out.with_suffix(""))
    run = load_run(run_dir, lds=lds, train=train, queries=queries)
    shown = _shown_queries(run)[:max_queries]
    figures = {}
    for method, scores in run.scores.items():
        rows = [q for q in shown if q in scores.query_ids][:FIGURE_ROWS]
        if rows:
            figures[f"top attributions, {method}"] = attribution_figure(
                figures_dir / f"top-{method}.png", run.queries, run.train, scores, rows, k
            )
    # A Journey-TRAK run: the first shown queries' trajectories and top images per step.
    figures.update(journey_figures(run.run_dir, run.train, shown, figures_dir, k=k))
    if run.lds is not None:
        figures["lds"] = lds_figure(
            figures_dir / "lds.png", run.lds["results"], run.lds.get("benchmark")
        )
    page = render_report(run, shown, k, figures, out)
    atomic_write(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return out


def _shown_queries(run: RunContents) -> list[int]:
    """Every scored query id once: the first method's order, then others' extra ids."""
    seen: dict[int, None] = {}
    for scores in run.scores.values():
        seen.update(dict.fromkeys(map(int, scores.query_ids)))
    return list(seen)
