"""The method contract: which features a method needs, ``fit`` on training features, ``score``."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import numpy as np
import torch

from diffattr.data import ImageDataset
from diffattr.errors import ConfigError, StoreMismatchError
from diffattr.features import FeatureConfig, FeatureStore, ShardedStore
from diffattr.features._preconditioned import StreamedFeatures
from diffattr.methods._scores import Scores

#: What methods read features from: one store, the parts of a distributed featurisation, or
#: features computed when read (the exact route of the curvature methods).
Features = FeatureStore | ShardedStore | StreamedFeatures
#: A method's own featurisation of a dataset, as the training images or as queries.
Featurizer = Callable[[ImageDataset, Literal["train", "query"]], Features]


class Method(ABC):
    """Base of every method in the registry: a name and a settings dataclass.

    Two kinds share it, and :class:`~diffattr.methods.Attribution` runs either:
    :class:`AttributionMethod` (gradient features of the model) and :class:`ModelFreeMethod`
    (the images alone, or the noise schedule).

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


class ModelFreeMethod(Method):
    """A method that scores from the images (and the noise schedule), never the model."""

    @abstractmethod
    def score_images(
        self,
        queries: ImageDataset,
        train: ImageDataset,
        *,
        scheduler_config: dict[str, Any],
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> Scores:
        """Return the (n_query, n_train) scores of ``queries`` against ``train``."""


class AttributionMethod(Method):
    """Base of every gradient method.

    A method names the output function and normalisation it needs (:meth:`features`); the caller
    featurises training and query images with that config, one store pair per checkpoint; then
    ``fit(train_stores).score(query_stores)`` gives :class:`Scores`. Several checkpoints form an
    ensemble: their scores are averaged (TracIn sums them, weighted by learning rate).
    """

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._train: list[Features] = []
        self._fit_state: list[Any] = []

    @abstractmethod
    def features(self, base: FeatureConfig) -> FeatureConfig:
        """Return ``base`` with the output function and normalisation this method needs."""

    def featurizer(
        self,
        model: torch.nn.Module,
        scheduler_config: dict[str, Any],
        train: ImageDataset,
        features: FeatureConfig,
        out_dir: Path,
        **options: Any,
    ) -> Featurizer | None:
        """A featurisation of the method's own, for methods that need more of the model.

        :func:`~diffattr.methods.attribute` calls it once per checkpoint before featurising.
        None (the default) means the feature engine's stores; the curvature methods estimate
        the Gauss-Newton matrix on ``train`` here and return a featuriser that preconditions by
        it.

        Args:
            model: The checkpoint's model.
            scheduler_config: Its noise schedule.
            train: The training images.
            features: :meth:`features` of the run's settings.
            out_dir: The run directory.
            **options: ``model_id``, ``batch_size``, ``chunk_size``, ``device``, ``progress``
                and ``distributed``, as :func:`~diffattr.methods.attribute` has them.
        """
        return None

    @abstractmethod
    def _fit_one(self, train: Features) -> Any:
        """Precompute what scoring against one checkpoint's training features needs."""

    @abstractmethod
    def _score_one(self, state: Any, train: Features, query: Features) -> np.ndarray:
        """Return (n_query, n_train) scores for one checkpoint."""

    def _combine(self, per_checkpoint: list[np.ndarray]) -> np.ndarray:
        return np.mean(per_checkpoint, axis=0)

    def _state_to_save(self, state: Any) -> dict[str, Any] | None:
        """One checkpoint's fitted state as arrays and JSON values; None: not saved."""
        return {} if state is None else None

    def _state_from_saved(self, saved: dict[str, Any]) -> Any:
        """Inverse of :meth:`_state_to_save`."""
        return None

    def saved_state(self) -> list[dict[str, Any]] | None:
        """The fitted state of every checkpoint, to save; None when the method keeps none."""
        states = [self._state_to_save(state) for state in self._fit_state]
        return None if any(state is None for state in states) else states  # type: ignore[misc]

    def restore(self, train: Sequence[Features], saved: list[dict[str, Any]]) -> Self:
        """Be fitted on ``train`` from :meth:`saved_state` of an earlier fit on the same stores."""
        self._train = list(train)
        for store in self._train:
            self._check_features(store)
        self._fit_state = [self._state_from_saved(state) for state in saved]
        return self

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

    def describe(self, settings: dict[str, Any]) -> str:
        """What scores with these ``settings`` were computed from, in a few words.

        ``diffattr attribute`` prints it; the default names the features' plan and projection.
        """
        features = settings["features"]
        return (
            f"{features['plan']['num_steps']} timesteps, k={features['projection']['dim']} "
            f"({features['backend']} backend)"
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


@dataclasses.dataclass(frozen=True)
class PerQueryEstimate:
    """Expected time, in seconds, of a method that pays most of its cost per query.

    Journey-TRAK (:func:`~diffattr.methods._journey.estimate_journey`) and unlearning
    (:func:`~diffattr.methods._unlearn.estimate_unlearn`) estimate this way.

    Attributes:
        method: The method's registry name.
        n_train: Training images.
        n_queries: Query images.
        seconds_once: What is paid once, by name.
        seconds_per_query: What each query pays, by name.
        probe: The measured rates the estimate scales.
        candidates: Training images each query's pass covers, where a method restricts it.
        memory_bytes: Resident bytes by piece; the working memory of the probed passes is
            measured (:mod:`diffattr._probe`) and left out where it cannot be.
    """

    method: str
    n_train: int
    n_queries: int
    seconds_once: dict[str, float]
    seconds_per_query: dict[str, float]
    probe: dict[str, float]
    candidates: int | None = None
    memory_bytes: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def peak_memory_bytes(self) -> int:
        """The sum of the resident pieces (an upper bound: not all live at once)."""
        return sum(self.memory_bytes.values())

    @property
    def per_query_seconds(self) -> float:
        """Seconds per query."""
        return sum(self.seconds_per_query.values())

    @property
    def total_seconds(self) -> float:
        """Everything paid once, plus every query."""
        return sum(self.seconds_once.values()) + self.n_queries * self.per_query_seconds

    def to_dict(self) -> dict[str, Any]:
        """As JSON types."""
        return {
            **dataclasses.asdict(self),
            "per_query_seconds": self.per_query_seconds,
            "total_seconds": self.total_seconds,
            "peak_memory_bytes": self.peak_memory_bytes,
        }
