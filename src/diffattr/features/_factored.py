"""The factored backend: Kronecker-projected per-sample gradients from one batched backward.

A Linear or Conv2d layer's per-sample weight gradient is a sum over positions p (tokens, pixels)
of outer products, G_b = sum_p delta_{b,p} a_{b,p}^T, with a the layer's input (a conv's input
patch, padded with a 1 for the bias) and delta the gradient of sample b's output function at the
layer's output. With the projection P_out (x) P_in of :class:`~._kronecker.KroneckerLayout`,

    P_out^T G_b P_in = sum_p (P_out^T delta_{b,p}) (P_in^T a_{b,p})^T,

so forward hooks keep each covered layer's input (as training keeps it), and its backward hook,
given delta, projects both sides and sums the outer products over positions in one einsum, for
all samples of the batch at once. A convolution's input patches are unfolded there, one layer at
a time (the exact norm below needs them; that is B x P x d_in values for a single layer, freed
before the next). Per-sample gradients of the whole model never exist. One ordinary batched
backward of sum_b f(sample b) gives every sample's delta because no layer mixes the batch's
samples (models that would, e.g. BatchNorm without running statistics, are refused).

The unnormalised gradient norm, which per-step normalisation needs, is exact: per layer either
the "ghost norm" ||G_b||^2 = sum_{p,q} (delta_p . delta_q)(a_p . a_q) (cost P^2 (d_in + d_out))
or the layer's G_b formed one layer at a time (cost P d_in d_out), whichever is cheaper.
Normalisation scales and shifts, and biases without their weight, get exact per-sample
gradients from the same hooks and go to the layout's "rest" vector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.nn import functional as F  # noqa: N812

from diffattr.errors import ConfigError, DataError
from diffattr.features._gradients import GradientComputer
from diffattr.features._kronecker import KroneckerLayout, KroneckerProjector, LayerBlock
from diffattr.features._outputs import OutputConfig, OutputFunction
from diffattr.features._projection import ProjectionConfig
from diffattr.models import predict


class FactoredBatch(NamedTuple):
    """What :meth:`FactoredGradientComputer.compute_features` returns for B samples."""

    features: Tensor
    norms: Tensor
    losses: Tensor
    residuals: Tensor


class FactoredGradientComputer(GradientComputer):
    """Kronecker-projected per-sample gradients of an output function, at one timestep.

    Same model handling, inputs and outputs as :class:`GradientComputer` (which it extends: its
    :meth:`~GradientComputer.compute` still gives exact per-sample gradients by vmap, useful to
    check this one), plus :meth:`compute_features`.

    Args:
        model: A module called as ``model(x_t, t)`` with a batch of timesteps ``t``.
        scheduler_config: The noise schedule.
        output: The output function.
        projection: A ``kind="kronecker"`` projection: total k, seed, distribution.
        parameters: Parameter globs (None: all); every selected parameter must be a Linear or
            Conv2d weight or bias, or a GroupNorm/LayerNorm scale or shift.
        dtype: The computation's dtype (bfloat16 projects in float32).
        device: The computation's device.

    Attributes:
        layout: The layers and their (k_out, k_in).
        projector: The same map applied to flattened gradients (the reference).
        proj_dim: k.

    Raises:
        ConfigError: Uncovered parameters, a grouped convolution, a too small k, or a layer
            that mixes the samples of a batch.
    """

    _vmapped = False

    def __init__(
        self,
        model: nn.Module,
        scheduler_config: dict[str, Any],
        output: OutputConfig,
        projection: ProjectionConfig,
        parameters: Sequence[str] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(model, scheduler_config, output, parameters, dtype=dtype, device=device)
        refuse_batch_coupling(self._model)
        # Only activations are differentiated: the hooks build the projected weight gradients.
        self._model.requires_grad_(False)
        self.layout = KroneckerLayout(self._model, self.parameter_names, projection)
        self.projector = KroneckerProjector(self.layout, self.device)
        self.proj_dim = self.layout.proj_dim
        self._work_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        self._modules = dict(self._model.named_modules())
        self._rest_modules: dict[str, list[int]] = {}
        for index, rest in enumerate(self.layout.rest):
            self._rest_modules.setdefault(rest.module, []).append(index)
        self._output_fns: dict[tuple[int, ...], Callable[..., Tensor]] = {}

    def compute_features(
        self, x0: Tensor, timestep: int, noise: Tensor, cond: Tensor | None = None
    ) -> FactoredBatch:
        """Return each sample's projected output gradients, gradient norm, loss and residuals.

        Args:
            x0: Tensor (B, C, H, W) of clean images.
            timestep: t in [0, T).
            noise: Tensor (B, C, H, W).
            cond: The batch's conditioning, as in :meth:`GradientComputer.compute`.

        Returns:
            A :class:`FactoredBatch`: features (B, r, k), the factored projection of each
            output's gradient; norms (B,), each sample's exact gradient norm over all r outputs
            (what per-step normalisation divides by); losses and residuals as in
            :meth:`GradientComputer.compute`.

        Raises:
            ConfigError: A bad timestep, or a covered module that runs twice in one forward.
            DataError: Bad images or noise.
        """
        x_t, target = self._noisy_inputs(x0, timestep, noise)
        batch, r = x_t.shape[0], self.num_outputs
        self._check_condition(cond, batch)
        if batch == 0:
            empty = self._empty(self.proj_dim)
            return FactoredBatch(empty.grads, empty.losses[:0], empty.losses, empty.residuals)
        capture = self._capture(batch)
        handles = [
            self._modules[block.module].register_forward_hook(partial(capture.on_layer, block))
            for block in self.layout.blocks
        ] + [
            self._modules[name].register_forward_hook(partial(capture.on_rest, name, indices))
            for name, indices in self._rest_modules.items()
        ]
        output_fn = self._batched_output(tuple(x_t.shape[1:]))
        try:
            with torch.enable_grad():
                t = torch.full((batch,), timestep, device=self.device)
                prediction = predict(self._model, x_t, t, cond)
                losses = (prediction.detach() - target).square().flatten(1).mean(dim=1)
                values = output_fn(prediction, target)
                residuals = output_fn(target, target) - values.detach()
                if not capture.leaves:
                    raise ConfigError("no covered layer ran in the model's forward pass")
                for row in range(r):
                    capture.row = row
                    torch.autograd.grad(
                        values[:, row].sum(),
                        capture.leaves,
                        retain_graph=row < r - 1,
                        allow_unused=True,
                    )
        finally:
            for handle in handles:
                handle.remove()
        features, norms = capture.finish()
        return FactoredBatch(features, norms, losses, residuals)

    def _capture(self, batch: int) -> _Capture:
        """The hook state of one :meth:`compute_features` call (subclasses collect other sums)."""
        return _Capture(self, batch)

    def _batched_output(self, sample_shape: tuple[int, ...]) -> Callable[..., Tensor]:
        if sample_shape not in self._output_fns:
            output_fn = OutputFunction(
                self._output, sample_shape, dtype=self.dtype, device=self.device
            )
            self._output_fns[sample_shape] = vmap(output_fn)
        return self._output_fns[sample_shape]


class _Capture:
    """Hook state of one :meth:`FactoredGradientComputer.compute_features` call."""

    def __init__(self, computer: FactoredGradientComputer, batch: int) -> None:
        self.computer = computer
        self.batch = batch
        self.row = 0
        self.work = computer._work_dtype
        r, like = computer.num_outputs, {"dtype": computer._work_dtype, "device": computer.device}
        self._like = like
        # Made when a layer's gradient arrives (see _block): subclasses that sum something else
        # never hold B x r x k features.
        self.blocks: dict[str, Tensor] = {}
        self.rest = [torch.zeros((batch, r, rest.numel), **like) for rest in computer.layout.rest]
        self.square_norms = torch.zeros((batch,), **like)
        self.layer_inputs: dict[str, Tensor] = {}
        self.patches: dict[str, Tensor] = {}
        self.leaves: list[Tensor] = []

    def _trace(self, name: str, output: Tensor, on_grad: Callable[[Tensor], None]) -> Tensor:
        if not isinstance(output, Tensor) or output.shape[:1] != (self.batch,):
            raise DataError(f"{name}: output is not a batch of {self.batch} tensors")
        if not output.requires_grad:
            # Nothing before this layer depends on what is differentiated (e.g. the timestep
            # embedding): start the graph here. The clone keeps later in-place ops legal.
            leaf = output.detach().requires_grad_(True)
            self.leaves.append(leaf)
            output = leaf.clone()
        elif not self.leaves:
            raise ConfigError(
                f"{name}: its output already needs gradients before any covered layer; the "
                "factored backend needs the model's parameters frozen outside its hooks"
            )
        output.register_hook(lambda grad: on_grad(grad.detach()))
        return output

    def on_layer(self, block: LayerBlock, module: nn.Module, inputs: tuple[Any, ...], output: Any):
        if block.module in self.layer_inputs:
            raise ConfigError(
                f"{block.module} ran twice in one forward pass; the factored backend needs each "
                "covered layer to run once (leave it out with parameter patterns)"
            )
        a = inputs[0].detach()
        if a.shape[0] != self.batch:
            raise DataError(f"{block.module}: input is not a batch of {self.batch}")
        # Kept as is (as training keeps it for the weight gradient); patches are made per layer
        # in the backward hook, so at most one layer's patches exist at a time.
        self.layer_inputs[block.module] = a
        return self._trace(block.module, output, partial(self.on_layer_grad, block, module))

    def _block(self, block: LayerBlock) -> Tensor:
        """The layer's (B, r, k_out, k_in) features, zero until its backward hook adds to them."""
        if block.module not in self.blocks:
            shape = (self.batch, self.computer.num_outputs, block.k_out, block.k_in)
            self.blocks[block.module] = torch.zeros(shape, **self._like)
        return self.blocks[block.module]

    def _target(self, block: LayerBlock) -> Tensor:
        """Where the projected gradient of the current output row goes: (B, k_out, k_in)."""
        return self._block(block)[:, self.row]

    def delta(self, block: LayerBlock, grad: Tensor) -> Tensor:
        """The output gradient per position, (B, d_out, P), in the working dtype."""
        # Channels first, positions last: (B, d_out, P) and (B, d_in, P). A conv's gradient and
        # unfolded input come this way; a Linear's are transposed views. No copies either way.
        grad = grad.to(self.work)
        if block.kind == "linear":
            return grad.reshape(self.batch, -1, block.d_out).transpose(1, 2)
        return grad.flatten(2)

    def on_layer_grad(self, block: LayerBlock, module: nn.Module, grad: Tensor) -> None:
        grad = grad.to(self.work)
        delta = self.delta(block, grad)
        has_bias = block.bias is not None
        weight_cols = block.d_in - has_bias
        delta_sum = delta.sum(dim=2) if has_bias else None  # the bias gradient
        p_out, p_in = self.computer.projector.factors(block, self.work, grad.device)
        # A side kept whole needs no product; data-dependent factors are never the identity.
        whole_out, whole_in = self.computer.projector.whole_sides(block)
        target = self._target(block)
        if explicit_is_cheaper(block, delta.shape[2], whole=(whole_out, whole_in)):
            # The layer's exact per-sample gradient (B, d_out, d_in), projected afterwards.
            weight_grad = self._weight_gradient(block, module, grad, delta)
            self.square_norms += weight_grad.square().sum(dim=(1, 2))
            if delta_sum is not None:
                self.square_norms += delta_sum.square().sum(dim=1)
            project_out = not whole_out
            if not whole_in:
                weight_grad = weight_grad @ p_in[:weight_cols]
                if delta_sum is not None:
                    weight_grad += delta_sum[:, :, None] * p_in[weight_cols]
                target += p_out.T @ weight_grad if project_out else weight_grad
                return
            # The input side is whole: the bias gradient is the block's last column.
            target[:, :, :weight_cols] += p_out.T @ weight_grad if project_out else weight_grad
            if delta_sum is not None:
                target[:, :, weight_cols] += delta_sum @ p_out if project_out else delta_sum
            return
        inputs = self.inputs(block, module)
        projected_in = p_in[:weight_cols].T @ inputs  # (B, k_in, P)
        projected_out = p_out.T @ delta  # (B, k_out, P)
        target += projected_out @ projected_in.transpose(1, 2)
        if delta_sum is not None:
            target += (delta_sum @ p_out)[:, :, None] * p_in[weight_cols]
        # The exact norm without the layer's gradient: the "ghost norm".
        gram_out = delta.transpose(1, 2) @ delta
        gram_in = inputs.transpose(1, 2) @ inputs
        if has_bias:
            gram_in += 1.0  # the bias column's inputs are ones
        self.square_norms += (gram_out * gram_in).sum(dim=(1, 2))

    def _weight_gradient(
        self, block: LayerBlock, module: nn.Module, grad: Tensor, delta: Tensor
    ) -> Tensor:
        """Each sample's weight gradient (B, d_out, d_in without the bias)."""
        if block.kind == "linear":
            return delta @ self.inputs(block, module).transpose(1, 2)
        # A convolution's weight gradient with the batch as groups: per-sample gradients from
        # the convolution backward kernel, faster than unfolding patches for a matmul.
        assert isinstance(module, nn.Conv2d)
        if module.padding_mode == "zeros" and not isinstance(module.padding, str):
            a, padding = self.layer_inputs[block.module].to(self.work), module.padding
        else:
            a, padding = self._padded(block, module), (0, 0)
        batch, channels = a.shape[:2]
        per_sample = torch.nn.grad.conv2d_weight(
            a.reshape(1, batch * channels, *a.shape[2:]),
            (batch * block.d_out, *module.weight.shape[1:]),
            grad.reshape(1, batch * block.d_out, *grad.shape[2:]),
            stride=module.stride,
            padding=padding,
            dilation=module.dilation,
            groups=batch,
        )
        return per_sample.reshape(batch, block.d_out, -1)

    def _padded(self, block: LayerBlock, module: nn.Conv2d) -> Tensor:
        """A convolution's input, padded as its forward pads it."""
        a = self.layer_inputs[block.module].to(self.work)
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(a, module._reversed_padding_repeated_twice, mode=mode)

    def inputs(self, block: LayerBlock, module: nn.Module) -> Tensor:
        """The layer's inputs per position, (B, d_in without the bias, P)."""
        if block.module in self.patches:
            return self.patches[block.module]
        if block.kind == "linear":
            a = self.layer_inputs[block.module].to(self.work)
            inputs = a.reshape(self.batch, -1, module.weight.shape[1]).transpose(1, 2)
        else:
            assert isinstance(module, nn.Conv2d)
            inputs = F.unfold(
                self._padded(block, module),
                module.kernel_size,
                dilation=module.dilation,
                stride=module.stride,
            )
        if self.computer.num_outputs > 1:
            self.patches[block.module] = inputs  # every output row reuses them
        return inputs

    def on_rest(
        self, name: str, indices: list[int], module: nn.Module, inputs: tuple[Any, ...], output: Any
    ):
        self.layer_inputs[name] = inputs[0].detach()
        return self._trace(name, output, partial(self.on_rest_grad, name, module, indices))

    def on_rest_grad(self, name: str, module: nn.Module, indices: list[int], grad: Tensor) -> None:
        grad = grad.to(self.work)
        for index in indices:
            rest = self.computer.layout.rest[index]
            if rest.role == "scale":
                # d(out)/d(scale) is the normalised input, recomputed here rather than kept.
                a = self.layer_inputs[name].to(self.work)
                if isinstance(module, nn.GroupNorm):
                    normalised = F.group_norm(a, module.num_groups, eps=module.eps)
                else:
                    normalised = F.layer_norm(a, module.normalized_shape, eps=module.eps)
                grad_of = grad * normalised
            else:
                grad_of = grad
            self.rest[index][:, self.row] += _sum_to_parameter(module, grad_of, self.batch)

    def finish(self) -> tuple[Tensor, Tensor]:
        """Return (features (B, r, k), exact gradient norms (B,))."""
        r = self.computer.num_outputs
        parts = [self._block(block).flatten(2) for block in self.computer.layout.blocks]
        if self.rest:
            rest = torch.cat(self.rest, dim=2)
            self.square_norms += rest.square().sum(dim=(1, 2))
            projected = self.computer.projector.project_rest(rest.reshape(self.batch * r, -1))
            parts.append(projected.reshape(self.batch, r, -1))
        factored = torch.cat(parts, dim=2).reshape(self.batch * r, -1)
        features = self.computer.projector.project_final(factored)
        return features.reshape(self.batch, r, -1), self.square_norms.sqrt()


def explicit_is_cheaper(
    block: LayerBlock, positions: int, *, whole: tuple[bool, bool] | None = None
) -> bool:
    """Whether forming the layer's gradient costs fewer multiplies than the factored way.

    Explicit: P d_out d_in for the gradient (which gives the norm too), then the factors.
    Factored: P (d_in k_in + d_out k_out + k_out k_in) for the features plus the ghost norm,
    P^2 (d_in + d_out). Both per sample.

    Args:
        block: The layer.
        positions: P.
        whole: Whether the (output, input) side is kept whole, i.e. its factor is the identity
            and costs nothing; by default, where k equals d (random factors).
    """
    d_in, d_out, k_in, k_out = block.d_in, block.d_out, block.k_in, block.k_out
    whole_out, whole_in = (k_out == d_out, k_in == d_in) if whole is None else whole
    explicit = positions * d_out * d_in
    explicit += d_out * d_in * k_in if not whole_in else 0
    explicit += k_out * d_out * k_in if not whole_out else 0
    factored = positions * (d_in * k_in + d_out * k_out + k_out * k_in)
    factored += positions * positions * (d_in + d_out)
    return explicit <= factored


def _sum_to_parameter(module: nn.Module, grad: Tensor, batch: int) -> Tensor:
    """Sum an output gradient over positions to the shape of the module's per-channel parameter."""
    if isinstance(module, nn.LayerNorm):
        shape = module.normalized_shape
        return grad.reshape(batch, -1, *shape).sum(dim=1).reshape(batch, -1)
    if isinstance(module, nn.Linear):
        return grad.reshape(batch, -1, grad.shape[-1]).sum(dim=1)
    # GroupNorm and Conv2d: channels second.
    return grad.reshape(batch, grad.shape[1], -1).sum(dim=2)


def refuse_batch_coupling(model: nn.Module) -> None:
    """Refuse models whose layers mix the samples of a batch in eval mode.

    The computers run a copy of the model in eval mode, where BatchNorm normalises with its
    running statistics (per sample); without running statistics it uses the batch's.

    Raises:
        ConfigError: A BatchNorm layer without running statistics.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
            raise ConfigError(
                f"{name}: BatchNorm using batch statistics mixes the samples of a batch, so one "
                "batched backward cannot give per-sample gradients; use backend='vmap'"
            )
