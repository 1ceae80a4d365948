"""Journey-TRAK: attribution of each step of a generation (docs/methods.md, "Journey-TRAK").

Georgiev et al. 2023, "The Journey, Not the Destination: How Data Guides Diffusion Models". The
training side is TRAK's: plan-averaged, unnormalised diffusion-loss gradients of the training
images, projected (the engine's stores), and the damped kernel K = Phi^T Phi + lambda I. The
query side re-runs the query's own generation from its recorded seed, sampler and number of
steps, and at S of its steps t_1 > ... > t_S takes the loss gradient at that step's state:

    phi_s(x) = P^T grad_theta (1/D) || eps_theta(x_{t_s}, t_s) - y(x_hat_0, eps*_s) ||^2,
    eps*_s = (x_{t_s} - sqrt(abar_{t_s}) x_hat_0) / sqrt(1 - abar_{t_s}),

x_{t_s} the trajectory's state (the network's input exactly), x_hat_0 the chain's final sample in
diffusion space and y the scheduler's target (eps*_s for epsilon prediction): the ordinary
diffusion loss of the generated image at t_s with the noise of its own trajectory instead of a
fresh draw (``journey_target="trajectory"``). ``"denoised"`` is the paper's published output
function: the trajectory's prediction of x_0 at step s, x_hat_0^(s), noised afresh,
x = sqrt(abar) x_hat_0^(s) + sqrt(1 - abar) xi with xi seeded per (step, query).

Scores per (query, step, training image) are s_s(x, z_i) = transform(phi_s(x)^T K^-1 phi(z_i));
the image-level score is their mean over the S steps. The per-step scores are saved beside the
image-level ones as ``scores/journey-trak/steps.npz`` (:class:`StepScores`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

from diffattr._io import read_json, write_npz
from diffattr._probe import measure
from diffattr._seed import generator
from diffattr.data import ImageDataset
from diffattr.errors import ConfigError, DataError, StoreError, StoreMismatchError
from diffattr.features import (
    FeatureConfig,
    FeatureStore,
    PlanConfig,
    estimate_featurization,
    featurize,
)
from diffattr.features._engine import _DTYPES, _computer_and_projector
from diffattr.features._factored import FactoredGradientComputer
from diffattr.features._gradients import GradientComputer
from diffattr.features._projection import Projector
from diffattr.methods._base import Features, PerQueryEstimate
from diffattr.methods._kernel import _BLOCK, Kernel, KernelConfig, _KernelMethod, _transform
from diffattr.methods._run import RunLayout
from diffattr.methods._scores import Scores
from diffattr.models import (
    DEFAULT_STEPS,
    DiffusionTask,
    condition,
    is_conditional,
    sample,
    to_diffusion_space,
)

#: The per-step scores' file in the method's scores folder.
STEPS_FILE = "steps.npz"
#: Largest difference (in [-1, 1] pixel units) allowed between a query and its regenerated
#: image: a batched forward rounds differently, and the chain carries that rounding along.
_IMAGE_TOLERANCE = 1e-2
_TARGETS = ("trajectory", "denoised")
_SAMPLERS = ("recorded", *sorted(DEFAULT_STEPS))


@dataclass(frozen=True, kw_only=True, slots=True)
class JourneyTRAKConfig(KernelConfig):
    """Journey-TRAK: TRAK's kernel, with query features along the query's own generation."""

    journey_steps: int = field(
        default=10,
        metadata={
            "help": "S, the generation steps attributed, evenly spaced over the query's chain "
            "(its first and last step included)"
        },
    )
    journey_target: Literal["trajectory", "denoised"] = field(
        default="trajectory",
        metadata={
            "help": "trajectory: the loss at the chain's state x_t with the noise linking it to "
            "the final sample; denoised: the paper's x0-prediction at the step, noised afresh"
        },
    )
    seed: int = field(
        default=0, metadata={"help": "root seed of the fresh noise of journey_target=denoised"}
    )
    sampler: Literal["recorded", "ddim", "ddpm"] = field(
        default="recorded",
        metadata={
            "help": "how queries without a samples.json record were generated (recorded: "
            "refuse them); a recorded generation must agree"
        },
    )
    sampling_steps: int = field(
        default=0, metadata={"help": "with --sampler: its steps (0: the sampler's default)"}
    )
    eta: float = field(default=0.0, metadata={"help": "with --sampler ddim: its eta"})
    guidance_scale: float = field(
        default=1.0, metadata={"help": "with --sampler: the classifier-free guidance used"}
    )

    def __post_init__(self) -> None:
        KernelConfig.__post_init__(self)
        if isinstance(self.journey_steps, bool) or not isinstance(self.journey_steps, int):
            raise ConfigError(f"journey_steps={self.journey_steps!r} is invalid: must be an int")
        if self.journey_steps < 1:
            raise ConfigError(f"journey_steps={self.journey_steps} is invalid: must be >= 1")
        if self.journey_target not in _TARGETS:
            raise ConfigError(
                f"journey_target={self.journey_target!r} is invalid: must be one of {_TARGETS}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r} is invalid: must be an integer")
        if self.sampler not in _SAMPLERS:
            raise ConfigError(f"sampler={self.sampler!r} is invalid: must be one of {_SAMPLERS}")
        if isinstance(self.sampling_steps, bool) or not isinstance(self.sampling_steps, int):
            raise ConfigError(f"sampling_steps={self.sampling_steps!r} is invalid: must be an int")
        if self.sampling_steps < 0:
            raise ConfigError(f"sampling_steps={self.sampling_steps} is invalid: must be >= 0")
        if not (isinstance(self.eta, int | float) and self.eta >= 0):
            raise ConfigError(f"eta={self.eta!r} is invalid: must be a number >= 0")
        if not (isinstance(self.guidance_scale, int | float) and self.guidance_scale >= 0):
            raise ConfigError(
                f"guidance_scale={self.guidance_scale!r} is invalid: must be a number >= 0"
            )


@dataclass(frozen=True)
class Generation:
    """How a set of queries was generated: what re-running their chains needs.

    Attributes:
        seeds: One seed per query, in the dataset's row order.
        sampler: ``"ddpm"`` or ``"ddim"``.
        steps: Denoising steps of the chain.
        eta: DDIM's noise scale.
        guidance_scale: Classifier-free guidance weight.
        source: Where the record came from (``samples.json`` or the method's settings).
    """

    seeds: np.ndarray
    sampler: str
    steps: int
    eta: float
    guidance_scale: float
    source: str

    def to_dict(self) -> dict[str, Any]:
        """The settings (without the seeds), as JSON types."""
        return {
            "sampler": self.sampler,
            "steps": self.steps,
            "eta": self.eta,
            "guidance_scale": self.guidance_scale,
            "source": self.source,
        }


def generation_of(queries: ImageDataset, config: JourneyTRAKConfig) -> Generation:
    """Each query's seed and the chain's settings, as ``diffattr sample`` records them.

    The seeds come from the queries' ``.npz`` (``seeds`` beside ``ids``), the sampler, steps,
    eta and guidance from the ``samples.json`` beside it; without that file, from the config's
    ``sampler`` (when not ``"recorded"``) and its companions.

    Raises:
        DataError: Queries without seeds or without a sampler record (the message names what is
            missing), resized queries, or a record that contradicts the config.
    """
    source = queries.source
    path = Path(source["path"]) if source.get("kind") == "npz" and "path" in source else None
    missing = []
    seeds = None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as arrays:
            if "seeds" in arrays.files:
                ids = arrays["ids"] if "ids" in arrays.files else np.arange(len(arrays["seeds"]))
                seed_of = {int(i): int(s) for i, s in zip(ids, arrays["seeds"], strict=True)}
                seeds = np.asarray([seed_of[int(i)] for i in queries.ids], dtype=np.int64)
    if seeds is None:
        missing.append("seeds")
    record = _read_record(path)
    if record is None and config.sampler == "recorded":
        missing.append("sampler and number of steps (samples.json)")
    if missing:
        raise DataError(
            f"journey-trak re-runs each query's generation, so it needs generated queries: "
            f"{queries.name} ({source.get('kind')}) lacks {' and '.join(missing)}. Use the "
            "samples of `diffattr sample` (samples.npz with samples.json), or state the "
            "generation with --sampler/--sampling-steps when only samples.json is missing"
        )
    if source.get("size") is not None:
        raise DataError(
            f"{queries.name}: the queries were resized ({source['size']}); their generation "
            "cannot be re-run at that size"
        )
    assert seeds is not None  # for the type checker: refused above otherwise
    declared = None if config.sampler == "recorded" else _declared(config)
    if record is None:
        assert declared is not None
        return Generation(seeds, *declared, source="method settings")
    if declared is not None and declared != record:
        raise DataError(
            f"{path.with_name('samples.json')} records the generation {record}, but the method "
            f"was given {declared} (sampler, steps, eta, guidance_scale)"
        )
    return Generation(seeds, *record, source=str(path.with_name("samples.json")))


def _declared(config: JourneyTRAKConfig) -> tuple[str, int, float, float]:
    steps = config.sampling_steps or DEFAULT_STEPS[config.sampler]
    eta = float(config.eta) if config.sampler == "ddim" else 0.0
    return config.sampler, steps, eta, float(config.guidance_scale)


def _read_record(npz: Path | None) -> tuple[str, int, float, float] | None:
    """(sampler, steps, eta, guidance) from ``samples.json``; None without one or a sampler."""
    if npz is None or not npz.with_name("samples.json").is_file():
        return None
    doc = read_json(npz.with_name("samples.json"))
    sampler = doc.get("sampler")
    if sampler not in DEFAULT_STEPS:
        return None
    # `diffattr sample` records steps=None for the sampler's default number.
    steps = doc.get("steps", doc.get("num_inference_steps")) or DEFAULT_STEPS[sampler]
    eta = float(doc.get("eta") or 0.0) if sampler == "ddim" else 0.0
    return sampler, int(steps), eta, float(doc.get("guidance_scale") or 1.0)


def step_indices(chain_steps: int, journey_steps: int) -> np.ndarray:
    """The S chain steps attributed: evenly spaced, the first and the last included.

    Raises:
        ConfigError: S exceeds the chain's number of steps.
    """
    if journey_steps > chain_steps:
        raise ConfigError(
            f"journey_steps={journey_steps} exceeds the queries' {chain_steps} sampling steps"
        )
    return np.round(np.linspace(0, chain_steps - 1, journey_steps)).astype(np.int64)


class _Trajectory:
    """The states of a chain at the attributed steps, filled by :func:`sample`'s hook."""

    def __init__(self, n: int, timesteps: set[int]) -> None:
        self.wanted = timesteps
        self.states: dict[int, torch.Tensor] = {}
        self.denoised: dict[int, torch.Tensor] = {}
        self.final: torch.Tensor | None = None
        self.n = n

    def __call__(
        self, rows: list[int], t: int, x_t: torch.Tensor, x0: torch.Tensor, x_prev: torch.Tensor
    ) -> None:
        if t in self.wanted:
            self._put(self.states, t, rows, x_t)
            self._put(self.denoised, t, rows, x0)
        if t == min(self.wanted):
            # The attributed steps end with the chain's last one, whose next state is the sample.
            if self.final is None:
                self.final = torch.empty((self.n, *x_prev.shape[1:]), dtype=x_prev.dtype)
            self.final[rows] = x_prev.detach().cpu()

    def _put(self, into: dict[int, torch.Tensor], t: int, rows: list[int], x: torch.Tensor) -> None:
        if t not in into:
            into[t] = torch.empty((self.n, *x.shape[1:]), dtype=x.dtype)
        into[t][rows] = x.detach().cpu()


def journey_features(
    model: torch.nn.Module,
    scheduler_config: dict[str, Any],
    queries: ImageDataset,
    features: FeatureConfig,
    config: JourneyTRAKConfig,
    path: str | Path,
    *,
    model_id: str,
    batch_size: int = 32,
    chunk_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> FeatureStore:
    """Store (or resume storing) the query features along each query's own generation.

    Args:
        model: The checkpoint's model: it re-runs the chains and is differentiated.
        scheduler_config: Its noise schedule.
        queries: Generated images whose seeds and sampler are recorded (:func:`generation_of`).
        features: The training features' settings (resolved): the same output function,
            projection, parameters and precision.
        config: The method's settings (steps, target, seed, declared generation).
        path: The store directory.
        model_id: Identifies the weights.
        batch_size: Chains and gradients per batch.
        chunk_size: Queries per store chunk (the unit of resumption).
        device: Where to compute.
        progress: Show a progress bar.

    Returns:
        A store with ``step_features`` (n, S, r, k): phi_s(x); ``features`` (n, r, k): their
        mean over the steps; ``timesteps`` (n, S); per step ``losses``, ``grad_norms`` (n, S)
        and ``residuals`` (n, S, r); and ``denoised`` (n, S, *x0 shape): the chain's prediction
        of x_0 at each step (diffusion space), for showing the trajectory.

    Raises:
        DataError: Queries without a recorded generation, or whose regenerated image differs
            from the stored one (another model, weights or sampler made them).
        ConfigError: More journey steps than the chain has.
    """
    journey = _Journey(model, scheduler_config, queries, features, config, batch_size, device)
    settings = {
        "model_id": model_id,
        "scheduler": {key: v for key, v in scheduler_config.items() if not key.startswith("_")},
        "features": features.identity(),
        "projector": journey.projector.to_dict(),
        "parameter_count": journey.computer.num_parameters,
        "dataset_fingerprint": queries.fingerprint(),
        "journey": {
            "target": config.journey_target,
            "timesteps": journey.timesteps.tolist(),
            "seed": config.seed,
            "generation": journey.generation.to_dict(),
        },
    }
    r, k, steps = journey.computer.num_outputs, journey.projector.proj_dim, len(journey.timesteps)
    store = FeatureStore.create_or_resume(
        path,
        settings=json.loads(json.dumps(settings)),
        ids=queries.ids,
        arrays={
            "features": ((r, k), features.dtype),
            "step_features": ((steps, r, k), features.dtype),
            "timesteps": ((steps,), "int64"),
            "losses": ((steps,), features.dtype),
            "grad_norms": ((steps,), features.dtype),
            "residuals": ((steps, r), features.dtype),
            "denoised": ((steps, *journey.shape), "float32"),
        },
        chunk_size=chunk_size,
    )
    row_of = {int(i): row for row, i in enumerate(queries.ids)}
    pending = store.pending_chunks()
    bar = tqdm(
        total=sum(len(store.chunk_ids(c)) for c in pending),
        desc="journey features",
        unit="query",
        disable=not progress,
    )
    for chunk in pending:
        rows = [row_of[int(i)] for i in store.chunk_ids(chunk)]
        store.write_chunk(chunk, journey.rows(rows))
        bar.update(len(rows))
    bar.close()
    store.finalize()
    return store


class _Journey:
    """Re-runs the queries' chains and differentiates the loss at the attributed steps."""

    def __init__(
        self,
        model: torch.nn.Module,
        scheduler_config: dict[str, Any],
        queries: ImageDataset,
        features: FeatureConfig,
        config: JourneyTRAKConfig,
        batch_size: int,
        device: str | torch.device,
    ) -> None:
        self.generation = generation_of(queries, config)
        self.computer, self.projector = _computer_and_projector(
            model, scheduler_config, features, device
        )
        self.prompts = None if queries.prompts is None else list(queries.prompts)
        # Checked before any work: a conditional model needs a prompt per image, others none.
        self.computer.condition(None if self.prompts is None else self.prompts[:1])
        scheduler_cls = DDPMScheduler if self.generation.sampler == "ddpm" else DDIMScheduler
        chain = scheduler_cls.from_config(scheduler_config)
        chain.set_timesteps(self.generation.steps)
        chosen = step_indices(self.generation.steps, config.journey_steps)
        self.timesteps = chain.timesteps.numpy().astype(np.int64)[chosen]
        self.shape = tuple(to_diffusion_space(model, queries.images[:1].to(device)).shape[1:])
        self.alphas_cumprod = DiffusionTask(scheduler_config).alphas_cumprod
        self.model, self.scheduler_config = model, scheduler_config
        self.queries, self.features, self.config = queries, features, config
        self.batch_size, self.device = batch_size, device

    def rows(self, rows: list[int]) -> dict[str, np.ndarray]:
        """Every array of the store for the queries at ``rows`` (dataset row indices)."""
        prompts = None if self.prompts is None else [self.prompts[r] for r in rows]
        seeds = [int(s) for s in self.generation.seeds[rows]]
        trajectory = _Trajectory(len(rows), {int(t) for t in self.timesteps})
        images = sample(
            self.model,
            self.scheduler_config,
            seeds,
            shape=self.shape,  # type: ignore[arg-type]
            sampler=self.generation.sampler,  # type: ignore[arg-type]
            num_inference_steps=self.generation.steps,
            eta=self.generation.eta,
            batch_size=self.batch_size,
            prompts=prompts,
            guidance_scale=self.generation.guidance_scale,
            device=self.device,
            progress=False,
            on_step=trajectory,
        )
        _check_regenerated(images, self.queries, rows, seeds)
        ids = self.queries.ids[rows]
        n, steps, r = len(rows), len(self.timesteps), self.computer.num_outputs
        out = {
            "step_features": np.empty((n, steps, r, self.projector.proj_dim)),
            "losses": np.empty((n, steps)),
            "grad_norms": np.empty((n, steps)),
            "residuals": np.empty((n, steps, r)),
        }
        for s, t in enumerate(int(t) for t in self.timesteps):
            for start in range(0, n, self.batch_size):
                part = slice(start, start + self.batch_size)
                x0, noise = self._inputs(trajectory, s, t, part, ids[part])
                cond = self.computer.condition(None if prompts is None else prompts[part])
                grads, norms, loss, residual = _step_gradients(
                    self.computer, self.projector, x0, t, noise, cond
                )
                grads = grads.to(_DTYPES[self.features.dtype])
                if self.features.normalize:
                    grads = grads / norms.clamp_min(1e-30)[:, None, None].to(grads.dtype)
                out["step_features"][part, s] = grads.detach().cpu().numpy()
                out["losses"][part, s] = loss.detach().cpu().double().numpy()
                out["grad_norms"][part, s] = norms.detach().cpu().double().numpy()
                out["residuals"][part, s] = residual.detach().cpu().double().numpy()
        denoised = torch.stack([trajectory.denoised[int(t)] for t in self.timesteps], dim=1)
        return {
            **out,
            "features": out["step_features"].mean(axis=1),
            "timesteps": np.broadcast_to(self.timesteps, (n, steps)).copy(),
            "denoised": denoised.float().numpy(),
        }

    def _inputs(
        self, trajectory: _Trajectory, s: int, t: int, part: slice, ids: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, noise) whose noising at t the engine differentiates (module docstring)."""
        abar = self.alphas_cumprod[t]
        if self.config.journey_target == "trajectory":
            assert trajectory.final is not None  # the hook saw the chain's last step
            x_t = trajectory.states[t][part].double()
            x0 = trajectory.final[part].double()
            # The noise that takes the final sample to x_t: the engine's noising then gives x_t.
            return x0, (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        x0 = trajectory.denoised[t][part].double()
        noise = [
            torch.randn(x0.shape[1:], generator=generator(self.config.seed, "journey", s, int(i)))
            for i in ids
        ]
        return x0, torch.stack(noise).double()


def _step_gradients(
    computer: GradientComputer,
    projector: Projector,
    x0: torch.Tensor,
    t: int,
    noise: torch.Tensor,
    cond: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projected gradients (B, r, k), the unprojected norms, losses and residuals at one step."""
    if isinstance(computer, FactoredGradientComputer):
        return computer.compute_features(x0, t, noise, cond)
    grads, loss, residual = computer.compute(x0, t, noise, cond)
    batch, r, p = grads.shape
    norms = grads.flatten(1).norm(dim=1)
    projected = projector.project(grads.reshape(batch * r, p)).reshape(batch, r, -1)
    return projected, norms, loss, residual


def _check_regenerated(
    images: torch.Tensor, queries: ImageDataset, rows: list[int], seeds: list[int]
) -> None:
    difference = (images - queries.images[rows]).abs().flatten(1).amax(dim=1)
    bad = torch.nonzero(difference > _IMAGE_TOLERANCE).flatten().tolist()
    if bad:
        row = bad[0]
        raise DataError(
            f"query {int(queries.ids[rows[row]])} (seed {seeds[row]}): its generation re-run "
            f"with this model ends {float(difference[row]):.3g} away from the stored image "
            f"(tolerance {_IMAGE_TOLERANCE}); {len(bad)} of {len(rows)} queries differ. Were "
            "they generated by another checkpoint, other weights (--weights), or another sampler?"
        )


@dataclass(frozen=True, eq=False)
class StepScores:
    """Journey-TRAK's scores per (query, step, training image), saved beside the image-level ones.

    Attributes:
        values: (n_query, S, n_train) float32; their mean over the steps is the image-level score.
        timesteps: (n_query, S) the scheduler timestep of each attributed step, from the noisiest
            to the last.
        query_ids: (n_query,) the queries' sample ids.
        train_ids: (n_train,) the training images' sample ids.
        denoised: (n_query, S, *x0 shape) the chain's prediction of x_0 at each step, in
            diffusion space (a latent model's latents): the trajectory, to show it.
    """

    values: np.ndarray
    timesteps: np.ndarray
    query_ids: np.ndarray
    train_ids: np.ndarray
    denoised: np.ndarray

    def save(self, directory: str | Path) -> Path:
        """Write ``steps.npz`` into ``directory`` (the method's scores folder)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_npz(
            directory / STEPS_FILE,
            {
                "values": np.asarray(self.values, dtype=np.float32),
                "timesteps": np.asarray(self.timesteps, dtype=np.int64),
                "query_ids": np.asarray(self.query_ids, dtype=np.int64),
                "train_ids": np.asarray(self.train_ids, dtype=np.int64),
                "denoised": np.asarray(self.denoised, dtype=np.float32),
            },
        )
        return directory / STEPS_FILE

    @classmethod
    def load(cls, directory: str | Path) -> StepScores:
        """Read ``steps.npz`` from a scores folder.

        Raises:
            StoreError: The folder holds no per-step scores.
        """
        path = Path(directory) / STEPS_FILE
        if not path.is_file():
            raise StoreError(f"{path}: no Journey-TRAK per-step scores")
        with np.load(path, allow_pickle=False) as arrays:
            return cls(**{name: arrays[name] for name in arrays.files})


class JourneyTRAK(_KernelMethod):
    """Journey-TRAK (Georgiev et al. 2023): TRAK scores of each step of the query's generation.

    Run it through :class:`~diffattr.methods.Attribution` (or ``diffattr attribute --method
    journey-trak``): its :meth:`featurizer` re-runs each query's chain. After :meth:`score`,
    :attr:`step_scores` holds the per-step scores, which a run also saves as
    ``scores/journey-trak/steps.npz``.
    """

    name = "journey-trak"
    config_cls = JourneyTRAKConfig
    output_kind = "loss"

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._run_dir: Path | None = None
        self._steps: list[np.ndarray] = []
        self._trajectory: tuple[np.ndarray, np.ndarray] | None = None
        #: The per-step scores of the last :meth:`score`.
        self.step_scores: StepScores | None = None

    def featurizer(
        self,
        model: torch.nn.Module,
        scheduler_config: dict[str, Any],
        train: ImageDataset,
        features: FeatureConfig,
        out_dir: Path,
        **options: Any,
    ) -> _JourneyFeaturizer:
        """The engine's stores for the training images, trajectory features for the queries.

        Raises:
            ConfigError: Under torchrun (the per-step scores are saved by one process).
        """
        distributed = options.pop("distributed", None)
        if distributed is not None and distributed.active:
            raise ConfigError("journey-trak runs in one process, not under torchrun")
        self._run_dir = Path(out_dir)
        return _JourneyFeaturizer(self, model, scheduler_config, features, Path(out_dir), options)

    def score(self, query: Features | list[Features]) -> Scores:
        """Image-level scores (the mean over the steps); per-step ones in :attr:`step_scores`."""
        self._steps, self._trajectory = [], None
        scores = super().score(query)
        assert self._trajectory is not None
        timesteps, denoised = self._trajectory
        self.step_scores = StepScores(
            np.mean(self._steps, axis=0), timesteps, scores.query_ids, scores.train_ids, denoised
        )
        if self._run_dir is not None:
            self.step_scores.save(RunLayout(self._run_dir).scores(self.name))
        return scores

    def _score_one(self, state: Kernel, train: Features, query: Features) -> np.ndarray:
        if not isinstance(query, FeatureStore) or "step_features" not in query.arrays:
            raise StoreMismatchError(
                f"{query.path}: journey-trak scores features along the queries' generation; "
                "make them with its featurizer (as Attribution does)"
            )
        steps = np.asarray(query.array("step_features"), dtype=np.float64)  # (q, S, r, k)
        n_query, n_steps, r, k = steps.shape
        solved = state.solve(steps.reshape(-1, k).T).T.reshape(n_query * n_steps, r * k)
        train_features = train.array("features")
        out = np.empty((n_query * n_steps, len(train_features)))
        for start in range(0, len(train_features), _BLOCK):
            block = np.asarray(train_features[start : start + _BLOCK], dtype=np.float64)
            out[:, start : start + len(block)] = solved @ block.reshape(len(block), -1).T
        per_step = _transform(out, self.config.transform).reshape(n_query, n_steps, -1)
        self._steps.append(per_step)
        if self._trajectory is None:
            # The first checkpoint's chain (an ensemble's checkpoints all regenerate the query).
            arrays = (query.array("timesteps"), query.array("denoised"))
            self._trajectory = (np.asarray(arrays[0]), np.asarray(arrays[1]))
        return per_step.mean(axis=1)

    def _extra_settings(self) -> dict[str, Any]:
        return {
            **super()._extra_settings(),
            "aggregate": "mean over the attributed steps",
            "step_scores": STEPS_FILE,
        }


class _JourneyFeaturizer:
    """What :meth:`JourneyTRAK.featurizer` returns: called with (dataset, role)."""

    def __init__(
        self,
        method: JourneyTRAK,
        model: torch.nn.Module,
        scheduler_config: dict[str, Any],
        features: FeatureConfig,
        out_dir: Path,
        options: dict[str, Any],
    ) -> None:
        self.method = method
        self.model = model
        self.scheduler_config = scheduler_config
        self.features = features
        self.options = options
        # The layout Attribution uses, so TRAK and Journey-TRAK share the training features.
        self.folder = RunLayout(out_dir).features(options["model_id"], features)

    def __call__(self, dataset: ImageDataset, role: Literal["train", "query"]) -> FeatureStore:
        tag = dataset.fingerprint()[:16]
        if role == "train":
            return featurize(
                self.model,
                self.scheduler_config,
                dataset,
                self.features,
                self.folder / f"train-{tag}",
                **self.options,
            )
        config = self.method.config
        journey = {
            "target": config.journey_target,
            "steps": config.journey_steps,
            "seed": config.seed,
            "declared": [config.sampler, config.sampling_steps, config.eta, config.guidance_scale],
        }
        digest = hashlib.sha256(json.dumps(journey, sort_keys=True).encode()).hexdigest()[:12]
        return journey_features(
            self.model,
            self.scheduler_config,
            dataset,
            self.features,
            config,
            self.folder / f"journey-{digest}-query-{tag}",
            **self.options,
        )


def estimate_journey(
    model: torch.nn.Module,
    scheduler_config: dict[str, Any],
    features: FeatureConfig | None = None,
    config: JourneyTRAKConfig | None = None,
    *,
    image_shape: tuple[int, int, int],
    n_train: int,
    n_queries: int = 1,
    sampler: str = "ddpm",
    chain_steps: int | None = None,
    guidance_scale: float = 1.0,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    probe_steps: int = 4,
) -> PerQueryEstimate:
    """Estimate the time of Journey-TRAK over ``n_queries`` generated queries, from short probes.

    The training side and each query's S step gradients are featurisations (the engine's
    :func:`~diffattr.features.estimate_featurization` with the method's feature settings: the
    training set at the run's K timesteps, the queries at S "timesteps"). The chain re-run is
    timed by sampling ``min(batch_size, n_queries)`` random seeds for ``probe_steps`` steps of
    ``sampler`` (with ``guidance_scale``; a conditional model gets the empty prompt), scaled to
    ``chain_steps`` and to the batches of ``n_queries``.

    Args:
        model: The model (not changed).
        scheduler_config: Its noise schedule.
        features: The run's feature settings (default ``FeatureConfig()``).
        config: The method's settings (default ``JourneyTRAKConfig()``): S.
        image_shape: (C, H, W) of the images.
        n_train: Training images.
        n_queries: Generated queries.
        sampler: The queries' sampler, ``"ddpm"`` or ``"ddim"``.
        chain_steps: Its number of steps (default: the sampler's default).
        guidance_scale: The queries' classifier-free guidance.
        batch_size: Chains and gradients per batch.
        device: Where the probes run, and the run would.
        probe_steps: Chain steps timed.

    Raises:
        ConfigError: Bad counts, an unknown sampler, or more journey steps than the chain has.
    """
    features = features or FeatureConfig()
    config = config or JourneyTRAKConfig()
    for name, value in (("n_train", n_train), ("n_queries", n_queries), ("batch", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} is invalid: must be an integer >= 1")
    if sampler not in DEFAULT_STEPS:
        raise ConfigError(f"sampler={sampler!r} is invalid: must be one of {sorted(DEFAULT_STEPS)}")
    steps = chain_steps or DEFAULT_STEPS[sampler]
    step_indices(steps, config.journey_steps)  # refuses S > steps
    settings = JourneyTRAK(config).features(features)
    train_side = estimate_featurization(
        model,
        scheduler_config,
        settings,
        image_shape=image_shape,
        n_samples=n_train,
        batch_size=batch_size,
        device=device,
    )
    # The queries' S steps cost what S timesteps of the plan cost.
    query_settings = replace(settings, plan=PlanConfig(num_steps=config.journey_steps))
    query_side = estimate_featurization(
        model,
        scheduler_config,
        query_settings,
        image_shape=image_shape,
        n_samples=n_queries,
        batch_size=batch_size,
        device=device,
    )
    batch = min(batch_size, n_queries)
    shape = tuple(to_diffusion_space(model, torch.zeros((1, *image_shape), device=device)).shape)
    prompts = [""] * batch if is_conditional(model) else None
    if prompts is not None:
        condition(model, prompts)  # checked before timing
    timed = min(probe_steps, steps)

    def chain() -> None:
        sample(
            model,
            scheduler_config,
            list(range(batch)),
            shape=shape[1:],  # type: ignore[arg-type]
            sampler=sampler,  # type: ignore[arg-type]
            num_inference_steps=timed,
            batch_size=batch,
            prompts=prompts,
            guidance_scale=guidance_scale,
            device=device,
            progress=False,
        )

    chain_probe = measure(chain, 1, torch.device(device))
    seconds_per_step = chain_probe.seconds / timed
    batches = -(-n_queries // batch)
    chain_seconds = seconds_per_step * steps * batches / n_queries
    gradients = query_side.seconds["gradients"] / n_queries
    return PerQueryEstimate(
        method="journey-trak",
        n_train=n_train,
        n_queries=n_queries,
        seconds_once={"training features": train_side.total_seconds},
        seconds_per_query={"chain": chain_seconds, "step gradients": gradients},
        probe={"seconds_per_chain_step_of_batch": seconds_per_step, "batch": batch},
        memory_bytes={
            # The stages run one after another: the larger featurisation, the chain batch's
            # measured growth, and the per-step scores (float64 while scoring).
            "featurisation (larger)": max(
                train_side.peak_memory_bytes, query_side.peak_memory_bytes
            ),
            **(
                {}
                if chain_probe.peak_bytes is None
                else {"chain (measured)": chain_probe.peak_bytes}
            ),
            "scores per step": n_queries * config.journey_steps * n_train * 8,
        },
    )
