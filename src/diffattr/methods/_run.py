"""An attribution run: one directory that owns its stages (features, fitted state, scores).

:class:`Attribution` is the library's entry point::

    run = Attribution("runs/attr", load_checkpoint("runs/m"))
    scores = run.score(DAS(), load_dataset("runs/m/samples"))

The run directory's layout is defined here, once (:class:`RunLayout`); the command line and the
report read and write it through this module. Every stage is saved and skipped when done:

- ``features/<weights>/<settings>/train-<data>/``: the training images' features, per checkpoint
  (resumable feature stores);
- ``fitted/<method>-<key>/``: what a method precomputes from them (DAS's kernel factor and
  directions, TRAK's kernel factor), so a second batch of queries is scored without refitting;
- ``features/.../query-<data>/``: each query set's features;
- ``scores/<method>/``: the scores, and ``run.json``: what the report needs to find the images.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from diffattr._io import read_format, read_json, sha256_file, write_json, write_npy
from diffattr.data import ImageDataset
from diffattr.errors import ConfigError, DataError, StoreCorruptError
from diffattr.features import Distributed, FeatureConfig, featurize, featurize_sharded
from diffattr.methods._base import AttributionMethod, Features, Method, ModelFreeMethod
from diffattr.methods._scores import Scores
from diffattr.methods._tracin import TracIn
from diffattr.models import Checkpoint, Pipeline, TrainConfig, load_checkpoint

RUN_FILE = "run.json"
SCORES_DIR = "scores"
FEATURES_DIR = "features"
FITTED_DIR = "fitted"
HEATMAPS_DIR = "heatmaps"
LDS_FILE = "lds.json"
RUN_FORMAT = "diffattr.run"
RUN_FORMAT_VERSION = 1
_FITTED_FORMAT = "diffattr.fitted"
_STATE_FILE = "state.json"

Model = Checkpoint | Pipeline


@dataclass(frozen=True)
class RunLayout:
    """Where each stage of a run lives under its directory."""

    root: Path

    @property
    def run_file(self) -> Path:
        """``run.json``: the models, data and settings of each method's scores."""
        return self.root / RUN_FILE

    def features(self, model_id: str, features: FeatureConfig) -> Path:
        """The folder of one checkpoint's stores made with one (resolved) feature setting."""
        digest = _digest(features.identity())
        return self.root / FEATURES_DIR / model_id[:16] / f"{features.output.kind}-{digest}"

    def scores(self, method: str) -> Path:
        """Where a method's scores are saved."""
        return self.root / SCORES_DIR / method

    def fitted(self, method: str, key: str) -> Path:
        """Where a method's fitted state for one set of training stores is saved."""
        return self.root / FITTED_DIR / f"{method}-{key}"


class Attribution:
    """One attribution run: the models, the training images, the feature settings, a directory.

    Methods are fitted on the training images' features once and the fit is saved, so every
    later :meth:`score` (new queries, another process) featurises only its queries. Several
    checkpoints form an ensemble (TracIn sums over them, the others average).

    Inside an initialised ``torch.distributed`` job (e.g. under torchrun) every rank must make
    the same calls: each featurises its block of the training images into its own part store,
    the fit is reduced over the ranks, each rank featurises and scores its block of the queries,
    and rank 0 gathers and saves the scores, which every rank returns. Fitted state is not
    saved in a distributed job (each job fits again).

    Args:
        out_dir: The run directory.
        models: A checkpoint (or its path), several, or a local diffusers pipeline.
        train: The training images; None reloads what the first checkpoint was trained on.
        features: Plan, projection, backend, parameters, precision; None: the defaults
            (``FeatureConfig()``: the backend rule picks the factored backend wherever it
            applies). A method sets the output function and normalisation it needs.
        batch_size: Images per gradient batch (speed and memory only).
        chunk_size: Images per store chunk (the unit of resumption).
        device: Where to compute.
        progress: Show progress bars.
        trust_remote_code: Allow checkpoints given as paths whose model is an importable
            factory (see ``docs/trust.md``).

    Raises:
        ConfigError: No models, or a pipeline without ``train``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        models: Model | str | os.PathLike[str] | Sequence[Model | str | os.PathLike[str]],
        train: ImageDataset | None = None,
        features: FeatureConfig | None = None,
        *,
        batch_size: int = 32,
        chunk_size: int = 256,
        device: str = "cpu",
        progress: bool = True,
        trust_remote_code: bool = False,
    ) -> None:
        single = isinstance(models, str | os.PathLike) or not isinstance(models, Sequence)
        items = [models] if single else list(models)  # type: ignore[list-item]
        if not items:
            raise ConfigError("an attribution run needs at least one checkpoint")
        # Paths are opened; anything else is used as a checkpoint (duck-typed, e.g. a wrapper).
        self.models: list[Model] = [
            load_checkpoint(m, trust_remote_code=trust_remote_code)
            if isinstance(m, str | os.PathLike)
            else m
            for m in items
        ]
        if train is None:
            if not isinstance(self.models[0], Checkpoint):
                raise ConfigError("a pipeline records no training images: pass them as train")
            train = self.models[0].training_data()
        self.train = train
        self.features = FeatureConfig() if features is None else features
        self.layout = RunLayout(Path(out_dir))
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.device = device
        self.progress = progress
        # The methods this object fitted (or reloaded), by name: score() reuses them.
        self._fitted: dict[str, Method] = {}

    @property
    def path(self) -> Path:
        """The run directory."""
        return self.layout.root

    def fit(self, method: Method) -> Method:
        """Fit ``method`` on the training images: featurise them (resumable), then fit or reload.

        Returns:
            The method, fitted (model-free methods need no fit and are returned as they are).
        """
        if isinstance(method, ModelFreeMethod):
            return method
        method = self._with_learning_rates(method)
        stores = self._stores(method, self.train, "train")
        distributed = Distributed.current()
        key = self._fit_key(method, stores)
        folder = self.layout.fitted(method.name, key)
        saved = None if distributed.active else _load_state(folder, method, len(stores))
        if saved is not None:
            method.restore(stores, saved)
        else:
            method.fit(stores)
            states = method.saved_state()
            if states is not None and not distributed.active:
                _save_state(folder, method, states)
        self._fitted[method.name] = method
        return method

    def score(self, method: Method, queries: ImageDataset) -> Scores:
        """Scores of ``queries`` against the training images, saved under ``scores/<method>/``.

        The training features and the method's fit are reused when the run already has them.

        Raises:
            DataError: The queries' images differ in shape from the training images.
        """
        if queries.images.shape[1:] != self.train.images.shape[1:]:
            # Checked before any featurisation, which may take long.
            raise DataError(
                f"query images {tuple(queries.images.shape[1:])} differ from the training "
                f"images {tuple(self.train.images.shape[1:])}"
            )
        distributed = Distributed.current()
        if isinstance(method, ModelFreeMethod):
            if distributed.active:
                raise ConfigError(f"{method.name} runs in one process, not under torchrun")
            scores = method.score_images(
                queries,
                self.train,
                scheduler_config=self.models[0].scheduler_config,
                device=self.device,
                progress=self.progress,
            )
        else:
            if self._fitted.get(method.name) is not method:
                method = self.fit(method)
            own_ids = queries.ids[distributed.block(len(queries))]
            local = None
            if len(own_ids):
                local = method.score(self._stores(method, queries.select(own_ids), "query"))
            scores = _gather(local, distributed)
        if distributed.rank == 0:
            scores.save(self.layout.scores(method.name))
            self._record(method.name, queries)
        distributed.barrier()
        return scores

    def _with_learning_rates(self, method: AttributionMethod) -> AttributionMethod:
        if isinstance(method, TracIn) and method.config.learning_rates is None:
            rates = tuple(_learning_rate(m) for m in self.models)
            return type(method)(replace(method.config, learning_rates=rates))
        return method

    def _stores(
        self, method: AttributionMethod, dataset: ImageDataset, role: str
    ) -> list[Features]:
        """One store per model: the method's own featurisation, or the engine's."""
        distributed = Distributed.current()
        wanted = method.features(self.features)
        stores: list[Features] = []
        for checkpoint in self.models:
            model_id = checkpoint.weights_id()
            model = checkpoint.load_model(device=self.device)
            settings = wanted.resolve(model)
            common = {
                "model_id": model_id,
                "batch_size": self.batch_size,
                "chunk_size": self.chunk_size,
                "device": self.device,
                "progress": self.progress,
            }
            own = method.featurizer(
                model,
                checkpoint.scheduler_config,
                self.train,
                settings,
                self.path,
                distributed=distributed,
                **common,
            )
            if own is not None:
                stores.append(own(dataset, role))  # type: ignore[arg-type]
                continue
            folder = self.layout.features(model_id, settings)
            folder /= f"{role}-{dataset.fingerprint()[:16]}"
            run = featurize
            if role == "train" and distributed.active:
                run = partial(featurize_sharded, distributed=distributed)
            stores.append(
                run(model, checkpoint.scheduler_config, dataset, settings, folder, **common)
            )
        return stores

    def _fit_key(self, method: AttributionMethod, stores: list[Features]) -> str:
        return _digest(
            {
                "method": method.name,
                "config": _jsonable(method.config),
                "stores": [
                    {
                        "settings": store.settings,
                        "ids": hashlib.sha256(np.asarray(store.ids).tobytes()).hexdigest(),
                    }
                    for store in stores
                ],
            }
        )

    def _record(self, method: str, queries: ImageDataset) -> None:
        """Add the method's entry to ``run.json``: where its images and models are."""
        record_run(
            self.path,
            method,
            [str(m.path) for m in self.models],
            {"source": queries.source},
            {"features": self.features.to_dict(), "train": self.train.source},
        )


def record_run(
    run_dir: str | os.PathLike[str],
    method: str,
    checkpoints: Sequence[str | os.PathLike[str]],
    queries: str | dict[str, Any],
    settings: dict[str, Any],
) -> Path:
    """Add or replace one method's entry in ``RUN_DIR/run.json``, so a report finds its images.

    Scores record sample ids, not where the images are: this file names the checkpoints (whose
    metadata locates the training images) and the queries. Several methods may share a run
    directory; each keeps its own entry.

    Args:
        run_dir: The directory holding ``scores/<method>/``.
        method: The method's name, as in its scores.
        checkpoints: The checkpoint directories attributed; the first names the training data.
        queries: ``"held-out"`` (the first checkpoint's held-out split), ``"digits"``, a path
            for :func:`~diffattr.data.load_dataset` (recorded as an absolute path), or
            ``{"source": ...}``: a dataset's reloadable source.
        settings: JSON-serialisable settings of the command.

    Returns:
        The path of ``run.json``.
    """
    path = Path(run_dir) / RUN_FILE
    doc = read_run(path) if path.is_file() else _new_run()
    if isinstance(queries, str) and queries not in ("held-out", "digits"):
        queries = str(Path(queries).resolve())
    doc["methods"][method] = {
        "checkpoints": [str(Path(c).resolve()) for c in checkpoints],
        "queries": queries,
        "settings": settings,
    }
    write_json(path, doc)
    return path


def read_run(path: Path, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """Read ``run.json``, raising ``error`` when it is unreadable or of another format."""
    doc = read_format(path, RUN_FORMAT, RUN_FORMAT_VERSION, error)
    if not isinstance(doc.get("methods"), dict):
        raise error(f"{path}: no 'methods' object")
    return doc


def _new_run() -> dict[str, Any]:
    return {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, "methods": {}}


def _save_state(folder: Path, method: AttributionMethod, states: list[dict[str, Any]]) -> None:
    """Arrays as ``.npy`` files (memory-mapped when read back), the rest and hashes in JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"format": _FITTED_FORMAT, "method": method.name, "states": []}
    for n, state in enumerate(states):
        entry: dict[str, Any] = {"arrays": {}, "values": {}}
        for name, value in state.items():
            if isinstance(value, np.ndarray):
                file = f"{n}-{name}.npy"
                write_npy(folder / file, value)
                entry["arrays"][name] = {"file": file, "sha256": sha256_file(folder / file)}
            else:
                entry["values"][name] = value
        record["states"].append(entry)
    # Written last: a fit interrupted before this is simply fitted again.
    write_json(folder / _STATE_FILE, record)


def _load_state(folder: Path, method: AttributionMethod, count: int) -> list[dict[str, Any]] | None:
    file = folder / _STATE_FILE
    if not file.is_file():
        return None
    record = read_json(file)
    if record.get("format") != _FITTED_FORMAT or len(record.get("states", [])) != count:
        raise StoreCorruptError(f"{file}: not the fitted state of {count} checkpoint(s)")
    states = []
    for entry in record["states"]:
        state = dict(entry["values"])
        for name, info in entry["arrays"].items():
            path = folder / Path(info["file"]).name
            if not path.is_file() or sha256_file(path) != info["sha256"]:
                raise StoreCorruptError(f"{path}: missing or altered since {method.name} was fit")
            state[name] = np.load(path, mmap_mode="r")
        states.append(state)
    return states


def _gather(local: Scores | None, distributed: Distributed) -> Scores:
    """All ranks' score rows, in rank order (ranks without queries send None)."""
    pieces = [p for p in distributed.all_gather(local) if p is not None]
    if len(pieces) == 1:
        return pieces[0]
    first = pieces[0]
    return Scores(
        values=np.concatenate([p.values for p in pieces]),
        query_ids=np.concatenate([p.query_ids for p in pieces]),
        train_ids=first.train_ids,
        method=first.method,
        settings={**first.settings, "world_size": distributed.world_size},
    )


def _learning_rate(checkpoint: Model) -> float:
    training = getattr(checkpoint, "metadata", {}).get("training")
    if not training:
        raise ConfigError(
            f"{checkpoint.path} records no training recipe: give TracIn's learning_rates"
        )
    return TrainConfig.from_dict(training).learning_rate_at(max(checkpoint.step - 1, 0))


def _jsonable(config: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    return json.loads(json.dumps(asdict(config) if is_dataclass(config) else config))


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]
