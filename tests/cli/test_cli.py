from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffattr.cli import main
from diffattr.errors import CheckpointError
from diffattr.models import load_checkpoint

TRAIN_ARGS = [
    "--model", "mlp-tiny", "--steps", "3", "--warmup-steps", "1", "--batch-size", "16",
    "--checkpoint-every", "0", "--quiet", "--device", "cpu",
]  # fmt: skip


def _write_npz(path: Path, n: int = 40, channels: int = 1, size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(n, channels, size, size)).astype(np.float32)
    np.savez(path, images=images, value_range=np.array([-1.0, 1.0], dtype=np.float32))
    return path


def _expect_error(capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffattr: error: ")
    assert err.endswith("\n")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err
    return err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def checkpoint(workdir: Path) -> Path:
    data = _write_npz(workdir / "toy.npz")
    out = workdir / "ckpt"
    assert main(["train", "--data", str(data), "--out", str(out), *TRAIN_ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def samples(workdir: Path, checkpoint: Path) -> Path:
    out = workdir / "samples"
    argv = ["sample", str(checkpoint), "--n", "3", "--steps", "5", "--sampler", "ddim"]
    assert main([*argv, "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    return out


def test_models_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == ["cunet-tiny", "ldm-tiny", "mlp-tiny", "unet-cifar", "unet-tiny"]


def test_train_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_npz(tmp_path / "toy.npz")
    out = tmp_path / "ckpt"
    assert main(["train", "--data", str(data), "--out", str(out), *TRAIN_ARGS]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("trained mlp-tiny (")
    assert "to step 3/3 on toy (36 training images, 4 held out)" in stdout
    assert stdout.rstrip().endswith(f"checkpoint: {out}")

    checkpoint = load_checkpoint(out)
    assert checkpoint.step == 3
    assert checkpoint.model_spec.name == "mlp-tiny"
    assert checkpoint.model_spec.config["in_channels"] == 1
    assert checkpoint.model_spec.config["sample_size"] == 8
    assert checkpoint.metadata["training"]["batch_size"] == 16
    assert checkpoint.metadata["training"]["warmup_steps"] == 1
    assert checkpoint.metadata["dataset"]["name"] == "toy"
    assert len(checkpoint.metadata["split"]["query_ids"]) == 4

    # Running it again finds the finished run and does not train.
    before = (out / "checkpoint.json").read_text()
    assert main(["train", "--data", str(data), "--out", str(out), *TRAIN_ARGS]) == 0
    assert "to step 3/3" in capsys.readouterr().out
    assert (out / "checkpoint.json").read_text() == before


def test_train_options_reach_the_recipe(tmp_path: Path) -> None:
    data = _write_npz(tmp_path / "toy.npz", n=20)
    out = tmp_path / "ckpt"
    argv = ["train", "--data", str(data), "--out", str(out), *TRAIN_ARGS]
    argv += ["--ema-decay", "none", "--grad-clip", "0.5", "--seed", "4", "--query-fraction", "0.25"]
    assert main(argv) == 0
    checkpoint = load_checkpoint(out)
    assert not checkpoint.has_ema
    assert checkpoint.metadata["training"]["ema_decay"] is None
    assert checkpoint.metadata["training"]["grad_clip"] == 0.5
    assert checkpoint.metadata["training"]["seed"] == 4
    assert checkpoint.metadata["split"]["n_query"] == 5


def test_sample_writes_the_files(samples: Path) -> None:
    assert sorted(p.name for p in samples.iterdir()) == [
        "grid.png",
        "png",
        "samples.json",
        "samples.npz",
    ]
    assert sorted(p.name for p in (samples / "png").iterdir()) == [
        "seed-000000.png",
        "seed-000001.png",
        "seed-000002.png",
    ]
    with np.load(samples / "samples.npz") as arrays:
        assert arrays["images"].shape == (3, 1, 8, 8)
        assert arrays["seeds"].tolist() == [0, 1, 2]
    meta = json.loads((samples / "samples.json").read_text())
    assert meta["sampler"] == "ddim"
    assert meta["steps"] == 5
    assert meta["weights"] == "auto"
    assert meta["n"] == 3


def test_sample_prints_where_it_wrote(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s"
    argv = ["sample", str(checkpoint), "--seeds", "5, 9", "--steps", "2", "--out", str(out)]
    assert main([*argv, "--quiet", "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("generated 2 images with ddpm in ")
    assert f"samples: {out / 'samples.npz'}" in stdout
    with np.load(out / "samples.npz") as arrays:
        assert arrays["seeds"].tolist() == [5, 9]


def test_sample_seed_range(tmp_path: Path, checkpoint: Path) -> None:
    out = tmp_path / "s"
    argv = ["sample", str(checkpoint), "--n", "2", "--seed", "10", "--steps", "2"]
    assert main([*argv, "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    with np.load(out / "samples.npz") as arrays:
        assert arrays["seeds"].tolist() == [10, 11]


def test_info_on_a_checkpoint_prints_its_json(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", str(checkpoint)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"]["name"] == "mlp-tiny"
    assert doc["step"] == 3
    assert doc["format"] == "diffattr.checkpoint"


def test_info_on_samples_prints_the_seeds(
    samples: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", str(samples)]) == 0
    stdout = capsys.readouterr().out
    assert "seeds: 3 (0..2)" in stdout
    assert '"name": "samples"' in stdout
    assert '"sampler": "ddim"' in stdout  # samples.json is shown too
    assert main(["info", str(samples / "samples.npz")]) == 0
    assert "seeds: 3 (0..2)" in capsys.readouterr().out


def test_sample_missing_checkpoint_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing"
    argv = ["sample", str(missing), "--out", str(tmp_path / "s"), "--device", "cpu"]
    _expect_error(capsys, argv, str(missing), "no such checkpoint directory")
    assert not (tmp_path / "s").exists()


def test_debug_shows_the_exception(tmp_path: Path) -> None:
    argv = ["--debug", "sample", str(tmp_path / "missing"), "--out", str(tmp_path / "s")]
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        main([*argv, "--device", "cpu"])


def test_train_on_empty_folder_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["train", "--data", str(empty), "--out", str(tmp_path / "ckpt"), *TRAIN_ARGS]
    _expect_error(capsys, argv, "no PNG/JPEG images", str(empty))
    assert not (tmp_path / "ckpt").exists()


def test_train_on_text_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "images.txt"
    text.write_text("not images")
    argv = ["train", "--data", str(text), "--out", str(tmp_path / "ckpt"), *TRAIN_ARGS]
    _expect_error(capsys, argv, "cannot load dataset", "images.txt")


def test_train_unknown_model_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_npz(tmp_path / "toy.npz", n=10)
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "c"), *TRAIN_ARGS]
    _expect_error(capsys, [*argv, "--model", "unet-huge"], "unknown model 'unet-huge'")


def test_train_invalid_recipe_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_npz(tmp_path / "toy.npz", n=10)
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "c"), *TRAIN_ARGS]
    # The default warm-up (200 steps) is longer than 3 steps of training.
    _expect_error(capsys, [*argv, "--warmup-steps", "200"], "TrainConfig.warmup_steps=200")


def test_bad_seeds_exit_1(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sample", str(checkpoint), "--seeds", "1,x", "--out", str(tmp_path / "s")]
    _expect_error(capsys, [*argv, "--device", "cpu"], "--seeds must be comma-separated", "'1,x'")
    assert not (tmp_path / "s").exists()


def test_zero_steps_exit_1(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sample", str(checkpoint), "--n", "1", "--sampler", "ddim", "--steps", "0"]
    _expect_error(capsys, [*argv, "--out", str(tmp_path / "s"), "--quiet"], "num_inference_steps=0")
    assert not (tmp_path / "s").exists()


def test_info_on_unknown_path_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _expect_error(capsys, ["info", str(tmp_path / "nothing.bin")], "nothing.bin")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_exits_1(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sample", str(checkpoint), "--out", str(tmp_path / "s"), "--device", "cuda"]
    _expect_error(capsys, argv, "CUDA is not available")
    _expect_error(capsys, ["train", "--out", str(tmp_path / "c"), "--device", "cuda"], "CUDA")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["sample", "somewhere"],  # no --out
        ["train"],  # no --out
        ["train", "--out", "x", "--steps", "many"],
        ["sample", "ckpt", "--out", "x", "--sampler", "euler"],
    ],
    ids=["nothing", "unknown-command", "sample-no-out", "train-no-out", "bad-int", "bad-choice"],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: diffattr" in capsys.readouterr().err


def test_console_script_runs() -> None:
    script = Path(sys.executable).with_name("diffattr")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "diffattr"]
    result = subprocess.run(
        [*command, "models"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "unet-tiny" in result.stdout
    assert "unet-cifar" in result.stdout
    assert "mlp-tiny" in result.stdout


def test_python_dash_m_diffattr_runs_without_warnings() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", "-m", "diffattr", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: diffattr")
    assert result.stderr == ""


def test_plan_of_lora_adapters_counts_only_theirs(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--model", "cunet-tiny", "--n-train", "20", "--n-queries", "2"]
    argv += ["--proj-dim", "32", "--batch-size", "2", "--device", "cpu", "--json"]
    assert main(argv) == 0
    whole = json.loads(capsys.readouterr().out)["parameters"]
    assert main([*argv, "--lora", "2"]) == 0
    lora = json.loads(capsys.readouterr().out)["parameters"]
    assert whole == 800_545
    assert lora == 4_992  # rank 2 on the 16 attention projections (see the LoRA CLI tests)


def test_plan_prints_memory_disk_and_time(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--model", "mlp-tiny", "--n-train", "200", "--n-queries", "10"]
    assert main([*argv, "--proj-dim", "32", "--batch-size", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "mlp-tiny: 528,704 parameters; 210 images x 10 timesteps, k = 32" in out
    assert "disk for the feature stores: 0.000 GB" in out
    # The default backend, its reason, and the per-layer feature sizes.
    assert "backend: factored (auto: all 528,704 selected parameters" in out
    assert "  blocks.0.fc1 " in out
    assert "then sparse (nnz 4) to total k = 32" in out
    vmap = [*argv, "--proj-dim", "32", "--batch-size", "4", "--device", "cpu", "--backend", "vmap"]
    assert main(vmap) == 0
    out = capsys.readouterr().out
    assert "backend: vmap (asked for; the default rule says factored" in out
    assert "projection matrix: kept in memory" in out
    assert main([*argv, "--proj-dim", "32", "--device", "cpu", "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    assert estimate["n_samples"] == 210
    assert estimate["backend"] == "factored"
