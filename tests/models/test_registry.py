from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffattr.errors import ConfigError, DiffattrError, UnknownModelError
from diffattr.models import (
    ModelSpec,
    ResidualMLP,
    available_models,
    build_model,
    count_parameters,
    load_checkpoint,
    model_spec,
    predict,
    sample_checkpoint,
    train,
)

from .custom_model import TinyConvNet
from .helpers import (
    CUSTOM_FACTORY,
    MLP_OVERRIDES,
    UNET_OVERRIDES,
    fixed_input,
    random_dataset,
    seeded_model,
    tiny_config,
)


def test_available_models_lists_the_registry() -> None:
    models = available_models()
    assert list(models) == ["cunet-tiny", "ldm-tiny", "mlp-tiny", "unet-cifar", "unet-tiny"]
    assert all(isinstance(text, str) and text for text in models.values())


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("unet-tiny", UNET_OVERRIDES),
        ("unet-tiny", None),
        ("mlp-tiny", MLP_OVERRIDES),
        ("mlp-tiny", None),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_predict_returns_the_input_shape(name: str, overrides: dict | None, channels: int) -> None:
    spec = model_spec(name, in_channels=channels, sample_size=8, overrides=overrides)
    model = seeded_model(spec)
    x = fixed_input((3, channels, 8, 8))
    with torch.no_grad():
        by_int = predict(model, x, 17)
        by_scalar = predict(model, x, torch.tensor(17))
        by_vector = predict(model, x, torch.full((3,), 17))
        mixed = predict(model, x, torch.tensor([17, 500, 999]))
    for out in (by_int, by_scalar, by_vector, mixed):
        assert out.shape == (3, channels, 8, 8)
        assert torch.isfinite(out).all()
    # A scalar timestep means the same timestep for every image.
    torch.testing.assert_close(by_scalar, by_vector)
    torch.testing.assert_close(by_int, by_vector)
    torch.testing.assert_close(mixed[0], by_vector[0])


def test_unet_tiny_depends_on_the_timestep() -> None:
    spec = model_spec("unet-tiny", in_channels=1, sample_size=8, overrides=UNET_OVERRIDES)
    model = seeded_model(spec)
    x = fixed_input((2, 1, 8, 8))
    with torch.no_grad():
        assert not torch.allclose(predict(model, x, 1), predict(model, x, 900))


def test_registry_configs_follow_the_image_shape() -> None:
    spec = model_spec("unet-tiny", in_channels=3, sample_size=16)
    assert spec.config["in_channels"] == spec.config["out_channels"] == 3
    assert spec.config["sample_size"] == 16
    assert spec.config["block_out_channels"] == [32, 64]
    mlp = model_spec("mlp-tiny", in_channels=1, sample_size=8, overrides={"width": 12})
    assert mlp.config == {"in_channels": 1, "sample_size": 8, "width": 12, "depth": 3}
    model = build_model(mlp)
    assert isinstance(model, ResidualMLP)
    assert model.input.in_features == 64
    assert model.input.out_features == 12


def test_unet_cifar_is_the_36m_parameter_ddpm_unet() -> None:
    spec = model_spec("unet-cifar", in_channels=3, sample_size=32)
    model = build_model(spec)
    n = count_parameters(model)
    assert 35_000_000 < n < 37_000_000
    assert n == 35_746_307
    assert model.config.in_channels == model.config.out_channels == 3
    assert model.config.sample_size == 32
    assert list(model.config.block_out_channels) == [128, 256, 256, 256]


def test_count_parameters_counts_trainable_only() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    assert count_parameters(model) == 3 * 4 + 4 + 4 * 2 + 2
    model[0].requires_grad_(False)
    assert count_parameters(model) == 4 * 2 + 2


def test_model_spec_round_trips_through_json() -> None:
    spec = model_spec("unet-tiny", in_channels=1, sample_size=8, overrides=UNET_OVERRIDES)
    data = spec.to_dict()
    assert data["name"] == "unet-tiny"
    assert data["config"]["block_out_channels"] == [8, 16]
    again = ModelSpec.from_dict(json.loads(json.dumps(data)))
    assert again == spec
    assert again.config == spec.config
    # to_dict hands out a copy: changing it leaves the spec alone.
    data["config"]["in_channels"] = 3
    assert spec.config["in_channels"] == 1


@pytest.mark.parametrize("data", [None, [], {}, {"name": 3}, {"config": {}}])
def test_model_spec_from_dict_rejects_malformed(data: object) -> None:
    with pytest.raises(ConfigError, match="model spec must be a dict"):
        ModelSpec.from_dict(data)  # type: ignore[arg-type]


def test_model_spec_from_dict_defaults_config() -> None:
    assert ModelSpec.from_dict({"name": "mlp-tiny"}).config == {}
    assert ModelSpec.from_dict({"name": "mlp-tiny", "config": None}).config == {}


def test_unknown_model_name_is_an_unknown_model_error() -> None:
    with pytest.raises(UnknownModelError, match="unet-huge") as info:
        model_spec("unet-huge", in_channels=1, sample_size=8)
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, DiffattrError)
    # Unlike a bare KeyError, the message is not wrapped in quotes.
    assert str(info.value).startswith("unknown model 'unet-huge'")
    assert "mlp-tiny" in str(info.value)


def test_build_model_rejects_unknown_names() -> None:
    with pytest.raises(KeyError, match="nope"):
        build_model(ModelSpec(name="nope"))
    with pytest.raises(UnknownModelError, match="no_such_module_xyz"):
        build_model(ModelSpec(name="no_such_module_xyz:make", config={}))
    with pytest.raises(UnknownModelError, match="missing_factory"):
        build_model(ModelSpec(name="tests.models.custom_model:missing_factory"))
    with pytest.raises(UnknownModelError, match="not callable"):
        build_model(ModelSpec(name="tests.models.custom_model:__doc__"))


def test_unknown_override_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="blocks_out") as info:
        model_spec("unet-tiny", in_channels=1, sample_size=8, overrides={"blocks_out": [8]})
    assert "block_out_channels" in str(info.value)  # the known keys are listed


def test_model_spec_rejects_bad_shapes() -> None:
    with pytest.raises(ConfigError, match="in_channels"):
        model_spec("mlp-tiny", in_channels=0, sample_size=8)
    with pytest.raises(ConfigError, match="sample_size"):
        model_spec("mlp-tiny", in_channels=1, sample_size=0)


def test_build_model_wraps_constructor_errors() -> None:
    spec = ModelSpec(name="mlp-tiny", config={"in_channels": 1, "sample_size": 8, "bogus": 1})
    with pytest.raises(ConfigError, match="cannot build model 'mlp-tiny'"):
        build_model(spec)
    with pytest.raises(ConfigError, match="not a torch module"):
        build_model(
            model_spec("tests.models.custom_model:not_a_module", in_channels=1, sample_size=8)
        )


def test_custom_factory_builds_trains_and_samples(tmp_path) -> None:
    spec = model_spec(CUSTOM_FACTORY, in_channels=1, sample_size=8, overrides={"width": 6})
    assert spec.config == {"in_channels": 1, "sample_size": 8, "width": 6}
    model = build_model(spec)
    assert isinstance(model, TinyConvNet)
    assert model.conv_in.out_channels == 6

    dataset = random_dataset(n=12)
    checkpoint = train(
        spec,
        dataset,
        tiny_config(steps=3, batch_size=4, checkpoint_every=0),
        tmp_path / "ckpt",
        progress=False,
    )
    assert checkpoint.step == 3
    # Reloading a factory from a checkpoint file needs the caller's explicit trust.
    loaded = load_checkpoint(tmp_path / "ckpt", trust_remote_code=True)
    assert loaded.model_spec == spec
    assert isinstance(loaded.load_model(), TinyConvNet)
    images = sample_checkpoint(
        loaded, [0, 1], sampler="ddim", num_inference_steps=5, progress=False
    )
    assert images.shape == (2, 1, 8, 8)
    assert images.dtype == torch.float32
    assert images.abs().max() <= 1
    assert not torch.equal(images[0], images[1])


class _Wrapped(nn.Module):
    """Returns ``x + t`` through a configurable wrapper."""

    def __init__(self, wrap) -> None:
        super().__init__()
        self.wrap = wrap

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> object:
        return self.wrap(x + torch.as_tensor(t, dtype=x.dtype))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda y: y,
        lambda y: SimpleNamespace(sample=y),
        lambda y: (y,),
        lambda y: (y, "extra"),
        lambda y: [y, None],
    ],
    ids=["tensor", "sample-attribute", "1-tuple", "2-tuple", "list"],
)
def test_predict_unwraps_model_outputs(wrap) -> None:
    x = fixed_input((2, 1, 4, 4))
    out = predict(_Wrapped(wrap), x, 2)
    assert torch.equal(out, x + 2)


@pytest.mark.parametrize(
    ("wrap", "message"),
    [
        (lambda y: y[:, :, :2], r"shape \(2, 1, 2, 4\) for input \(2, 1, 4, 4\)"),
        (lambda y: y.flatten(1), r"shape \(2, 16\)"),
        (lambda y: SimpleNamespace(sample=y[:1]), r"shape \(1, 1, 4, 4\)"),
        (lambda y: y.numpy(), "returned ndarray"),
        (lambda y: SimpleNamespace(sample=None), "returned SimpleNamespace"),
        (lambda y: (), "returned tuple"),
        (lambda y: {"sample": y}, "returned dict"),
    ],
    ids=["cropped", "flat", "sample-batch", "ndarray", "no-sample", "empty-tuple", "dict"],
)
def test_predict_rejects_wrong_outputs(wrap, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        predict(_Wrapped(wrap), fixed_input((2, 1, 4, 4)), 2)
