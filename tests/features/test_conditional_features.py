"""The feature engine on text-conditioned, LoRA fine-tuned and latent models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffattr.data import ImageDataset
from diffattr.errors import DataError, StoreMismatchError
from diffattr.features import (
    FactoredGradientComputer,
    FeatureConfig,
    GradientComputer,
    OutputConfig,
    PlanConfig,
    ProjectionConfig,
    choose_backend,
    estimate_featurization,
    featurize,
)
from diffattr.features._gradients import use_batchable_attention
from diffattr.models import LoRAConfig, build_model, default_scheduler_config
from tests.models.helpers import cunet_spec, prompted_dataset

TIMESTEP = 400


def random_model(lora: bool, name: str = "cunet-tiny", size: int = 8) -> nn.Module:
    """A conditional model with every weight random (LoRA B too, so no gradient is trivial)."""
    spec = cunet_spec(name, size=size)
    spec = spec.with_lora(LoRAConfig(rank=2)) if lora else spec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(spec)
        for param in model.parameters():
            nn.init.normal_(param, std=0.2)
    use_batchable_attention(model)
    return model


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    draw = torch.Generator().manual_seed(seed)
    x0 = torch.rand((3, 1, 8, 8), generator=draw, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=draw, dtype=torch.float64)
    return x0, noise, ["a handwritten 3", "a handwritten 7", ""]


@pytest.mark.parametrize("lora", [True, False], ids=["lora-parameters", "all-parameters"])
@pytest.mark.parametrize("kind", ["mean", "loss"])
def test_factored_features_of_a_conditional_model_are_the_projected_exact_gradients(
    lora: bool, kind: str
) -> None:
    model = random_model(lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    projection = ProjectionConfig(kind="kronecker", dim=min(trainable, 512), seed=3)
    computer = FactoredGradientComputer(
        model, default_scheduler_config(), OutputConfig(kind=kind), projection, dtype=torch.float64
    )
    if lora:
        assert all(".lora_" in name for name in computer.parameter_names)
    else:
        # The prompt encoder is differentiated too: it trains with the model.
        assert any(name.startswith("text.") for name in computer.parameter_names)
    x0, noise, prompts = batch()
    cond = computer.condition(prompts)
    got = computer.compute_features(x0, TIMESTEP, noise, cond)
    grads = computer.compute(x0, TIMESTEP, noise, cond).grads
    assert float(grads.abs().max()) > 0
    expected = computer.projector.project(grads.reshape(3, -1)).reshape(3, 1, -1)
    torch.testing.assert_close(got.features, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.norms, grads.flatten(1).norm(dim=1), rtol=1e-10, atol=0)


def test_gradients_of_one_sample_do_not_depend_on_the_others_prompts() -> None:
    model = random_model(lora=True)
    computer = GradientComputer(
        model, default_scheduler_config(), OutputConfig(kind="mean"), dtype=torch.float64
    )
    x0, noise, prompts = batch()
    both = computer.compute(x0, TIMESTEP, noise, computer.condition(prompts)).grads
    other = ["a handwritten 3", "something else", "x"]
    changed = computer.compute(x0, TIMESTEP, noise, computer.condition(other)).grads
    torch.testing.assert_close(both[0], changed[0], rtol=1e-12, atol=0)
    assert not torch.allclose(both[1], changed[1])


def test_the_auto_rule_picks_factored_for_lora_and_conditional_models() -> None:
    assert choose_backend(random_model(lora=True), None).backend == "factored"
    assert choose_backend(random_model(lora=False), None).backend == "factored"


def config(backend: str = "vmap") -> FeatureConfig:
    kind = "kronecker" if backend == "factored" else "dense"
    return FeatureConfig(
        plan=PlanConfig(num_steps=2),
        projection=ProjectionConfig(kind=kind, dim=16),
        backend=backend,
    )


def test_featurize_uses_the_prompts_and_refuses_other_prompts(tmp_path) -> None:
    model = random_model(lora=True)
    data = prompted_dataset(n=6)
    common = {"model_id": "m", "progress": False, "batch_size": 4}
    store = featurize(model, default_scheduler_config(), data, config(), tmp_path / "s", **common)
    features = store.array("features")
    assert features.shape == (6, 1, 16)
    swapped = data.with_prompts([data.prompts[0]] * 6)
    with pytest.raises(StoreMismatchError):
        featurize(model, default_scheduler_config(), swapped, config(), tmp_path / "s", **common)
    other = featurize(
        model, default_scheduler_config(), swapped, config(), tmp_path / "t", **common
    )
    assert (other.array("features")[0] == features[0]).all()
    assert not (other.array("features")[1] == features[1]).all()


def test_featurize_refuses_missing_prompts_before_any_work(tmp_path) -> None:
    model = random_model(lora=True)
    plain = prompted_dataset(n=4)
    unprompted = ImageDataset(images=plain.images, ids=plain.ids, name="plain")
    with pytest.raises(DataError, match="need a prompt each"):
        featurize(
            model,
            default_scheduler_config(),
            unprompted,
            config(),
            tmp_path / "s",
            model_id="m",
            progress=False,
        )
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("backend", ["vmap", "factored"])
def test_latent_models_are_featurised_on_their_latents(tmp_path, backend: str) -> None:
    model = random_model(lora=True, name="ldm-tiny", size=16)
    data = prompted_dataset(n=4, size=16)
    store = featurize(
        model,
        default_scheduler_config(),
        data,
        config(backend),
        tmp_path / backend,
        model_id="m",
        progress=False,
    )
    assert store.array("features").shape == (4, 1, 16)
    computer = GradientComputer(model, default_scheduler_config(), OutputConfig())
    assert computer.encode(data.images).shape == (4, 4, 8, 8)


@pytest.mark.parametrize("backend", ["vmap", "factored"])
@pytest.mark.parametrize(("name", "size"), [("cunet-tiny", 8), ("ldm-tiny", 16)])
def test_plans_probe_conditional_and_latent_models(backend: str, name: str, size: int) -> None:
    model = random_model(lora=True, name=name, size=size)
    features = FeatureConfig(projection=ProjectionConfig(kind="auto", dim=16), backend=backend)  # type: ignore[arg-type]
    estimate = estimate_featurization(
        model,
        default_scheduler_config(),
        features,
        image_shape=(1, size, size),
        n_samples=100,
        batch_size=2,
        repeats=1,
    )
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate.parameters == lora
    assert estimate.probe["seconds_per_gradient_pair"] > 0
