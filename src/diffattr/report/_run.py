"""What a report reads from a run directory: scores, the images they refer to, heatmaps, LDS."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffattr._io import read_json
from diffattr.data import ImageDataset, load_dataset, load_from_source
from diffattr.errors import ReportError
from diffattr.methods import Scores
from diffattr.methods._run import HEATMAPS_DIR, LDS_FILE, RUN_FILE, SCORES_DIR, read_run
from diffattr.methods._scores import META_FILE as SCORES_META
from diffattr.models import load_checkpoint

# The names `diffattr attribute --method nda --heatmaps N` gives its files.
_HEATMAP = re.compile(r"query-(-?\d+)-train-(-?\d+)-(query|train)\.png")
_LDS_KEYS = ("method", "query_set", "lds", "ci")


@dataclass(frozen=True)
class Heatmap:
    """An NDA heatmap pair of one query and its top training image.

    Attributes:
        query_id: The query's sample id.
        train_id: The training image's sample id.
        query_png: Which query pixels the training image explains.
        train_png: Where in the training image the matches lie.
    """

    query_id: int
    train_id: int
    query_png: Path
    train_png: Path


@dataclass(frozen=True)
class RunContents:
    """Everything a report shows, read from a run directory and checked for consistency.

    Attributes:
        run_dir: The run directory.
        scores: Method name -> its scores, sorted by name.
        train: The training images; every training id of every scores is among them.
        queries: The query images; every query id of every scores is among them.
        records: Method name -> its ``run.json`` entry (checkpoints, queries, command
            settings); empty when the images were passed in.
        heatmaps: NDA heatmap pairs found under ``heatmaps/``, by query id.
        lds: The LDS results (``diffattr lds score --out``), or None.
        lds_path: The file they came from, or None.
    """

    run_dir: Path
    scores: dict[str, Scores]
    train: ImageDataset
    queries: ImageDataset
    records: dict[str, dict[str, Any]]
    heatmaps: dict[int, list[Heatmap]]
    lds: dict[str, Any] | None
    lds_path: Path | None


def load_run(
    run_dir: str | os.PathLike[str],
    *,
    lds: str | os.PathLike[str] | None = None,
    train: ImageDataset | None = None,
    queries: ImageDataset | None = None,
) -> RunContents:
    """Read a run directory's scores, images, heatmaps and LDS results.

    Args:
        run_dir: Holds ``scores/<method>/`` and, unless both image sets are given, ``run.json``.
        lds: LDS results file; None reads ``RUN_DIR/lds.json`` when it exists.
        train: The training images; None reloads them through ``run.json``.
        queries: The query images; None reloads them through ``run.json``.

    Raises:
        ReportError: No scores; no ``run.json`` or no entry for a method; methods run on
            different images; ids in the scores missing from the images; a malformed LDS file.
    """
    run_dir = Path(run_dir)
    scores = _load_scores(run_dir)
    records: dict[str, dict[str, Any]] = {}
    if train is None or queries is None:
        records = _records(run_dir, list(scores))
        loaded_train, loaded_queries = _reload_images(records)
        train = train if train is not None else loaded_train
        queries = queries if queries is not None else loaded_queries
    for method, result in scores.items():
        _check_ids(method, "training", result.train_ids, train)
        _check_ids(method, "query", result.query_ids, queries)
    lds_path = Path(lds) if lds is not None else run_dir / LDS_FILE
    if lds is None and not lds_path.is_file():
        lds_path = None
    return RunContents(
        run_dir=run_dir,
        scores=scores,
        train=train,
        queries=queries,
        records=records,
        heatmaps=_heatmaps(run_dir / HEATMAPS_DIR),
        lds=None if lds_path is None else _read_lds(lds_path),
        lds_path=lds_path,
    )


def _load_scores(run_dir: Path) -> dict[str, Scores]:
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    folder = run_dir / SCORES_DIR
    found = sorted(p for p in folder.glob("*") if (p / SCORES_META).is_file())
    if not found:
        raise ReportError(
            f"{run_dir}: no scores (expected {SCORES_DIR}/<method>/ from diffattr attribute)"
        )
    scores = {}
    for directory in found:
        result = Scores.load(directory)
        scores[result.method] = result
    return scores


def _records(run_dir: Path, methods: list[str]) -> dict[str, dict[str, Any]]:
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise ReportError(
            f"{path}: missing; it records where the scored images are: rerun diffattr "
            "attribute with this --out to write it"
        )
    entries = read_run(path, ReportError)["methods"]
    missing = [m for m in methods if m not in entries]
    if missing:
        raise ReportError(f"{path} has no entry for the {missing[0]} scores; rerun its attribute")
    return {m: entries[m] for m in methods}


def _reload_images(records: dict[str, dict[str, Any]]) -> tuple[ImageDataset, ImageDataset]:
    """One training set and one query set for all methods, reloaded as ``run.json`` says."""
    checkpoints: dict[str, Any] = {}
    train_sets: dict[str, ImageDataset] = {}
    query_sets: dict[tuple[str, str], ImageDataset] = {}
    train_of, queries_of = {}, {}
    for method, entry in records.items():
        path = entry["checkpoints"][0]
        data = entry["settings"].get("data")
        train_source = entry["settings"].get("train")
        # The axis order given for .npz images (runs from before --layout record none).
        layout = entry["settings"].get("layout", "auto")
        if data is not None:
            # A --pipeline run: its training images were given, a pipeline records none.
            train_sets[path] = load_dataset(data, layout=layout)
        elif isinstance(train_source, dict):
            # A run made in Python records its training images' source.
            train_sets[path] = load_from_source(train_source)
        elif path not in checkpoints:
            # The weights are not needed, only the data the metadata locates: skip hashing them.
            # Trusted because no model is built from it.
            checkpoints[path] = load_checkpoint(path, verify=False, trust_remote_code=True)
            train_sets[path] = checkpoints[path].training_data()
        spec = entry["queries"]
        # A dataset given in Python records its reloadable source; the command line its spec.
        key = (json.dumps(spec, sort_keys=True), path if spec == "held-out" else "")
        if key not in query_sets:
            if isinstance(spec, dict):
                query_sets[key] = load_from_source(spec["source"])
            elif spec == "held-out":
                query_sets[key] = checkpoints[path].heldout_data()
            else:
                query_sets[key] = load_dataset(spec, layout=layout)
        train_of[method], queries_of[method] = train_sets[path], query_sets[key]
    return _one(train_of, "training images"), _one(queries_of, "queries")


def _one(datasets: dict[str, ImageDataset], what: str) -> ImageDataset:
    """The dataset every method used; an error when two methods used different ones."""
    methods = list(datasets)
    first = datasets[methods[0]]
    for method in methods[1:]:
        other = datasets[method]
        if other is not first and other.fingerprint() != first.fingerprint():
            raise ReportError(
                f"{methods[0]} and {method} were scored on different {what}; a report compares "
                "methods on the same images: give each its own run directory"
            )
    return first


def _check_ids(method: str, what: str, ids: np.ndarray, images: ImageDataset) -> None:
    missing = ids[~np.isin(ids, images.ids)]
    if missing.size:
        raise ReportError(
            f"the {method} scores name {what} id {int(missing[0])} ({missing.size} of {len(ids)} "
            f"ids), which is not among the {len(images)} {what} images of {images.name!r}: the "
            "scores and the images come from different runs"
        )


def _heatmaps(folder: Path) -> dict[int, list[Heatmap]]:
    pairs: dict[int, list[Heatmap]] = {}
    for path in sorted(folder.glob("query-*-query.png")):
        match = _HEATMAP.fullmatch(path.name)
        partner = path.with_name(path.name.removesuffix("query.png") + "train.png")
        if match and partner.is_file():
            query_id, train_id = int(match[1]), int(match[2])
            pairs.setdefault(query_id, []).append(Heatmap(query_id, train_id, path, partner))
    return pairs


def _read_lds(path: Path) -> dict[str, Any]:
    """LDS results as ``diffattr lds score --out`` writes them, checked for what a report shows."""
    if not path.is_file():
        raise ReportError(f"{path}: no such LDS results file")
    try:
        doc = read_json(path)
    except ValueError as err:
        raise ReportError(str(err)) from None
    results = doc.get("results")
    if not isinstance(results, list) or not results:
        raise ReportError(f"{path}: no 'results' list (expected diffattr lds score --out output)")
    for index, result in enumerate(results):
        missing = [key for key in _LDS_KEYS if key not in result]
        if missing:
            raise ReportError(f"{path}: result {index} lacks {', '.join(missing)}")
        ci = result["ci"]
        if not (isinstance(ci, list) and len(ci) == 2 and _numbers(result["lds"], *ci)):
            raise ReportError(f"{path}: result {index} needs a number 'lds' and 'ci': [low, high]")
    return doc


def _numbers(*values: object) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
