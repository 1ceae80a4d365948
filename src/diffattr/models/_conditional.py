"""Text-conditioned (and latent) denoisers: one module around a diffusers UNet.

:class:`TextToImageUNet` is what every conditional model of diffattr is: a UNet (diffusers
``UNet2DConditionModel``, or ``UNet2DModel`` for an unconditional latent model), an optional prompt
encoder and an optional frozen autoencoder. It keeps the engine's call signature,
``model(x_t, t, cond)``, with ``cond = model.condition(prompts)`` one tensor row per image, so
that per-sample gradients (vmap or factored hooks) see a plain batch of tensors:

- the built-in :class:`BytePromptEncoder` is trained with the model, so ``cond`` is its token
  ids and the embedding happens inside ``forward`` (its parameters get gradients);
- a frozen encoder (a pipeline's CLIP text model) returns its hidden states from ``condition``,
  so the text model never runs under the gradient engine.

With an autoencoder the diffusion runs in latent space: :meth:`TextToImageUNet.encode_images`
maps images to scaled posterior means and :meth:`TextToImageUNet.decode_latents` maps back.
The attributes ``in_channels`` and ``sample_size`` describe that diffusion space (what ``x_t``
is), ``image_channels`` and ``image_size`` the images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel
from torch import nn

from diffattr.errors import ConfigError, DataError

#: Byte values 0..255 are tokens 1..256; 0 pads (an empty prompt is all padding).
_VOCABULARY = 257


class BytePromptEncoder(nn.Module):
    """Prompts as UTF-8 bytes, embedded by token and position, trained with the denoiser.

    A fixed byte vocabulary needs no tokenizer files and accepts any prompt. Both embeddings are
    ``nn.Linear`` layers on one-hot codes rather than ``nn.Embedding`` tables: the same function,
    and a layer whose per-sample gradients the factored backend computes exactly.

    Args:
        dim: Width of the embeddings (the UNet's ``cross_attention_dim``).
        max_length: Tokens (bytes) per prompt. A longer prompt is an error rather than
            truncated, as CLIP's tokenizer would: two prompts that differ only past the limit
            would otherwise get the same conditioning.
    """

    def __init__(self, dim: int, max_length: int = 32) -> None:
        super().__init__()
        if dim < 1 or max_length < 1:
            raise ConfigError(f"prompt encoder needs dim, max_length >= 1, got {dim}, {max_length}")
        self.max_length = max_length
        self.token = nn.Linear(_VOCABULARY, dim, bias=False)
        self.position = nn.Linear(max_length, dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def condition(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids (N, max_length), int64: byte + 1, zero-padded.

        Raises:
            DataError: A prompt is longer than ``max_length`` bytes.
        """
        rows = torch.zeros((len(prompts), self.max_length), dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            codes = list(prompt.encode("utf-8"))
            if len(codes) > self.max_length:
                raise DataError(
                    f"prompt {row} ({prompt[:40]!r}) is {len(codes)} bytes long; this model's "
                    f"prompt encoder takes at most {self.max_length} (its max_length)"
                )
            rows[row, : len(codes)] = torch.tensor(codes, dtype=torch.int64) + 1
        return rows.to(self.token.weight.device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embed token ids (B, L) into hidden states (B, L, dim)."""
        weight = self.token.weight
        # A comparison rather than F.one_hot, which torch.func's vmap cannot batch.
        vocabulary = torch.arange(_VOCABULARY, device=tokens.device)
        one_hot = (tokens[..., None] == vocabulary).to(weight.dtype)
        # Positions are given per sample, so every hooked layer sees a batch (factored backend).
        eye = torch.eye(self.max_length, dtype=weight.dtype, device=weight.device)
        positions = eye.expand(tokens.shape[0], -1, -1)
        return self.norm(self.token(one_hot) + self.position(positions))


class TextToImageUNet(nn.Module):
    """A denoiser called as ``model(x_t, t, cond)``, with its prompt encoder and autoencoder.

    Args:
        unet: The noise-prediction network: a ``UNet2DConditionModel`` when there is a prompt
            encoder, either kind otherwise.
        text: A prompt encoder with ``condition(prompts) -> Tensor`` and
            ``forward(cond) -> hidden states`` (:class:`BytePromptEncoder`, or a frozen
            pipeline encoder); None for an unconditional model.
        vae: A frozen ``AutoencoderKL``: the diffusion then runs on its scaled latents.
        latent_scale: Multiplies the autoencoder's posterior means (its ``scaling_factor``).
        image_channels: Channels of the images (without an autoencoder: the UNet's).
        image_size: Side of the images in pixels (without an autoencoder: the UNet's).

    Raises:
        ConfigError: A prompt encoder with an unconditional UNet, or shapes that disagree.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel | UNet2DModel,
        text: nn.Module | None = None,
        vae: AutoencoderKL | None = None,
        *,
        latent_scale: float = 1.0,
        image_channels: int | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        if text is not None and not isinstance(unet, UNet2DConditionModel):
            raise ConfigError(
                f"a prompt encoder needs a UNet2DConditionModel, got {type(unet).__name__}"
            )
        self.unet = unet
        self.text = text
        self.vae = vae
        if vae is not None:
            # The autoencoder is fixed: attribution and training concern the denoiser.
            vae.requires_grad_(False)
        self.latent_scale = float(latent_scale)
        self.in_channels = int(unet.config.in_channels)
        size = unet.config.sample_size
        self.sample_size = int(size if isinstance(size, int) else size[0])
        factor = downsampling_factor(vae.config) if vae is not None else 1
        # Without these given, the images are what the autoencoder (or, without one, the UNet)
        # takes.
        if image_channels is None:
            image_channels = vae.config.in_channels if vae is not None else self.in_channels
        self.image_channels = int(image_channels)
        self.image_size = int(image_size or self.sample_size * factor)
        if vae is not None and int(vae.config.latent_channels) != self.in_channels:
            raise ConfigError(
                f"the UNet takes {self.in_channels} channels but the autoencoder's latents have "
                f"{vae.config.latent_channels}"
            )
        if vae is not None and self.image_channels != int(vae.config.in_channels):
            raise ConfigError(
                f"{self.image_channels}-channel images do not fit an autoencoder of "
                f"{vae.config.in_channels}-channel images"
            )
        if self.image_size != self.sample_size * factor:
            raise ConfigError(
                f"{self.image_size}-pixel images do not fit a {self.sample_size}-sized UNet "
                f"with a {factor}x autoencoder"
            )

    @property
    def conditional(self) -> bool:
        """Whether the model takes a prompt per image."""
        return self.text is not None

    def condition(self, prompts: Sequence[str]) -> torch.Tensor:
        """The conditioning tensor of ``prompts``, one row per prompt (the empty prompt: none).

        Raises:
            ConfigError: The model is unconditional.
        """
        if self.text is None:
            raise ConfigError("this model is unconditional: it takes no prompts")
        return self.text.condition(list(prompts))

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the scheduler's target for ``x_t`` at ``t``, given ``cond`` if conditional."""
        if self.text is None:
            if cond is not None:
                raise ConfigError("this model is unconditional: it takes no prompts")
            return self.unet(x_t, t).sample
        if cond is None:
            raise ConfigError("this model is conditional: it needs a prompt per image")
        return self.unet(x_t, t, encoder_hidden_states=self.text(cond)).sample

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in [-1, 1] to the diffusion space: the scaled posterior means of the VAE.

        The mean, not a sample: an image's latent is then a function of the image alone, so its
        features do not depend on a draw. Without an autoencoder the images are returned as
        they are.
        """
        if self.vae is None:
            return images
        self._check_images(images)
        return encode_latents(self.vae, images, self.latent_scale)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Map diffusion-space samples back to images in [-1, 1] (identity without a VAE)."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        return decode_latents(self.vae, latents, self.latent_scale)

    def _check_images(self, images: torch.Tensor) -> None:
        expected = (self.image_channels, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise DataError(
                f"images of shape {tuple(images.shape)} do not fit the model: it takes "
                f"(B, {expected[0]}, {expected[1]}, {expected[2]}) images"
            )


def text_to_image_unet(
    *,
    in_channels: int,
    sample_size: int,
    unet: dict[str, Any],
    text: dict[str, Any] | None = None,
    vae: dict[str, Any] | None = None,
    latent_scale: float = 1.0,
) -> TextToImageUNet:
    """Build a :class:`TextToImageUNet` from a JSON config (the registry's factory).

    Args:
        in_channels: Image channels.
        sample_size: Image side in pixels.
        unet: ``UNet2DConditionModel`` keyword arguments when ``text`` is given, else
            ``UNet2DModel`` ones.
        text: :class:`BytePromptEncoder` arguments (``max_length``); its ``dim`` is the UNet's
            ``cross_attention_dim``.
        vae: ``AutoencoderKL`` keyword arguments of a latent model; its weights come from a
            trained autoencoder (``train(..., init=...)``) or from the checkpoint.
        latent_scale: The autoencoder's latent scale.
    """
    if text is not None:
        network: UNet2DConditionModel | UNet2DModel = UNet2DConditionModel(**unet)
        encoder: nn.Module | None = BytePromptEncoder(
            int(network.config.cross_attention_dim), **text
        )
    else:
        network, encoder = UNet2DModel(**unet), None
    autoencoder = AutoencoderKL(**vae) if vae is not None else None
    return TextToImageUNet(
        network,
        encoder,
        autoencoder,
        latent_scale=latent_scale,
        image_channels=in_channels,
        image_size=sample_size,
    )


def is_conditional(model: nn.Module) -> bool:
    """Whether ``model`` takes a prompt per image (a :class:`TextToImageUNet` with text)."""
    return bool(getattr(model, "conditional", False))


def condition(model: nn.Module, prompts: Sequence[str] | None) -> torch.Tensor | None:
    """The conditioning tensor of ``prompts`` for ``model``, or None for unconditional models.

    Raises:
        DataError: A conditional model without prompts, or prompts for an unconditional model.
    """
    if not is_conditional(model):
        if prompts is not None and any(prompts):
            raise DataError(
                f"the images have prompts but {type(model).__name__} is unconditional; drop the "
                "prompts or use a conditional model"
            )
        return None
    if prompts is None:
        raise DataError(
            "the model is conditional: the images need a prompt each (a template such as "
            "--prompts 'a photo of {label}', a folder's metadata.jsonl, or an .npz 'prompts' "
            "array; --prompt when sampling)"
        )
    return model.condition(prompts)


def to_diffusion_space(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images as the denoiser sees them: latents for latent models, the images otherwise."""
    encode = getattr(model, "encode_images", None)
    return encode(images) if encode is not None else images


def to_image_space(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Samples of the diffusion space as images in [-1, 1]."""
    decode = getattr(model, "decode_latents", None)
    return decode(x) if decode is not None else x.clamp(-1, 1)


def diffusion_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) of ``x_t`` for models that state it (``in_channels``, ``sample_size``)."""
    channels = model_setting(model, "in_channels")
    size = model_setting(model, "sample_size")
    if isinstance(size, list | tuple):
        size = size[0]
    if not isinstance(channels, int) or not isinstance(size, int):
        return None
    return (channels, size, size)


def model_setting(model: nn.Module, key: str) -> object:
    """A setting a model states: diffusers models keep theirs in ``.config``, others as attributes.

    Returns:
        The value, or None where the model does not state it.
    """
    config = getattr(model, "config", None)
    if isinstance(config, Mapping) and key in config:
        return config[key]
    return getattr(model, key, None)


def downsampling_factor(vae_config: Mapping[str, Any]) -> int:
    """How much an ``AutoencoderKL`` config shrinks image sides: 2 per block but the last."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, scale: float) -> torch.Tensor:
    """Encode images deterministically: the posterior mean times ``scale``.

    Args:
        vae: The autoencoder (see :func:`~diffattr.models.load_vae`).
        images: (B, C, H, W) in [-1, 1].
        scale: The latent scale (see :func:`~diffattr.models.vae_latent_scale`).

    Returns:
        (B, latent_channels, H / f, W / f) latents on the VAE's device and in its dtype, f its
        :func:`downsampling_factor`.
    """
    return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean * scale


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode latents made by :func:`encode_latents` (or sampled) into images in [-1, 1].

    Args:
        vae: The autoencoder (see :func:`~diffattr.models.load_vae`).
        latents: (B, latent_channels, h, w), scaled by ``scale``.
        scale: The latent scale the latents carry.

    Returns:
        (B, C, h * f, w * f) images on the VAE's device, clamped to [-1, 1].
    """
    return vae.decode(latents.to(vae.device) / scale).sample.clamp(-1.0, 1.0)
