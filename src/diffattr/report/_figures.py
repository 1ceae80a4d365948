"""PNG figures for papers, drawn on matplotlib's Agg canvas: no display, no global pyplot state."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from diffattr._io import atomic_write
from diffattr.data import ImageDataset, image_grid
from diffattr.methods import Scores

_DPI = 200
#: Tiles are upscaled (nearest neighbour) to at least this many pixels a side.
_MIN_TILE = 32


def attribution_figure(
    path: Path,
    queries: ImageDataset,
    train: ImageDataset,
    scores: Scores,
    query_ids: Sequence[int],
    k: int,
) -> Path:
    """Draw one row per query: the query, its top-k proponents, then its top-k opponents.

    Args:
        path: The PNG to write.
        queries: Holds every id of ``query_ids``.
        train: Holds every training id of ``scores``.
        scores: One method's scores.
        query_ids: The rows, each scored by ``scores``.
        k: Proponents and opponents per row (fewer when there are fewer training images).

    Returns:
        ``path``.
    """
    k = min(k, len(scores.train_ids))
    # A white tile separates the query from the proponents and those from the opponents.
    gap = torch.ones_like(queries.images[:1])
    tiles = []
    for query_id in query_ids:
        proponents, opponents = scores.top_k(query_id, k)
        tiles += [queries.select([query_id]).images, gap, train.select(proponents).images]
        tiles += [gap, train.select(opponents).images]
    columns = 2 * k + 3
    height, width = queries.image_size
    scale = max(1, math.ceil(_MIN_TILE / min(height, width)))
    grid = image_grid(torch.cat(tiles), nrow=columns, pad=scale, scale=scale)
    cell_w, cell_h = width * scale + scale, height * scale + scale
    figure = Figure(figsize=(0.45 * columns + 1.0, 0.45 * len(query_ids) + 0.9), dpi=_DPI)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    # Gray grids are (H, W, 1), which imshow takes only as (H, W); RGB ones stay as they are.
    pixels = grid.squeeze(-1) if grid.shape[-1] == 1 else grid
    ax.imshow(pixels, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    labels = ["query", "", *(f"+{i}" for i in range(1, k + 1)), ""]
    labels += [f"\N{MINUS SIGN}{i}" for i in range(1, k + 1)]
    ax.set_xticks([scale + (c + 0.5) * cell_w for c in range(columns)], labels, fontsize=6)
    ax.xaxis.tick_top()
    ax.set_yticks(
        [scale + (r + 0.5) * cell_h for r in range(len(query_ids))],
        [str(q) for q in query_ids],
        fontsize=6,
    )
    ax.tick_params(length=0)
    ax.set_ylabel("query id", fontsize=7)
    ax.set_title(
        f"{scores.method}: top {k} proponents (+) and opponents (\N{MINUS SIGN})", fontsize=8
    )
    for spine in ax.spines.values():
        spine.set_visible(False)
    return _save(figure, path)


def lds_figure(path: Path, results: list[dict[str, Any]], benchmark: str | None) -> Path:
    """Draw the LDS of each result as a bar with its 95% interval and the noise ceiling.

    Args:
        path: The PNG to write.
        results: Entries of ``diffattr lds score --out``: ``method``, ``query_set``, ``lds``,
            ``ci`` and optionally ``ceiling``.
        benchmark: The benchmark id, for the title.

    Returns:
        ``path``.
    """
    several_sets = len({r["query_set"] for r in results}) > 1
    labels = [
        f"{r['method']}\n({r['query_set']})" if several_sets else r["method"] for r in results
    ]
    lds = np.array([r["lds"] for r in results], dtype=float)
    low, high = np.array([r["ci"] for r in results], dtype=float).T
    # An interval need not contain the estimate; error bars cannot be negative.
    errors = np.stack([np.maximum(lds - low, 0.0), np.maximum(high - lds, 0.0)])
    positions = np.arange(len(results))
    figure = Figure(figsize=(max(3.2, 0.8 * len(results) + 1.5), 2.8), dpi=_DPI)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.bar(positions, lds, width=0.6, color="#4c72b0", yerr=errors, capsize=4, ecolor="black")
    ceilings = [(i, r["ceiling"]) for i, r in enumerate(results) if r.get("ceiling") is not None]
    for n, (i, ceiling) in enumerate(ceilings):
        ax.hlines(
            ceiling,
            i - 0.4,
            i + 0.4,
            colors="#c44e52",
            linestyles="dashed",
            label="noise ceiling" if n == 0 else None,
        )
    if ceilings:
        # Outside the axes: inside, it would cover a bar or a ceiling mark.
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(positions, labels, fontsize=7)
    ax.set_ylabel("LDS (Spearman)", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    title = "LDS with 95% bootstrap interval"
    ax.set_title(f"{title}, benchmark {benchmark}" if benchmark else title, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    return _save(figure, path)


def _save(figure: Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", bbox_inches="tight"))
    return path
