"""Named model configurations, and building a model from a JSON-able spec (never from a pickle)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import UNet2DModel
from torch import nn

from diffattr.errors import CheckpointError, ConfigError, UnknownModelError
from diffattr.models._conditional import downsampling_factor, text_to_image_unet
from diffattr.models._lora import LoRAConfig, add_lora
from diffattr.models._mlp import ResidualMLP


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    """What is needed to rebuild a model: a registry name (or ``module:factory``) and its config.

    Attributes:
        name: A registry name such as ``"unet-tiny"``, or an importable ``"package.module:factory"``
            whose factory accepts ``**config`` and returns a torch module (a checkpoint naming
            one loads only with ``trust_remote_code``: see :func:`imports_code`).
        config: JSON-serialisable keyword arguments of the model's constructor or factory.
        lora: LoRA adapters on the built model (:class:`~diffattr.models.LoRAConfig` as a
            dict), or None. A spec with adapters is a fine-tune: only the adapters train.
    """

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.lora is not None:
            # Validated (and normalised) at the edge, so a bad adapter spec never reaches peft.
            object.__setattr__(self, "lora", LoRAConfig.from_dict(self.lora).to_dict())

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as a JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        data: dict[str, Any] = {"name": self.name, "config": dict(self.config)}
        if self.lora is not None:
            data["lora"] = dict(self.lora)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Rebuild a spec written by :meth:`to_dict`."""
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise ConfigError(f"model spec must be a dict with a string 'name', got {data!r}")
        return cls(name=data["name"], config=dict(data.get("config") or {}), lora=data.get("lora"))

    def without_lora(self) -> ModelSpec:
        """The spec of the pretrained model the adapters fine-tune."""
        return ModelSpec(name=self.name, config=dict(self.config))

    def with_lora(self, config: LoRAConfig) -> ModelSpec:
        """This model fine-tuned by LoRA adapters."""
        return ModelSpec(name=self.name, config=dict(self.config), lora=config.to_dict())


@dataclass(frozen=True, slots=True)
class _Entry:
    description: str
    default_config: Callable[[int, int], dict[str, Any]]
    build: Callable[..., nn.Module]


def _unet_tiny(in_channels: int, sample_size: int) -> dict[str, Any]:
    # Two levels and mid-block attention: ~650k parameters, trains on digits in minutes on a CPU.
    return {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 8,
    }


def _unet_cifar(in_channels: int, sample_size: int) -> dict[str, Any]:
    # The DDPM CIFAR-10 architecture used by the D-TRAK and DAS papers (~36M parameters).
    return {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "block_out_channels": [128, 256, 256, 256],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "norm_eps": 1e-6,
        "attention_head_dim": None,
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
    }


def _cunet_tiny(in_channels: int, sample_size: int) -> dict[str, Any]:
    # unet-tiny's shape with cross-attention on the prompt in the first level and the mid block.
    return {
        "in_channels": in_channels,
        "sample_size": sample_size,
        "unet": _conditional_unet(in_channels, sample_size),
        "text": {"max_length": 32},
    }


def _ldm_tiny(in_channels: int, sample_size: int) -> dict[str, Any]:
    # cunet-tiny on the 4-channel latents of vae-tiny (2x smaller sides); latent_scale and the
    # autoencoder's weights come from a trained vae-tiny (see `train(..., init=...)`).
    vae = vae_tiny_config(in_channels, sample_size)
    factor = downsampling_factor(vae)
    if sample_size % factor:
        raise ConfigError(f"ldm-tiny needs an image side divisible by {factor}, got {sample_size}")
    latent_side = sample_size // factor
    return {
        "in_channels": in_channels,
        "sample_size": sample_size,
        "unet": _conditional_unet(vae["latent_channels"], latent_side),
        "text": {"max_length": 32},
        "vae": vae,
        "latent_scale": 1.0,
    }


def vae_tiny_config(in_channels: int, sample_size: int) -> dict[str, Any]:
    """A small ``AutoencoderKL`` config: 2x downsampling to 4 latent channels, ~660k parameters.

    Args:
        in_channels: Image channels (1 for grayscale, 3 for RGB).
        sample_size: Image side in pixels; 16x16 images give 4x8x8 latents.

    Returns:
        JSON-serialisable keyword arguments of ``AutoencoderKL``.
    """
    return {
        "in_channels": in_channels,
        "out_channels": in_channels,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": sample_size,
    }


def _conditional_unet(channels: int, side: int) -> dict[str, Any]:
    return {
        "sample_size": side,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 8,
        "cross_attention_dim": 32,
    }


def _mlp_tiny(in_channels: int, sample_size: int) -> dict[str, Any]:
    return {"in_channels": in_channels, "sample_size": sample_size, "width": 256, "depth": 3}


_REGISTRY: dict[str, _Entry] = {
    "unet-tiny": _Entry(
        "diffusers UNet2DModel, channels (32, 64), mid-block attention; CPU-trainable",
        _unet_tiny,
        UNet2DModel,
    ),
    "unet-cifar": _Entry(
        "diffusers UNet2DModel, the 36M-parameter DDPM CIFAR-10 configuration; for a GPU",
        _unet_cifar,
        UNet2DModel,
    ),
    "cunet-tiny": _Entry(
        "diffusers UNet2DConditionModel with a byte-level prompt encoder; text-conditioned",
        _cunet_tiny,
        text_to_image_unet,
    ),
    "ldm-tiny": _Entry(
        "cunet-tiny on the latents of a trained vae-tiny autoencoder (latent diffusion)",
        _ldm_tiny,
        text_to_image_unet,
    ),
    "mlp-tiny": _Entry(
        "residual MLP on flattened pixels (width 256, 3 blocks); the fastest CPU model",
        _mlp_tiny,
        ResidualMLP,
    ),
}


def available_models() -> dict[str, str]:
    """Return the registry: model name -> one-line description."""
    return {name: entry.description for name, entry in sorted(_REGISTRY.items())}


def model_spec(
    name: str, *, in_channels: int, sample_size: int, overrides: dict[str, Any] | None = None
) -> ModelSpec:
    """Resolve a registry name to a full spec for images of the given shape.

    Args:
        name: A registry name (see :func:`available_models`) or ``"package.module:factory"``.
        in_channels: Image channels (1 for grayscale, 3 for RGB).
        sample_size: Image side in pixels.
        overrides: Config entries to change, e.g. ``{"block_out_channels": [16, 32]}``.

    Returns:
        The spec; building it gives a model for (B, in_channels, sample_size, sample_size) inputs.

    Raises:
        UnknownModelError: The name is neither registered nor a ``module:factory`` path.
        ConfigError: An override names a key the configuration does not have.
    """
    if in_channels < 1 or sample_size < 1:
        raise ConfigError(
            f"in_channels and sample_size must be >= 1, got {in_channels}, {sample_size}"
        )
    if imports_code(name):
        config = {"in_channels": in_channels, "sample_size": sample_size, **(overrides or {})}
        return ModelSpec(name=name, config=config)
    config = _entry(name).default_config(in_channels, sample_size)
    unknown = sorted(set(overrides or {}) - set(config))
    if unknown:
        raise ConfigError(
            f"model {name!r} has no config keys {unknown}; known keys: {sorted(config)}"
        )
    return ModelSpec(name=name, config={**config, **(overrides or {})})


def build_model(spec: ModelSpec, base_state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Build a freshly initialised model from a spec (weights are loaded separately).

    Args:
        spec: The model.
        base_state: Weights of the pretrained model to load before the spec's LoRA adapters are
            added (a fine-tune starts from them); the adapters themselves start as the identity.

    Raises:
        UnknownModelError: The spec's name cannot be resolved.
        ConfigError: The constructor rejects the config.
        CheckpointError: ``base_state`` does not fit the model.
    """
    model = _build_plain(spec)
    if base_state is not None:
        load_weights(model, base_state, "pretrained weights")
    if spec.lora is not None:
        add_lora(model, LoRAConfig.from_dict(spec.lora))
    return model


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch names its first differing keys.

    Raises:
        CheckpointError: The keys or shapes do not match.
    """
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{key} ({list(state[key].shape)} given, {list(value.shape)} expected)"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            problems.append(f"{len(keys)} {label}, e.g. {', '.join(keys[:2])}")
    if problems:
        raise CheckpointError(
            f"{what} do not fit the model ({type(model).__name__}): {'; '.join(problems)}"
        )
    model.load_state_dict(state, strict=True)


def _build_plain(spec: ModelSpec) -> nn.Module:
    factory = _factory(spec.name)
    try:
        model = factory(**spec.config)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot build model {spec.name!r} from its config: {err}") from err
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"factory {spec.name!r} returned {type(model).__name__}, not a torch module"
        )
    return model


def predict(
    model: nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor | int,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Call ``model(x_t, t)`` (``model(x_t, t, cond)`` if conditioned) and return the prediction.

    The prediction is a tensor shaped like ``x_t``; ``cond`` is the model's conditioning of the
    batch (see :func:`~diffattr.models.condition`), None for unconditional models.

    Accepts diffusers outputs (an object with ``.sample``), tuples whose first entry is the
    prediction, and plain tensors, so any module with the ``model(x_t, t)`` signature works.

    Raises:
        TypeError: The model returned something else, or a tensor of the wrong shape.
    """
    out = model(x_t, t) if cond is None else model(x_t, t, cond)
    if not isinstance(out, torch.Tensor):
        sample = getattr(out, "sample", None)
        out = sample if isinstance(sample, torch.Tensor) else out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model returned {type(out).__name__}; expected a tensor or .sample")
    if out.shape != x_t.shape:
        raise TypeError(f"model returned shape {tuple(out.shape)} for input {tuple(x_t.shape)}")
    return out


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; choose one of {sorted(_REGISTRY)} or give 'module:factory'"
        ) from None


def imports_code(name: str) -> bool:
    """Whether building model ``name`` imports and runs code from outside diffattr.

    A registry name builds a diffattr or diffusers class; ``"package.module:factory"`` imports
    ``package.module`` and calls ``factory``, which may do anything. Such a name typed by the
    user is their choice; read from a checkpoint it needs ``trust_remote_code`` (see
    :func:`~diffattr.models.load_checkpoint`).
    """
    return ":" in name


def _factory(name: str) -> Callable[..., nn.Module]:
    if not imports_code(name):
        return _entry(name).build
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UnknownModelError(f"cannot import model factory {name!r}: {err}") from err
    if not callable(factory):
        raise UnknownModelError(f"model factory {name!r} is not callable")
    return factory
