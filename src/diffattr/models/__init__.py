"""Diffusion models: a registry of configurations, training, sampling and checkpoints."""

from diffattr.models._checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from diffattr.models._conditional import (
    BytePromptEncoder,
    TextToImageUNet,
    condition,
    decode_latents,
    diffusion_shape,
    downsampling_factor,
    encode_latents,
    is_conditional,
    model_setting,
    text_to_image_unet,
    to_diffusion_space,
    to_image_space,
)
from diffattr.models._lora import LoRAConfig, add_lora, lora_parameter_names
from diffattr.models._mlp import ResidualMLP
from diffattr.models._pipeline import (
    FrozenTextEncoder,
    Pipeline,
    load_pipeline,
    save_lora_weights,
)
from diffattr.models._registry import (
    ModelSpec,
    available_models,
    build_model,
    count_parameters,
    load_weights,
    model_spec,
    predict,
)
from diffattr.models._sampling import DEFAULT_STEPS, sample, sample_checkpoint, save_samples
from diffattr.models._task import PREDICTION_TYPES, DiffusionTask
from diffattr.models._training import (
    TrainConfig,
    default_scheduler_config,
    train,
)
from diffattr.models._vae import (
    VAEConfig,
    load_vae,
    train_vae,
    vae_latent_scale,
    vae_tiny_config,
)

__all__ = [
    "DEFAULT_STEPS",
    "PREDICTION_TYPES",
    "BytePromptEncoder",
    "Checkpoint",
    "DiffusionTask",
    "FrozenTextEncoder",
    "LoRAConfig",
    "ModelSpec",
    "Pipeline",
    "ResidualMLP",
    "TextToImageUNet",
    "TrainConfig",
    "VAEConfig",
    "add_lora",
    "available_models",
    "build_model",
    "condition",
    "count_parameters",
    "decode_latents",
    "default_scheduler_config",
    "diffusion_shape",
    "downsampling_factor",
    "encode_latents",
    "is_conditional",
    "load_checkpoint",
    "load_pipeline",
    "load_vae",
    "load_weights",
    "lora_parameter_names",
    "model_setting",
    "model_spec",
    "predict",
    "sample",
    "sample_checkpoint",
    "save_checkpoint",
    "save_lora_weights",
    "save_samples",
    "text_to_image_unet",
    "to_diffusion_space",
    "to_image_space",
    "train",
    "train_vae",
    "vae_latent_scale",
    "vae_tiny_config",
]
