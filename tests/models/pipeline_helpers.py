"""Tiny saved diffusers pipelines (DDPM and Stable Diffusion), LoRA adapters, and no network.

Shared by the pipeline tests of the models, methods and CLI. Import ``offline`` into a test
module to make it apply there (it is an autouse fixture).
"""

from __future__ import annotations

import json
import socket
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMPipeline,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffattr.models import LoRAConfig, add_lora, lora_parameter_names, save_lora_weights

#: Byte-level BPE vocabulary: the special tokens, every letter alone and word-final, two merges.
LETTERS = list(string.ascii_lowercase)
VOCABULARY = [
    "<|startoftext|>",
    "<|endoftext|>",
    *LETTERS,
    *(letter + "</w>" for letter in LETTERS),
    "ca",
    "cat</w>",
]
MERGES = ["c a", "ca t</w>"]
UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer read from the vocab.json and merges.txt written to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCABULARY)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True, model_max_length=77)


def tiny_unet(**changes: Any) -> UNet2DConditionModel:
    return UNet2DConditionModel(**{**UNET, **changes})


def tiny_sd_components(root: Path, seed: int = 0) -> dict[str, Any]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {
            "unet": tiny_unet(),
            "vae": AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                block_out_channels=(32, 64),
                latent_channels=4,
                norm_num_groups=8,
                sample_size=16,
            ),
            "text_encoder": CLIPTextModel(
                CLIPTextConfig(
                    hidden_size=32,
                    intermediate_size=37,
                    num_attention_heads=4,
                    num_hidden_layers=2,
                    vocab_size=len(VOCABULARY),
                    max_position_embeddings=77,
                    bos_token_id=0,
                    eos_token_id=1,
                    pad_token_id=1,
                )
            ),
            "tokenizer": tiny_tokenizer(root / "vocabulary"),
            # Stable Diffusion's schedule; steps_offset and clip_sample as its configs set them.
            "scheduler": DDPMScheduler(
                beta_schedule="scaled_linear",
                beta_start=0.00085,
                beta_end=0.012,
                steps_offset=1,
                clip_sample=False,
            ),
        }


def save_sd_pipeline(root: Path, seed: int = 0) -> Path:
    """A tiny Stable-Diffusion pipeline: 16x16 RGB images, 4x8x8 latents, 32-wide CLIP."""
    pipeline = StableDiffusionPipeline(
        **tiny_sd_components(root, seed),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(root / "sd")
    return root / "sd"


def save_ddpm_pipeline(root: Path) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            norm_num_groups=4,
            attention_head_dim=4,
        )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(root / "ddpm")
    return root / "ddpm"


def randomize_lora(model: nn.Module, seed: int) -> nn.Module:
    """Give the adapter random B matrices (peft starts them at zero): a non-trivial update."""
    draw = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in lora_parameter_names(model):
            param = model.get_parameter(name)
            if ".lora_B." in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=draw))
    return model


def save_lora_for(unet: nn.Module, folder: Path, seed: int = 1) -> Path:
    """The random adapter (rank 4, alpha 8: a scale of 2) of ``unet`` saved in ``folder``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        add_lora(unet, LoRAConfig(rank=4, alpha=8))
    return save_lora_weights(randomize_lora(unet, seed), folder)


class NetworkUsedError(AssertionError):
    pass


@pytest.fixture(scope="module", autouse=True)
def offline() -> Iterator[None]:
    """No hub: offline mode, and any connection attempt fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise NetworkUsedError(f"network access attempted: {args}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        patch.setattr(socket.socket, "connect", refuse)
        yield
