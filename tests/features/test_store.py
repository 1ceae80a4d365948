from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from diffattr.errors import (
    ConfigError,
    DataError,
    StoreCorruptError,
    StoreError,
    StoreIncompleteError,
    StoreMismatchError,
)
from diffattr.features import _store
from diffattr.features._store import FeatureStore

N = 10
CHUNK = 4  # three chunks: rows 0-3, 4-7, 8-9
SETTINGS = {"checkpoint": "abc123", "projection": {"kind": "dense", "seed": 0, "dim": 6}}
ARRAYS = {"features": ((2, 3), "float32"), "loss": ((), "float64")}
IDS = np.arange(100, 100 + N, dtype=np.int64)[::-1].copy()


def _values(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "features": rng.standard_normal((N, 2, 3)).astype(np.float32),
        "loss": rng.standard_normal(N),
    }


def _create(path: Path, **changes) -> FeatureStore:
    kwargs = {"settings": SETTINGS, "ids": IDS, "arrays": ARRAYS, "chunk_size": CHUNK, **changes}
    return FeatureStore.create_or_resume(path, **kwargs)


def _write(store: FeatureStore, chunks, values) -> None:
    for chunk in chunks:
        rows = store.chunk_slice(chunk)
        store.write_chunk(chunk, {name: value[rows] for name, value in values.items()})


def _complete_store(path: Path) -> dict[str, np.ndarray]:
    values = _values()
    store = _create(path)
    _write(store, store.pending_chunks(), values)
    store.finalize()
    return values


def _flip_byte(file: Path, position: int) -> None:
    with open(file, "r+b") as handle:
        handle.seek(position)
        byte = handle.read(1)
        handle.seek(position)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_write_finalize_open_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "store"
    store = _create(path)
    assert store.pending_chunks() == [0, 1, 2]
    assert store.num_chunks == 3
    assert store.chunk_slice(2) == slice(8, 10)
    np.testing.assert_array_equal(store.chunk_ids(1), IDS[4:8])
    assert not store.complete
    values = _values()
    _write(store, [2, 0, 1], values)
    assert store.pending_chunks() == []
    store.finalize()
    assert store.complete

    opened = FeatureStore.open(path)
    assert opened.complete
    assert opened.n == N
    assert opened.settings == SETTINGS
    np.testing.assert_array_equal(opened.ids, IDS)
    assert opened.ids.dtype == np.int64
    assert opened.arrays == {"features": ((2, 3), "float32"), "loss": ((), "float64")}
    for name, value in values.items():
        array = opened.array(name)
        assert array.dtype == value.dtype
        np.testing.assert_array_equal(array, value)
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 0
    assert opened.pending_chunks() == []
    description = opened.describe()
    assert description["n"] == N
    assert description["num_chunks"] == description["chunks_done"] == 3
    assert description["arrays"]["features"] == {"shape": [N, 2, 3], "dtype": "float32"}
    assert description["bytes"] == N * 6 * 4 + N * 8
    json.dumps(description)
    with pytest.raises(KeyError, match="features"):
        opened.array("nope")

    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "diffattr.features"
    assert manifest["format_version"] == 1
    assert manifest["complete"] is True
    assert manifest["n"] == N
    assert manifest["chunk_size"] == CHUNK
    # Ids live in ids.npy, not in the JSON.
    assert manifest["ids"] == {"file": "ids.npy", "sha256": manifest["sha256"]["ids.npy"]}
    assert sorted(manifest["sha256"]) == ["features.npy", "ids.npy", "loss.npy"]
    # Plain numpy reads the files too.
    np.testing.assert_array_equal(np.load(path / "ids.npy"), IDS)
    np.testing.assert_array_equal(np.load(path / "features.npy"), values["features"])


def test_interrupted_run_resumes_unfinished_chunks_only(tmp_path: Path) -> None:
    values = _values()
    store = _create(tmp_path)
    _write(store, [0, 2], values)
    del store
    resumed = _create(tmp_path)
    assert resumed.pending_chunks() == [1]
    np.testing.assert_array_equal(resumed.array("features")[0:4], values["features"][0:4])
    np.testing.assert_array_equal(resumed.array("loss")[8:10], values["loss"][8:10])
    with pytest.raises(StoreIncompleteError, match="1 of 3"):
        resumed.finalize()
    _write(resumed, [1], values)
    resumed.finalize()
    np.testing.assert_array_equal(FeatureStore.open(tmp_path).array("loss"), values["loss"])


def test_crash_before_progress_leaves_chunk_pending(tmp_path: Path, monkeypatch) -> None:
    values = _values()
    store = _create(tmp_path)
    _write(store, [0], values)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_store, "atomic_write", crash)
    with pytest.raises(KeyboardInterrupt):
        _write(store, [1], values)
    monkeypatch.undo()
    # The rows reached the file before the crash, but only progress.json says a chunk is done.
    np.testing.assert_array_equal(np.load(tmp_path / "loss.npy")[4:8], values["loss"][4:8])
    assert _create(tmp_path).pending_chunks() == [1, 2]


def test_interrupted_creation_is_redone(tmp_path: Path) -> None:
    _create(tmp_path)
    (tmp_path / "manifest.json").unlink()  # as if killed before the manifest was written
    (tmp_path / ".progress.json.abc.tmp").write_text("{")
    store = _create(tmp_path)
    assert store.pending_chunks() == [0, 1, 2]
    assert not (tmp_path / ".progress.json.abc.tmp").exists()


def test_foreign_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"not a feature store.*notes\.txt"):
        _create(tmp_path)
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="not a directory"):
        _create(tmp_path / "file")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"settings": {**SETTINGS, "projection": {**SETTINGS["projection"], "seed": 1}}},
            "projection.seed: store has 0, requested 1",
        ),
        ({"settings": {**SETTINGS, "extra": True}}, "extra: store has no such key, requested true"),
        ({"settings": {**SETTINGS, "checkpoint": "abc"}}, 'checkpoint: store has "abc123"'),
        ({"ids": IDS[::-1].copy()}, "ids: the same samples in another order"),
        ({"ids": IDS + 1}, "ids: other samples"),
        ({"ids": IDS[:-1].copy()}, "ids: store has 10 sample ids, requested 9"),
        (
            {"arrays": {**ARRAYS, "features": ((2, 4), "float32")}},
            "arrays.features.shape: store has [10, 2, 3], requested [10, 2, 4]",
        ),
        (
            {"arrays": {**ARRAYS, "loss": ((), "float32")}},
            'arrays.loss.dtype: store has "float64", requested "float32"',
        ),
        ({"arrays": {**ARRAYS, "extra": ((1,), "int8")}}, "arrays.extra: store has no such key"),
        ({"chunk_size": 5}, "chunk_size: store has 4, requested 5"),
    ],
)
def test_resume_with_other_arguments_names_the_difference(
    tmp_path: Path, changes, expected
) -> None:
    _create(tmp_path)
    with pytest.raises(StoreMismatchError, match="another output path") as info:
        _create(tmp_path, **changes)
    assert expected in str(info.value)


def test_mismatch_lists_every_difference_and_truncates_values(tmp_path: Path) -> None:
    _create(tmp_path)
    settings = {**SETTINGS, "checkpoint": "x" * 500, "projection": {"kind": "sparse", "dim": 6}}
    with pytest.raises(StoreMismatchError) as info:
        _create(tmp_path, settings=settings, chunk_size=3)
    message = str(info.value)
    assert 'projection.kind: store has "dense", requested "sparse"' in message
    assert "projection.seed: store has 0, requested no such key" in message
    assert "chunk_size: store has 4, requested 3" in message
    assert "x" * 100 not in message
    assert "..." in message


def test_settings_are_compared_as_json(tmp_path: Path) -> None:
    _create(tmp_path, settings={"steps": (0, 100), "seed": 1})
    assert _create(tmp_path, settings={"seed": 1, "steps": [0, 100]}).pending_chunks() == [0, 1, 2]
    with pytest.raises(StoreMismatchError, match=r"seed: store has 1, requested 1\.0"):
        _create(tmp_path, settings={"seed": 1.0, "steps": [0, 100]})


def test_complete_store_is_returned_as_is(tmp_path: Path) -> None:
    values = _complete_store(tmp_path)
    store = _create(tmp_path)
    assert store.complete
    assert store.pending_chunks() == []
    with pytest.raises(StoreError, match="complete or read-only"):
        _write(store, [0], values)
    store.finalize()  # no-op
    with pytest.raises(StoreMismatchError):
        _create(tmp_path, chunk_size=2)


def test_read_only_store_refuses_writes(tmp_path: Path) -> None:
    values = _complete_store(tmp_path)
    with pytest.raises(StoreError, match="read-only"):
        _write(FeatureStore.open(tmp_path), [0], values)


def test_open_incomplete_store(tmp_path: Path) -> None:
    store = _create(tmp_path)
    _write(store, [1], _values())
    with pytest.raises(StoreIncompleteError, match=r"2 of 3 chunks missing.*rerun"):
        FeatureStore.open(tmp_path)
    _write(store, [0, 2], _values())
    with pytest.raises(StoreIncompleteError, match="not finalised"):
        FeatureStore.open(tmp_path)


def test_open_missing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such feature store"):
        FeatureStore.open(tmp_path / "nothing")
    with pytest.raises(StoreError, match=r"no manifest\.json"):
        FeatureStore.open(tmp_path)


def test_truncated_or_missing_array_is_corrupt(tmp_path: Path) -> None:
    _complete_store(tmp_path)
    file = tmp_path / "features.npy"
    os.truncate(file, file.stat().st_size - 4)
    with pytest.raises(StoreCorruptError, match=r"features\.npy.*truncated"):
        FeatureStore.open(tmp_path)
    file.unlink()
    with pytest.raises(StoreCorruptError, match=r"features\.npy: missing"):
        FeatureStore.open(tmp_path)


def test_flipped_byte_is_refused(tmp_path: Path) -> None:
    _complete_store(tmp_path)
    _flip_byte(tmp_path / "loss.npy", (tmp_path / "loss.npy").stat().st_size - 3)
    with pytest.raises(StoreCorruptError, match=r"loss\.npy: contents do not match"):
        FeatureStore.open(tmp_path)


def test_damaged_header_is_corrupt(tmp_path: Path) -> None:
    _complete_store(tmp_path)
    (tmp_path / "loss.npy").write_bytes(b"not a numpy file at all" * 10)
    with pytest.raises(StoreCorruptError, match=r"loss\.npy: unreadable \.npy header"):
        FeatureStore.open(tmp_path)


def test_finalize_detects_changed_chunk_and_marks_it_pending(tmp_path: Path) -> None:
    values = _values()
    store = _create(tmp_path)
    _write(store, [0, 1, 2], values)
    file = tmp_path / "loss.npy"
    _flip_byte(file, file.stat().st_size - 8 * 3)  # a byte of row 7: chunk 1
    with pytest.raises(StoreCorruptError, match=r"chunks \[1\].*rerun"):
        store.finalize()
    assert store.pending_chunks() == [1]
    assert _create(tmp_path).pending_chunks() == [1]
    _write(store, [1], values)
    store.finalize()
    np.testing.assert_array_equal(FeatureStore.open(tmp_path).array("loss"), values["loss"])


def test_writing_a_chunk_twice_replaces_it(tmp_path: Path) -> None:
    first, second = _values(0), _values(1)
    store = _create(tmp_path)
    _write(store, [0, 1, 2], first)
    _write(store, [1], second)
    _write(store, [1], second)
    assert store.pending_chunks() == []
    store.finalize()
    loss = FeatureStore.open(tmp_path).array("loss")
    np.testing.assert_array_equal(loss[4:8], second["loss"][4:8])
    np.testing.assert_array_equal(loss[:4], first["loss"][:4])


def test_bad_values_are_rejected_before_writing(tmp_path: Path) -> None:
    store = _create(tmp_path)
    good = {"features": np.zeros((4, 2, 3), np.float32), "loss": np.zeros(4)}
    with pytest.raises(ValueError, match=r"'features' has shape \(4, 3, 2\)"):
        store.write_chunk(0, {**good, "features": np.zeros((4, 3, 2))})
    with pytest.raises(ValueError, match=r"expected \(2, 2, 3\)"):
        store.write_chunk(2, good)  # the last chunk has 2 rows
    with pytest.raises(ValueError, match="needs exactly the arrays"):
        store.write_chunk(0, {"features": good["features"]})
    with pytest.raises(ValueError, match="does not cast"):
        store.write_chunk(0, {**good, "loss": np.zeros(4, dtype=np.complex128)})
    for chunk in (3, -1):
        with pytest.raises(ValueError, match="out of range"):
            store.write_chunk(chunk, good)
    assert store.pending_chunks() == [0, 1, 2]
    # float64 input is cast to the store's float32.
    store.write_chunk(0, {**good, "features": np.ones((4, 2, 3))})
    assert store.array("features")[0, 0, 0] == 1.0


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"format": "diffattr.features.progress", "checksum": "crc32", "chunks": {"7": {}}}',
        '{"format": "diffattr.features.progress", "checksum": "crc32", '
        '"chunks": {"0": {"loss": 1}}}',
        "[]",
    ],
)
def test_corrupt_progress_is_reported(tmp_path: Path, content: str) -> None:
    store = _create(tmp_path)
    _write(store, [0], _values())
    (tmp_path / "progress.json").write_text(content)
    with pytest.raises(StoreCorruptError, match=r"progress\.json: .*delete"):
        _create(tmp_path)


def test_missing_progress_means_nothing_done(tmp_path: Path) -> None:
    store = _create(tmp_path)
    _write(store, [0], _values())
    (tmp_path / "progress.json").unlink()
    assert _create(tmp_path).pending_chunks() == [0, 1, 2]


def test_corrupt_manifest_and_ids(tmp_path: Path) -> None:
    _create(tmp_path)
    (tmp_path / "ids.npy").write_bytes((tmp_path / "ids.npy").read_bytes()[:-8] + bytes(8))
    with pytest.raises(StoreCorruptError, match=r"ids\.npy: contents do not match"):
        _create(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "diffattr.features", "format_version": 1}')
    with pytest.raises(StoreCorruptError, match="malformed manifest"):
        _create(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(StoreError, match="format is 'other'"):
        _create(tmp_path)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"ids": np.array([1, 2, 2])}, DataError, "sample id 2 repeats"),
        ({"ids": np.array([], dtype=np.int64)}, DataError, "at least one sample id"),
        ({"ids": np.array([1.0, 2.0])}, DataError, "integers"),
        ({"ids": np.zeros((2, 2), dtype=np.int64)}, DataError, "1-D"),
        ({"chunk_size": 0}, ConfigError, r"chunk_size=0 is invalid: must be an integer >= 1"),
        ({"chunk_size": True}, ConfigError, "chunk_size=True"),
        ({"settings": {"seed": float("nan")}}, ConfigError, "JSON-serialisable"),
        ({"settings": {"f": object()}}, ConfigError, "JSON-serialisable"),
        ({"arrays": {}}, ConfigError, "non-empty"),
        ({"arrays": {"ids": ((1,), "float32")}}, ConfigError, "'ids' is invalid"),
        ({"arrays": {"../x": ((1,), "float32")}}, ConfigError, "is invalid"),
        ({"arrays": {"x": ((0,), "float32")}}, ConfigError, ">= 1"),
        ({"arrays": {"x": ((1,), "U3")}}, ConfigError, "dtype <U3 is invalid"),
        ({"arrays": {"x": ((1,), None)}}, ConfigError, "expected"),
    ],
)
def test_invalid_arguments(tmp_path: Path, changes, error, match) -> None:
    with pytest.raises(error, match=match):
        _create(tmp_path / "store", **changes)
    assert not (tmp_path / "store").exists()


def test_chunk_size_larger_than_n_and_unsigned_ids(tmp_path: Path) -> None:
    store = _create(tmp_path, ids=np.arange(3, dtype=np.uint32), chunk_size=np.int64(1000))
    assert store.pending_chunks() == [0]
    assert store.ids.dtype == np.int64
    store.write_chunk(0, {"features": np.ones((3, 2, 3), np.float32), "loss": np.arange(3.0)})
    store.finalize()
    np.testing.assert_array_equal(FeatureStore.open(tmp_path).array("loss"), [0.0, 1.0, 2.0])


_KILLED_WRITER = """
import sys
import numpy as np
from diffattr.features._store import FeatureStore

store = FeatureStore.create_or_resume(
    sys.argv[1], settings={}, ids=np.arange(400), arrays={"x": ((50,), "float64")}, chunk_size=1
)
for chunk in store.pending_chunks():
    store.write_chunk(chunk, {"x": np.full((1, 50), float(chunk))})
"""


def test_writer_killed_at_a_random_moment_resumes(tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)])
    try:
        # Generous: the loop ends at 20 chunks, and a starved writer may take long to start.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            progress = tmp_path / "progress.json"
            if progress.exists() and len(json.loads(progress.read_text())["chunks"]) >= 20:
                break
            time.sleep(0.005)
    finally:
        process.kill()
        process.wait()
    store = FeatureStore.create_or_resume(
        tmp_path, settings={}, ids=np.arange(400), arrays={"x": ((50,), "float64")}, chunk_size=1
    )
    pending = store.pending_chunks()
    assert len(pending) <= 400 - 20  # usually some are pending; the kill time varies
    done = sorted(set(range(400)) - set(pending))
    np.testing.assert_array_equal(store.array("x")[done, 0], done)
    for chunk in pending:
        store.write_chunk(chunk, {"x": np.full((1, 50), float(chunk))})
    store.finalize()
    np.testing.assert_array_equal(FeatureStore.open(tmp_path).array("x")[:, -1], np.arange(400))
