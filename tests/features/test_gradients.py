from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn

from diffattr.errors import ConfigError, DataError
from diffattr.features._gradients import (
    GradientComputer,
    select_parameters,
    use_batchable_attention,
)
from diffattr.features._outputs import OutputConfig, output_directions
from diffattr.models import ResidualMLP, build_model, default_scheduler_config, model_spec, predict

KINDS = ["loss", "square_norm", "mean", "l1", "l2", "linf", "output_projection"]
SHAPE = (1, 8, 8)
TIMESTEP = 400


class TinyConv(nn.Module):
    """A custom model(x, t) without a config: two convolutions and a timestep embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(1, 6, 3, padding=1)
        self.time = nn.Linear(1, 6)
        self.conv_out = nn.Conv2d(6, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        h = self.conv_in(x) + self.time(t[:, None] / 1000)[:, :, None, None]
        return self.conv_out(nn.functional.silu(h))


def make_unet() -> nn.Module:
    spec = model_spec(
        "unet-tiny",
        in_channels=1,
        sample_size=8,
        overrides={"block_out_channels": [8, 16], "norm_num_groups": 4, "attention_head_dim": 4},
    )
    return build_model(spec)


def make_mlp() -> nn.Module:
    model = ResidualMLP(in_channels=1, sample_size=8, width=16, depth=1, time_dim=8)
    # The output layer starts at zero (a zero prediction has no l2/linf gradient): randomise it.
    nn.init.normal_(model.output.weight, std=0.1)
    nn.init.normal_(model.output.bias, std=0.1)
    return model


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": make_mlp,
    "unet": make_unet,
    "custom": TinyConv,
}


def seeded(name: str, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name]().eval()


def batch(size: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    draw = torch.Generator().manual_seed(seed)
    return torch.randn((size, *SHAPE), generator=draw), torch.randn((size, *SHAPE), generator=draw)


def reference(
    model: nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    output: OutputConfig,
    *,
    names: list[str] | None = None,
    timestep: int = TIMESTEP,
    scheduler_config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, r, p) gradients and (B,) losses from one backward pass per sample and output."""
    model = nn.Module.to(copy.deepcopy(model), torch.float64).eval()
    scheduler = DDPMScheduler.from_config(scheduler_config or default_scheduler_config())
    abar = scheduler.alphas_cumprod[timestep].double()
    x0, noise = x0.double(), noise.double()
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    target = {
        "epsilon": noise,
        "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * x0,
        "sample": x0,
    }[scheduler.config.prediction_type]
    named = dict(model.named_parameters())
    params = [named[n] for n in (names or list(named))]
    directions = output_directions(
        output.num_directions, x0[0].numel(), output.seed, dtype=x0.dtype
    )
    grads, losses = [], []
    for b in range(len(x0)):
        pred = predict(model, x_t[b : b + 1], torch.tensor([timestep]))[0]
        p, e = pred.flatten(), target[b].flatten()
        values = {
            "loss": [((p - e) ** 2).sum() / p.numel()],
            "square_norm": [(p**2).sum() / p.numel()],
            "mean": [p.sum() / p.numel()],
            "l1": [p.abs().sum() / p.numel()],
            "l2": [(p**2).sum().sqrt()],
            "linf": [p.abs().max()],
            "output_projection": list(directions @ p),
        }[output.kind]
        rows = [
            torch.cat([g.flatten() for g in torch.autograd.grad(v, params, retain_graph=True)])
            for v in values
        ]
        grads.append(torch.stack(rows))
        losses.append(((p - e) ** 2).mean().detach())
    return torch.stack(grads), torch.stack(losses)


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    error = torch.linalg.vector_norm(actual - expected, dim=-1)
    scale = torch.linalg.vector_norm(expected, dim=-1)
    assert (scale > 0).all()
    assert (error / scale).max() < tol, (error / scale).max()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_equal_a_loop_of_backward_passes(name: str, kind: str) -> None:
    model = seeded(name)
    output = OutputConfig(kind=kind, num_directions=3, seed=1)
    computer = GradientComputer(model, default_scheduler_config(), output, dtype=torch.float64)
    x0, noise = batch()
    grads, losses, _ = computer.compute(x0, TIMESTEP, noise)
    expected, expected_losses = reference(model, x0, noise, output)
    assert grads.dtype == losses.dtype == torch.float64
    assert grads.shape == (3, output.num_outputs, computer.num_parameters)
    assert computer.num_outputs == output.num_outputs
    assert computer.num_parameters == sum(p.numel() for p in model.parameters())
    assert_relative_close(grads, expected)
    # The reference runs SDPA attention, the computer the classic processor: ~1e-9 apart.
    torch.testing.assert_close(losses, expected_losses, rtol=1e-8, atol=0)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_loss_uses_the_scheduler_target(prediction_type: str) -> None:
    model = seeded("mlp")
    config = {**default_scheduler_config(), "prediction_type": prediction_type}
    output = OutputConfig(kind="loss")
    computer = GradientComputer(model, config, output, dtype=torch.float64)
    x0, noise = batch()
    grads, losses, _ = computer.compute(x0, 900, noise)
    expected, expected_losses = reference(
        model, x0, noise, output, timestep=900, scheduler_config=config
    )
    assert_relative_close(grads, expected)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-10, atol=0)


def test_batchable_attention_matches_the_default_sdpa_path() -> None:
    model = seeded("unet")
    processors = [m.processor for m in model.modules() if hasattr(m, "set_processor")]
    assert processors
    assert all(type(p) is AttnProcessor2_0 for p in processors)
    output = OutputConfig(kind="output_projection", num_directions=2)
    computer = GradientComputer(model, default_scheduler_config(), output, dtype=torch.float64)
    inner = [m.processor for m in computer._model.modules() if hasattr(m, "set_processor")]
    assert all(type(p) is AttnProcessor for p in inner)
    x0, noise = batch(seed=4)
    grads, _, _ = computer.compute(x0, 10, noise)
    expected, _ = reference(model, x0, noise, output, timestep=10)  # SDPA, per sample
    assert_relative_close(grads, expected)
    # The caller's model is untouched: still SDPA.
    assert all(
        type(m.processor) is AttnProcessor2_0
        for m in model.modules()
        if hasattr(m, "set_processor")
    )


def test_use_batchable_attention_keeps_the_function() -> None:
    model = nn.Module.to(seeded("unet"), torch.float64)
    x = torch.randn((2, *SHAPE), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    before = predict(model, x, torch.tensor([3, 700]))
    use_batchable_attention(model)
    attention = [m for m in model.modules() if hasattr(m, "set_processor")]
    assert all(type(m.processor) is AttnProcessor for m in attention)
    torch.testing.assert_close(predict(model, x, torch.tensor([3, 700])), before)
    # Processors that are not SDPA compute something else and are kept.
    custom = AttnProcessor()
    attention[0].set_processor(custom)
    use_batchable_attention(model)
    assert attention[0].processor is custom
    mlp = seeded("mlp")
    state = copy.deepcopy(mlp.state_dict())
    use_batchable_attention(mlp)
    assert all(torch.equal(state[k], v) for k, v in mlp.state_dict().items())


def test_parameter_globs_select_slices_of_the_full_gradient() -> None:
    model = seeded("unet")
    names = select_parameters(model, ["*attentions*"])
    assert names
    assert all("attentions" in n for n in names)
    all_names = [n for n, _ in model.named_parameters()]
    assert names == [n for n in all_names if "attentions" in n]  # model order
    output = OutputConfig(kind="square_norm")
    config = default_scheduler_config()
    full = GradientComputer(model, config, output, dtype=torch.float64)
    part = GradientComputer(model, config, output, ["*attentions*"], dtype=torch.float64)
    assert part.parameter_names == names
    x0, noise = batch(size=2)
    full_grads, full_losses, _ = full.compute(x0, TIMESTEP, noise)
    part_grads, part_losses, _ = part.compute(x0, TIMESTEP, noise)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    offsets, start = {}, 0
    for n in all_names:
        offsets[n] = slice(start, start + sizes[n])
        start += sizes[n]
    expected = torch.cat([full_grads[:, :, offsets[n]] for n in names], dim=2)
    assert part.num_parameters == expected.shape[2]
    torch.testing.assert_close(part_grads, expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(part_losses, full_losses)
    assert_relative_close(part_grads, reference(model, x0, noise, output, names=names)[0])


def test_select_parameters_patterns_and_errors() -> None:
    model = seeded("mlp")
    assert select_parameters(model, None) == [n for n, _ in model.named_parameters()]
    assert select_parameters(model, ["output.*", "input.weight"]) == [
        "input.weight",
        "output.weight",
        "output.bias",
    ]
    assert select_parameters(model, "output.bias") == ["output.bias"]
    model.input.weight.requires_grad_(False)
    assert "input.weight" not in select_parameters(model, None)
    with pytest.raises(ConfigError, match=r"'\*attn\*' matches no trainable parameter.*input"):
        select_parameters(model, ["output.*", "*attn*"])
    with pytest.raises(ConfigError, match="matches no trainable"):
        select_parameters(model, ["input.weight"])  # frozen
    with pytest.raises(ConfigError, match="no trainable parameters selected"):
        select_parameters(model, [])
    with pytest.raises(ConfigError, match="matches no trainable"):
        GradientComputer(model, default_scheduler_config(), OutputConfig(), ["nope"])


def test_frozen_parameters_are_held_fixed() -> None:
    model = seeded("mlp")
    model.input.requires_grad_(False)
    computer = GradientComputer(
        model, default_scheduler_config(), OutputConfig(), dtype=torch.float64
    )
    assert not any(n.startswith("input.") for n in computer.parameter_names)
    x0, noise = batch()
    grads, _, _ = computer.compute(x0, TIMESTEP, noise)
    expected, _ = reference(model, x0, noise, OutputConfig(), names=computer.parameter_names)
    assert_relative_close(grads, expected)


def test_the_callers_model_is_not_changed() -> None:
    model = seeded("unet").train()
    state = copy.deepcopy(model.state_dict())
    computer = GradientComputer(
        model, default_scheduler_config(), OutputConfig(), dtype=torch.float64
    )
    computer.compute(*batch(size=1)[:1], TIMESTEP, batch(size=1)[1])
    assert model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_float32_default_and_batch_independence() -> None:
    model = seeded("unet")
    computer = GradientComputer(model, default_scheduler_config(), OutputConfig(kind="l1"))
    x0, noise = batch(size=3)
    grads, losses, _ = computer.compute(x0, TIMESTEP, noise)
    assert grads.dtype == losses.dtype == torch.float32
    alone, alone_loss, _ = computer.compute(x0[2:], TIMESTEP, noise[2:])
    torch.testing.assert_close(alone[0], grads[2], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(alone_loss[0], losses[2])
    exact = GradientComputer(
        model, default_scheduler_config(), OutputConfig(kind="l1"), dtype=torch.float64
    )
    assert_relative_close(grads.double(), exact.compute(x0, TIMESTEP, noise)[0], tol=1e-3)
    empty, empty_losses, _ = computer.compute(x0[:0], TIMESTEP, noise[:0])
    assert empty.shape == (0, 1, computer.num_parameters)
    assert empty_losses.shape == (0,)


def test_bad_inputs_are_rejected() -> None:
    computer = GradientComputer(seeded("unet"), default_scheduler_config(), OutputConfig())
    x0, noise = batch(size=2)
    for bad in (-1, 1000, 2.0, True):
        with pytest.raises(ConfigError, match="timestep"):
            computer.compute(x0, bad, noise)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"expects \(B, 1, 8, 8\)"):
        computer.compute(torch.zeros(2, 3, 8, 8), 0, torch.zeros(2, 3, 8, 8))
    with pytest.raises(DataError, match=r"expects \(B, 1, 8, 8\)"):
        computer.compute(torch.zeros(2, 1, 4, 4), 0, torch.zeros(2, 1, 4, 4))
    with pytest.raises(DataError, match=r"\(B, C, H, W\)"):
        computer.compute(torch.zeros(2, 64), 0, torch.zeros(2, 64))
    with pytest.raises(DataError, match="noise has shape"):
        computer.compute(x0, 0, noise[:1])
    x0[1, 0, 2, 2] = float("nan")
    with pytest.raises(DataError, match=r"x0 has non-finite values in batch rows \[1\]"):
        computer.compute(x0, 0, noise)
    mlp = GradientComputer(seeded("mlp"), default_scheduler_config(), OutputConfig())
    with pytest.raises(DataError, match=r"expects \(B, 1, 8, 8\)"):
        mlp.compute(torch.zeros(1, 1, 4, 4), 0, torch.zeros(1, 1, 4, 4))
    # A model without a config accepts any image size.
    custom = GradientComputer(seeded("custom"), default_scheduler_config(), OutputConfig())
    assert custom.compute(torch.zeros(1, 1, 5, 5), 0, torch.ones(1, 1, 5, 5))[0].shape == (
        1,
        1,
        custom.num_parameters,
    )
    with pytest.raises(ConfigError, match="dtype"):
        GradientComputer(
            seeded("mlp"), default_scheduler_config(), OutputConfig(), dtype=torch.int64
        )
