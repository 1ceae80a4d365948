from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffattr.data import DatasetSplit
from diffattr.errors import CheckpointError
from diffattr.models import (
    Checkpoint,
    build_model,
    count_parameters,
    load_checkpoint,
    sample_checkpoint,
    save_checkpoint,
)

from .helpers import fixed_input, mlp_spec, seeded_model, states_equal, tiny_config, unet_spec

SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}


def _copy(checkpoint: Checkpoint, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(checkpoint.path, target)
    return target


def _rewrite_json(path: Path, change) -> None:
    doc = json.loads((path / "checkpoint.json").read_text())
    change(doc)
    (path / "checkpoint.json").write_text(json.dumps(doc))


def test_save_and_load_give_identical_outputs(tmp_path: Path) -> None:
    spec = unet_spec()
    raw, ema = seeded_model(spec, seed=1), seeded_model(spec, seed=2)
    x = fixed_input()
    checkpoint = save_checkpoint(
        tmp_path / "ckpt",
        model_spec=spec,
        scheduler_config=SCHEDULER,
        step=7,
        states={"model": raw.state_dict(), "ema": ema.state_dict()},
        metadata={"note": "hello"},
    )
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.step == checkpoint.step == 7
    assert loaded.model_spec == spec
    assert loaded.metadata == {
        "note": "hello",
        "diffattr_version": loaded.metadata["diffattr_version"],
    }
    assert loaded.has_ema
    with torch.no_grad():
        want_raw, want_ema = raw(x, 10).sample, ema(x, 10).sample
        assert not torch.equal(want_raw, want_ema)
        for weights, want in [("raw", want_raw), ("ema", want_ema), ("auto", want_ema)]:
            model = loaded.load_model(weights)
            assert not model.training
            assert torch.equal(model(x, 10).sample, want), weights


def test_auto_weights_are_raw_without_ema(tmp_path: Path) -> None:
    spec = mlp_spec()
    model = seeded_model(spec, seed=3)
    torch.nn.init.normal_(model.output.weight)  # the default output layer is all zeros
    save_checkpoint(
        tmp_path,
        model_spec=spec,
        scheduler_config=SCHEDULER,
        step=1,
        states={"model": model.state_dict()},
    )
    loaded = load_checkpoint(tmp_path)
    assert not loaded.has_ema
    x = fixed_input()
    with torch.no_grad():
        assert torch.equal(loaded.load_model("auto")(x, 3), model(x, 3))
    with pytest.raises(CheckpointError, match="no 'ema' weights"):
        loaded.load_model("ema")


def test_trained_checkpoint_loads_its_weights(trained: Checkpoint) -> None:
    x = fixed_input()
    raw_state, ema_state = trained.load_state("model"), trained.load_state("ema")
    raw, ema = trained.load_model("raw"), trained.load_model("ema")
    assert states_equal(raw.state_dict(), raw_state)
    assert states_equal(ema.state_dict(), ema_state)
    with torch.no_grad():
        assert not torch.equal(raw(x, 50).sample, ema(x, 50).sample)
        assert torch.equal(trained.load_model()(x, 50).sample, ema(x, 50).sample)
    # Training moved the weights away from the seeded initialisation.
    fresh = build_model(trained.model_spec)
    assert not states_equal(fresh.state_dict(), raw_state)


def test_checkpoint_json_records_the_run(trained: Checkpoint, digits_split: DatasetSplit) -> None:
    doc = json.loads((trained.path / "checkpoint.json").read_text())
    assert doc == trained.describe()
    assert doc["format"] == "diffattr.checkpoint"
    assert doc["format_version"] == 1
    assert doc["model"] == unet_spec().to_dict()
    assert doc["scheduler"]["_class_name"] == "DDPMScheduler"
    assert doc["scheduler"]["num_train_timesteps"] == 1000
    assert doc["scheduler"]["beta_schedule"] == "linear"
    assert doc["scheduler"]["prediction_type"] == "epsilon"
    assert doc["training"] == tiny_config(steps=4, checkpoint_every=0, seed=5).to_dict()
    assert doc["training"]["seed"] == 5
    assert doc["step"] == 4
    assert doc["dataset"]["fingerprint"] == digits_split.train.fingerprint()
    assert doc["dataset"]["n"] == 56
    assert doc["dataset"]["shape"] == [1, 8, 8]
    assert doc["split"]["seed"] == 0
    assert doc["split"]["query_ids"] == sorted(digits_split.query.ids.tolist())
    assert len(doc["split"]["query_ids"]) == 8
    assert doc["n_parameters"] == count_parameters(build_model(unet_spec()))
    assert doc["last_call"]["final_loss"] > 0
    assert trained.metadata["training"] == doc["training"]
    assert trained.scheduler_config == doc["scheduler"]


def test_weight_files_are_hashed_safetensors(trained: Checkpoint) -> None:
    doc = trained.describe()
    assert set(doc["files"]) == {"model", "ema", "optimizer"}
    on_disk = sorted(p.name for p in trained.path.iterdir())
    assert on_disk == sorted(["checkpoint.json", *(e["file"] for e in doc["files"].values())])
    for role, entry in doc["files"].items():
        assert entry["file"] == f"{role}-00000004.safetensors"
        data = (trained.path / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        # safetensors: an 8-byte little-endian header length, then a JSON header (no pickle).
        header_length = int.from_bytes(data[:8], "little")
        assert json.loads(data[8 : 8 + header_length])
        assert load_file(trained.path / entry["file"])


def test_loading_never_unpickles(trained: Checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", forbidden)
    checkpoint = load_checkpoint(trained.path)
    checkpoint.load_model()
    images = sample_checkpoint(checkpoint, [0], num_inference_steps=2, progress=False)
    assert images.shape == (1, 1, 8, 8)


def test_missing_directory_is_a_checkpoint_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="no such checkpoint directory") as info:
        load_checkpoint(missing)
    assert isinstance(info.value, OSError)
    assert str(missing) in str(info.value)


def test_directory_without_json_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "model-00000001.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"no checkpoint\.json") as info:
        load_checkpoint(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_corrupted_weights_fail_the_hash_check(trained: Checkpoint, tmp_path: Path) -> None:
    path = _copy(trained, tmp_path)
    file = path / trained.files["model"]
    data = bytearray(file.read_bytes())
    data[-5] ^= 0xFF  # flip a byte of tensor data; the file still parses
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256") as info:
        load_checkpoint(path)
    assert isinstance(info.value, OSError)
    assert str(file) in str(info.value)
    # Without verification the flipped byte goes unnoticed, which is why verification is default.
    load_checkpoint(path, verify=False).load_model("raw")


def test_truncated_weights_are_a_checkpoint_error(trained: Checkpoint, tmp_path: Path) -> None:
    path = _copy(trained, tmp_path)
    file = path / trained.files["ema"]
    file.write_bytes(file.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)
    unverified = load_checkpoint(path, verify=False)
    with pytest.raises(CheckpointError, match="unreadable weights") as info:
        unverified.load_model("ema")
    assert str(file) in str(info.value)


def test_missing_weight_file_is_a_checkpoint_error(trained: Checkpoint, tmp_path: Path) -> None:
    path = _copy(trained, tmp_path)
    file = path / trained.files["optimizer"]
    file.unlink()
    with pytest.raises(CheckpointError, match="optimizer weights listed") as info:
        load_checkpoint(path, verify=False)
    assert isinstance(info.value, OSError)
    assert str(file) in str(info.value)


def test_malformed_json_is_a_checkpoint_error(trained: Checkpoint, tmp_path: Path) -> None:
    path = _copy(trained, tmp_path)
    (path / "checkpoint.json").write_text('{"format": "diffattr.checkpoint", ')
    with pytest.raises(CheckpointError, match="not valid JSON") as info:
        load_checkpoint(path)
    assert isinstance(info.value, OSError)
    assert str(path / "checkpoint.json") in str(info.value)
    (path / "checkpoint.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("format_version", 2, "format_version 2 is not supported"),
        ("format_version", None, "format_version None is not supported"),
        ("format", "other.format", "format is 'other.format'"),
    ],
)
def test_other_formats_are_refused(
    trained: Checkpoint, tmp_path: Path, key: str, value: object, message: str
) -> None:
    path = _copy(trained, tmp_path)
    _rewrite_json(path, lambda doc: doc.__setitem__(key, value))
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert str(path / "checkpoint.json") in str(info.value)


@pytest.mark.parametrize(
    "change",
    [
        lambda doc: doc.pop("model"),
        lambda doc: doc.pop("step"),
        lambda doc: doc.__setitem__("files", []),
        lambda doc: doc["files"].__setitem__("model", "model.safetensors"),
        lambda doc: doc["files"].pop("model"),
    ],
    ids=["no-model", "no-step", "files-list", "entry-string", "no-model-file"],
)
def test_malformed_description_is_a_checkpoint_error(
    trained: Checkpoint, tmp_path: Path, change
) -> None:
    path = _copy(trained, tmp_path)
    _rewrite_json(path, change)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_entry_without_sha256_is_a_checkpoint_error(trained: Checkpoint, tmp_path: Path) -> None:
    # A hand-edited or truncated description must not escape as a bare KeyError.
    path = _copy(trained, tmp_path)
    _rewrite_json(path, lambda doc: doc["files"]["ema"].pop("sha256"))
    with pytest.raises(CheckpointError, match="malformed checkpoint description") as info:
        load_checkpoint(path)
    assert str(path / "checkpoint.json") in str(info.value)


def test_weights_that_do_not_fit_are_a_checkpoint_error(
    trained: Checkpoint, tmp_path: Path
) -> None:
    path = _copy(trained, tmp_path)
    _rewrite_json(
        path, lambda doc: doc["model"]["config"].__setitem__("block_out_channels", [8, 8])
    )
    with pytest.raises(CheckpointError, match="do not fit the model"):
        load_checkpoint(path).load_model("raw")


def test_resave_removes_the_previous_files(tmp_path: Path) -> None:
    spec = mlp_spec()
    state = seeded_model(spec).state_dict()
    (tmp_path / "notes.txt").write_text("mine")
    first = save_checkpoint(
        tmp_path,
        model_spec=spec,
        scheduler_config=SCHEDULER,
        step=3,
        states={"model": state, "ema": state, "optimizer": {"state.0.step": torch.tensor(3.0)}},
    )
    assert set(first.files.values()) == {
        "model-00000003.safetensors",
        "ema-00000003.safetensors",
        "optimizer-00000003.safetensors",
    }
    second = save_checkpoint(
        tmp_path, model_spec=spec, scheduler_config=SCHEDULER, step=6, states={"model": state}
    )
    assert second.files == {"model": "model-00000006.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.json",
        "model-00000006.safetensors",
        "notes.txt",  # files the checkpoint never referenced are not its to delete
    ]
    assert load_checkpoint(tmp_path).step == 6


def test_training_keeps_only_the_latest_step(tmp_path: Path, digits_split: DatasetSplit) -> None:
    from diffattr.models import train

    checkpoint = train(
        mlp_spec(), digits_split.train, tiny_config(checkpoint_every=2), tmp_path, progress=False
    )
    assert checkpoint.step == 6
    referenced = set(checkpoint.files.values())
    assert referenced == {f"{r}-00000006.safetensors" for r in ("model", "ema", "optimizer")}
    assert {p.name for p in tmp_path.iterdir()} == referenced | {"checkpoint.json"}


def test_save_needs_model_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="needs 'model' weights"):
        save_checkpoint(
            tmp_path, model_spec=mlp_spec(), scheduler_config=SCHEDULER, step=1, states={}
        )
    assert not (tmp_path / "checkpoint.json").exists()


def test_load_scheduler_builds_ddpm_and_ddim(trained: Checkpoint) -> None:
    ddpm, ddim = trained.load_scheduler("ddpm"), trained.load_scheduler("ddim")
    assert type(ddpm).__name__ == "DDPMScheduler"
    assert type(ddim).__name__ == "DDIMScheduler"
    assert ddpm.config.num_train_timesteps == ddim.config.num_train_timesteps == 1000
    torch.testing.assert_close(ddpm.betas, ddim.betas)
    assert ddpm.betas[0].item() == pytest.approx(1e-4)
    assert ddpm.betas[-1].item() == pytest.approx(0.02)
