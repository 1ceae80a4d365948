"""Featurisation: per-sample gradients over a plan, averaged, projected, and stored resumably.

For each training (or query) image z and each plan step (t, noise seed), the engine computes the
gradient g_t(z) of the output function over the selected parameters, optionally scales it to unit
norm, averages over the plan, and projects once:

    phi(z) = P^T (1/K) sum_t g_t(z) / ||g_t(z)||        (docs/methods.md, "Gradient features")

Projecting the plan average instead of each step is exact (P is linear) and K times cheaper. The
store also keeps each step's diffusion loss and unnormalised gradient norm, which DAS's residual
weighting and the diagnostics use.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from diffattr._config import known_fields
from diffattr.data import ImageDataset
from diffattr.errors import ConfigError
from diffattr.features._factored import FactoredGradientComputer
from diffattr.features._gradients import GradientComputer
from diffattr.features._kronecker import KroneckerLayout, KroneckerProjector
from diffattr.features._outputs import OutputConfig
from diffattr.features._plan import Plan, PlanConfig
from diffattr.features._projection import ProjectionConfig, Projector, make_projector
from diffattr.features._store import FeatureStore

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Norms below this are treated as zero gradients (left unscaled rather than blown up).
_TINY_NORM = 1e-30


@dataclass(frozen=True, kw_only=True, slots=True)
class FeatureConfig:
    """Everything that determines a sample's gradient features."""

    output: OutputConfig = field(
        default_factory=OutputConfig, metadata={"help": "the model output function f_t"}
    )
    plan: PlanConfig = field(
        default_factory=PlanConfig, metadata={"help": "timesteps and noise seeds"}
    )
    projection: ProjectionConfig = field(
        default_factory=lambda: ProjectionConfig(kind="auto"),
        metadata={"help": "random projection to k dimensions (kind auto: the backend's)"},
    )
    parameters: tuple[str, ...] | None = field(
        default=None, metadata={"help": "glob patterns of parameter names (None: all)"}
    )
    normalize: bool = field(
        default=True, metadata={"help": "scale each step's gradient to unit norm (DAS, ReTrac)"}
    )
    dtype: Literal["float32", "float64"] = field(
        default="float32", metadata={"help": "precision of gradients and projection"}
    )
    backend: Literal["auto", "vmap", "factored"] = field(
        default="auto",
        metadata={
            "help": "vmap: per-sample gradients by torch.func, then the projection; factored: "
            "kronecker-projected gradients from layer hooks in one batched backward; auto: "
            "factored wherever it covers the parameters, else vmap (see choose_backend)"
        },
    )
    storage: Literal["compute", "float16"] = field(
        default="compute",
        metadata={
            "help": "dtype of the stored features: compute (that of dtype) or float16 (half the "
            "disk and memory of float32; its LDS is measured in benchmarks/README.md)"
        },
    )
    mixed_precision: Literal["none", "bf16", "tf32"] = field(
        default="none",
        metadata={
            "help": "bf16: forward and backward in bfloat16, averaging and projection in "
            "float32; tf32: TensorFloat-32 matmuls and convolutions (CUDA only); none"
        },
    )

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ConfigError(
                f"FeatureConfig.dtype={self.dtype!r} is invalid: must be one of {sorted(_DTYPES)}"
            )
        if self.backend not in ("auto", "vmap", "factored"):
            raise ConfigError(
                f"FeatureConfig.backend={self.backend!r} is invalid: must be auto, vmap or factored"
            )
        if self.backend == "factored" and self.projection.kind not in ("auto", "kronecker"):
            raise ConfigError(
                "FeatureConfig.backend='factored' computes kronecker-projected gradients: "
                f"projection kind {self.projection.kind!r} needs backend 'vmap' (on the "
                f"command line: --projection {self.projection.kind} needs --backend vmap)"
            )
        if self.backend == "vmap" and self.projection.kind == "auto":
            object.__setattr__(self, "projection", replace(self.projection, kind="dense"))
        if self.backend == "factored" and self.projection.kind == "auto":
            object.__setattr__(self, "projection", replace(self.projection, kind="kronecker"))
        if self.storage not in ("compute", "float16"):
            raise ConfigError(
                f"FeatureConfig.storage={self.storage!r} is invalid: must be compute or float16"
            )
        if self.mixed_precision not in ("none", "bf16", "tf32"):
            raise ConfigError(
                f"FeatureConfig.mixed_precision={self.mixed_precision!r} is invalid: must be "
                "none, bf16 or tf32"
            )
        if self.mixed_precision != "none" and self.dtype != "float32":
            raise ConfigError(
                f"FeatureConfig.mixed_precision={self.mixed_precision!r} needs dtype='float32'"
            )
        if self.parameters is not None:
            if isinstance(self.parameters, str) or not all(
                isinstance(p, str) for p in self.parameters
            ):
                raise ConfigError(
                    f"FeatureConfig.parameters={self.parameters!r} is invalid: must be a tuple "
                    "of glob strings or None"
                )
            object.__setattr__(self, "parameters", tuple(self.parameters))

    def resolve(self, model: torch.nn.Module) -> FeatureConfig:
        """The concrete settings for ``model``: ``backend="auto"`` decided by the backend rule.

        ``auto`` becomes ``factored`` (with the Kronecker projection) when every selected
        parameter lies in a layer the factored backend covers, else ``vmap`` (with the dense
        projection, unless another kind was asked for); see :func:`choose_backend`.
        """
        if self.backend != "auto":
            return self
        if self.projection.kind not in ("auto", "kronecker"):
            # A projection other than Kronecker needs per-sample gradients: vmap.
            return replace(self, backend="vmap")
        from diffattr.features._planner import choose_backend

        backend = choose_backend(model, None if self.parameters is None else list(self.parameters))
        return replace(self, backend=backend.backend)

    def identity(self) -> dict[str, Any]:
        """The settings that determine the features: :meth:`to_dict` without memory budgets.

        Memory budgets change speed, never the numbers, so a rerun may change them and still
        find (and resume) the same features.
        """
        settings = self.to_dict()
        settings["projection"] = {
            k: v for k, v in settings["projection"].items() if k != "max_memory_mb"
        }
        return settings

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON types (inverse of :meth:`from_dict`)."""
        return {
            "output": self.output.to_dict(),
            "plan": self.plan.to_dict(),
            "projection": self.projection.to_dict(),
            "parameters": None if self.parameters is None else list(self.parameters),
            "normalize": self.normalize,
            "dtype": self.dtype,
            "backend": self.backend,
            "storage": self.storage,
            "mixed_precision": self.mixed_precision,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureConfig:
        """Rebuild settings written by :meth:`to_dict`."""
        values = known_fields(cls, data)
        nested = {"output": OutputConfig, "plan": PlanConfig, "projection": ProjectionConfig}
        for key, config_cls in nested.items():
            if key in values:
                values[key] = config_cls.from_dict(values[key])
        if values.get("parameters") is not None:
            values["parameters"] = tuple(values["parameters"])
        return cls(**values)


def featurize(
    model: torch.nn.Module,
    scheduler_config: dict[str, Any],
    dataset: ImageDataset,
    config: FeatureConfig,
    path: str | os.PathLike[str],
    *,
    model_id: str,
    batch_size: int = 32,
    chunk_size: int = 256,
    projection_buffer_mb: int = 1024,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> FeatureStore:
    """Compute (or resume computing) the gradient features of every image of ``dataset``.

    Args:
        model: Any module called as ``model(x_t, t)``; it is copied, never changed.
        scheduler_config: The noise schedule the model was trained with.
        dataset: The images; rows of the store follow ``dataset.ids``.
        config: What to compute; ``backend="auto"`` is resolved for ``model`` first
            (:meth:`FeatureConfig.resolve`), and the store records the concrete settings.
        path: Store directory. A store there with the same settings is resumed (finished chunks
            are kept); one with other settings is refused.
        model_id: Identifies the weights, e.g. the SHA-256 of a checkpoint's weight file; stores
            of different models are never mixed.
        batch_size: Images per gradient batch (speed and memory only).
        chunk_size: Images per store chunk: the unit of resumption.
        projection_buffer_mb: Gradients are buffered up to this size (and at most a chunk) and
            projected together, so that a projection matrix regenerated block by block is
            generated once per buffer rather than once per batch.
        device: Where to compute.
        progress: Show a progress bar.

    Returns:
        The finished store, with arrays ``features`` (N, r, k), ``losses`` (N, K),
        ``grad_norms`` (N, K) (before normalisation) and ``residuals`` (N, K, r)
        (f(target) - f(prediction), see :class:`GradientComputer`), K the plan length and r
        the outputs per sample.

    Raises:
        StoreMismatchError: ``path`` holds a store made with other settings or samples.
        ConfigError: Bad settings (e.g. k larger than the number of parameters).
        DataError: The images do not fit the model.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} is invalid: must be >= 1")
    config = config.resolve(model)
    dtype = _DTYPES[config.dtype]
    if config.mixed_precision == "tf32" and torch.device(device).type != "cuda":
        raise ConfigError(f"mixed_precision='tf32' is a CUDA matmul mode; the device is {device}")
    computer, projector = _computer_and_projector(model, scheduler_config, config, device)
    # Checked before any work: a conditional model needs a prompt per image, others none.
    computer.condition(None if dataset.prompts is None else list(dataset.prompts[:1]))
    plan = Plan.build(config.plan, computer.num_train_timesteps)
    r, k, steps = computer.num_outputs, projector.proj_dim, len(plan)
    settings = {
        "model_id": model_id,
        "scheduler": {k_: v for k_, v in scheduler_config.items() if not k_.startswith("_")},
        "features": config.identity(),
        # Names the hash stream too, so stores of another generator version are refused.
        "projector": projector.to_dict(),
        "parameter_count": computer.num_parameters,
        "dataset_fingerprint": dataset.fingerprint(),
    }
    # Stored in the computation's precision: float64 features keep exactness tests exact.
    arrays = {
        "features": ((r, k), "float16" if config.storage == "float16" else config.dtype),
        "losses": ((steps,), config.dtype),
        "grad_norms": ((steps,), config.dtype),
        "residuals": ((steps, r), config.dtype),
    }
    store = FeatureStore.create_or_resume(
        path,
        settings=json.loads(json.dumps(settings)),
        ids=dataset.ids,
        arrays=arrays,
        chunk_size=chunk_size,
    )
    pending = store.pending_chunks()
    row_of = {int(i): row for row, i in enumerate(dataset.ids)}
    total = sum(len(store.chunk_ids(c)) for c in pending)
    bar = tqdm(total=total, desc="features", unit="image", disable=not progress)
    row_bytes = r * computer.num_parameters * torch.finfo(dtype).bits // 8
    rows_per_projection = max(batch_size, (projection_buffer_mb << 20) // row_bytes)
    for chunk in pending:
        ids = store.chunk_ids(chunk)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in arrays}
        buffer: list[torch.Tensor] = []
        start = 0
        while start < len(ids):
            batch_ids = ids[start : start + batch_size]
            rows = torch.as_tensor([row_of[int(i)] for i in batch_ids])
            prompts = None if dataset.prompts is None else [dataset.prompts[r] for r in rows]
            try:
                with _tf32(config.mixed_precision == "tf32"):
                    mean_grad, values = _batch_gradients(
                        computer,
                        plan,
                        dataset.images[rows],
                        prompts,
                        batch_ids,
                        config.normalize,
                        dtype,
                    )
            except (torch.OutOfMemoryError, MemoryError) as err:
                # Features are per sample, so a smaller batch changes nothing but memory.
                batch_size = _smaller_batch(batch_size, err, computer.device)
                continue
            start += len(batch_ids)
            for name, value in values.items():
                parts[name].append(value)
            if isinstance(computer, FactoredGradientComputer):
                parts["features"].append(mean_grad.detach().cpu().numpy())
            else:
                buffer.append(mean_grad)
            if sum(len(g) for g in buffer) >= rows_per_projection:
                parts["features"].append(_project(projector, buffer))
            bar.update(len(batch_ids))
        if buffer:
            parts["features"].append(_project(projector, buffer))
        store.write_chunk(chunk, {name: np.concatenate(values) for name, values in parts.items()})
    bar.close()
    # Verified either way: finalize() hashes what it completes, and a store found complete was
    # hashed when create_or_resume opened it.
    store.finalize()
    return store


def _computer_and_projector(
    model: torch.nn.Module,
    scheduler_config: dict[str, Any],
    config: FeatureConfig,
    device: str | torch.device,
) -> tuple[GradientComputer, Projector]:
    compute_dtype = torch.bfloat16 if config.mixed_precision == "bf16" else _DTYPES[config.dtype]
    if config.backend == "factored":
        computer = FactoredGradientComputer(
            model,
            scheduler_config,
            config.output,
            config.projection,
            config.parameters,
            dtype=compute_dtype,
            device=device,
        )
        return computer, computer.projector
    computer = GradientComputer(
        model,
        scheduler_config,
        config.output,
        config.parameters,
        dtype=compute_dtype,
        device=device,
    )
    if config.projection.kind == "kronecker":
        layout = KroneckerLayout(model, computer.parameter_names, config.projection)
        return computer, KroneckerProjector(layout, device)
    return computer, make_projector(config.projection, computer.num_parameters, device)


def _smaller_batch(batch_size: int, err: BaseException, device: torch.device) -> int:
    if batch_size == 1:
        raise ConfigError(
            f"out of memory with one image per batch on {device} ({err}); select fewer parameters "
            "or see `diffattr plan` for what this run needs"
        ) from err
    if device.type == "cuda":
        torch.cuda.empty_cache()
    smaller = batch_size // 2
    warnings.warn(
        f"out of memory at batch size {batch_size} on {device}: retrying with {smaller}",
        ResourceWarning,
        stacklevel=3,
    )
    return smaller


@contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _batch_gradients(
    computer: GradientComputer,
    plan: Plan,
    images: torch.Tensor,
    prompts: list[str] | None,
    ids: np.ndarray,
    normalize: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Plan-averaged (optionally per-step normalised) gradients (B, r, p), and per-step aux.

    With the factored backend the gradients arrive projected: (B, r, k). A latent model's
    images are encoded first; the plan's noise then has the latents' shape.

    The gradients are accumulated in ``dtype`` whatever precision the computer works in.
    """
    x0 = computer.encode(images)
    cond = computer.condition(prompts)
    batch, steps, r = len(ids), len(plan), computer.num_outputs
    factored = isinstance(computer, FactoredGradientComputer)
    width = computer.proj_dim if factored else computer.num_parameters
    mean_grad = torch.zeros((batch, r, width), dtype=dtype, device=computer.device)
    losses = torch.empty((batch, steps), dtype=torch.float64)
    norms = torch.empty((batch, steps), dtype=torch.float64)
    residuals = torch.empty((batch, steps, r), dtype=torch.float64)
    for step, timestep in enumerate(plan.timesteps):
        noise = plan.noise_for(step, ids, tuple(x0.shape[1:]))
        if factored:
            # Projected already; the norm is the exact one of the unprojected gradient.
            grads, step_norms, loss, residual = computer.compute_features(
                x0, int(timestep), noise, cond
            )
            grads, step_norms = grads.to(dtype), step_norms.to(dtype)
        else:
            grads, loss, residual = computer.compute(x0, int(timestep), noise, cond)
            grads = grads.to(dtype)
            step_norms = grads.flatten(1).norm(dim=1)
        if normalize:
            grads = grads / step_norms.clamp_min(_TINY_NORM)[:, None, None]
        mean_grad.add_(grads, alpha=1 / steps)
        losses[:, step] = loss.detach().cpu().double()
        norms[:, step] = step_norms.detach().cpu().double()
        residuals[:, step] = residual.detach().cpu().double()
    aux = {"losses": losses.numpy(), "grad_norms": norms.numpy(), "residuals": residuals.numpy()}
    return mean_grad, aux


def _project(projector: Projector, buffer: list[torch.Tensor]) -> np.ndarray:
    """Project and empty the buffer of (B, r, p) gradients: one pass over P for all of them."""
    grads = torch.cat(buffer)
    buffer.clear()
    batch, r, p = grads.shape
    projected = projector.project(grads.reshape(batch * r, p)).reshape(batch, r, -1)
    return projected.detach().cpu().numpy()
