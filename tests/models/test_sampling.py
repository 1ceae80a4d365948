from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from diffattr.data import load_npz
from diffattr.errors import ConfigError
from diffattr.models import (
    DEFAULT_STEPS,
    Checkpoint,
    default_scheduler_config,
    predict,
    sample,
    sample_checkpoint,
    save_samples,
)

from .helpers import mlp_spec, seeded_model, unet_spec

SCHEDULER = default_scheduler_config()
SEEDS = [3, 7, 11, 20, 42]
SAMPLERS = [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)]


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    return seeded_model(unet_spec(), seed=0)


def _sample(model: nn.Module, seeds, sampler="ddpm", eta=0.0, batch_size=64, steps=10, **kw):
    return sample(
        model,
        SCHEDULER,
        seeds,
        shape=(1, 8, 8),
        sampler=sampler,
        num_inference_steps=steps,
        eta=eta,
        batch_size=batch_size,
        progress=False,
        **kw,
    )


class _PerImage(nn.Module):
    """Runs the wrapped model on one image at a time, so its output cannot depend on the batch.

    Batched convolutions round differently for different batch sizes (about 1e-6 here), and
    deterministic DDIM multiplies that by 1 / sqrt(alpha_bar_999) ~ 156 in its first step; this
    wrapper takes the model's numerics out of the test of the sampler's seeding.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([predict(self.inner, x[i : i + 1], t) for i in range(len(x))])


class _MustNotRun(nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the model ran although the arguments are invalid")


@pytest.mark.parametrize(("sampler", "eta"), SAMPLERS)
def test_same_seeds_give_identical_images(unet: nn.Module, sampler: str, eta: float) -> None:
    first = _sample(unet, SEEDS, sampler, eta)
    assert torch.equal(_sample(unet, SEEDS, sampler, eta), first)


@pytest.mark.parametrize(("sampler", "eta"), SAMPLERS)
def test_image_depends_only_on_its_seed(unet: nn.Module, sampler: str, eta: float) -> None:
    model = _PerImage(unet)
    reference = dict(zip(SEEDS, _sample(model, SEEDS, sampler, eta, batch_size=5), strict=True))
    runs = [
        (SEEDS, 1),
        (SEEDS, 3),  # batches [3, 7, 11] and [20, 42]
        ([42, 3, 99], 3),  # other order and another seed
        ([100, 101, 11, 102, 7], 5),
        ([20], 1),
    ]
    for seeds, batch_size in runs:
        images = _sample(model, seeds, sampler, eta, batch_size=batch_size)
        assert images.shape == (len(seeds), 1, 8, 8)
        for seed, image in zip(seeds, images, strict=True):
            if seed in reference:
                torch.testing.assert_close(image, reference[seed], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("sampler", "eta"), SAMPLERS)
def test_batched_model_is_batch_independent_up_to_rounding(
    unet: nn.Module, sampler: str, eta: float
) -> None:
    # The plain batched UNet: only float rounding differs (see _PerImage); measured 2e-6 for DDPM
    # and DDIM eta=1, 1e-4 for deterministic DDIM. Other seeds differ by more than 0.1.
    together = _sample(unet, SEEDS, sampler, eta, batch_size=5)
    alone = torch.cat([_sample(unet, [seed], sampler, eta) for seed in SEEDS])
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-3)


@pytest.mark.parametrize(("sampler", "eta"), SAMPLERS)
def test_different_seeds_give_different_images(unet: nn.Module, sampler: str, eta: float) -> None:
    images = _sample(unet, SEEDS, sampler, eta)
    for i in range(len(SEEDS)):
        for j in range(i + 1, len(SEEDS)):
            assert (images[i] - images[j]).abs().max() > 0.1


def test_samplers_and_eta_change_the_chain(unet: nn.Module) -> None:
    ddpm = _sample(unet, SEEDS, "ddpm")
    ddim = _sample(unet, SEEDS, "ddim", 0.0)
    ddim_noisy = _sample(unet, SEEDS, "ddim", 1.0)
    assert not torch.allclose(ddpm, ddim, atol=1e-3)
    assert not torch.allclose(ddim, ddim_noisy, atol=1e-3)
    assert not torch.allclose(ddim, _sample(unet, SEEDS, "ddim", 0.0, steps=5), atol=1e-3)


def test_samples_are_float32_in_range(unet: nn.Module) -> None:
    images = _sample(unet, SEEDS, "ddpm")
    assert images.shape == (5, 1, 8, 8)
    assert images.dtype == torch.float32
    assert images.device.type == "cpu"
    assert images.min() >= -1
    assert images.max() <= 1
    assert images.std() > 0.1


def test_sample_shape_follows_the_argument() -> None:
    model = seeded_model(mlp_spec(in_channels=3, sample_size=4))
    images = sample(
        model, SCHEDULER, [0, 1], shape=(3, 4, 4), num_inference_steps=3, progress=False
    )
    assert images.shape == (2, 3, 4, 4)


def test_default_steps() -> None:
    assert DEFAULT_STEPS == {"ddpm": 1000, "ddim": 100}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sampler": "foo"}, "sampler='foo' is invalid"),
        ({"num_inference_steps": 0}, "num_inference_steps=0 must be in 1..1000"),
        ({"num_inference_steps": -2}, "num_inference_steps=-2 must be in 1..1000"),
        ({"num_inference_steps": 1001}, "num_inference_steps=1001 must be in 1..1000"),
        ({"seeds": [1, 2, 1]}, "distinct"),
        ({"seeds": []}, "non-empty"),
        ({"eta": -0.5}, "eta=-0.5 must be >= 0"),
        ({"batch_size": 0}, "batch_size=0 must be >= 1"),
    ],
    ids=[
        "sampler",
        "zero-steps",
        "negative-steps",
        "too-many-steps",
        "duplicate-seeds",
        "no-seeds",
        "negative-eta",
        "zero-batch",
    ],
)
def test_sample_rejects_bad_arguments(changes: dict, message: str) -> None:
    arguments = {"seeds": [1, 2], "sampler": "ddim", "num_inference_steps": 5, **changes}
    seeds = arguments.pop("seeds")
    with pytest.raises(ConfigError, match=message):
        sample(_MustNotRun(), SCHEDULER, seeds, shape=(1, 8, 8), progress=False, **arguments)


def test_sample_checkpoint_uses_ema_weights_by_default(trained: Checkpoint) -> None:
    def run(**kw):
        return sample_checkpoint(
            trained, [0, 1], sampler="ddim", num_inference_steps=5, progress=False, **kw
        )

    default, ema, raw = run(), run(weights="ema"), run(weights="raw")
    assert default.shape == (2, 1, 8, 8)
    assert torch.equal(default, ema)
    assert not torch.allclose(default, raw, atol=1e-4)
    direct = sample(
        trained.load_model("ema"),
        trained.scheduler_config,
        [0, 1],
        shape=(1, 8, 8),
        sampler="ddim",
        num_inference_steps=5,
        progress=False,
    )
    assert torch.equal(default, direct)


def test_save_samples_writes_a_query_set(unet: nn.Module, tmp_path: Path) -> None:
    seeds = [3, 7, 120]
    images = _sample(unet, seeds, "ddim")
    npz = save_samples(images, seeds, tmp_path / "out", {"sampler": "ddim"})
    assert npz == tmp_path / "out" / "samples.npz"

    with np.load(npz, allow_pickle=False) as arrays:
        assert sorted(arrays.files) == ["ids", "images", "seeds", "value_range"]
        assert arrays["images"].dtype == np.float32
        assert arrays["images"].shape == (3, 1, 8, 8)
        np.testing.assert_array_equal(arrays["images"], images.numpy())
        np.testing.assert_array_equal(arrays["seeds"], seeds)
        np.testing.assert_array_equal(arrays["ids"], seeds)
        np.testing.assert_array_equal(arrays["value_range"], [-1.0, 1.0])

    dataset = load_npz(npz)
    torch.testing.assert_close(dataset.images, images, rtol=0, atol=1e-6)
    assert dataset.ids.tolist() == seeds

    pngs = sorted(p.name for p in (tmp_path / "out" / "png").iterdir())
    assert pngs == ["seed-000003.png", "seed-000007.png", "seed-000120.png"]
    with Image.open(tmp_path / "out" / "png" / "seed-000007.png") as png:
        assert png.size == (8, 8)
        assert png.mode == "L"
        expected = np.round((images[1, 0].numpy() + 1) * 127.5)
        assert np.abs(np.asarray(png, dtype=np.float64) - expected).max() <= 1
    with Image.open(tmp_path / "out" / "grid.png") as grid:
        assert grid.width > 8
    meta = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert meta == {"n": 3, "seeds": seeds, "sampler": "ddim"}
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_save_samples_needs_one_seed_per_image(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="2 images but 3 seeds"):
        save_samples(torch.zeros(2, 1, 4, 4), [0, 1, 2], tmp_path)
    assert not (tmp_path / "samples.npz").exists()
