"""Per-sample gradients of an output function, batched with torch.func (functional_call + vmap)."""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from diffattr._config import is_int
from diffattr.errors import ConfigError, DataError
from diffattr.features._outputs import OutputConfig, OutputFunction
from diffattr.models import (
    DiffusionTask,
    condition,
    is_conditional,
    model_setting,
    predict,
    to_diffusion_space,
)


def select_parameters(model: nn.Module, patterns: Sequence[str] | None) -> list[str]:
    """Return the names of the trainable parameters matching any of ``patterns``.

    Args:
        model: The model.
        patterns: ``fnmatch`` globs over ``model.named_parameters()`` names, e.g.
            ``["*attentions*"]``; None selects every trainable parameter.

    Returns:
        The selected names in ``model.named_parameters()`` order.

    Raises:
        ConfigError: A pattern matches no trainable parameter, or nothing is selected.
    """
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    if patterns is None:
        selected = names
    else:
        if isinstance(patterns, str):
            patterns = [patterns]
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                raise ConfigError(
                    f"parameter pattern {pattern!r} matches no trainable parameter; "
                    f"names look like: {shown}"
                )
        selected = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not selected:
        raise ConfigError(f"no trainable parameters selected from {type(model).__name__}")
    return selected


def use_batchable_attention(model: nn.Module) -> None:
    """Switch diffusers attention layers from SDPA to the classic processor, in place.

    ``F.scaled_dot_product_attention`` has no vmap batching rule on the CPU, so under vmap it
    runs one sample at a time; diffusers' ``AttnProcessor`` (explicit bmm + softmax) computes the
    same function and batches. Only ``AttnProcessor2_0`` is replaced (other processors, e.g.
    added-KV, LoRA or IP-adapter ones, compute something else); modules without diffusers
    attention are left unchanged. (UNet2DModel has no ``set_attn_processor`` in diffusers 0.42,
    so the submodules are visited directly.)

    Args:
        model: Any module; every diffusers ``Attention`` submodule is visited.
    """
    for module in model.modules():
        if type(getattr(module, "processor", None)) is AttnProcessor2_0:
            module.set_processor(AttnProcessor())


class _Predictor(nn.Module):
    # functional_call calls a module; wrapping predict() accepts every output form it accepts.
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        return predict(self.model, x_t, t, cond)


class GradientBatch(NamedTuple):
    """What :meth:`GradientComputer.compute` returns for a batch of B samples."""

    grads: torch.Tensor
    losses: torch.Tensor
    residuals: torch.Tensor


class GradientComputer:
    """Per-sample gradients of an output function of a diffusion model at one timestep.

    The computer works on its own deep copy of ``model``, converted to ``dtype`` and moved to
    ``device``, in eval mode, with SDPA attention switched to the batchable classic processor
    (:func:`use_batchable_attention`): the caller's model is never changed, and later changes to
    it do not reach the computer. Only the selected parameters are differentiated; the others
    and the buffers are held fixed.

    A sample's flattened gradient is the concatenation of the gradients of
    :attr:`parameter_names`, in that order, each flattened row-major (``Tensor.reshape(-1)``).

    Args:
        model: A module called as ``model(x_t, t)`` (see :func:`diffattr.models.predict`).
        scheduler_config: diffusers DDPM scheduler config: the noise schedule and
            ``prediction_type`` (epsilon, v_prediction or sample).
        output: The output function to differentiate.
        parameters: Globs selecting parameters (see :func:`select_parameters`); None: all.
        dtype: Floating dtype of the computation and of the results.
        device: Device of the computation and of the results.

    Attributes:
        parameter_names: Names of the selected parameters, in flattening order.
        num_parameters: p, the length of a flattened gradient.
        num_outputs: r, the number of output functions per sample.
        num_train_timesteps: T, from the scheduler config.
        dtype: The computation's dtype.
        device: The computation's device.

    Raises:
        ConfigError: Bad parameter patterns, dtype or scheduler prediction type.
    """

    # Under vmap SDPA runs one sample at a time on the CPU; batched backends keep it.
    _vmapped = True

    def __init__(
        self,
        model: nn.Module,
        scheduler_config: dict[str, Any],
        output: OutputConfig,
        parameters: Sequence[str] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype={dtype} is invalid: must be a floating-point dtype")
        self.dtype = dtype
        self.device = torch.device(device)
        # nn.Module.to, not diffusers' ModelMixin.to: that one logs a float32-modules warning on
        # every dtype cast (diffusers 0.42), and every parameter is wanted in ``dtype`` here.
        self._model = nn.Module.to(copy.deepcopy(model), device=self.device, dtype=dtype).eval()
        self.parameter_names = select_parameters(self._model, parameters)
        if self._vmapped:
            use_batchable_attention(self._model)
        channels = model_setting(self._model, "in_channels")
        self._in_channels = int(channels) if is_int(channels) else None
        self._sample_size = _expected_size(self._model)

        self._task = DiffusionTask(scheduler_config)
        self.num_train_timesteps = self._task.num_train_timesteps

        self._output = output
        self.num_outputs = output.num_outputs
        # functional_call names tensors relative to the wrapper, hence the "model." prefix.
        self._wrapper = _Predictor(self._model)
        selected = set(self.parameter_names)
        self._params: dict[str, torch.Tensor] = {}
        self._fixed: dict[str, torch.Tensor] = {}
        for name, param in self._model.named_parameters():
            target = self._params if name in selected else self._fixed
            target["model." + name] = param.detach()
        self._fixed.update({"model." + name: b for name, b in self._model.named_buffers()})
        self.num_parameters = sum(p.numel() for p in self._params.values())
        self._per_sample_fns: dict[tuple[tuple[int, ...], bool], Callable[..., Any]] = {}

    @property
    def conditional(self) -> bool:
        """Whether the model takes a prompt per image (``cond`` of :meth:`compute`)."""
        return is_conditional(self._model)

    def condition(self, prompts: Sequence[str] | None) -> torch.Tensor | None:
        """The model's conditioning of ``prompts`` (None for an unconditional model).

        Raises:
            DataError: Prompts missing for a conditional model, or given to an unconditional one.
        """
        cond = condition(self._model, prompts)
        return None if cond is None else cond.to(self.device)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images as the model's x0: a latent model's scaled latents, else the images."""
        images = images.to(device=self.device, dtype=self.dtype)
        return to_diffusion_space(self._model, images)

    def compute(
        self,
        x0: torch.Tensor,
        timestep: int,
        noise: torch.Tensor,
        cond: torch.Tensor | None = None,
    ) -> GradientBatch:
        """Return each sample's output gradients and diffusion loss at ``timestep``.

        The noisy input and the target are the task's (:class:`~diffattr.models.DiffusionTask`):
        x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, and each sample's
        prediction is ``predict(model, x_t[None], t[None])`` (batch of one, so batch-coupled
        layers cannot mix samples). Peak memory is about 2 * B * r * p values (the per-parameter
        gradients and their concatenation), so choose B for the model's size.

        Args:
            x0: Tensor (B, C, H, W) of clean images (a latent model's latents, see
                :meth:`encode`).
            timestep: t in [0, T).
            noise: Tensor (B, C, H, W), the noise added to ``x0``.
            cond: The batch's conditioning (see :meth:`condition`); None if unconditional.

        Returns:
            ``(grads, losses, residuals)``: grads is Tensor (B, r, p), row j of sample b the
            flattened gradient of output j (see the class docstring for the order); losses is
            Tensor (B,), each sample's diffusion loss ||prediction - target||^2 / D with the
            scheduler's target (noise, velocity or x0); residuals is Tensor (B, r),
            f(target) - f(prediction), the residual of the output for the linear outputs
            (mean, output_projection; meaningless for the others). All in the computer's dtype
            and device.

        Raises:
            ConfigError: ``timestep`` is not an integer in [0, T).
            DataError: ``x0`` or ``noise`` has the wrong shape or non-finite values.
        """
        x_t, target = self._noisy_inputs(x0, timestep, noise)
        batch = x_t.shape[0]
        if batch == 0:
            return self._empty(self.num_parameters)
        t = torch.tensor([timestep], device=self.device)

        self._check_condition(cond, batch)
        per_sample = self._per_sample_fn(tuple(x0.shape[1:]), cond is not None)
        inputs = (self._params, x_t, target, t) + (() if cond is None else (cond,))
        grads, (losses, residuals) = per_sample(*inputs)
        flat = torch.cat(
            [
                grads["model." + name].reshape(batch, self.num_outputs, -1)
                for name in self.parameter_names
            ],
            dim=2,
        )
        return GradientBatch(flat, losses, residuals)

    def _noisy_inputs(
        self, x0: torch.Tensor, timestep: int, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check the inputs and return (x_t, training target), in the computer's dtype/device."""
        self._task.check_timestep(timestep)
        self._check_images(x0, noise)
        x0 = x0.detach().to(device=self.device, dtype=self.dtype)
        noise = noise.detach().to(device=self.device, dtype=self.dtype)
        t = torch.full((len(x0),), timestep, device=self.device)
        return self._task.noised(x0, noise, t), self._task.target(x0, noise, t)

    def _empty(self, width: int) -> GradientBatch:
        like = {"dtype": self.dtype, "device": self.device}
        return GradientBatch(
            torch.empty((0, self.num_outputs, width), **like),
            torch.empty((0,), **like),
            torch.empty((0, self.num_outputs), **like),
        )

    def _check_condition(self, cond: torch.Tensor | None, batch: int) -> None:
        if self.conditional and cond is None:
            raise DataError("the model is conditional: compute() needs the batch's cond")
        if not self.conditional and cond is not None:
            raise DataError("the model is unconditional: compute() takes no cond")
        if cond is not None and cond.shape[0] != batch:
            raise DataError(f"cond has {cond.shape[0]} rows for a batch of {batch} images")

    def _per_sample_fn(
        self, sample_shape: tuple[int, ...], conditioned: bool
    ) -> Callable[..., Any]:
        # Built per sample shape: output_projection's directions have D = prod(sample_shape).
        key = (sample_shape, conditioned)
        if key in self._per_sample_fns:
            return self._per_sample_fns[key]
        output_fn = OutputFunction(self._output, sample_shape, dtype=self.dtype, device=self.device)
        wrapper, fixed = self._wrapper, self._fixed

        def outputs(
            params: dict[str, torch.Tensor],
            x_t: torch.Tensor,
            target: torch.Tensor,
            t: torch.Tensor,
            *cond: torch.Tensor,
        ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            args = (x_t[None], t, *(c[None] for c in cond))
            prediction = functional_call(wrapper, (params, fixed), args)[0]
            loss = (prediction - target).square().mean()
            values = output_fn(prediction, target)
            # f(target) - f(prediction): the residual of a linear output (DAS's rho).
            residual = output_fn(target, target) - values.detach()
            return values, (loss, residual)

        if self.num_outputs == 1:

            def scalar(*args: torch.Tensor) -> tuple[torch.Tensor, Any]:
                values, aux = outputs(*args)
                return values[0], aux

            per_sample = grad(scalar, has_aux=True)
        else:
            # jacrev shares one forward pass among the r backward passes (one vjp, vmapped over
            # the r output directions); vmap over directions of grad(u_j . eps_hat) reruns the
            # forward r times and measured ~25% slower (unet-tiny 16x16, r=8, batch 16, CPU).
            per_sample = jacrev(outputs, has_aux=True)
        in_dims = (None, 0, 0, None, 0) if conditioned else (None, 0, 0, None)
        fn = vmap(per_sample, in_dims=in_dims)
        self._per_sample_fns[key] = fn
        return fn

    def _check_images(self, x0: torch.Tensor, noise: torch.Tensor) -> None:
        if not isinstance(x0, torch.Tensor) or x0.ndim != 4:
            shape = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
            raise DataError(f"x0 must be a (B, C, H, W) tensor, got {shape}")
        _, channels, height, width = x0.shape
        expected_size = self._sample_size
        if (self._in_channels is not None and channels != self._in_channels) or (
            expected_size is not None and (height, width) != expected_size
        ):
            c = self._in_channels if self._in_channels is not None else "C"
            h, w = expected_size if expected_size is not None else ("H", "W")
            raise DataError(f"x0 has shape {tuple(x0.shape)}; the model expects (B, {c}, {h}, {w})")
        if not isinstance(noise, torch.Tensor) or noise.shape != x0.shape:
            shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise DataError(f"noise has shape {shape}; it must match x0's {tuple(x0.shape)}")
        for name, values in (("x0", x0), ("noise", noise)):
            bad = ~torch.isfinite(values.flatten(1)).all(dim=1)
            if bad.any():
                rows = bad.nonzero().flatten().tolist()
                raise DataError(f"{name} has non-finite values in batch rows {rows[:10]}")


def _expected_size(model: nn.Module) -> tuple[int, int] | None:
    size = model_setting(model, "sample_size")
    if is_int(size):
        return (int(size), int(size))
    if isinstance(size, Sequence) and len(size) == 2 and all(is_int(s) for s in size):
        return (int(size[0]), int(size[1]))
    return None
