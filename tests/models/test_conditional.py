"""Text-conditioned models, classifier-free guidance, LoRA fine-tunes and latent models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffattr.data import ImageDataset
from diffattr.errors import CheckpointError, ConfigError, DataError
from diffattr.models import (
    BytePromptEncoder,
    LoRAConfig,
    ModelSpec,
    TextToImageUNet,
    build_model,
    condition,
    load_checkpoint,
    lora_parameter_names,
    predict,
    sample,
    sample_checkpoint,
    save_samples,
    text_to_image_unet,
    train,
)
from tests.models.helpers import (
    cunet_spec,
    fixed_input,
    prompted_dataset,
    random_dataset,
    seeded_model,
    states_equal,
    tiny_config,
    unet_spec,
)


def test_byte_prompts_pad_encode_utf8_and_refuse_long_ones() -> None:
    encoder = BytePromptEncoder(dim=4, max_length=5)
    tokens = encoder.condition(["ab", "", "abcde", "é"])
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == [
        [98, 99, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [98, 99, 100, 101, 102],
        [0xC3 + 1, 0xA9 + 1, 0, 0, 0],
    ]
    assert encoder(tokens).shape == (4, 5, 4)
    with pytest.raises(DataError, match=r"prompt 1 \('abcdef'\) is 6 bytes long"):
        encoder.condition(["a", "abcdef"])


def test_the_prompt_changes_the_prediction_and_the_batch_does_not() -> None:
    model = seeded_model(cunet_spec())
    x = fixed_input((2, 1, 8, 8))
    with torch.no_grad():
        three = predict(model, x, 500, model.condition(["a handwritten 3"] * 2))
        four = predict(model, x, 500, model.condition(["a handwritten 4"] * 2))
        alone = predict(model, x[:1], 500, model.condition(["a handwritten 3"]))
    assert not torch.allclose(three, four)
    torch.testing.assert_close(three[:1], alone, rtol=1e-5, atol=1e-6)


def test_conditioning_is_checked() -> None:
    model = seeded_model(cunet_spec())
    x = fixed_input((2, 1, 8, 8))
    with pytest.raises(ConfigError, match="needs a prompt per image"):
        model(x, 3)
    with pytest.raises(DataError, match="need a prompt each"):
        condition(model, None)
    plain = seeded_model(unet_spec())
    with pytest.raises(DataError, match="is unconditional"):
        condition(plain, ["a cat"])
    assert condition(plain, None) is None


def test_conditional_training_needs_prompts(tmp_path) -> None:
    with pytest.raises(DataError, match="need a prompt each"):
        train(cunet_spec(), random_dataset(), tiny_config(), tmp_path / "m", progress=False)
    with pytest.raises(DataError, match="unconditional"):
        train(unet_spec(), prompted_dataset(), tiny_config(), tmp_path / "u", progress=False)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("conditional") / "base"
    return train(cunet_spec(), prompted_dataset(), tiny_config(), path, progress=False)


def test_guided_sampling_is_seeded_and_uses_the_prompt(pretrained) -> None:
    common = {"num_inference_steps": 5, "sampler": "ddim", "progress": False}
    prompts = ["a handwritten 1", "a handwritten 2"]
    first = sample_checkpoint(pretrained, [4, 5], prompts=prompts, guidance_scale=3.0, **common)
    again = sample_checkpoint(pretrained, [4, 5], prompts=prompts, guidance_scale=3.0, **common)
    plain = sample_checkpoint(pretrained, [4, 5], prompts=prompts, guidance_scale=1.0, **common)
    assert first.shape == (2, 1, 8, 8)
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, plain)
    with pytest.raises(DataError, match="1 prompts for 2 seeds"):
        sample_checkpoint(pretrained, [4, 5], prompts=prompts[:1], **common)


def test_samples_keep_their_prompts(pretrained, tmp_path) -> None:
    from diffattr.data import load_npz

    images = torch.zeros((2, 1, 8, 8))
    npz = save_samples(images, [3, 9], tmp_path, prompts=["a handwritten 1", "a handwritten 2"])
    assert load_npz(npz).prompts == ("a handwritten 1", "a handwritten 2")


def test_lora_fine_tune_trains_only_the_adapters(pretrained, tmp_path) -> None:
    spec = pretrained.model_spec.with_lora(LoRAConfig(rank=2))
    fine = train(
        spec,
        prompted_dataset(seed=1),
        tiny_config(),
        tmp_path / "lora",
        init=pretrained,
        progress=False,
    )
    base_state = pretrained.load_state("ema")
    tuned_state = fine.load_state("model")
    adapters = [k for k in tuned_state if ".lora_" in k]
    assert adapters
    assert fine.metadata["n_parameters"] == sum(tuned_state[k].numel() for k in adapters)
    # Base weights are the pretrained (EMA) ones, stored under peft's base_layer names.
    for key, value in base_state.items():
        tuned_key = key if key in tuned_state else key.replace(".weight", ".base_layer.weight")
        tuned_key = (
            tuned_key if tuned_key in tuned_state else key.replace(".bias", ".base_layer.bias")
        )
        torch.testing.assert_close(tuned_state[tuned_key], value, rtol=0, atol=0)
    assert fine.metadata["init"]["weights"] == pretrained.weights_id()
    model = fine.load_model()
    assert lora_parameter_names(model) == [
        n for n, p in model.named_parameters() if p.requires_grad
    ]
    assert ModelSpec.from_dict(fine.model_spec.to_dict()) == fine.model_spec


def test_full_fine_tune_starts_from_every_pretrained_weight(pretrained, tmp_path) -> None:
    data = prompted_dataset(seed=1)
    unchanged = tiny_config(steps=1, learning_rate=1e-12, ema_decay=None, warmup_steps=0)
    start = train(
        pretrained.model_spec, data, unchanged, tmp_path / "f0", init=pretrained, progress=False
    )
    for key, value in pretrained.load_state("ema").items():
        torch.testing.assert_close(start.load_state("model")[key], value, rtol=1e-9, atol=1e-9)
    assert start.metadata["init"]["weights"] == pretrained.weights_id()
    fresh = train(pretrained.model_spec, data, unchanged, tmp_path / "f1", progress=False)
    assert not states_equal(fresh.load_state("model"), start.load_state("model"))
    with pytest.raises(ConfigError, match=r"another model \('cunet-tiny'\) than a full fine-tune"):
        train(
            unet_spec(),
            random_dataset(),
            tiny_config(),
            tmp_path / "u",
            init=pretrained,
            progress=False,
        )


def test_lora_needs_a_matching_pretrained_model(pretrained, tmp_path) -> None:
    spec = pretrained.model_spec.with_lora(LoRAConfig(rank=2))
    data = prompted_dataset(seed=1)
    with pytest.raises(ConfigError, match="pass its checkpoint as init"):
        train(spec, data, tiny_config(), tmp_path / "a", progress=False)
    other = train(
        cunet_spec(size=8).with_lora(LoRAConfig(rank=2)).without_lora(),
        data,
        tiny_config(steps=3),
        tmp_path / "other-base",
        progress=False,
    )
    wider = ModelSpec(
        name=spec.name,
        config={**spec.config, "text": {"max_length": 9}},
        lora=spec.lora,
    )
    with pytest.raises(ConfigError, match="another configuration"):
        train(wider, data, tiny_config(), tmp_path / "b", init=other, progress=False)
    finished = train(
        spec, data, tiny_config(steps=3), tmp_path / "c", init=pretrained, progress=False
    )
    with pytest.raises(CheckpointError, match="initial weights differ"):
        train(spec, data, tiny_config(steps=3), finished.path, init=other, progress=False)


def test_lora_targets_and_rank_are_validated() -> None:
    with pytest.raises(ConfigError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="match no layer"):
        build_model(cunet_spec().with_lora(LoRAConfig(targets=("no_such_layer",))))
    with pytest.raises(ConfigError, match="LoRAConfig has no fields"):
        ModelSpec(name="cunet-tiny", config={}, lora={"rank": 2, "dropout": 0.1})


def test_unconditional_guidance_is_refused_without_prompts() -> None:
    model = seeded_model(unet_spec())
    images = sample(
        model,
        _scheduler(),
        [1],
        shape=(1, 8, 8),
        num_inference_steps=2,
        sampler="ddim",
        guidance_scale=3.0,
        progress=False,
    )
    assert images.shape == (1, 1, 8, 8)
    with pytest.raises(DataError, match="unconditional"):
        sample(model, _scheduler(), [1], shape=(1, 8, 8), prompts=["x"], progress=False)


def test_latent_model_encodes_samples_and_decodes(tmp_path) -> None:
    spec = cunet_spec("ldm-tiny", size=16)
    model = seeded_model(spec)
    assert isinstance(model, TextToImageUNet)
    assert (model.in_channels, model.sample_size) == (4, 8)
    images = random_dataset(n=3, size=16).images
    latents = model.encode_images(images)
    assert latents.shape == (3, 4, 8, 8)
    assert model.decode_latents(latents).shape == (3, 1, 16, 16)
    with pytest.raises(DataError, match="do not fit the model"):
        model.encode_images(random_dataset(n=1, size=8).images)
    out = sample(
        model,
        _scheduler(),
        [0, 1],
        shape=(4, 8, 8),
        num_inference_steps=2,
        sampler="ddim",
        prompts=["a", "b"],
        progress=False,
    )
    assert out.shape == (2, 1, 16, 16)
    assert float(out.abs().max()) <= 1


def test_latent_model_shapes_are_checked() -> None:
    config = cunet_spec("ldm-tiny", size=16).config
    with pytest.raises(ConfigError, match="3-channel images do not fit an autoencoder"):
        text_to_image_unet(**{**config, "in_channels": 3})
    with pytest.raises(ConfigError, match="24-pixel images do not fit"):
        text_to_image_unet(**{**config, "sample_size": 24})


def test_latent_model_loads_its_autoencoder_and_checks_the_scale(tmp_path) -> None:
    from diffattr.models import VAEConfig, train_vae

    data = prompted_dataset(n=16, size=16)
    vae_spec = ModelSpec(name="vae-tiny", config=cunet_spec("ldm-tiny", size=16).config["vae"])
    vae = train_vae(
        data, VAEConfig(steps=2, batch_size=8), tmp_path / "vae", spec=vae_spec, progress=False
    )
    spec = cunet_spec("ldm-tiny", size=16)
    with pytest.raises(ConfigError, match="latent_scale"):
        train(spec, data, tiny_config(steps=2), tmp_path / "bad", init=vae, progress=False)
    scaled = ModelSpec(
        name=spec.name, config={**spec.config, "latent_scale": vae.metadata["latent_scale"]}
    )
    model_ckpt = train(
        scaled, data, tiny_config(steps=2), tmp_path / "ldm", init=vae, progress=False
    )
    model = load_checkpoint(model_ckpt.path).load_model()
    vae_state = vae.load_state("model")
    for key, value in model.vae.state_dict().items():
        torch.testing.assert_close(value, vae_state[key], rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.vae.parameters())


def _scheduler() -> dict:
    from diffattr.models import default_scheduler_config

    return default_scheduler_config()


def test_prompted_dataset_helper_is_consistent() -> None:
    data = prompted_dataset(n=6)
    assert isinstance(data, ImageDataset)
    assert data.prompts[5] == "a handwritten 0"
    assert np.array_equal(data.labels, [0, 1, 2, 3, 4, 0])
