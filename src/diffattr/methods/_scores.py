"""The result of an attribution: a score matrix with both sets of sample ids, saved and reloaded."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffattr._io import read_json, sha256_file, write_json, write_npy
from diffattr._version import __version__
from diffattr.errors import ConfigError, DataError, StoreCorruptError, StoreError

SCORES_FILE = "scores.npy"
META_FILE = "scores.json"
FORMAT = "diffattr.scores"

#: The sign convention every method follows.
SIGN_CONVENTION = (
    "positive: the training image helped the model produce the query (removing it would make "
    "the query less likely / raise its loss); negative: it worked against the query"
)


@dataclass(frozen=True, eq=False)
class Scores:
    """Attribution scores of query images against training images.

    Attributes:
        values: (n_query, n_train) float32; ``values[q, i]`` is the score of training image
            ``train_ids[i]`` for query ``query_ids[q]``, with :data:`SIGN_CONVENTION`.
        query_ids: (n_query,) int64 sample ids of the queries.
        train_ids: (n_train,) int64 sample ids of the training images.
        method: The method's registry name.
        settings: JSON-serialisable settings and seeds of the run (method config, features,
            checkpoints, the lambda actually used...).
    """

    values: np.ndarray
    query_ids: np.ndarray
    train_ids: np.ndarray
    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = np.asarray(self.values, dtype=np.float32)
        query_ids = np.asarray(self.query_ids, dtype=np.int64)
        train_ids = np.asarray(self.train_ids, dtype=np.int64)
        if values.shape != (len(query_ids), len(train_ids)):
            raise DataError(
                f"scores of shape {values.shape} do not match {len(query_ids)} query ids and "
                f"{len(train_ids)} training ids"
            )
        for name, ids in (("query", query_ids), ("training", train_ids)):
            if len(np.unique(ids)) != len(ids):
                raise DataError(f"{name} ids of the scores repeat")
        if not np.isfinite(values).all():
            raise DataError(f"{self.method} scores contain NaN or infinite values")
        try:
            # Normalised through JSON now, so saved and reloaded settings compare equal.
            settings = json.loads(json.dumps(self.settings, allow_nan=False))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"scores settings must be JSON-serialisable: {err}") from err
        object.__setattr__(self, "settings", settings)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "query_ids", query_ids)
        object.__setattr__(self, "train_ids", train_ids)

    def top_k(self, query_id: int, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Return the ``k`` strongest proponents and opponents of a query.

        Args:
            query_id: A sample id from :attr:`query_ids`.
            k: How many of each.

        Returns:
            ``(proponents, opponents)``: training sample ids, proponents by decreasing score,
            opponents by increasing score.
        """
        rows = np.flatnonzero(self.query_ids == query_id)
        if len(rows) == 0:
            raise DataError(f"query id {query_id} is not among the scored queries")
        row = self.values[rows[0]]
        k = min(k, len(row))
        order = np.argsort(-row, kind="stable")
        return self.train_ids[order[:k]], self.train_ids[order[::-1][:k]]

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``scores.npy`` and ``scores.json`` (ids, method, settings) atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_npy(directory / SCORES_FILE, self.values)
        write_json(
            directory / META_FILE,
            {
                "format": FORMAT,
                "diffattr_version": __version__,
                "method": self.method,
                "sign_convention": SIGN_CONVENTION,
                "shape": list(self.values.shape),
                "query_ids": self.query_ids.tolist(),
                "train_ids": self.train_ids.tolist(),
                "settings": self.settings,
                "sha256": sha256_file(directory / SCORES_FILE),
            },
        )
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Scores:
        """Read scores written by :meth:`save`, checking the matrix against its recorded hash."""
        directory = Path(directory)
        meta_path, values_path = directory / META_FILE, directory / SCORES_FILE
        if not meta_path.is_file() or not values_path.is_file():
            raise StoreError(f"{directory}: no saved scores ({META_FILE} and {SCORES_FILE})")
        meta = read_json(meta_path)
        if meta.get("format") != FORMAT:
            raise StoreError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if sha256_file(values_path) != meta.get("sha256"):
            raise StoreCorruptError(f"{values_path}: contents do not match {META_FILE}")
        return cls(
            values=np.load(values_path),
            query_ids=np.asarray(meta["query_ids"], dtype=np.int64),
            train_ids=np.asarray(meta["train_ids"], dtype=np.int64),
            method=meta["method"],
            settings=meta.get("settings", {}),
        )
