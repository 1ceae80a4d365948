"""LoRA adapters (peft) on a UNet's attention projections, for fine-tuning and attribution.

The Stable-Diffusion attribution protocol of D-TRAK and DAS fine-tunes LoRA adapters on a
pretrained model and attributes over the adapter's parameters only. :func:`add_lora` freezes the
model and injects trainable low-rank adapters, so "every trainable parameter" (the engine's
default selection) then means "every LoRA parameter".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from diffattr._config import known_fields
from diffattr.errors import ConfigError

#: The attention projections diffusers' LoRA scripts adapt (query, key, value, output).
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True, kw_only=True, slots=True)
class LoRAConfig:
    """Which layers get adapters, and their rank and scale.

    Attributes:
        rank: r, the adapters' rank.
        alpha: The update is scaled by alpha / rank (None: alpha = rank, a scale of 1).
        targets: Names (or name suffixes) of the Linear layers to adapt, as peft matches them.
    """

    rank: int = field(default=4, metadata={"help": "LoRA rank r"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (None: the rank)"})
    targets: tuple[str, ...] = field(
        default=DEFAULT_TARGETS, metadata={"help": "module names to adapt"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRAConfig.rank={self.rank!r} is invalid: must be an int >= 1")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"LoRAConfig.alpha={self.alpha!r} is invalid: must be > 0 or None")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(
                f"LoRAConfig.targets={self.targets!r} is invalid: must be module names"
            )
        object.__setattr__(self, "targets", targets)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON types."""
        data = asdict(self)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        """Rebuild settings written by :meth:`to_dict`."""
        values = known_fields(cls, data)
        if "targets" in values:
            values["targets"] = tuple(values["targets"])
        return cls(**values)


def add_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze ``model`` and inject LoRA adapters into its UNet, in place.

    The adapters start as the identity (B = 0, peft's default), so the adapted model computes
    what the pretrained one does until it is fine-tuned. A :class:`TextToImageUNet` is adapted
    in its ``unet`` only: its autoencoder has attention layers of the same names.

    Args:
        model: A diffusers UNet, or a module with a ``unet`` attribute.
        config: The adapters.

    Returns:
        ``model``, whose only trainable parameters are the adapters'.

    Raises:
        ConfigError: No layer matches the targets.
    """
    network = getattr(model, "unet", model)
    model.requires_grad_(False)
    peft_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha if config.alpha is not None else config.rank,
        target_modules=list(config.targets),
    )
    try:
        inject_adapter_in_model(peft_config, network)
    except ValueError as err:
        raise ConfigError(
            f"LoRA targets {list(config.targets)} match no layer of {type(network).__name__}: {err}"
        ) from err
    return model


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Names of the LoRA adapter parameters of ``model``."""
    return [name for name, _ in model.named_parameters() if ".lora_" in name]
