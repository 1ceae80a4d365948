"""Finished feature stores whose bytes or hashes were altered are refused on every opening."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from diffattr.cli.main import main
from diffattr.data import ImageDataset
from diffattr.errors import StoreCorruptError
from diffattr.features import FeatureConfig, PlanConfig, ProjectionConfig, featurize
from diffattr.features._store import MANIFEST_FILE, FeatureStore
from diffattr.models import default_scheduler_config
from tests.methods.helpers import make_model

N = 10
CHUNK = 4  # three chunks: rows 0-3, 4-7, 8-9
ROW_VALUES = 6  # float32 features of shape (2, 3)
ARRAYS = {"features": ((2, 3), "float32"), "loss": ((), "float64")}
SETTINGS = {"model_id": "abc"}
IDS = np.arange(N, dtype=np.int64)


def _create(path: Path) -> FeatureStore:
    return FeatureStore.create_or_resume(
        path, settings=SETTINGS, ids=IDS, arrays=ARRAYS, chunk_size=CHUNK
    )


def _finished_store(path: Path) -> None:
    rng = np.random.default_rng(0)
    values = {
        "features": rng.standard_normal((N, 2, 3)).astype(np.float32),
        "loss": rng.standard_normal(N),
    }
    store = _create(path)
    for chunk in store.pending_chunks():
        rows = store.chunk_slice(chunk)
        store.write_chunk(chunk, {name: value[rows] for name, value in values.items()})
    store.finalize()


def _data_offset(file: Path) -> int:
    return np.load(file, mmap_mode="r").offset


def _xor_byte(file: Path, position: int, mask: int) -> None:
    data = bytearray(file.read_bytes())
    data[position] ^= mask
    file.write_bytes(bytes(data))


def _flip_byte(path: Path) -> None:
    file = path / "features.npy"
    _xor_byte(file, _data_offset(file) + 5 * ROW_VALUES * 4 + 2, 0xFF)


def _flip_low_bit(path: Path) -> None:
    # The smallest change there is: the last mantissa bit of one float.
    file = path / "features.npy"
    _xor_byte(file, _data_offset(file) + 4 * ROW_VALUES * 4, 0x01)


def _zero_chunk(path: Path) -> None:
    file = path / "features.npy"
    start = _data_offset(file) + CHUNK * ROW_VALUES * 4  # chunk 1: rows 4-7
    data = bytearray(file.read_bytes())
    data[start : start + CHUNK * ROW_VALUES * 4] = bytes(CHUNK * ROW_VALUES * 4)
    file.write_bytes(bytes(data))


def _wrong_manifest_hash(path: Path) -> None:
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["sha256"]["features.npy"] = "0" * 64
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


TAMPERINGS: dict[str, Callable[[Path], None]] = {
    "byte flip": _flip_byte,
    "low bit flip": _flip_low_bit,
    "zeroed chunk": _zero_chunk,
    "wrong SHA-256 in the manifest": _wrong_manifest_hash,
}


@pytest.mark.parametrize("tamper", TAMPERINGS.values(), ids=TAMPERINGS.keys())
def test_tampered_finished_store_is_refused_by_open_and_resume(
    tmp_path: Path, tamper: Callable[[Path], None]
) -> None:
    _finished_store(tmp_path)
    tamper(tmp_path)
    with pytest.raises(StoreCorruptError, match=r"features\.npy: contents do not match"):
        FeatureStore.open(tmp_path)
    # Rerunning a featurisation over a finished store reopens it this way.
    with pytest.raises(StoreCorruptError, match=r"features\.npy: contents do not match"):
        _create(tmp_path)


def test_featurize_refuses_a_tampered_finished_store(tmp_path: Path) -> None:
    draw = torch.Generator().manual_seed(0)
    dataset = ImageDataset(
        images=torch.rand((6, 1, 8, 8), generator=draw) * 2 - 1,
        ids=np.arange(6, dtype=np.int64),
        name="noise",
    )
    config = FeatureConfig(
        plan=PlanConfig(strategy="uniform", num_steps=2, seed=0),
        projection=ProjectionConfig(kind="dense", dim=8, seed=0),
    )

    def run() -> FeatureStore:
        return featurize(
            make_model(),
            default_scheduler_config(),
            dataset,
            config,
            tmp_path,
            model_id="tiny",
            chunk_size=4,
            progress=False,
        )

    assert run().complete
    file = tmp_path / "features.npy"
    _xor_byte(file, file.stat().st_size - 1, 0x01)
    with pytest.raises(StoreCorruptError, match=r"features\.npy: contents do not match"):
        run()


def test_info_does_not_call_a_tampered_store_complete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _finished_store(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["complete"] is True
    _zero_chunk(tmp_path)
    assert main(["info", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "features.npy: contents do not match" in captured.err


def test_store_file_linked_from_outside_is_refused(tmp_path: Path) -> None:
    # A faithful copy outside the store: the hashes match, the location does not.
    store = tmp_path / "store"
    _finished_store(store)
    outside = tmp_path / "loss.npy"
    shutil.move(store / "loss.npy", outside)
    (store / "loss.npy").symlink_to(outside)
    with pytest.raises(StoreCorruptError, match=r"'loss\.npy', which resolves outside"):
        FeatureStore.open(store)


def test_manifest_hash_list_naming_other_files_is_refused(tmp_path: Path) -> None:
    _finished_store(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["sha256"]["../elsewhere.npy"] = manifest["sha256"].pop("loss.npy")
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(StoreCorruptError, match="malformed manifest"):
        FeatureStore.open(tmp_path)
