"""The method contract: which features a method needs, ``fit`` on training features, ``score``."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Self

import numpy as np

from diffattr.errors import ConfigError, StoreMismatchError
from diffattr.features import FeatureConfig, FeatureStore, ShardedStore
from diffattr.methods._scores import Scores

#: What methods read features from: one store, or the parts of a distributed featurisation.
Features = FeatureStore | ShardedStore


class AttributionMethod(ABC):
    """Base of every gradient method.

    A method names the output function and normalisation it needs (:meth:`features`); the caller
    featurises training and query images with that config, one store pair per checkpoint; then
    ``fit(train_stores).score(query_stores)`` gives :class:`Scores`. Several checkpoints form an
    ensemble: their scores are averaged (TracIn sums them, weighted by learning rate).

    Attributes:
        name: Registry key, e.g. ``"das"``.
        config: The method's settings (a frozen dataclass).
    """

    name: ClassVar[str]
    config_cls: ClassVar[type]

    def __init__(self, config: Any = None) -> None:
        self.config = self.config_cls() if config is None else config
        if not isinstance(self.config, self.config_cls):
            raise ConfigError(
                f"{type(self).__name__} takes a {self.config_cls.__name__}, "
                f"got {type(self.config).__name__}"
            )
        self._train: list[Features] = []
        self._fit_state: list[Any] = []

    @abstractmethod
    def features(self, base: FeatureConfig) -> FeatureConfig:
        """Return ``base`` with the output function and normalisation this method needs."""

    @abstractmethod
    def _fit_one(self, train: Features) -> Any:
        """Precompute what scoring against one checkpoint's training features needs."""

    @abstractmethod
    def _score_one(self, state: Any, train: Features, query: Features) -> np.ndarray:
        """Return (n_query, n_train) scores for one checkpoint."""

    def _combine(self, per_checkpoint: list[np.ndarray]) -> np.ndarray:
        return np.mean(per_checkpoint, axis=0)

    def fit(self, train: Features | Sequence[Features]) -> Self:
        """Precompute from the training features, one store per checkpoint."""
        stores = list(train) if isinstance(train, list | tuple) else [train]
        if not stores:
            raise ConfigError("fit needs at least one training feature store")
        for store in stores[1:]:
            if not np.array_equal(store.ids, stores[0].ids):
                raise StoreMismatchError(
                    f"{store.path}: training ids differ from those of {stores[0].path}"
                )
        for store in stores:
            self._check_features(store)
        self._train = stores
        self._fit_state = [self._fit_one(store) for store in stores]
        return self

    def score(self, query: Features | Sequence[Features]) -> Scores:
        """Score query features (one store per checkpoint, in the order given to :meth:`fit`)."""
        stores = list(query) if isinstance(query, list | tuple) else [query]
        if not self._train:
            raise ConfigError(f"{self.name}: call fit() before score()")
        if len(stores) != len(self._train):
            raise StoreMismatchError(
                f"{len(stores)} query stores for {len(self._train)} checkpoints"
            )
        for store in stores[1:]:
            if not np.array_equal(store.ids, stores[0].ids):
                raise StoreMismatchError(
                    f"{store.path}: query ids differ from those of {stores[0].path}"
                )
        per_checkpoint = []
        for state, train, store in zip(self._fit_state, self._train, stores, strict=True):
            self._check_pair(train, store)
            per_checkpoint.append(self._score_one(state, train, store))
        return Scores(
            values=self._combine(per_checkpoint),
            query_ids=stores[0].ids,
            train_ids=self._train[0].ids,
            method=self.name,
            settings={
                "config": _config_dict(self.config),
                "checkpoints": [s.settings.get("model_id") for s in self._train],
                "features": self._train[0].settings.get("features"),
                **self._extra_settings(),
            },
        )

    def _extra_settings(self) -> dict[str, Any]:
        return {}

    def _check_features(self, store: Features) -> None:
        made_with = store.settings.get("features", {})
        wanted = self.features(FeatureConfig.from_dict(made_with)).to_dict()
        for key in ("output", "normalize"):
            if made_with.get(key) != wanted[key]:
                raise StoreMismatchError(
                    f"{store.path}: features made with {key}={made_with.get(key)!r}, but "
                    f"{self.name} needs {wanted[key]!r}"
                )

    def _check_pair(self, train: Features, query: Features) -> None:
        self._check_features(query)
        for key in ("model_id", "features", "scheduler", "parameter_count"):
            if train.settings.get(key) != query.settings.get(key):
                raise StoreMismatchError(
                    f"query store {query.path} and training store {train.path} differ in {key}; "
                    "featurise both with the same checkpoint and settings"
                )


def _config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
