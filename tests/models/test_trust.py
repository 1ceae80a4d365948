"""Shared checkpoints are data: they run no code without trust and name no file outside them."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from diffattr._io import path_inside
from diffattr.cli.main import main
from diffattr.errors import BenchmarkError, CheckpointError
from diffattr.evaluation import LDSBenchmark, LDSConfig
from diffattr.evaluation._lds import _load_queries
from diffattr.models import Checkpoint, load_checkpoint, model_spec, save_checkpoint, train
from diffattr.models._pipeline import _model_files

from .custom_model import TinyConvNet
from .helpers import CUSTOM_FACTORY, mlp_spec, random_dataset, seeded_model, tiny_config

SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}


def _save(path: Path, spec=None, step: int = 1) -> Checkpoint:
    spec = spec or mlp_spec()
    model = seeded_model(spec)
    return save_checkpoint(
        path,
        model_spec=spec,
        scheduler_config=SCHEDULER,
        step=step,
        states={"model": model.state_dict(), "ema": model.state_dict()},
    )


def _rewrite_json(path: Path, change) -> None:
    doc = json.loads((path / "checkpoint.json").read_text())
    change(doc)
    (path / "checkpoint.json").write_text(json.dumps(doc))


def _hostile(tmp_path: Path) -> tuple[Path, Path]:
    """A registry checkpoint edited to be built by ``subprocess:run``; and the file it makes."""
    path, victim = tmp_path / "hostile", tmp_path / "PWNED"
    _save(path)
    _rewrite_json(
        path,
        lambda doc: doc.update(
            model={"name": "subprocess:run", "config": {"args": ["touch", str(victim)]}}
        ),
    )
    return path, victim


# ---------------------------------------------------------------------- code execution


def test_factory_checkpoint_runs_no_code_without_trust(tmp_path: Path) -> None:
    path, victim = _hostile(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path).load_model()
    message = str(info.value)
    assert "\n" not in message
    assert "'subprocess:run'" in message
    assert "trust_remote_code=True" in message
    assert "--trust-remote-code" in message
    assert not victim.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["sample", "{ckpt}", "--out", "{out}", "--n", "1"],
        ["attribute", "{ckpt}", "--out", "{out}"],
        ["train", "--init", "{ckpt}", "--lora", "2", "--out", "{out}", "--steps", "1"],
        ["lds", "init", "{out}", "--base", "{ckpt}"],
        ["counterfactual", "{ckpt}", "--queries", "{out}", "--scores", "{out}", "--out", "{out}"],
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_commands_refuse_a_factory_checkpoint_without_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    path, victim = _hostile(tmp_path)
    argv = [part.format(ckpt=path, out=tmp_path / "out") for part in command]
    assert main([*argv, "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "'subprocess:run'" in err
    assert "--trust-remote-code" in err
    assert not victim.exists()


def test_lds_benchmark_refuses_a_factory_base_without_trust(tmp_path: Path) -> None:
    path, victim = _hostile(tmp_path)
    with pytest.raises(CheckpointError, match="trust_remote_code"):
        LDSBenchmark.create(tmp_path / "bench", path, LDSConfig(), progress=False)
    assert not victim.exists()


def test_info_describes_a_factory_checkpoint_without_building_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, victim = _hostile(tmp_path)
    assert main(["info", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["name"] == "subprocess:run"
    assert not victim.exists()


def test_trusted_factory_checkpoint_loads_and_samples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ckpt"
    _save(path, model_spec(CUSTOM_FACTORY, in_channels=1, sample_size=8))
    with pytest.raises(CheckpointError, match=r"'tests\.models\.custom_model:make'"):
        load_checkpoint(path)
    assert isinstance(load_checkpoint(path, trust_remote_code=True).load_model(), TinyConvNet)
    sample = ["sample", str(path), "--out", str(tmp_path / "s"), "--n", "1", "--device", "cpu"]
    options = ["--sampler", "ddim", "--steps", "2", "--quiet"]
    assert main([*sample, *options]) == 1
    assert main([*sample, *options, "--trust-remote-code"]) == 0
    assert (tmp_path / "s" / "samples.npz").is_file()
    capsys.readouterr()


def test_training_a_typed_factory_resumes_without_the_flag(tmp_path: Path) -> None:
    # The caller named the factory: resuming its own checkpoint needs no further consent.
    spec = model_spec(CUSTOM_FACTORY, in_channels=1, sample_size=8, overrides={"width": 4})
    dataset, config = random_dataset(n=8), tiny_config(steps=2, batch_size=4, checkpoint_every=1)
    assert train(spec, dataset, config, tmp_path, until=1, progress=False).step == 1
    assert train(spec, dataset, config, tmp_path, progress=False).step == 2


# ---------------------------------------------------------------------- paths outside folders


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_weight_file_outside_the_checkpoint_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "ckpt"
    checkpoint = _save(path)
    outside = tmp_path / "outside.safetensors"
    shutil.move(path / checkpoint.files["ema"], outside)  # the same bytes: the hash still fits
    name = {"parent": "../outside.safetensors", "absolute": str(outside), "symlink": "ema.link"}
    if kind == "symlink":
        (path / "ema.link").symlink_to(outside)
    _rewrite_json(path, lambda doc: doc["files"]["ema"].update(file=name[kind]))
    with pytest.raises(CheckpointError, match=r"resolves outside the folder"):
        load_checkpoint(path)


def test_save_deletes_no_file_outside_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    first = _save(path)
    victims = [tmp_path / "victim.txt", tmp_path / "elsewhere" / "victim.txt"]
    for victim in victims:
        victim.parent.mkdir(exist_ok=True)
        victim.write_text("keep me")

    def list_victims(doc: dict) -> None:
        doc["files"]["relative"] = {"file": "../victim.txt", "sha256": ""}
        doc["files"]["absolute"] = {"file": str(victims[1]), "sha256": ""}

    _rewrite_json(path, list_victims)
    second = _save(path, step=2)
    assert all(victim.read_text() == "keep me" for victim in victims)
    # The previous checkpoint's own files are still replaced.
    assert not (path / first.files["model"]).exists()
    assert (path / second.files["model"]).is_file()


@pytest.mark.parametrize("name", ["../queries.npz", "/tmp/queries.npz", "queries/../../q.npz"])
def test_benchmark_query_file_outside_the_benchmark_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(BenchmarkError, match="resolves outside the folder"):
        _load_queries(tmp_path / "bench", "heldout", {"file": name, "sha256": ""})


def test_pipeline_weight_shard_outside_the_component_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "pipeline" / "unet"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (tmp_path / "evil.safetensors").write_bytes(b"")
    index = {"weight_map": {"w": "../../evil.safetensors"}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="resolves outside the folder"):
        _model_files(folder, "diffusers")


@pytest.mark.parametrize("name", ["", ".", None, 3, "a/.."])
def test_path_inside_refuses_names_of_no_file_inside(tmp_path: Path, name: object) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint\.json lists"):
        path_inside(tmp_path, name, "checkpoint.json", CheckpointError)


def test_path_inside_accepts_names_that_stay_inside(tmp_path: Path) -> None:
    assert path_inside(tmp_path, "a/../b.bin", "x.json", CheckpointError) == tmp_path / "a/../b.bin"
    digest = hashlib.sha256(b"").hexdigest()
    assert path_inside(tmp_path, digest, "x.json", CheckpointError) == tmp_path / digest
