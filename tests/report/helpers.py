"""Synthetic runs for the report tests: random scores over digits, no model training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffattr._io import write_json
from diffattr.data import ImageDataset, load_digits
from diffattr.methods import Scores
from diffattr.report import save_heatmap


def digit_sets(n_queries: int, n_train: int) -> tuple[ImageDataset, ImageDataset]:
    """(training images, queries): disjoint runs of the digits, queries first."""
    digits = load_digits()
    queries = digits.select(np.arange(n_queries))
    train = digits.select(np.arange(n_queries, n_queries + n_train))
    return train, queries


def write_scores(
    run: Path, methods: list[str], train: ImageDataset, queries: ImageDataset, seed: int = 0
) -> dict[str, Scores]:
    """Random scores of each method under ``run/scores/<method>/``; NDA's are non-negative."""
    rng = np.random.default_rng(seed)
    written = {}
    for method in methods:
        values = rng.normal(size=(len(queries), len(train))).astype(np.float32)
        if method == "nda":
            values = np.abs(values)
        scores = Scores(values, queries.ids, train.ids, method, {"seed": seed, "k": 16})
        scores.save(run / "scores" / method)
        written[method] = scores
    return written


def write_heatmaps(run: Path, scores: Scores, queries: ImageDataset, train: ImageDataset) -> None:
    """NDA-style heatmap pairs for the first two queries, named as `attribute --heatmaps` does."""
    generator = torch.Generator().manual_seed(0)
    for query_id in scores.query_ids[:2]:
        best = int(scores.top_k(int(query_id), 1)[0][0])
        stem = run / "heatmaps" / f"query-{int(query_id)}-train-{best}"
        for side, image in (
            ("query", queries.select([int(query_id)])),
            ("train", train.select([best])),
        ):
            heat = torch.rand(image.image_size, generator=generator).numpy()
            save_heatmap(image.images[0], heat, f"{stem}-{side}.png")


def write_lds(path: Path, methods: list[str]) -> Path:
    """An LDS results file in the format of ``diffattr lds score --out``."""
    results = [
        {
            "method": method,
            "query_set": "heldout",
            "lds": 0.1 + 0.05 * i,
            "ci": [0.05 + 0.05 * i, 0.16 + 0.05 * i],
            "per_query": [0.1, 0.2],
            "split_half": 0.4,
            "ceiling": 0.57,
            "ceiling_basis": "model seeds",
            "n_subsets": 32,
            "n_queries": 2,
            "settings": {},
        }
        for i, method in enumerate(methods)
    ]
    write_json(path, {"benchmark": "0123abcd", "results": results})
    return path
