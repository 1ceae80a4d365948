"""Attribution by unlearning the query (docs/methods.md, "Unlearning").

After Wang, Efros, Zhu and Zhang, NeurIPS 2024, "Data Attribution for Text-to-Image Models by
Unlearning Synthesized Images". For each query x, a copy of the model unlearns x by ``steps``
steps of gradient ascent on x's diffusion loss, held near the original weights theta_0 by a
penalty (lambda / 2) sum_j F~_j (theta_j - theta_0j)^2 weighted by the diagonal Fisher of the
training loss: an ascent step on L_x, then the penalty's proximal (implicit) step,

    theta - theta_0 <- (theta - theta_0 + eta grad L_x(theta)) / (1 + eta lambda F~),

F~ = F / mean(F), F_j = (1/M) sum_m (d l(z_m; t_m, eps_m) / d theta_j)^2 over M training images
drawn with their timestep and noise from ``seed`` (the empirical Fisher of the diffusion loss).
Each training image is then scored by the rise of its own diffusion loss,

    s(x, z_i) = L_i(theta_x) - L_i(theta_0),

with the same noise before and after (common random numbers). A positive score: unlearning x
made z_i harder to denoise, so z_i resembles what x needed (the package's sign convention).

L is the loss over a recorded plan like the LDS ground truth's: ``loss_timesteps`` uniform
timesteps, noise drawn per image from (``derive_seed(seed, "unlearn-loss")``, step, sample id),
averaged. With one step and lambda = 0, L_i(theta_0 + eta g_x) - L_i(theta_0) = eta g_i . g_x +
O(eta^2): the score ranks like grad-dot with the same plan (tests/methods/test_unlearn.py).

The model is copied (in the features' dtype) and never saved: the checkpoint is only read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from diffattr._probe import measure
from diffattr._seed import derive_seed, generator
from diffattr.data import ImageDataset
from diffattr.errors import ConfigError, DataError
from diffattr.features import FeatureConfig, OutputConfig, Plan, PlanConfig
from diffattr.features._engine import _DTYPES
from diffattr.features._gradients import GradientComputer, select_parameters
from diffattr.methods._base import AttributionMethod, Features, PerQueryEstimate
from diffattr.methods._scores import Scores
from diffattr.models import (
    DiffusionTask,
    condition,
    is_conditional,
    to_diffusion_space,
)

#: (image, timestep) pairs per forward pass of the loss passes.
_PAIRS = 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class UnlearnConfig:
    """Unlearning the query: ascent steps, the Fisher penalty, the loss plan, the candidates."""

    steps: int = field(default=10, metadata={"help": "gradient-ascent steps on the query's loss"})
    learning_rate: float = field(
        default=1e-2, metadata={"help": "eta, the size of each ascent step"}
    )
    fisher_weight: float = field(
        default=1.0,
        metadata={
            "help": "lambda, the penalty on (theta - theta_0) weighted by the diagonal Fisher "
            "normalised to mean 1 (0: plain ascent)"
        },
    )
    fisher_samples: int = field(
        default=256,
        metadata={"help": "training images (one timestep and noise each) estimating the Fisher"},
    )
    loss_timesteps: int = field(
        default=100,
        metadata={"help": "uniform timesteps of the loss (each image its own recorded noise)"},
    )
    seed: int = field(default=0, metadata={"help": "root seed of the Fisher draws and the loss"})
    candidates: str | None = field(
        default=None,
        metadata={
            "help": "another method's scores folder (e.g. RUN/scores/das): only each query's "
            "top_m training images get the loss pass; the others score the minimum - 1"
        },
    )
    top_m: int = field(default=200, metadata={"help": "candidates per query, with --candidates"})

    def __post_init__(self) -> None:
        for name in ("steps", "fisher_samples", "loss_timesteps", "top_m"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} is invalid: must be an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r} is invalid: must be an integer")
        if not (isinstance(self.learning_rate, int | float) and self.learning_rate > 0):
            raise ConfigError(f"learning_rate={self.learning_rate!r} is invalid: must be > 0")
        if not (isinstance(self.fisher_weight, int | float) and self.fisher_weight >= 0):
            raise ConfigError(f"fisher_weight={self.fisher_weight!r} is invalid: must be >= 0")
        if self.candidates is not None and not isinstance(self.candidates, str):
            raise ConfigError(f"candidates={self.candidates!r} is invalid: must be a path")

    def loss_plan(self, num_train_timesteps: int) -> Plan:
        """The plan of every loss of the method: uniform timesteps, per-image noise."""
        config = PlanConfig(
            strategy="uniform",
            num_steps=min(self.loss_timesteps, num_train_timesteps),
            noise="per_sample",
            seed=derive_seed(self.seed, "unlearn-loss"),
        )
        return Plan.build(config, num_train_timesteps)


class ModelImages:
    """What :meth:`Unlearn.featurizer` gives for a dataset: its images and the model.

    Nothing is precomputed (unlearning needs the model itself); it reads like a feature store
    where the method contract looks (``ids``, ``n``, ``settings``, ``path``).

    Args:
        model: The working model: a copy in the features' dtype, on the device.
        scheduler_config: Its noise schedule.
        dataset: The images.
        features: The run's (resolved) feature settings: parameters and dtype.
        model_id: Identifies the weights.
        device: Where to compute.
        progress: Show progress bars.
    """

    def __init__(
        self,
        model: nn.Module,
        scheduler_config: dict[str, Any],
        dataset: ImageDataset,
        features: FeatureConfig,
        *,
        model_id: str,
        device: str | torch.device,
        progress: bool,
    ) -> None:
        self.model = model
        self.task = DiffusionTask(scheduler_config)
        self.scheduler_config = scheduler_config
        self.dataset = dataset
        self.features = features
        self.parameter_names = select_parameters(model, features.parameters)
        self.device = torch.device(device)
        self.progress = progress
        self.path = Path(f"(unlearn: {dataset.name})")
        selected = set(self.parameter_names)
        self.settings = {
            "model_id": model_id,
            "scheduler": {k: v for k, v in scheduler_config.items() if not k.startswith("_")},
            "features": features.identity(),
            "parameter_count": sum(p.numel() for n, p in model.named_parameters() if n in selected),
            "dataset_fingerprint": dataset.fingerprint(),
        }

    @property
    def ids(self) -> np.ndarray:
        """The sample ids, in row order."""
        return self.dataset.ids

    @property
    def n(self) -> int:
        """The number of images."""
        return len(self.dataset)

    def x0_and_condition(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The images at ``rows`` in diffusion space (the model's dtype) and their condition."""
        dtype = next(self.model.parameters()).dtype
        images = self.dataset.images[torch.as_tensor(rows)].to(self.device, dtype)
        prompts = None if self.dataset.prompts is None else [self.dataset.prompts[r] for r in rows]
        with torch.no_grad():
            x0 = to_diffusion_space(self.model, images)
        cond = condition(self.model, prompts)
        return x0, None if cond is None else cond.to(self.device)


def plan_losses(
    model: nn.Module,
    task: DiffusionTask,
    x0: torch.Tensor,
    cond: torch.Tensor | None,
    ids: np.ndarray,
    plan: Plan,
    *,
    first: int = 0,
    stop: int | None = None,
) -> torch.Tensor:
    """Each image's diffusion loss summed over plan steps ``first:stop``, divided by the plan's K.

    The LDS ground truth's expression (``query_losses``): the task's loss
    (:meth:`~diffattr.models.DiffusionTask.losses`), the noise of step k and image i
    ``plan.noise_for(k, [id_i])``. Differentiable; over the whole plan it is the plan's mean loss.
    """
    stop = len(plan) if stop is None else min(stop, len(plan))
    batch, steps = len(x0), range(first, stop)
    noise = torch.cat([plan.noise_for(k, ids, tuple(x0.shape[1:])) for k in steps]).to(x0)
    t = torch.tensor([plan.timesteps[k] for k in steps for _ in range(batch)], device=x0.device)
    clean = x0.repeat(len(steps), 1, 1, 1)
    repeated = None if cond is None else cond.repeat(len(steps), *([1] * (cond.ndim - 1)))
    losses = task.losses(model, clean, noise, t, repeated)
    return losses.view(len(steps), batch).sum(0) / len(plan)


def mean_losses(images: ModelImages, model: nn.Module, rows: np.ndarray, plan: Plan) -> np.ndarray:
    """Plan-mean diffusion loss of the images at ``rows`` under ``model``, float64."""
    out = np.empty(len(rows))
    per_batch = max(1, _PAIRS // len(plan))
    with torch.no_grad():
        for start in range(0, len(rows), per_batch):
            part = rows[start : start + per_batch]
            x0, cond = images.x0_and_condition(part)
            ids = images.ids[part]
            total = sum(
                plan_losses(model, images.task, x0, cond, ids, plan, first=k, stop=k + _steps(x0))
                for k in range(0, len(plan), _steps(x0))
            )
            out[start : start + len(part)] = torch.as_tensor(total).double().cpu().numpy()
    return out


def _steps(x0: torch.Tensor) -> int:
    """Plan steps per forward pass for a batch of images."""
    return max(1, _PAIRS // len(x0))


class Unlearn(AttributionMethod):
    """Attribution by unlearning the query (AbU, Wang et al. 2024); module docstring.

    Run it through :class:`~diffattr.methods.Attribution` (or ``diffattr attribute --method
    unlearn``): its :meth:`featurizer` hands it the model. Costs per query ``steps`` gradients
    of the query's loss over the plan, then a loss pass over the training images (or the
    candidates).
    """

    name = "unlearn"
    config_cls = UnlearnConfig

    def features(self, base: FeatureConfig) -> FeatureConfig:
        """The run's settings with the diffusion loss as output (its dtype and parameters)."""
        return replace(base, output=OutputConfig(kind="loss"), normalize=False)

    def featurizer(
        self,
        model: nn.Module,
        scheduler_config: dict[str, Any],
        train: ImageDataset,
        features: FeatureConfig,
        out_dir: Path,
        **options: Any,
    ) -> Any:
        """Hand the method a copy of the model with each dataset (nothing is featurised).

        Raises:
            ConfigError: Under torchrun (each query's unlearning runs in one process).
        """
        distributed = options.get("distributed")
        if distributed is not None and distributed.active:
            raise ConfigError("unlearn runs in one process, not under torchrun")
        device = options.get("device", "cpu")
        # A copy: the unlearning steps change weights, and the caller's model must not see them.
        work = nn.Module.to(copy.deepcopy(model), device=device, dtype=_DTYPES[features.dtype])
        work.eval()
        model_id, progress = options["model_id"], options.get("progress", True)

        def images(dataset: ImageDataset, role: Literal["train", "query"]) -> ModelImages:
            return ModelImages(
                work,
                scheduler_config,
                dataset,
                features,
                model_id=model_id,
                device=device,
                progress=progress,
            )

        return images

    def _check_features(self, store: Features) -> None:
        if not isinstance(store, ModelImages):
            raise ConfigError(
                f"{store.path}: unlearn needs the model, not features; run it through "
                "Attribution (or diffattr attribute), whose featurizer hook hands it the model"
            )
        super()._check_features(store)

    def _fit_one(self, train: ModelImages) -> dict[str, Any]:
        """The diagonal Fisher of the training loss, normalised to mean 1, and its mean."""
        config = self.config
        computer = GradientComputer(
            train.model,
            train.scheduler_config,
            OutputConfig(kind="loss"),
            train.features.parameters,
            dtype=next(train.model.parameters()).dtype,
            device=train.device,
        )
        count = min(config.fisher_samples, train.n)
        rows = torch.randperm(train.n, generator=generator(config.seed, "unlearn-fisher"))[:count]
        timesteps = torch.randint(
            0,
            computer.num_train_timesteps,
            (count,),
            generator=generator(config.seed, "unlearn-fisher-t"),
        )
        total = torch.zeros(computer.num_parameters, dtype=torch.float64)
        for t in torch.unique(timesteps).tolist():
            chosen = rows[timesteps == t].numpy()
            x0, cond = train.x0_and_condition(chosen)
            noise = torch.stack(
                [
                    torch.randn(
                        x0.shape[1:],
                        generator=generator(config.seed, "unlearn-fisher-noise", int(i)),
                    )
                    for i in train.ids[chosen]
                ]
            )
            grads = computer.compute(x0, int(t), noise, cond).grads
            total += grads.double().square().sum(dim=(0, 1)).cpu()
        fisher = (total / count).numpy()
        mean = float(fisher.mean())
        return {"fisher": fisher / mean if mean > 0 else np.ones_like(fisher), "mean": mean}

    def _state_to_save(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"fisher": np.asarray(state["fisher"]), "mean": state["mean"]}

    def _state_from_saved(self, saved: dict[str, Any]) -> dict[str, Any]:
        return {"fisher": np.asarray(saved["fisher"]), "mean": saved["mean"]}

    def _score_one(
        self, state: dict[str, Any], train: ModelImages, query: ModelImages
    ) -> np.ndarray:
        plan = self.config.loss_plan(train.task.num_train_timesteps)
        chosen = self._candidates(train, query)
        needed = np.unique(np.concatenate(chosen))
        before = np.full(train.n, np.nan)
        before[needed] = mean_losses(train, train.model, needed, plan)
        work = copy.deepcopy(train.model)
        params = dict(work.named_parameters())
        selected = [params[name] for name in train.parameter_names]
        origin = [p.detach().clone() for p in selected]
        fisher = _split(state["fisher"], origin)
        out = np.empty((query.n, train.n))
        bar = tqdm(total=query.n, desc="unlearn", unit="query", disable=not train.progress)
        for row in range(query.n):
            with torch.no_grad():
                for p, p0 in zip(selected, origin, strict=True):
                    p.copy_(p0)
            self._unlearn(work, selected, origin, fisher, query, row, plan)
            rows = chosen[row]
            rise = mean_losses(train, work, rows, plan) - before[rows]
            # Finite for LDS: the others rank below every candidate.
            out[row] = rise.min() - 1.0
            out[row, rows] = rise
            bar.update(1)
        bar.close()
        return out

    def _unlearn(
        self,
        work: nn.Module,
        selected: list[torch.Tensor],
        origin: list[torch.Tensor],
        fisher: list[torch.Tensor],
        query: ModelImages,
        row: int,
        plan: Plan,
    ) -> None:
        """``steps`` penalised ascent steps on the query's plan loss, in place on ``work``."""
        config = self.config
        x0, cond = query.x0_and_condition(np.asarray([row]))
        ids = query.ids[[row]]
        for _ in range(config.steps):
            grads = [torch.zeros_like(p) for p in selected]
            for first in range(0, len(plan), _steps(x0)):
                loss = plan_losses(
                    work, query.task, x0, cond, ids, plan, first=first, stop=first + _steps(x0)
                ).sum()
                for total, g in zip(grads, torch.autograd.grad(loss, selected), strict=True):
                    total.add_(g)
            eta, weight = config.learning_rate, config.fisher_weight
            with torch.no_grad():
                for p, g, p0, f in zip(selected, grads, origin, fisher, strict=True):
                    # The penalty's step is implicit (proximal): where eta lambda F~ > 2 an
                    # explicit step would overshoot theta_0 and diverge.
                    p.copy_(p0 + (p - p0 + eta * g) / (1 + eta * weight * f))

    def _candidates(self, train: ModelImages, query: ModelImages) -> list[np.ndarray]:
        """Per query, the training rows that get the loss pass (all, or the top_m candidates)."""
        if self.config.candidates is None:
            return [np.arange(train.n)] * query.n
        scores = Scores.load(self.config.candidates)
        position = {int(i): n for n, i in enumerate(train.ids)}
        if set(position) != {int(i) for i in scores.train_ids}:
            raise DataError(
                f"{self.config.candidates}: its training images are not this run's training images"
            )
        row_of = {int(q): n for n, q in enumerate(scores.query_ids)}
        missing = [int(q) for q in query.ids if int(q) not in row_of]
        if missing:
            raise DataError(
                f"{self.config.candidates} holds no scores of queries {missing[:10]}: score "
                "these queries with the candidate method first"
            )
        chosen = []
        for q in query.ids:
            order = np.argsort(-scores.values[row_of[int(q)]], kind="stable")[: self.config.top_m]
            chosen.append(np.sort([position[int(i)] for i in scores.train_ids[order]]))
        return chosen

    def describe(self, settings: dict[str, Any]) -> str:
        """The unlearning and the loss plan (no features are projected)."""
        config = self.config
        candidates = "all training images" if config.candidates is None else f"top {config.top_m}"
        return (
            f"{config.steps} ascent steps of {config.learning_rate:g}, losses over "
            f"{settings['loss_plan']['config']['num_steps']} timesteps for {candidates}"
        )

    def _extra_settings(self) -> dict[str, Any]:
        num_train_timesteps = self._train[0].settings["scheduler"]["num_train_timesteps"]
        return {
            "loss_plan": self.config.loss_plan(num_train_timesteps).to_dict(),
            "fisher_mean": [state["mean"] for state in self._fit_state],
            "score": "loss after unlearning minus loss before, same noise (plan mean)",
            "not_candidates": None if self.config.candidates is None else "row minimum - 1",
        }


def _split(flat: np.ndarray, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """A flat vector as tensors shaped like ``like``, in order, in their dtype and device."""
    out, start = [], 0
    for tensor in like:
        stop = start + tensor.numel()
        piece = torch.tensor(np.asarray(flat[start:stop]))
        out.append(piece.reshape(tensor.shape).to(tensor))
        start = stop
    return out


def estimate_unlearn(
    model: nn.Module,
    scheduler_config: dict[str, Any],
    config: UnlearnConfig | None = None,
    features: FeatureConfig | None = None,
    *,
    image_shape: tuple[int, int, int],
    n_train: int,
    n_queries: int = 1,
    device: str | torch.device = "cpu",
    repeats: int = 2,
) -> PerQueryEstimate:
    """Estimate the time of unlearning attribution, from a short probe on random images.

    Three rates are timed (the fastest of ``repeats`` after a warm-up): one ascent step's
    gradient of a query's plan loss (``loss_timesteps`` pairs, as :meth:`Unlearn._unlearn`
    computes it), the plan loss of a batch of images without gradients (per (image, timestep)
    pair, as the loss passes compute it), and the per-sample gradients of a batch of images for
    the Fisher. Per query: ``steps`` ascent gradients plus the loss pass over N images (or the
    config's ``top_m`` with ``candidates``); once: the Fisher of ``fisher_samples`` images and the
    loss pass before unlearning over N. A conditional model gets the empty prompt.

    Args:
        model: The model (copied; not changed).
        scheduler_config: Its noise schedule.
        config: The method's settings (default ``UnlearnConfig()``).
        features: The run's feature settings (default ``FeatureConfig()``): the parameters
            differentiated and the dtype.
        image_shape: (C, H, W) of the images.
        n_train: Training images N.
        n_queries: Query images.
        device: Where the probe runs, and the run would.
        repeats: Timed repetitions of each probe.

    Raises:
        ConfigError: Bad counts.
    """
    config = config or UnlearnConfig()
    features = features or FeatureConfig()
    for name, value in (("n_train", n_train), ("n_queries", n_queries)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} is invalid: must be an integer >= 1")
    device = torch.device(device)
    work = nn.Module.to(copy.deepcopy(model), device=device, dtype=_DTYPES[features.dtype])
    work.eval()
    task = DiffusionTask(scheduler_config)
    plan = config.loss_plan(task.num_train_timesteps)
    dtype = next(work.parameters()).dtype
    draw = torch.Generator().manual_seed(0)
    batch = max(1, min(n_train, _PAIRS // len(plan)))
    images = (torch.rand((batch, *image_shape), generator=draw) * 2 - 1).to(device, dtype)
    with torch.no_grad():
        x0 = to_diffusion_space(work, images)
    conditional = [""] * batch if is_conditional(work) else None
    cond = condition(work, conditional)
    cond = None if cond is None else cond.to(device)
    ids = np.arange(batch)
    names = select_parameters(work, features.parameters)
    params = dict(work.named_parameters())
    selected = [params[name] for name in names]

    def ascent() -> None:
        one = None if cond is None else cond[:1]
        per_pass = _steps(x0[:1])
        for first in range(0, len(plan), per_pass):
            loss = plan_losses(
                work, task, x0[:1], one, ids[:1], plan, first=first, stop=first + per_pass
            ).sum()
            torch.autograd.grad(loss, selected)

    def losses() -> None:
        with torch.no_grad():
            for first in range(0, len(plan), _steps(x0)):
                plan_losses(work, task, x0, cond, ids, plan, first=first, stop=first + _steps(x0))

    computer = GradientComputer(
        work,
        scheduler_config,
        OutputConfig(kind="loss"),
        features.parameters,
        dtype=dtype,
        device=device,
    )
    fisher_batch = min(batch, config.fisher_samples, 32)
    noise = torch.randn(x0[:fisher_batch].shape, generator=draw).to(device, dtype)

    middle = task.num_train_timesteps // 2
    fisher_cond = None if cond is None else cond[:fisher_batch]

    def fisher() -> None:
        computer.compute(x0[:fisher_batch], middle, noise, fisher_cond)

    ascent_probe, loss_probe = measure(ascent, repeats, device), measure(losses, repeats, device)
    ascent_seconds = ascent_probe.seconds
    per_pair = loss_probe.seconds / (batch * len(plan))
    per_fisher_image = measure(fisher, repeats, device).seconds / fisher_batch
    candidates = n_train if config.candidates is None else min(config.top_m, n_train)
    pass_seconds = per_pair * len(plan)
    return PerQueryEstimate(
        method="unlearn",
        n_train=n_train,
        n_queries=n_queries,
        candidates=candidates,
        seconds_once={
            "fisher": per_fisher_image * min(config.fisher_samples, n_train),
            "losses before": pass_seconds * n_train,
        },
        seconds_per_query={
            "unlearning": config.steps * ascent_seconds,
            "loss pass": pass_seconds * candidates,
        },
        memory_bytes=_unlearn_memory(
            model, selected, n_train, n_queries, ascent_probe.peak_bytes, loss_probe.peak_bytes
        ),
        probe={
            "seconds_per_ascent_gradient": ascent_seconds,
            "seconds_per_loss_pair": per_pair,
            "seconds_per_fisher_image": per_fisher_image,
        },
    )


def _unlearn_memory(
    model: nn.Module,
    selected: list[torch.Tensor],
    n_train: int,
    n_queries: int,
    ascent_bytes: int | None,
    loss_bytes: int | None,
) -> dict[str, int]:
    """Resident bytes of an unlearning run by piece (see :func:`estimate_unlearn`)."""
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    chosen = sum(p.numel() for p in selected)
    itemsize = selected[0].element_size() if selected else 4
    memory = {
        # The caller's model, the method's working copy, and the copy each query unlearns.
        "model and 2 copies": 3 * model_bytes,
        # The Fisher (float64, and as tensors) and theta_0 of the selected parameters.
        "Fisher and origin": chosen * (8 + 2 * itemsize),
        "scores": n_queries * n_train * 8,
    }
    measured = [b for b in (ascent_bytes, loss_bytes) if b is not None]
    if measured:
        memory["pass (measured)"] = max(measured)
    return memory
