"""A Journey-TRAK figure: a query's trajectory and its top training images at a few steps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from diffattr.data import ImageDataset, image_grid
from diffattr.errors import ReportError
from diffattr.methods._journey import STEPS_FILE, JourneyTRAK, StepScores
from diffattr.methods._run import RunLayout
from diffattr.report._figures import _DPI, _MIN_TILE, _save


def journey_figure(
    path: Path,
    steps: StepScores,
    train: ImageDataset,
    query_id: int,
    *,
    shown: int = 4,
    k: int = 5,
) -> Path:
    """Draw one row per shown step: the chain's x_0 prediction there, then its top-k images.

    Args:
        path: The PNG to write.
        steps: Journey-TRAK's per-step scores (``StepScores.load(RUN/scores/journey-trak)``).
        train: Holds every training id of ``steps``.
        query_id: The query shown.
        shown: Steps shown, evenly spaced over the attributed ones (first and last included).
        k: Training images per step, by decreasing score at that step.

    Returns:
        ``path``.

    Raises:
        ReportError: The query was not scored, or its trajectory is a latent model's (its x_0
            predictions are latents, which this figure does not decode).
    """
    rows = np.flatnonzero(steps.query_ids == query_id)
    if len(rows) == 0:
        raise ReportError(f"query {query_id} has no Journey-TRAK per-step scores")
    trajectory = torch.as_tensor(np.array(steps.denoised[rows[0]]))
    if trajectory.shape[1:] != train.images.shape[1:]:
        raise ReportError(
            f"the trajectory's states {tuple(trajectory.shape[1:])} are not images "
            f"{tuple(train.images.shape[1:])} (a latent model): decode them to show them"
        )
    n_steps = len(trajectory)
    picked = np.unique(np.round(np.linspace(0, n_steps - 1, min(shown, n_steps))).astype(int))
    k = min(k, len(steps.train_ids))
    gap = torch.ones_like(trajectory[:1])
    tiles = []
    for s in picked:
        order = np.argsort(-steps.values[rows[0], s], kind="stable")[:k]
        tiles += [
            trajectory[s : s + 1].clamp(-1, 1),
            gap,
            train.select(steps.train_ids[order]).images,
        ]
    columns = k + 2
    height, width = train.image_size
    scale = max(1, math.ceil(_MIN_TILE / min(height, width)))
    grid = image_grid(torch.cat(tiles), nrow=columns, pad=scale, scale=scale)
    cell_w, cell_h = width * scale + scale, height * scale + scale
    figure = Figure(figsize=(0.45 * columns + 1.0, 0.45 * len(picked) + 0.9), dpi=_DPI)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
    labels = ["x0", "", *(f"+{i}" for i in range(1, k + 1))]
    ax.set_xticks([scale + (c + 0.5) * cell_w for c in range(columns)], labels, fontsize=6)
    ax.xaxis.tick_top()
    timesteps = steps.timesteps[rows[0]]
    ax.set_yticks(
        [scale + (r + 0.5) * cell_h for r in range(len(picked))],
        [f"t={int(timesteps[s])}" for s in picked],
        fontsize=6,
    )
    ax.tick_params(length=0)
    ax.set_title(f"journey-trak, query {query_id}: x0 prediction and top {k} per step", fontsize=8)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return _save(figure, path)


#: Queries given a trajectory figure in a run's report.
REPORT_QUERIES = 3


def journey_figures(
    run_dir: Path,
    train: ImageDataset,
    query_ids: list[int],
    figures_dir: Path,
    *,
    k: int = 5,
    limit: int = REPORT_QUERIES,
) -> dict[str, Path]:
    """The report's Journey-TRAK figures: one per shown query (the first ``limit``).

    Empty when the run has no per-step scores (``scores/journey-trak/steps.npz``) or its
    trajectories are a latent model's, which this figure does not decode.

    Returns:
        Caption -> PNG, as the report lists its figures.
    """
    folder = RunLayout(Path(run_dir)).scores(JourneyTRAK.name)
    if not (folder / STEPS_FILE).is_file():
        return {}
    steps = StepScores.load(folder)
    if tuple(steps.denoised.shape[2:]) != tuple(train.images.shape[1:]):
        return {}
    scored = {int(q) for q in steps.query_ids}
    chosen = [q for q in query_ids if q in scored][:limit]
    return {
        f"journey-trak, query {q}: trajectory and top images per step": journey_figure(
            figures_dir / f"journey-{q}.png", steps, train, q, k=k
        )
        for q in chosen
    }
