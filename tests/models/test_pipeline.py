"""Saved diffusers pipelines as checkpoints: tiny DDPM and Stable-Diffusion pipelines, offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from torch import nn

from diffattr.errors import CheckpointError, ConfigError
from diffattr.models import (
    FrozenTextEncoder,
    LoRAConfig,
    Pipeline,
    TextToImageUNet,
    add_lora,
    load_pipeline,
    lora_parameter_names,
    save_lora_weights,
)
from diffattr.models._pipeline import LORA_WEIGHTS_FILE

from .pipeline_helpers import (
    VOCABULARY,
    offline,  # noqa: F401  (autouse: no hub access here)
    save_ddpm_pipeline,
    save_lora_for,
    save_sd_pipeline,
    tiny_sd_components,
    tiny_tokenizer,
    tiny_unet,
)


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The saved tiny Stable-Diffusion pipeline; read-only: copy it before changing files."""
    return save_sd_pipeline(tmp_path_factory.mktemp("pipelines"))


@pytest.fixture(scope="module")
def ddpm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_ddpm_pipeline(tmp_path_factory.mktemp("pipelines"))


@pytest.fixture
def sd_copy(sd_path: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sd_path, tmp_path / "sd"))


def images_and_noise(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    draw = torch.Generator().manual_seed(3)
    images = torch.rand((batch, 3, 16, 16), generator=draw) * 2 - 1
    return images, torch.randn((batch, 4, 8, 8), generator=draw)


def predict(model: TextToImageUNet, prompts: list[str]) -> torch.Tensor:
    images, noise = images_and_noise(len(prompts))
    latents = model.encode_images(images)
    with torch.no_grad():
        return model(latents + noise, torch.tensor([10, 500]), model.condition(prompts))


# --- the tiny pipelines ------------------------------------------------------------------------


def test_tokenizer_is_built_from_the_vocabulary(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer(tmp_path)
    assert tokenizer.tokenize("a cat") == ["a</w>", "cat</w>"]
    ids = tokenizer("a cat").input_ids
    assert ids == [0, VOCABULARY.index("a</w>"), VOCABULARY.index("cat</w>"), 1]
    assert tokenizer.model_max_length == 77


def test_stable_diffusion_pipeline_opens(sd_path: Path) -> None:
    pipeline = load_pipeline(sd_path)
    assert pipeline.kind == "stable-diffusion"
    assert pipeline.path == sd_path
    assert pipeline.lora is None
    assert pipeline.metadata == {}
    assert "unet/diffusion_pytorch_model.safetensors" in pipeline.files
    assert "text_encoder/model.safetensors" in pipeline.files
    assert "tokenizer/tokenizer.json" in pipeline.files
    scheduler = DDPMScheduler.from_config(pipeline.scheduler_config)
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.beta_end == pytest.approx(0.012)
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.num_train_timesteps == 1000
    assert pipeline.load_scheduler("ddim").config.beta_start == pytest.approx(0.00085)


def test_stable_diffusion_model_predicts_as_the_pipeline(sd_path: Path, tmp_path: Path) -> None:
    model = load_pipeline(sd_path).load_model()
    assert isinstance(model, TextToImageUNet)
    assert isinstance(model.unet, UNet2DConditionModel)
    assert isinstance(model.vae, AutoencoderKL)
    assert isinstance(model.text, FrozenTextEncoder)
    assert not model.training
    assert (model.in_channels, model.sample_size) == (4, 8)
    assert (model.image_channels, model.image_size) == (3, 16)
    assert model.latent_scale == pytest.approx(model.vae.config.scaling_factor)
    images, noise = images_and_noise()
    latents = model.encode_images(images)
    assert latents.shape == (2, 4, 8, 8)
    cond = model.condition(["a cat"] * 2)
    assert cond.shape == (2, 77, 32)
    with torch.no_grad():
        got = model(latents + noise, torch.tensor([10, 500]), cond)
    assert got.shape == (2, 4, 8, 8)
    # The same computation with the components as built (before saving).
    parts = tiny_sd_components(tmp_path)
    ids = parts["tokenizer"](
        ["a cat"] * 2, padding="max_length", max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = parts["text_encoder"](ids.input_ids)[0]
        mean = parts["vae"].encode(images).latent_dist.mean * parts["vae"].config.scaling_factor
        expected = parts["unet"](mean + noise, torch.tensor([10, 500]), hidden).sample
    torch.testing.assert_close(cond, hidden)
    torch.testing.assert_close(latents, mean)
    torch.testing.assert_close(got, expected)


def test_stable_diffusion_trains_only_the_unet(sd_path: Path) -> None:
    model = load_pipeline(sd_path).load_model()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert all(name.startswith("unet.") for name in trainable)
    assert len(trainable) == len(list(model.unet.parameters()))


def test_frozen_text_encoder(sd_path: Path) -> None:
    text = load_pipeline(sd_path).load_model().text
    assert not any(p.requires_grad for p in text.parameters())
    with torch.enable_grad():
        cond = text.condition(["a cat", "a much longer prompt than the others"])
    assert cond.grad_fn is None
    assert text(cond) is cond
    assert text.condition([]).shape == (0, 77, 32)
    # Truncated to the model's positions, padded to them.
    assert text.condition(["cat " * 200]).shape == (1, 77, 32)


def test_ddpm_pipeline_loads_its_unet(ddpm_path: Path) -> None:
    pipeline = load_pipeline(ddpm_path)
    assert pipeline.kind == "ddpm"
    assert pipeline.files == ("unet/config.json", "unet/diffusion_pytorch_model.safetensors")
    model = pipeline.load_model()
    assert type(model) is UNet2DModel
    assert not model.training
    x = torch.randn((3, 1, 8, 8))
    with torch.no_grad():
        assert model(x, torch.tensor([1, 2, 3])).sample.shape == (3, 1, 8, 8)
    assert DDPMScheduler.from_config(pipeline.scheduler_config).config.clip_sample


def test_pndm_schedule_becomes_a_non_clipping_ddpm_one(sd_copy: Path) -> None:
    shutil.rmtree(sd_copy / "scheduler")
    PNDMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        num_train_timesteps=500,
    ).save_pretrained(sd_copy / "scheduler")
    config = load_pipeline(sd_copy).scheduler_config
    assert config["_class_name"] == "DDPMScheduler"
    scheduler = DDPMScheduler.from_config(config)
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.num_train_timesteps == 500
    assert not scheduler.config.clip_sample
    reference = PNDMScheduler.from_pretrained(sd_copy / "scheduler", local_files_only=True)
    torch.testing.assert_close(scheduler.alphas_cumprod, reference.alphas_cumprod)


# --- weights_id --------------------------------------------------------------------------------


def test_weights_id_is_stable_and_follows_the_weights(sd_copy: Path) -> None:
    first = load_pipeline(sd_copy).weights_id()
    assert load_pipeline(sd_copy).weights_id() == first
    assert load_pipeline(sd_copy).weights_id("raw") == first
    assert len(first) == 64
    unet = UNet2DConditionModel.from_pretrained(sd_copy / "unet", local_files_only=True)
    with torch.no_grad():
        unet.conv_out.bias.add_(1e-3)
    unet.save_pretrained(sd_copy / "unet")
    changed = load_pipeline(sd_copy).weights_id()
    assert changed != first
    save_lora_for(tiny_unet(), sd_copy)
    assert load_pipeline(sd_copy).weights_id() != changed


def test_pipelines_have_no_ema_weights(sd_path: Path) -> None:
    pipeline = load_pipeline(sd_path)
    with pytest.raises(CheckpointError, match="no 'ema' weights"):
        pipeline.weights_id("ema")
    with pytest.raises(CheckpointError, match="no 'ema' weights"):
        pipeline.load_model("ema")


# --- bad pipelines -----------------------------------------------------------------------------


def _edit_index(path: Path, **changes: Any) -> None:
    index = json.loads((path / "model_index.json").read_text())
    index.update(changes)
    (path / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if v}))


def test_missing_model_index(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"not a diffusers pipeline \(no model_index.json\)"):
        load_pipeline(tmp_path)


def test_model_index_not_json(sd_copy: Path) -> None:
    (sd_copy / "model_index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pipeline(sd_copy)


def test_unsupported_pipeline_class(sd_copy: Path) -> None:
    _edit_index(sd_copy, _class_name="StableDiffusionXLPipeline")
    with pytest.raises(
        CheckpointError, match="'StableDiffusionXLPipeline' is not supported"
    ) as err:
        load_pipeline(sd_copy)
    assert "StableDiffusionPipeline" in str(err.value)
    assert "DDPMPipeline" in str(err.value)


def test_missing_component_entry(sd_copy: Path) -> None:
    _edit_index(sd_copy, vae=None)
    with pytest.raises(CheckpointError, match="the pipeline lists no 'vae' component"):
        load_pipeline(sd_copy)


def test_component_of_another_class(sd_copy: Path) -> None:
    _edit_index(sd_copy, text_encoder=["transformers", "T5EncoderModel"])
    with pytest.raises(CheckpointError, match="'text_encoder' is a T5EncoderModel"):
        load_pipeline(sd_copy)


def test_missing_component_folder(sd_copy: Path) -> None:
    shutil.rmtree(sd_copy / "vae")
    with pytest.raises(CheckpointError, match=r"sd/vae: component folder missing"):
        load_pipeline(sd_copy)


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("unet/config.json", r"sd/unet: component config missing"),
        ("text_encoder/model.safetensors", r"sd/text_encoder: no model.safetensors"),
        ("tokenizer/tokenizer.json", r"sd/tokenizer: no tokenizer.json"),
        ("scheduler/scheduler_config.json", r"sd/scheduler: component config missing"),
    ],
)
def test_missing_component_file(sd_copy: Path, missing: str, message: str) -> None:
    (sd_copy / missing).unlink()
    with pytest.raises(CheckpointError, match=message):
        load_pipeline(sd_copy)


def test_pickled_weights_are_refused(sd_copy: Path) -> None:
    weights = sd_copy / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(CheckpointError, match="safetensors weights only"):
        load_pipeline(sd_copy)


def test_schedule_without_betas(sd_copy: Path) -> None:
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
    (sd_copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="FlowMatchEulerDiscreteScheduler has no beta"):
        load_pipeline(sd_copy)


def test_unknown_beta_schedule(sd_copy: Path) -> None:
    file = sd_copy / "scheduler" / "scheduler_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "beta_schedule": "cubic"}))
    with pytest.raises(CheckpointError, match="not a usable noise schedule"):
        load_pipeline(sd_copy)


def test_corrupt_weights_fail_at_load_time(sd_copy: Path) -> None:
    (sd_copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    pipeline = load_pipeline(sd_copy)
    with pytest.raises(CheckpointError, match=r"sd/unet: cannot load UNet2DConditionModel"):
        pipeline.load_model()


# --- LoRA --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """The pipeline's model with a random adapter added by diffattr, and the adapter's file."""
    model = load_pipeline(sd_path).load_model()
    file = save_lora_for(model, tmp_path_factory.mktemp("lora"))
    return model.eval(), file


def test_lora_round_trip(sd_path: Path, reference: tuple[nn.Module, Path]) -> None:
    expected_model, file = reference
    assert file.name == LORA_WEIGHTS_FILE
    pipeline = load_pipeline(sd_path, lora=file.parent)
    assert pipeline.lora == file
    model = pipeline.load_model()
    prompts = ["a cat", "a dog"]
    torch.testing.assert_close(predict(model, prompts), predict(expected_model, prompts))
    # Alpha 8 at rank 4 survives (the file's metadata): without it the update would halve.
    unscaled = load_pipeline(sd_path).load_model()
    assert not torch.allclose(predict(model, prompts), predict(unscaled, prompts))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == lora_parameter_names(model)
    assert trainable == lora_parameter_names(expected_model)
    assert all(name.startswith("unet.") and ".lora_" in name for name in trainable)


def test_diffusers_loads_the_saved_adapter(
    sd_path: Path, reference: tuple[nn.Module, Path]
) -> None:
    expected_model, file = reference
    pipe = StableDiffusionPipeline.from_pretrained(sd_path, local_files_only=True)
    pipe.load_lora_weights(file.parent)
    model = TextToImageUNet(
        pipe.unet,
        expected_model.text,
        pipe.vae,
        latent_scale=pipe.vae.config.scaling_factor,
    ).eval()
    torch.testing.assert_close(
        predict(model, ["a cat"] * 2), predict(expected_model, ["a cat"] * 2)
    )


def test_lora_in_the_pipeline_folder_is_found(
    sd_copy: Path, reference: tuple[nn.Module, Path]
) -> None:
    _, file = reference
    shutil.copy(file, sd_copy / LORA_WEIGHTS_FILE)
    assert load_pipeline(sd_copy).lora == sd_copy / LORA_WEIGHTS_FILE


def test_missing_lora_file(sd_path: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such LoRA weights file"):
        load_pipeline(sd_path, lora=tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cross_attention_dim": 16}, "attn2.to_k.lora_A.weight takes 16 inputs, the layer 32"),
        ({"block_out_channels": (16, 32)}, "gives 16 outputs, the layer 32"),
        (
            {
                "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            },
            "24 of its layers are not in the UNet "
            "(down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k; ",
        ),
    ],
)
def test_lora_of_another_unet(
    sd_path: Path, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    file = save_lora_for(tiny_unet(**changes), tmp_path)
    with pytest.raises(ConfigError, match="does not match the UNet: ") as err:
        load_pipeline(sd_path, lora=file)
    assert message in str(err.value)


def test_lora_checked_again_at_load_time(sd_copy: Path, tmp_path: Path) -> None:
    pipeline = load_pipeline(sd_copy, lora=save_lora_for(tiny_unet(), tmp_path / "good"))
    save_lora_for(tiny_unet(cross_attention_dim=16), tmp_path / "good")
    with pytest.raises(ConfigError, match="does not match the UNet"):
        pipeline.load_model()


def test_text_encoder_lora_is_refused(sd_path: Path, tmp_path: Path) -> None:
    unet = tiny_unet()
    add_lora(unet, LoRAConfig(rank=2))
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp_path,
        unet_lora_layers={k: v.detach() for k, v in unet.state_dict().items() if "lora_" in k},
        text_encoder_lora_layers={
            "text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
            "text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2),
        },
    )
    with pytest.raises(ConfigError, match=r"adapts \['text_encoder'\]"):
        load_pipeline(sd_path, lora=tmp_path)


def test_lora_for_a_ddpm_pipeline_is_refused(ddpm_path: Path, tmp_path: Path) -> None:
    file = save_lora_for(tiny_unet(), tmp_path)
    with pytest.raises(ConfigError, match="Stable-Diffusion UNets only"):
        load_pipeline(ddpm_path, lora=file)


def test_unreadable_lora(sd_path: Path, tmp_path: Path) -> None:
    (tmp_path / LORA_WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable LoRA weights"):
        load_pipeline(sd_path, lora=tmp_path)


def test_save_lora_weights_needs_an_adapter(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no LoRA adapter"):
        save_lora_weights(tiny_unet(), tmp_path)


def test_pipeline_is_a_frozen_record(sd_path: Path) -> None:
    pipeline = load_pipeline(sd_path)
    assert isinstance(pipeline, Pipeline)
    with pytest.raises(AttributeError):
        pipeline.kind = "ddpm"  # type: ignore[misc]
