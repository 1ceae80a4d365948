"""The CLI on text-conditioned models: prompts, LoRA fine-tunes, latent models, saved pipelines."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffattr.cli import main
from diffattr.data import load_digits, load_npz
from diffattr.features import FeatureStore
from diffattr.methods import Scores
from diffattr.models import load_checkpoint, load_pipeline, lora_parameter_names
from tests.models.pipeline_helpers import (
    offline,  # noqa: F401  (autouse: no hub access here either)
    save_lora_for,
    save_sd_pipeline,
    tiny_unet,
)

from .test_cli import _expect_error, _write_npz

TEMPLATE = "a handwritten {label}"
QUICK = ["--quiet", "--device", "cpu"]
TRAIN = ["--steps", "3", "--batch-size", "8", *QUICK]
PROMPTS = ["--prompt", "a handwritten 5", "--prompt", "a handwritten 6"]
FAST = ["--timesteps", "2", "--proj-dim", "8", *QUICK]


@dataclass(frozen=True)
class Run:
    """A command's output folder and what it printed."""

    path: Path
    stdout: str


def _run(argv: list[str], out: Path) -> Run:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main([*argv, "--out", str(out)])
    assert status == 0, stdout.getvalue()
    return Run(out, stdout.getvalue())


def _trainable(summary: str) -> int:
    found = re.search(r"\(([\d,]+) trainable parameters\)", summary)
    assert found is not None, summary
    return int(found.group(1).replace(",", ""))


def _lora_count(path: Path) -> int:
    model = load_checkpoint(path).load_model()
    return sum(model.get_parameter(name).numel() for name in lora_parameter_names(model))


def _stores(run: Path) -> list[FeatureStore]:
    return [FeatureStore.open(p.parent) for p in sorted(run.glob("features/*/*/*/manifest.json"))]


def _n_digits(labels: tuple[int, ...]) -> int:
    return int(np.isin(load_digits().labels, labels).sum())


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("conditional")


@pytest.fixture(scope="module")
def base(root: Path) -> Run:
    """cunet-tiny trained 3 steps on the digits 0, 1 and 2, each with its prompt."""
    argv = ["train", "--data", "digits", "--prompts", TEMPLATE, "--labels", "0,1,2"]
    return _run([*argv, "--model", "cunet-tiny", *TRAIN], root / "base")


@pytest.fixture(scope="module")
def lora(root: Path, base: Run) -> Run:
    """A rank-2 LoRA fine-tune of ``base`` on the digits 5 and 6."""
    argv = ["train", "--data", "digits", "--prompts", TEMPLATE, "--labels", "5,6"]
    return _run([*argv, "--init", str(base.path), "--lora", "2", *TRAIN], root / "lora")


@pytest.fixture(scope="module")
def samples(root: Path, lora: Run) -> Run:
    argv = ["sample", str(lora.path), "--n", "3", "--sampler", "ddim", "--steps", "3"]
    return _run([*argv, *PROMPTS, "--guidance-scale", "2", *QUICK], root / "samples")


# --- train: prompts, labels, LoRA ---------------------------------------------------------------


def test_train_a_conditional_model_on_some_labels(base: Run) -> None:
    checkpoint = load_checkpoint(base.path)
    model = checkpoint.load_model()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_images = _n_digits((0, 1, 2))
    n_query = len(checkpoint.metadata["split"]["query_ids"])
    assert base.stdout.startswith(f"trained cunet-tiny ({n_trainable:,} trainable parameters) ")
    assert f"on digits ({n_images - n_query} training images, {n_query} held out)" in base.stdout
    assert checkpoint.model_spec.name == "cunet-tiny"
    assert checkpoint.model_spec.lora is None
    train = checkpoint.training_data()
    assert set(train.labels.tolist()) == {0, 1, 2}
    assert train.prompts == tuple(f"a handwritten {label}" for label in train.labels)


def test_lora_fine_tune_trains_only_the_adapters(base: Run, lora: Run) -> None:
    checkpoint = load_checkpoint(lora.path)
    assert lora.stdout.startswith("trained LoRA rank 2 on cunet-tiny (")
    n_lora = _trainable(lora.stdout)
    assert n_lora == _lora_count(lora.path) > 0
    assert n_lora * 100 < _trainable(base.stdout)
    assert checkpoint.model_spec.lora is not None
    assert checkpoint.model_spec.lora["rank"] == 2
    assert checkpoint.model_spec.without_lora() == load_checkpoint(base.path).model_spec
    assert checkpoint.metadata["init"]["path"] == str(base.path)
    assert set(checkpoint.training_data().labels.tolist()) == {5, 6}


def test_lora_alpha_reaches_the_adapters(root: Path, base: Run) -> None:
    argv = ["train", "--data", "digits", "--prompts", TEMPLATE, "--labels", "7"]
    argv += ["--init", str(base.path), "--lora", "2", "--lora-alpha", "6", *TRAIN]
    run = _run([*argv, "--steps", "1"], root / "lora-alpha")
    assert load_checkpoint(run.path).model_spec.lora["alpha"] == 6


def test_train_rejects_bad_conditional_options(
    tmp_path: Path, base: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--data", "digits", "--prompts", TEMPLATE, *TRAIN]
    argv += ["--out", str(tmp_path / "ckpt")]
    _expect_error(capsys, [*argv, "--lora", "2"], "--lora", "give its checkpoint as --init")
    _expect_error(
        capsys,
        [*argv, "--init", str(base.path), "--lora-alpha", "4"],
        "--lora-alpha applies to a --lora fine-tune only",
    )
    _expect_error(capsys, [*argv, "--labels", "42"], "digits has no images with labels [42]")
    unlabelled = _write_npz(tmp_path / "unlabelled.npz", n=10)
    argv = ["train", "--data", str(unlabelled), "--labels", "0,1", *TRAIN]
    _expect_error(
        capsys,
        [*argv, "--out", str(tmp_path / "ckpt")],
        "--labels needs labelled images",
        "unlabelled has no labels",
    )
    assert not (tmp_path / "ckpt").exists()


# --- sample: prompts and guidance ---------------------------------------------------------------


def test_sample_cycles_through_the_prompts(samples: Run) -> None:
    assert samples.stdout.startswith("generated 3 images with ddim in ")
    generated = load_npz(samples.path / "samples.npz")
    assert generated.images.shape == (3, 1, 8, 8)
    assert generated.prompts == ("a handwritten 5", "a handwritten 6", "a handwritten 5")
    assert json.loads((samples.path / "samples.json").read_text())["guidance_scale"] == 2


def test_guidance_scale_reaches_the_sampler(root: Path, lora: Run, samples: Run) -> None:
    argv = ["sample", str(lora.path), "--n", "3", "--sampler", "ddim", "--steps", "3", *PROMPTS]
    plain = _run([*argv, "--guidance-scale", "1", *QUICK], root / "unguided")
    guided = load_npz(samples.path / "samples.npz").images
    unguided = load_npz(plain.path / "samples.npz").images
    assert not torch.allclose(guided, unguided)


def test_sample_a_conditional_model_without_prompts_exits_1(
    tmp_path: Path, lora: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sample", str(lora.path), "--n", "2", "--sampler", "ddim", "--steps", "2", *QUICK]
    _expect_error(
        capsys, [*argv, "--out", str(tmp_path / "s")], "conditional", "need a prompt each"
    )
    assert not (tmp_path / "s").exists()


# --- attribute: a LoRA fine-tune ----------------------------------------------------------------


def test_das_attributes_the_samples_over_the_adapters(
    root: Path, lora: Run, samples: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    out = root / "attr-das"
    argv = ["attribute", str(lora.path), "--out", str(out), "--method", "das"]
    assert main([*argv, "--queries", str(samples.path), *FAST]) == 0
    n_train = len(load_checkpoint(lora.path).training_data())
    assert f"das: 3 queries x {n_train} training images, 1 checkpoint(s)" in capsys.readouterr().out
    scores = Scores.load(out / "scores" / "das")
    assert scores.values.shape == (3, n_train)
    assert np.isfinite(scores.values).all()
    stores = _stores(out)
    assert len(stores) == 2  # the training images and the queries
    for store in stores:
        assert store.settings["parameter_count"] == _trainable(lora.stdout)


def test_nda_attributes_the_samples(
    root: Path, lora: Run, samples: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    out = root / "attr-nda"
    argv = ["attribute", str(lora.path), "--out", str(out), "--method", "nda"]
    assert main([*argv, "--queries", str(samples.path), *QUICK]) == 0
    n_train = len(load_checkpoint(lora.path).training_data())
    assert f"nda: 3 queries x {n_train} training images" in capsys.readouterr().out
    assert Scores.load(out / "scores" / "nda").values.shape == (3, n_train)


# --- a latent model: train-vae, then ldm-tiny on it ---------------------------------------------


@pytest.fixture(scope="module")
def vae(root: Path) -> Run:
    argv = ["train-vae", "--data", "digits", "--size", "16", "--labels", "0,1"]
    return _run([*argv, "--steps", "3", "--batch-size", "8", *QUICK], root / "vae")


def test_latent_model_on_a_trained_vae(root: Path, vae: Run) -> None:
    n_images = _n_digits((0, 1))
    n_train = n_images - round(0.1 * n_images)
    assert vae.stdout.startswith(f"trained vae-tiny for 3 steps on {n_train} images of digits")
    argv = ["train", "--data", "digits", "--size", "16", "--labels", "0,1", "--prompts", TEMPLATE]
    argv += ["--model", "ldm-tiny", "--init", str(vae.path), *TRAIN, "--steps", "2"]
    latent = _run(argv, root / "ldm")
    assert latent.stdout.startswith("trained ldm-tiny (")
    spec = load_checkpoint(latent.path).model_spec
    assert spec.config["latent_scale"] == load_checkpoint(vae.path).metadata["latent_scale"]
    argv = ["sample", str(latent.path), "--n", "2", "--sampler", "ddim", "--steps", "2"]
    sampled = _run([*argv, "--prompt", "a handwritten 1", *QUICK], root / "ldm-samples")
    generated = load_npz(sampled.path / "samples.npz")
    assert generated.images.shape == (2, 1, 16, 16)
    assert generated.prompts == ("a handwritten 1", "a handwritten 1")


def test_latent_model_needs_a_vae_checkpoint(
    tmp_path: Path, base: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--data", "digits", "--size", "16", "--prompts", TEMPLATE, *TRAIN]
    argv += ["--model", "ldm-tiny", "--init", str(base.path), "--out", str(tmp_path / "ldm")]
    _expect_error(capsys, argv, str(base.path), "is not a VAE checkpoint")
    assert not (tmp_path / "ldm").exists()


# --- attribute --pipeline: a saved Stable-Diffusion pipeline ------------------------------------

CAPTIONS = ("a red square", "a blue circle", "the sea", "a cat")


def _image_folder(folder: Path, n: int, seed: int, captions: bool = True) -> Path:
    """``n`` random 16x16 RGB PNGs, with a metadata.jsonl of their prompts if ``captions``."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": CAPTIONS[(seed + i) % 4]}))
    if captions:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@dataclass(frozen=True)
class PipelineData:
    pipeline: Path
    train: Path
    queries: Path


@pytest.fixture(scope="module")
def sd(root: Path) -> PipelineData:
    """The tiny pipeline, 6 captioned training images and 2 prompted queries (.npz)."""
    images = np.random.default_rng(9).uniform(-1, 1, size=(2, 3, 16, 16)).astype(np.float32)
    queries = root / "sd-queries.npz"
    np.savez(
        queries,
        images=images,
        value_range=np.array([-1.0, 1.0], dtype=np.float32),
        prompts=np.array(["a cat", "the sea"]),
    )
    return PipelineData(
        save_sd_pipeline(root / "sd"), _image_folder(root / "sd-train", 6, seed=0), queries
    )


def _pipeline_argv(sd: PipelineData, out: Path) -> list[str]:
    argv = ["attribute", "--pipeline", str(sd.pipeline), "--data", str(sd.train)]
    return [*argv, "--queries", str(sd.queries), "--method", "das", "--out", str(out), *FAST]


def test_attribute_a_pipeline(
    root: Path, sd: PipelineData, capsys: pytest.CaptureFixture[str]
) -> None:
    out = root / "attr-sd"
    assert main(_pipeline_argv(sd, out)) == 0
    assert "das: 2 queries x 6 training images, 1 pipeline, 2 timesteps" in capsys.readouterr().out
    scores = Scores.load(out / "scores" / "das")
    assert scores.values.shape == (2, 6)
    assert np.isfinite(scores.values).all()
    unet = load_pipeline(sd.pipeline).load_model().unet
    stores = _stores(out)
    assert len(stores) == 2
    for store in stores:
        assert store.settings["parameter_count"] == sum(p.numel() for p in unet.parameters())
    recorded = json.loads((out / "run.json").read_text())["methods"]["das"]
    assert recorded["checkpoints"] == [str(sd.pipeline)]
    assert recorded["settings"]["data"] == str(sd.train)
    # The report reloads the training images from --data (a pipeline records none).
    assert main(["report", str(out)]) == 0
    assert "das" in (out / "report.html").read_text()


def test_attribute_a_pipeline_with_lora_weights(
    root: Path, sd: PipelineData, capsys: pytest.CaptureFixture[str]
) -> None:
    model = load_pipeline(sd.pipeline).load_model()
    adapter = save_lora_for(model, root / "sd-adapter")
    out = root / "attr-sd-lora"
    assert main([*_pipeline_argv(sd, out), "--lora-weights", str(adapter.parent)]) == 0
    assert "1 pipeline" in capsys.readouterr().out
    assert Scores.load(out / "scores" / "das").values.shape == (2, 6)
    n_lora = sum(model.get_parameter(name).numel() for name in lora_parameter_names(model))
    assert [store.settings["parameter_count"] for store in _stores(out)] == [n_lora, n_lora]


@pytest.mark.parametrize("method", ["dtrak", "trak", "retrac", "grad-cos"])
def test_every_gradient_method_attributes_a_pipeline(
    root: Path, sd: PipelineData, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*_pipeline_argv(sd, root / f"attr-sd-{method}"), "--method", method]
    if method == "retrac":
        # A pipeline records no training recipe, so TracIn's learning rate is given.
        _expect_error(capsys, argv, "learning_rates")
        argv += ["--learning-rates", "1e-4"]
    assert main(argv) == 0
    assert f"{method}: 2 queries x 6 training images, 1 pipeline" in capsys.readouterr().out


def test_learning_rates_apply_to_tracin_only(
    root: Path, sd: PipelineData, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*_pipeline_argv(sd, root / "attr-sd-lr"), "--learning-rates", "1e-4"]
    _expect_error(capsys, argv, "--learning-rates does not apply to das")


def test_prompt_template_for_unprompted_pipeline_data(
    root: Path, sd: PipelineData, capsys: pytest.CaptureFixture[str]
) -> None:
    train = _image_folder(root / "sd-uncaptioned", 4, seed=1, captions=False)
    out = root / "attr-sd-template"
    argv = ["attribute", "--pipeline", str(sd.pipeline), "--data", str(train), "--prompts", "a cat"]
    assert main([*argv, "--queries", str(train), "--out", str(out), *FAST]) == 0
    assert "das: 4 queries x 4 training images, 1 pipeline" in capsys.readouterr().out


def test_attribute_pipeline_errors(
    sd: PipelineData, lora: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--out", str(tmp_path / "attr"), *FAST]
    pipeline = ["attribute", "--pipeline", str(sd.pipeline)]
    queries = ["--queries", str(sd.queries)]
    _expect_error(
        capsys, [*pipeline, *queries, *out], "--pipeline records no training images", "--data"
    )
    _expect_error(
        capsys,
        ["attribute", str(lora.path), *pipeline[1:], "--data", str(sd.train), *queries, *out],
        "give checkpoints or --pipeline, not both",
    )
    _expect_error(
        capsys,
        [*pipeline, "--data", str(sd.train), *out],
        "a --pipeline has no held-out split: give --queries PATH",
    )
    _expect_error(
        capsys, ["attribute", *queries, *out], "give one or more checkpoints, or --pipeline PATH"
    )
    _expect_error(
        capsys,
        ["attribute", str(lora.path), "--data", str(sd.train), *out],
        "--data applies to --pipeline",
    )
    assert not (tmp_path / "attr").exists()


def test_pipeline_missing_a_component_exits_1(
    sd: PipelineData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = Path(shutil.copytree(sd.pipeline, tmp_path / "sd"))
    shutil.rmtree(broken / "vae")
    argv = ["attribute", "--pipeline", str(broken), "--data", str(sd.train)]
    argv += ["--queries", str(sd.queries), "--out", str(tmp_path / "attr"), *FAST]
    _expect_error(capsys, argv, str(broken / "vae"), "component folder missing")


def test_lora_weights_of_another_unet_exit_1(
    sd: PipelineData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = save_lora_for(tiny_unet(cross_attention_dim=16), tmp_path / "other")
    argv = [*_pipeline_argv(sd, tmp_path / "attr"), "--lora-weights", str(adapter)]
    _expect_error(capsys, argv, str(adapter), "does not match the UNet")
    assert not (tmp_path / "attr").exists()


def test_pipeline_training_images_without_prompts_exit_1(
    sd: PipelineData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = _image_folder(tmp_path / "uncaptioned", 4, seed=2, captions=False)
    argv = ["attribute", "--pipeline", str(sd.pipeline), "--data", str(train)]
    argv += ["--queries", str(sd.queries), "--out", str(tmp_path / "attr"), *FAST]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffattr: error: ")
    assert "Traceback" not in err
    assert "conditional" in err
    assert "need a prompt each" in err


def test_quiet_pipeline_runs_write_only_the_error_to_stderr(
    sd: PipelineData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = _image_folder(tmp_path / "uncaptioned", 4, seed=3, captions=False)
    argv = ["attribute", "--pipeline", str(sd.pipeline), "--data", str(train)]
    argv += ["--queries", str(sd.queries), "--out", str(tmp_path / "attr"), *FAST]
    _expect_error(capsys, argv, "need a prompt each")
    assert main(_pipeline_argv(sd, tmp_path / "attr")) == 0
    assert capsys.readouterr().err == ""


def test_an_autoencoder_of_another_image_size_is_refused(
    vae: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The autoencoder was trained on 16x16 digits; these are 8x8.
    argv = ["train", "--data", "digits", "--labels", "0,1", "--prompts", TEMPLATE, *TRAIN]
    argv += ["--model", "ldm-tiny", "--init", str(vae.path), "--out", str(tmp_path / "l")]
    _expect_error(capsys, argv, "another configuration", "sample_size")


def test_init_without_lora_or_autoencoder_is_explained(
    base: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--data", "digits", "--labels", "0,1", "--model", "unet-tiny", *TRAIN]
    argv += ["--init", str(base.path), "--out", str(tmp_path / "u")]
    _expect_error(capsys, argv, "neither LoRA adapters")
