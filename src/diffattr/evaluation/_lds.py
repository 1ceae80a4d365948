"""An LDS benchmark's life cycle: subset masks, retrained subset models, ground truth.

A benchmark is a directory::

    benchmark.json          settings, seeds, base model, training ids, query sets, truth plans
    masks.npy               (M, N) bool: the training images subset m keeps (columns: train ids)
    base/                   the base checkpoint, whose recipe every subset model repeats
    init/                   the pretrained model a LoRA base was fine-tuned from (only then):
                            every subset model fine-tunes it alike
    queries/<set>.npz       query images and ids of each query set ("heldout", "generated")
    truth/subset-MMMM-seed-S.npz
                            one retrained model's query losses, (R, Q) per query set
    models/                 subset checkpoints while they train (deleted once measured)
    ground_truth.npz        merged: (M, S, R, Q) losses per query set

Every piece is written atomically and carries the benchmark's id, so a build resumes after an
interruption (finished models are not retrained, a half-trained one resumes from its last
checkpoint) and separate processes (``shard=(i, n)``) can split the retraining between them.
The metric itself is ``_metric.py``; scoring saved scores on a benchmark, ``_lds_score.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from tqdm.auto import tqdm

from diffattr._config import check_fields, is_int, known_fields
from diffattr._io import (
    output_lock,
    path_inside,
    read_format,
    sha256_file,
    write_json,
    write_npy,
    write_npz,
)
from diffattr._seed import derive_seed, generator
from diffattr._version import __version__
from diffattr.data import ImageDataset, load_npz, save_grid
from diffattr.errors import BenchmarkError, ConfigError, DataError
from diffattr.evaluation._retrain import recorded_init, recorded_recipe, retrain_like
from diffattr.features import Plan, PlanConfig
from diffattr.models import (
    Checkpoint,
    DiffusionTask,
    TrainConfig,
    condition,
    load_checkpoint,
    sample_checkpoint,
    save_checkpoint,
    to_diffusion_space,
)

BENCHMARK_FILE = "benchmark.json"
MASKS_FILE = "masks.npy"
TRUTH_FILE = "ground_truth.npz"
INIT_DIR = "init"
FORMAT = "diffattr.lds-benchmark"
FORMAT_VERSION = 1
QUERY_SETS = ("heldout", "generated")
QueryPart = Literal["reported", "calibration", "all"]

Schedule = Literal["epochs", "steps"]


@dataclass(frozen=True, kw_only=True, slots=True)
class LDSConfig:
    """How an LDS benchmark is drawn, retrained and measured.

    The formulas: docs/methods.md, section "Linear datamodeling score (LDS)".
    """

    num_subsets: int = field(default=64, metadata={"help": "M: random training subsets"})
    fraction: float = field(
        default=0.5, metadata={"help": "alpha: fraction of the training set each subset keeps"}
    )
    model_seeds: int = field(
        default=2,
        metadata={"help": "models per subset (training seeds); >= 2 gives the noise ceiling"},
    )
    schedule: Schedule = field(
        default="epochs",
        metadata={
            "help": "epochs: subset models train for the base's epochs (steps x alpha); "
            "steps: for the base's number of steps"
        },
    )
    n_heldout: int = field(
        default=100, metadata={"help": "held-out real queries, drawn from the base's split"}
    )
    n_generated: int = field(
        default=100, metadata={"help": "generated queries: the base samples seeds 0..n-1"}
    )
    truth_timesteps: int = field(
        default=1000, metadata={"help": "timesteps of the ground-truth loss (uniform)"}
    )
    truth_noise_draws: int = field(
        default=2, metadata={"help": "noise draws per timestep of the ground-truth loss"}
    )
    seed: int = field(default=0, metadata={"help": "root seed of masks, queries and truth noise"})
    guidance_scale: float = field(
        default=1.0,
        metadata={
            "help": "conditional models: classifier-free guidance of the generated queries "
            "(1: the conditional model alone)"
        },
    )
    n_calibration: int = field(
        default=0,
        metadata={
            "help": "queries of each set kept apart for choosing settings; the LDS is "
            "reported on the others"
        },
    )

    def __post_init__(self) -> None:
        checks = {
            "num_subsets": is_int(self.num_subsets) and self.num_subsets >= 3,
            "fraction": isinstance(self.fraction, float | int) and 0 < self.fraction < 1,
            "model_seeds": is_int(self.model_seeds) and self.model_seeds >= 1,
            "schedule": self.schedule in get_args(Schedule),
            "n_heldout": is_int(self.n_heldout) and self.n_heldout >= 0,
            "n_generated": is_int(self.n_generated) and self.n_generated >= 0,
            "truth_timesteps": is_int(self.truth_timesteps) and self.truth_timesteps >= 1,
            "truth_noise_draws": is_int(self.truth_noise_draws) and self.truth_noise_draws >= 1,
            "seed": is_int(self.seed),
            "guidance_scale": isinstance(self.guidance_scale, float | int)
            and math.isfinite(self.guidance_scale)
            and self.guidance_scale >= 0,
            "n_calibration": is_int(self.n_calibration)
            and self.n_calibration >= 0
            and all(n == 0 or n > self.n_calibration for n in (self.n_heldout, self.n_generated)),
        }
        allowed = {
            "num_subsets": "an integer >= 3 (Spearman over subsets)",
            "fraction": "in (0, 1)",
            "model_seeds": "an integer >= 1",
            "schedule": f"one of {list(get_args(Schedule))}",
            "n_heldout": "an integer >= 0",
            "n_generated": "an integer >= 0",
            "truth_timesteps": "an integer >= 1",
            "truth_noise_draws": "an integer >= 1",
            "seed": "an integer",
            "guidance_scale": "a finite number >= 0",
            "n_calibration": "an integer >= 0, smaller than each non-empty query set",
        }
        check_fields(self, checks, allowed)
        if self.n_heldout + self.n_generated == 0:
            raise ConfigError("LDSConfig needs queries: n_heldout + n_generated must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LDSConfig:
        """Rebuild settings written by :meth:`to_dict`; unknown keys are an error."""
        return cls(**known_fields(cls, data))


def draw_masks(n_train: int, config: LDSConfig) -> np.ndarray:
    """Draw the (M, N) boolean subset masks: each row keeps exactly round(alpha * N) images.

    Row m depends only on (seed, m), so adding subsets never changes the earlier ones.
    """
    keep = round(config.fraction * n_train)
    if not 1 <= keep < n_train:
        raise ConfigError(
            f"LDSConfig.fraction={config.fraction} keeps {keep} of {n_train} training images: "
            "each subset must keep at least one image and leave at least one out"
        )
    masks = np.zeros((config.num_subsets, n_train), dtype=bool)
    for m in range(config.num_subsets):
        order = torch.randperm(n_train, generator=generator(config.seed, "lds-mask", m))
        masks[m, order[:keep].numpy()] = True
    return masks


def truth_plans(config: LDSConfig, query_set: str, num_train_timesteps: int) -> list[Plan]:
    """The R plans of the ground-truth loss of one query set: same timesteps, own noise each."""
    return [
        Plan.build(
            PlanConfig(
                strategy="uniform",
                num_steps=min(config.truth_timesteps, num_train_timesteps),
                # Each query its own noise: the truth averages over more draws that way.
                noise="per_sample",
                seed=derive_seed(config.seed, "truth", query_set, r),
            ),
            num_train_timesteps,
        )
        for r in range(config.truth_noise_draws)
    ]


@torch.no_grad()
def query_losses(
    model: torch.nn.Module,
    scheduler_config: dict[str, Any],
    queries: ImageDataset,
    plans: list[Plan],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 1024,
    noise_cache: dict[int, torch.Tensor] | None = None,
) -> np.ndarray:
    """Diffusion loss of every query, averaged over each plan's timesteps.

    A conditional model is conditioned on each query's prompt; a latent model's loss is over its
    latents, as it is trained.

    Args:
        model: The denoiser, called as ``model(x_t, t)`` (``model(x_t, t, cond)``).
        scheduler_config: Its noise schedule.
        queries: Q images (with prompts for a conditional model).
        plans: R plans; plan r gives row r.
        device: Where to run the model.
        batch_size: (query, timestep) pairs per forward pass.
        noise_cache: Optional dict reused across calls with the same queries and plans, so the
            noise is drawn once for many models.

    Returns:
        (R, Q) float64 losses: the mean squared error of the model's prediction against the
        scheduler's target, over pixels and the plan's timesteps.
    """
    task = DiffusionTask(scheduler_config)
    x0 = to_diffusion_space(model, queries.images.to(device))
    cond = condition(model, queries.prompts)
    n_queries = len(queries)
    steps_per_batch = max(1, batch_size // max(1, n_queries))
    out = np.zeros((len(plans), n_queries), dtype=np.float64)
    for r, plan in enumerate(plans):
        noise = _plan_noise(plan, queries.ids, tuple(x0.shape[1:]), noise_cache, r)
        total = torch.zeros(n_queries, dtype=torch.float64, device=device)
        for first in range(0, len(plan), steps_per_batch):
            steps = range(first, min(first + steps_per_batch, len(plan)))
            eps = noise[steps.start : steps.stop].to(device).flatten(0, 1)
            t = torch.tensor(
                [plan.timesteps[k] for k in steps for _ in range(n_queries)], device=device
            )
            clean = x0.repeat(len(steps), 1, 1, 1)
            repeated = None if cond is None else cond.repeat(len(steps), *([1] * (cond.ndim - 1)))
            per_pair = task.losses(model, clean, eps, t, repeated).double()
            total += per_pair.view(len(steps), n_queries).sum(0)
        out[r] = (total / len(plan)).cpu().numpy()
    return out


def _plan_noise(
    plan: Plan,
    ids: np.ndarray,
    shape: tuple[int, ...],
    cache: dict[int, torch.Tensor] | None,
    key: int,
) -> torch.Tensor:
    if cache is not None and key in cache:
        return cache[key]
    noise = torch.stack([plan.noise_for(k, ids, shape) for k in range(len(plan))])
    if cache is not None:
        cache[key] = noise
    return noise


@dataclass(frozen=True)
class Unit:
    """One retrained model of a benchmark: subset ``subset`` with training seed ``seed``."""

    subset: int
    seed: int

    @property
    def name(self) -> str:
        """File-name stem, e.g. ``subset-0003-seed-1``."""
        return f"subset-{self.subset:04d}-seed-{self.seed}"


@dataclass(frozen=True)
class BuildReport:
    """What one :meth:`LDSBenchmark.build` call did."""

    trained: list[str]
    already_done: int
    remaining: int
    seconds: float


class LDSBenchmark:
    """A built (or building) LDS benchmark directory; open with :meth:`create` or :meth:`open`.

    Attributes:
        path: The directory.
        config: Its settings.
        base: The base checkpoint (``path/base``).
        train_ids: (N,) the training images' sample ids, the columns of :attr:`masks`.
        masks: (M, N) bool subset masks.
        queries: Query set name -> images.
        record: The content of ``benchmark.json``.
    """

    def __init__(self, path: Path, record: dict[str, Any], *, trust_remote_code: bool) -> None:
        self.path = path
        self.record = record
        self.config = LDSConfig.from_dict(record["config"])
        self.base = load_checkpoint(path / "base", trust_remote_code=trust_remote_code)
        self.init = _open_init(path, record, trust_remote_code)
        self.train_ids = np.asarray(record["train_ids"], dtype=np.int64)
        self.masks = _load_masks(path, record, len(self.train_ids))
        self.queries = {
            name: _load_queries(path, name, entry) for name, entry in record["queries"].items()
        }

    @property
    def id(self) -> str:
        """Identity of the benchmark: a hash of its settings, base weights, masks and queries."""
        return str(self.record["benchmark_id"])

    @property
    def units(self) -> list[Unit]:
        """Every model to retrain, subset-major."""
        return [
            Unit(m, s)
            for m in range(self.config.num_subsets)
            for s in range(self.config.model_seeds)
        ]

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        base: Checkpoint | str | os.PathLike[str],
        config: LDSConfig,
        *,
        device: str | torch.device = "cpu",
        progress: bool = True,
        trust_remote_code: bool = False,
    ) -> LDSBenchmark:
        """Set up a benchmark for a trained base model: copy the base, draw masks and queries.

        Idempotent: an existing benchmark at ``path`` made from the same base and settings is
        opened; one made otherwise is refused.

        Args:
            path: The benchmark directory.
            base: The trained base checkpoint; it must record its training data and split (every
                checkpoint ``diffattr train`` writes does).
            config: The settings.
            device: Where to sample the generated queries.
            progress: Show a progress bar while sampling.
            trust_remote_code: Allow checkpoints (the base, its copy, the model it was
                fine-tuned from, an existing benchmark's) whose model is an importable
                ``module:factory``; see :func:`~diffattr.models.load_checkpoint`.

        Raises:
            BenchmarkError: ``path`` holds a different benchmark.
            DataError: The base records no reloadable data, or too few held-out images.
        """
        path = Path(path)
        if not isinstance(base, Checkpoint):
            base = load_checkpoint(base, trust_remote_code=trust_remote_code)
        if (path / BENCHMARK_FILE).exists():
            existing = cls.open(path, trust_remote_code=trust_remote_code)
            differing = []
            if existing.config != config:
                differing.append("settings")
            if existing.record["base_weights"] != base.weights_id():
                differing.append("base weights")
            if differing:
                raise BenchmarkError(
                    f"{path} holds a benchmark with other {' and '.join(differing)}; "
                    "choose another directory"
                )
            return existing
        train_data = base.training_data()
        masks = draw_masks(len(train_data), config)
        queries = _draw_queries(base, config, device, progress)
        base_copy = _copy_base(base, path / "base")
        init = recorded_init(base, trust_remote_code=trust_remote_code)
        init_copy = _copy_base(init, path / INIT_DIR) if init is not None else None
        (path / "queries").mkdir(parents=True, exist_ok=True)
        write_npy(path / MASKS_FILE, masks)
        entries = {}
        for name, dataset in queries.items():
            entries[name] = _save_queries(path, name, dataset, config.guidance_scale)
            order = torch.randperm(
                len(dataset), generator=generator(config.seed, "lds-calib", name)
            )
            chosen = dataset.ids[order[: config.n_calibration].numpy()]
            entries[name]["calibration_ids"] = sorted(int(i) for i in chosen)
        scheduler_t = int(base.scheduler_config.get("num_train_timesteps", 1000))
        record: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "diffattr_version": __version__,
            "config": config.to_dict(),
            "base_weights": base_copy.weights_id(),
            "base_source": str(base.path),
            "init_weights": None if init_copy is None else init_copy.weights_id(),
            "train_fingerprint": train_data.fingerprint(),
            "train_ids": train_data.ids.tolist(),
            "masks_sha256": sha256_file(path / MASKS_FILE),
            "queries": entries,
            "subset_recipe": _recipe_description(base, config, len(train_data)),
            "truth_plans": {
                name: [p.to_dict() for p in truth_plans(config, name, scheduler_t)]
                for name in queries
            },
        }
        record["benchmark_id"] = _digest(record)
        write_json(path / BENCHMARK_FILE, record)
        return cls.open(path, trust_remote_code=trust_remote_code)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> LDSBenchmark:
        """Open a benchmark directory.

        Args:
            path: The benchmark directory.
            trust_remote_code: Allow a base (and pretrained model) whose model is an importable
                ``module:factory``; see :func:`~diffattr.models.load_checkpoint`.

        Raises:
            BenchmarkError: No benchmark there, another format, or a file that does not match
                ``benchmark.json`` or lies outside the directory.
            CheckpointError: The base is damaged, or needs ``trust_remote_code``.
        """
        path = Path(path)
        file = path / BENCHMARK_FILE
        if not file.is_file():
            raise BenchmarkError(f"{path}: not an LDS benchmark (no {BENCHMARK_FILE})")
        record = read_format(file, FORMAT, FORMAT_VERSION, BenchmarkError)
        return cls(path, record, trust_remote_code=trust_remote_code)

    def train_data(self) -> ImageDataset:
        """Reload the training images, in the order of :attr:`train_ids`."""
        data = self.base.training_data()
        if data.fingerprint() != self.record["train_fingerprint"]:
            raise BenchmarkError(f"{self.path}: the base's training data no longer matches")
        return data

    def subset_recipe(self, unit: Unit) -> TrainConfig:
        """The recipe of one subset model: the base's, with the unit's seed and length."""
        return _subset_recipe(self.base, self.config, len(self.train_ids), unit.subset, unit.seed)

    def truth_plans(self, query_set: str) -> list[Plan]:
        """The ground-truth plans of ``query_set``, as recorded."""
        return [Plan.from_dict(p) for p in self.record["truth_plans"][query_set]]

    def piece_path(self, unit: Unit) -> Path:
        """Where one unit's measured losses are stored."""
        return self.path / "truth" / f"{unit.name}.npz"

    def is_done(self, unit: Unit) -> bool:
        """Whether a valid measurement of ``unit`` exists (an invalid one raises)."""
        path = self.piece_path(unit)
        if not path.exists():
            return False
        self._read_piece(unit)
        return True

    def build(
        self,
        *,
        shard: tuple[int, int] = (0, 1),
        device: str | torch.device = "cpu",
        max_models: int | None = None,
        keep_models: bool = False,
        batch_size: int = 1024,
        progress: bool = True,
    ) -> BuildReport:
        """Retrain and measure this shard's subset models that are not done yet.

        Args:
            shard: (i, n): take every unit whose index is i modulo n; separate processes (or
                SLURM array tasks, or GPUs) take different i and the same n.
            device: Where to train and measure.
            max_models: Stop after training this many (for time-boxed jobs); rerun to go on.
            keep_models: Keep each subset checkpoint under ``models/`` after measuring it.
            batch_size: (query, timestep) pairs per forward pass of the measurement.
            progress: Show a progress bar.

        Returns:
            What was trained, what was already done and what is left in this shard.

        Raises:
            OutputError: Another process is training one of this shard's units (each unit's
                folder under ``models/`` is locked while it is built, see
                :func:`~diffattr._io.output_lock`).
        """
        index, count = _check_shard(shard)
        mine = [u for i, u in enumerate(self.units) if i % count == index]
        todo = [u for u in mine if not self.is_done(u)]
        if max_models is not None:
            if not is_int(max_models) or max_models < 0:
                raise ConfigError(f"max_models={max_models!r} is invalid: must be >= 0")
            todo = todo[:max_models]
        began = time.perf_counter()
        trained: list[str] = []
        if todo:
            train_data = self.train_data()
            caches: dict[str, dict[int, torch.Tensor]] = {name: {} for name in self.queries}
            bar = tqdm(todo, desc=f"lds shard {index}/{count}", unit="model", disable=not progress)
            for unit in bar:
                # Shards of one n never share a unit; overlapping ones (the same shard twice, or
                # another n) meet here, and the second to reach a unit in progress is refused.
                with output_lock(self.path / "models" / unit.name):
                    if self.is_done(unit):  # measured by another process meanwhile
                        continue
                    self._build_unit(unit, train_data, caches, device, keep_models, batch_size)
                trained.append(unit.name)
        remaining = sum(not self.is_done(u) for u in mine)
        return BuildReport(
            trained, len(mine) - len(todo), remaining, round(time.perf_counter() - began, 2)
        )

    def _build_unit(
        self,
        unit: Unit,
        train_data: ImageDataset,
        caches: dict[str, dict[int, torch.Tensor]],
        device: str | torch.device,
        keep_model: bool,
        batch_size: int,
    ) -> None:
        began = time.perf_counter()
        subset = train_data.select(self.train_ids[self.masks[unit.subset]])
        model_dir = self.path / "models" / unit.name
        checkpoint = retrain_like(
            self.base,
            subset,
            model_dir,
            init=self.init,
            recipe=self.subset_recipe(unit),
            device=device,
        )
        model = checkpoint.load_model("auto", device=str(device))
        arrays = {
            name: query_losses(
                model,
                self.base.scheduler_config,
                queries,
                self.truth_plans(name),
                device=device,
                batch_size=batch_size,
                noise_cache=caches[name],
            )
            for name, queries in self.queries.items()
        }
        meta = {
            "benchmark_id": self.id,
            "unit": unit.name,
            "weights": checkpoint.weights_id(),
            "steps": checkpoint.step,
            "seconds": round(time.perf_counter() - began, 2),
        }
        arrays["meta"] = np.array(json.dumps(meta))
        self.piece_path(unit).parent.mkdir(parents=True, exist_ok=True)
        write_npz(self.piece_path(unit), arrays)
        if not keep_model:
            shutil.rmtree(model_dir, ignore_errors=True)

    def _read_piece(self, unit: Unit) -> dict[str, np.ndarray]:
        path = self.piece_path(unit)
        try:
            with np.load(path) as data:
                arrays = {key: data[key] for key in data.files}
            meta = json.loads(str(arrays.pop("meta")))
        except (OSError, ValueError, KeyError) as err:
            raise BenchmarkError(
                f"{path}: unreadable measurement ({err}); delete it to redo"
            ) from err
        if meta.get("benchmark_id") != self.id:
            raise BenchmarkError(
                f"{path} was measured for another benchmark; delete it (or the truth folder)"
            )
        for name, queries in self.queries.items():
            shape = (self.config.truth_noise_draws, len(queries))
            values = arrays.get(name)
            if values is None or values.shape != shape or not np.isfinite(values).all():
                raise BenchmarkError(f"{path}: {name} losses are missing or malformed")
        return arrays

    def status(self) -> tuple[int, int]:
        """(units measured, units in total)."""
        return sum(self.is_done(u) for u in self.units), len(self.units)

    def merge(self) -> Path:
        """Check that every unit is measured and write ``ground_truth.npz``.

        Raises:
            BenchmarkError: Units are missing (they are listed) or a piece is invalid.
        """
        missing = [u.name for u in self.units if not self.piece_path(u).exists()]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise BenchmarkError(
                f"{self.path}: {len(missing)} of {len(self.units)} subset models are not measured "
                f"yet ({shown}); run `diffattr lds build` for every shard first"
            )
        shape = (self.config.num_subsets, self.config.model_seeds)
        merged = {
            name: np.zeros((*shape, self.config.truth_noise_draws, len(q)))
            for name, q in self.queries.items()
        }
        for unit in self.units:
            piece = self._read_piece(unit)
            for name in merged:
                merged[name][unit.subset, unit.seed] = piece[name]
        arrays: dict[str, np.ndarray] = {**merged, "benchmark_id": np.array(self.id)}
        write_npz(self.path / TRUTH_FILE, arrays)
        return self.path / TRUTH_FILE

    def ground_truth(self, query_set: str) -> np.ndarray:
        """(M, S, R, Q) losses of a query set, from ``ground_truth.npz``.

        Raises:
            BenchmarkError: Not merged yet, or merged for another benchmark.
        """
        self._check_query_set(query_set)
        file = self.path / TRUTH_FILE
        if not file.is_file():
            raise BenchmarkError(f"{self.path}: no {TRUTH_FILE}; run `diffattr lds merge` first")
        with np.load(file) as data:
            if str(data["benchmark_id"]) != self.id:
                raise BenchmarkError(f"{file} belongs to another benchmark; merge again")
            return np.asarray(data[query_set], dtype=np.float64)

    def calibration_ids(self, query_set: str) -> np.ndarray:
        """The ids of the queries of a set kept apart for choosing settings (maybe none)."""
        self._check_query_set(query_set)
        return np.asarray(self.record["queries"][query_set].get("calibration_ids", []), np.int64)

    def _check_query_set(self, query_set: str) -> None:
        if query_set not in self.queries:
            raise ConfigError(
                f"query set {query_set!r} is not in {self.path}: it has {sorted(self.queries)}"
            )


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise ConfigError(f"shard={shard!r} is invalid: must be (i, n)") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard={shard!r} is invalid: need n >= 1 and 0 <= i < n")
    return index, count


def _subset_recipe(
    base: Checkpoint, config: LDSConfig, n_train: int, subset: int, seed: int
) -> TrainConfig:
    recipe = recorded_recipe(base)
    keep = round(config.fraction * n_train)
    scale = keep / n_train if config.schedule == "epochs" else 1.0
    steps = max(1, round(recipe.steps * scale))
    warmup = recipe.warmup_steps
    if warmup is not None:
        warmup = min(round(warmup * scale), steps - 1)
    # The same training seed for every subset (common random numbers): initialisation and noise
    # draws are shared, so the subsets' outcomes differ by their data, not by unrelated noise.
    return replace(
        recipe,
        steps=steps,
        warmup_steps=warmup,
        seed=derive_seed(recipe.seed, "lds-model-seed", seed),
        checkpoint_every=min(recipe.checkpoint_every, steps),
    )


def _recipe_description(base: Checkpoint, config: LDSConfig, n_train: int) -> dict[str, Any]:
    recipe = _subset_recipe(base, config, n_train, 0, 0).to_dict()
    recipe["seed"] = "derive_seed(base seed, 'lds-model-seed', s) for model seed s"
    return recipe


def _draw_queries(
    base: Checkpoint, config: LDSConfig, device: str | torch.device, progress: bool
) -> dict[str, ImageDataset]:
    queries = {}
    if config.n_heldout:
        heldout = base.heldout_data()
        if len(heldout) < config.n_heldout:
            raise DataError(
                f"{base.path} holds out {len(heldout)} images, fewer than n_heldout="
                f"{config.n_heldout}; lower it or train the base with a larger query fraction"
            )
        order = torch.randperm(len(heldout), generator=generator(config.seed, "lds-heldout"))
        chosen = np.sort(heldout.ids[order[: config.n_heldout].numpy()])
        queries["heldout"] = heldout.select(chosen)
    if config.n_generated:
        seeds = list(range(config.n_generated))
        prompts = _generation_prompts(base, len(seeds))
        images = sample_checkpoint(
            base,
            seeds,
            prompts=prompts,
            guidance_scale=config.guidance_scale,
            device=device,
            progress=progress,
        )
        queries["generated"] = ImageDataset(
            images=images.cpu(),
            ids=np.asarray(seeds, dtype=np.int64),
            name="generated",
            prompts=prompts,
            source={"kind": "memory"},
        )
    return queries


def _open_init(path: Path, record: dict[str, Any], trust_remote_code: bool) -> Checkpoint | None:
    # Every subset model starts from the same pretrained weights as the base: a copy of them.
    weights = record.get("init_weights")
    if weights is None:
        return None
    init = load_checkpoint(path / INIT_DIR, trust_remote_code=trust_remote_code)
    if init.weights_id() != weights:
        raise BenchmarkError(f"{path / INIT_DIR}: weights do not match {BENCHMARK_FILE}")
    return init


def _generation_prompts(base: Checkpoint, n: int) -> list[str] | None:
    """Prompts of the generated queries: the training set's distinct prompts in turn.

    Training refuses prompts for an unconditional model and needs them for a conditional one,
    so the training data's prompts say which the base is.
    """
    prompts = base.training_data().prompts
    if prompts is None:
        return None
    distinct = sorted(set(prompts))
    return [distinct[i % len(distinct)] for i in range(n)]


def _copy_base(base: Checkpoint, target: Path) -> Checkpoint:
    """The base's weights (no optimizer state) and metadata, so the benchmark stands alone."""
    states = {role: base.load_state(role) for role in base.files if role != "optimizer"}
    metadata = {**base.metadata, "copied_from": str(base.path)}
    return save_checkpoint(
        target,
        model_spec=base.model_spec,
        scheduler_config=base.scheduler_config,
        step=base.step,
        states=states,
        metadata=metadata,
    )


def _save_queries(
    path: Path, name: str, dataset: ImageDataset, guidance_scale: float
) -> dict[str, Any]:
    arrays = {
        "images": dataset.images.numpy().astype(np.float32),
        "ids": dataset.ids,
        "value_range": np.array([-1.0, 1.0], dtype=np.float32),
    }
    if name == "generated":
        arrays["seeds"] = dataset.ids
    if dataset.labels is not None:
        arrays["labels"] = dataset.labels
    if dataset.prompts is not None:
        arrays["prompts"] = np.asarray(dataset.prompts, dtype=np.str_)
    file = path / "queries" / f"{name}.npz"
    write_npz(file, arrays)
    if name == "generated":
        # As `diffattr sample` records a generation (_draw_queries' sampler: DDPM, its default
        # steps), so that Journey-TRAK can re-run each query's chain.
        write_json(
            file.with_name("samples.json"),
            {
                "n": len(dataset),
                "seeds": dataset.ids.tolist(),
                "sampler": "ddpm",
                "steps": None,
                "guidance_scale": guidance_scale,
            },
        )
    save_grid(dataset.images[:64], path / "queries" / f"{name}.png")
    return {"file": f"queries/{name}.npz", "n": len(dataset), "sha256": sha256_file(file)}


def _load_queries(path: Path, name: str, entry: dict[str, Any]) -> ImageDataset:
    file = path_inside(path, entry["file"], BENCHMARK_FILE, BenchmarkError)
    if not file.is_file():
        raise BenchmarkError(f"{file}: query set {name!r} is missing")
    if sha256_file(file) != entry["sha256"]:
        raise BenchmarkError(f"{file}: contents do not match the SHA-256 in {BENCHMARK_FILE}")
    return load_npz(file)


def _load_masks(path: Path, record: dict[str, Any], n_train: int) -> np.ndarray:
    file = path / MASKS_FILE
    if not file.is_file():
        raise BenchmarkError(f"{file}: subset masks are missing")
    if sha256_file(file) != record["masks_sha256"]:
        raise BenchmarkError(f"{file}: contents do not match the SHA-256 in {BENCHMARK_FILE}")
    masks = np.load(file)
    config = record["config"]
    if masks.dtype != bool or masks.shape != (config["num_subsets"], n_train):
        raise BenchmarkError(f"{file}: masks of shape {masks.shape}, expected (M, N)")
    return masks


def _digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
