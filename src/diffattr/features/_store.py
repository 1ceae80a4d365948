"""Resumable on-disk feature stores: one ``.npy`` file per array, filled chunk by chunk.

Layout of a store directory::

    manifest.json   format, settings of the run, n, chunk_size, arrays (shape, dtype, file),
                    the ids file and its SHA-256, complete, and (once complete) the SHA-256 of
                    every data file; written last on creation and rewritten once by finalize()
    ids.npy         (N,) int64 sample ids; row i of every array belongs to ids[i]
    <name>.npy      one .npy file per array, shape (N, *per-sample shape), read as a memmap
    progress.json   finished chunks and the CRC-32 of each chunk's bytes in each array

Crash safety: a chunk's rows are written and fsynced before ``progress.json`` is atomically
replaced with the chunk marked done, so an interrupted run leaves finished chunks intact and
unfinished ones pending. Rewriting a finished chunk first marks it pending. ``finalize()`` checks
every chunk against its CRC-32 before marking the store complete, so a store never becomes
complete with bytes that differ from what was written.

Integrity: every opening of a complete store hashes every file against the SHA-256 that
``finalize()`` recorded (about a second per GB, see ``benchmarks/bench_store_verify.py``), so a
changed byte, a zeroed chunk or an edited hash is refused rather than scored. A store's files
must lie inside its directory: one that is a symbolic link out of it is refused.

A store has a single writer: two processes filling the same directory at once are not supported
and not detected. Readers of a complete store may be many.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from diffattr._io import (
    atomic_write,
    format_problem,
    path_inside,
    read_json,
    sha256_file,
    write_json,
    write_npy,
)
from diffattr._version import __version__
from diffattr.errors import (
    ConfigError,
    DataError,
    StoreCorruptError,
    StoreError,
    StoreIncompleteError,
    StoreMismatchError,
)

MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = "progress.json"
IDS_FILE = "ids.npy"
FORMAT = "diffattr.features"
FORMAT_VERSION = 1
PROGRESS_FORMAT = "diffattr.features.progress"

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")
_READ_BLOCK = 1 << 24  # bytes per read when checksumming
_MAX_VALUE_CHARS = 80  # values in mismatch messages are cut to this length
_MAX_DIFFERENCES = 10  # mismatch messages list at most this many differences

ArraySpec = tuple[tuple[int, ...], np.dtype]


class FeatureStore:
    """A directory of per-sample arrays written in resumable chunks.

    Build one with :meth:`create_or_resume` (to write) or :meth:`open` (to read a complete store);
    the constructor is internal. Rows follow :attr:`ids`; chunk ``c`` holds rows
    ``c * chunk_size`` up to ``(c + 1) * chunk_size`` (the last chunk may be shorter).

    Only one process may write a store at a time; this is not checked.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        ids: np.ndarray,
        arrays: dict[str, ArraySpec],
        offsets: dict[str, int],
        done: dict[int, dict[str, int]],
        *,
        writable: bool,
    ) -> None:
        self._path = path
        self._manifest = manifest
        self._ids = ids
        self._ids.setflags(write=False)
        self._arrays = arrays
        self._offsets = offsets
        self._done = done
        self._writable = writable

    # ------------------------------------------------------------------ construction

    @classmethod
    def create_or_resume(
        cls,
        path: str | os.PathLike[str],
        *,
        settings: Mapping[str, Any],
        ids: np.ndarray | Sequence[int],
        arrays: Mapping[str, tuple[Sequence[int], DTypeLike]],
        chunk_size: int,
    ) -> FeatureStore:
        """Create a store, or reopen an existing one made with exactly the same arguments.

        Args:
            path: The store directory; created if missing. An existing directory without a
                manifest is reused only if it holds nothing but leftovers of an interrupted
                creation of this store.
            settings: JSON-serialisable description of the run (checkpoint hash, plan, output,
                projection, parameters, ...). Compared after a JSON round trip, so tuples and
                lists are equal but ``1`` and ``1.0`` are not.
            ids: ``(N,)`` unique integer sample ids, ``N >= 1``; stored as int64.
            arrays: Array name -> (per-sample shape, dtype); array ``name`` has shape
                ``(N, *shape)``. Names start with a letter and use letters, digits, ``_``,
                ``-``; ``"ids"`` is reserved. Dtypes are numeric (bool, int, uint, float, complex).
            chunk_size: Rows per chunk, ``>= 1``.

        Returns:
            The store; :meth:`pending_chunks` lists what remains to be written (nothing when the
            existing store is complete, which is returned as it is).

        Raises:
            ConfigError: ``settings``, ``arrays`` or ``chunk_size`` is invalid.
            DataError: ``ids`` is empty, not 1-D integers, or repeats an id.
            StoreMismatchError: The existing store was made with other settings, ids, arrays or
                chunk size; the message names every differing key with both values.
            StoreCorruptError: The existing store's files are damaged (a complete store's are
                hashed, as by :meth:`open`).
            StoreError: ``path`` is a file, or a non-empty directory that is not a store.
        """
        path = Path(path)
        settings = _normalise_settings(settings)
        ids = _normalise_ids(ids)
        specs = _normalise_arrays(arrays)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer):
            raise ConfigError(f"chunk_size={chunk_size!r} is invalid: must be an integer >= 1")
        if chunk_size < 1:
            raise ConfigError(f"chunk_size={chunk_size} is invalid: must be an integer >= 1")
        chunk_size = int(chunk_size)
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path}: exists and is not a directory; choose another store path")
        if not (path / MANIFEST_FILE).is_file():
            _check_reusable(path, specs)
            return cls._create(path, settings, ids, specs, chunk_size)
        store = cls._load(path, writable=True)
        differences = _differences(
            store, settings=settings, ids=ids, arrays=specs, chunk_size=chunk_size
        )
        if differences:
            shown = differences[:_MAX_DIFFERENCES]
            if len(differences) > len(shown):
                shown.append(f"and {len(differences) - len(shown)} more")
            raise StoreMismatchError(
                f"{path}: the existing feature store was made for a different run: "
                f"{'; '.join(shown)}. Use another output path, or delete {path} to recompute."
            )
        if store.complete:
            store._writable = False
            store._verify()
            return store
        _remove_stale_temporaries(path)
        store._done = _read_progress(path, store.num_chunks, list(store._arrays))
        return store

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> FeatureStore:
        """Open a complete store read-only, after hashing every file against its manifest.

        Args:
            path: The store directory.

        Returns:
            The store.

        Raises:
            StoreError: The directory or its manifest is missing, or it is not a feature store.
            StoreIncompleteError: The featurisation has not finished (the message says how many
                chunks are missing); rerunning it with the same settings resumes it.
            StoreCorruptError: A file is missing, truncated, outside the directory, has another
                shape or dtype than the manifest says, or differs from its recorded SHA-256.
        """
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"{path}: no such feature store directory")
        if not (path / MANIFEST_FILE).is_file():
            raise StoreError(f"{path}: not a feature store (no {MANIFEST_FILE})")
        manifest = _read_manifest(path)
        if manifest.get("complete") is not True:
            raise StoreIncompleteError(
                f"{path}: feature store is incomplete ({_missing(path)}); rerun the "
                "featurisation with the same settings to resume it"
            )
        store = cls._load(path, writable=False, manifest=manifest)
        store._verify()
        return store

    @classmethod
    def _create(
        cls,
        path: Path,
        settings: dict[str, Any],
        ids: np.ndarray,
        specs: dict[str, ArraySpec],
        chunk_size: int,
    ) -> FeatureStore:
        path.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        write_npy(path / IDS_FILE, ids)
        offsets = {}
        for name, (shape, dtype) in specs.items():
            # Sparse file of the final size: rows are filled in place by write_chunk().
            handle = np.lib.format.open_memmap(
                path / f"{name}.npy", mode="w+", dtype=dtype, shape=(len(ids), *shape)
            )
            offsets[name] = handle.offset
            del handle
        store = cls(
            path,
            _manifest_doc(settings, ids, specs, chunk_size, sha256_file(path / IDS_FILE)),
            ids,
            specs,
            offsets,
            {},
            writable=True,
        )
        store._write_progress()
        # The manifest goes last: a directory without one is an unfinished creation.
        write_json(path / MANIFEST_FILE, store._manifest)
        return store

    @classmethod
    def _load(
        cls, path: Path, *, writable: bool, manifest: dict[str, Any] | None = None
    ) -> FeatureStore:
        """Read the manifest and check the ids and every array file's header and size."""
        manifest = _read_manifest(path) if manifest is None else manifest
        doc = path / MANIFEST_FILE
        try:
            n = int(manifest["n"])
            specs = {
                name: (tuple(int(d) for d in entry["shape"][1:]), np.dtype(entry["dtype"]))
                for name, entry in manifest["arrays"].items()
            }
            ids_sha = str(manifest["ids"]["sha256"])
            files = [IDS_FILE, *(f"{name}.npy" for name in specs)]
            valid = (
                isinstance(manifest["settings"], dict)
                and int(manifest["chunk_size"]) >= 1
                and isinstance(manifest["complete"], bool)
                and all(_NAME.match(name) and name != "ids" for name in specs)
                and all(entry["shape"][0] == n for entry in manifest["arrays"].values())
                # A complete store records the hash of exactly its files (see _verify).
                and (
                    not manifest["complete"]
                    or (
                        isinstance(manifest["sha256"], dict)
                        and sorted(manifest["sha256"]) == sorted(files)
                    )
                )
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            raise StoreCorruptError(f"{doc}: malformed manifest ({err!r})") from err
        if not valid or n < 1 or not specs:
            raise StoreCorruptError(f"{doc}: malformed manifest")
        for file in files:
            path_inside(path, file, MANIFEST_FILE, StoreCorruptError)
        _check_npy(path / IDS_FILE, (n,), np.dtype(np.int64))
        if writable and sha256_file(path / IDS_FILE) != ids_sha:
            raise StoreCorruptError(
                f"{path / IDS_FILE}: contents do not match the SHA-256 in {MANIFEST_FILE}; "
                f"delete {path} and rerun the featurisation"
            )
        ids = np.load(path / IDS_FILE)
        offsets = {
            name: _check_npy(path / f"{name}.npy", (n, *shape), dtype)
            for name, (shape, dtype) in specs.items()
        }
        return cls(path, manifest, ids, specs, offsets, {}, writable=writable)

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> Path:
        """The store directory."""
        return self._path

    @property
    def ids(self) -> np.ndarray:
        """``(N,)`` int64 sample ids (read-only), in row order."""
        return self._ids

    @property
    def settings(self) -> dict[str, Any]:
        """A copy of the run settings the store was made with (after a JSON round trip)."""
        return copy.deepcopy(self._manifest["settings"])

    @property
    def n(self) -> int:
        """Number of samples (rows)."""
        return len(self._ids)

    @property
    def chunk_size(self) -> int:
        """Rows per chunk."""
        return int(self._manifest["chunk_size"])

    @property
    def num_chunks(self) -> int:
        """Number of chunks, ``ceil(n / chunk_size)``."""
        return -(-self.n // self.chunk_size)

    @property
    def complete(self) -> bool:
        """Whether every chunk was written and :meth:`finalize` succeeded."""
        return bool(self._manifest["complete"])

    @property
    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Array name -> (per-sample shape, dtype name), as passed to :meth:`create_or_resume`."""
        return {name: (shape, dtype.name) for name, (shape, dtype) in self._arrays.items()}

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{len(self.pending_chunks())} chunks pending"
        return f"FeatureStore({str(self._path)!r}, n={self.n}, {state})"

    # ------------------------------------------------------------------ chunks

    def pending_chunks(self) -> list[int]:
        """Return the indices of chunks not written yet, ascending (empty when complete)."""
        if self.complete:
            return []
        return [c for c in range(self.num_chunks) if c not in self._done]

    def chunk_slice(self, chunk: int) -> slice:
        """Return the rows of ``chunk`` as ``slice(start, stop)``.

        Raises:
            ValueError: ``chunk`` is not in ``[0, num_chunks)``.
        """
        if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer):
            raise ValueError(f"chunk index must be an integer, found {chunk!r}")
        if not 0 <= chunk < self.num_chunks:
            raise ValueError(f"chunk {chunk} is out of range: the store has {self.num_chunks}")
        start = int(chunk) * self.chunk_size
        return slice(start, min(start + self.chunk_size, self.n))

    def chunk_ids(self, chunk: int) -> np.ndarray:
        """Return the ``(rows,)`` int64 sample ids of ``chunk``."""
        return self._ids[self.chunk_slice(chunk)].copy()

    def write_chunk(self, chunk: int, values: Mapping[str, np.ndarray]) -> None:
        """Write one chunk's rows of every array and record the chunk as done.

        Writing a chunk again replaces its rows (it is pending while that happens).

        Args:
            chunk: The chunk index.
            values: Array name -> ``(rows, *per-sample shape)`` array for every array of the
                store, ``rows = len(chunk_ids(chunk))``; cast to the store's dtype when numpy
                allows a same-kind cast (float64 -> float32 yes, float -> int no).

        Raises:
            ValueError: Bad chunk index, missing or extra arrays, wrong shape or dtype kind.
            StoreError: The store is complete or was opened read-only.
            OSError: Writing failed (the chunk stays pending).
        """
        if not self._writable or self.complete:
            raise StoreError(f"{self._path}: the store is complete or read-only; cannot write")
        rows = self.chunk_slice(chunk)
        prepared = self._prepare(int(chunk), rows.stop - rows.start, values)
        chunk = int(chunk)
        if chunk in self._done:
            # Mark it pending first, so a crash mid-rewrite cannot leave mixed rows marked done.
            del self._done[chunk]
            self._write_progress()
        checksums = {}
        for name, data in prepared.items():
            raw = data.reshape(-1).view(np.uint8)
            row_bytes = raw.nbytes // len(data)
            with open(self._path / f"{name}.npy", "r+b") as handle:
                handle.seek(self._offsets[name] + rows.start * row_bytes)
                handle.write(raw)
                handle.flush()
                os.fsync(handle.fileno())
            checksums[name] = zlib.crc32(raw)
        self._done[chunk] = checksums
        self._write_progress()

    def finalize(self) -> None:
        """Check every chunk against its checksum and mark the store complete.

        Reads every byte once (CRC-32 per chunk and SHA-256 per file). Does nothing on a complete
        store.

        Raises:
            StoreIncompleteError: Some chunks are still pending.
            StoreCorruptError: Files changed after they were written. Chunks whose bytes no longer
                match are marked pending again, so rerunning the featurisation recomputes them.
            StoreError: The store was opened read-only.
        """
        if self.complete:
            return
        if not self._writable:
            raise StoreError(f"{self._path}: the store was opened read-only; cannot finalise")
        pending = self.pending_chunks()
        if pending:
            raise StoreIncompleteError(
                f"{self._path}: cannot finalise: {len(pending)} of {self.num_chunks} chunks are "
                f"not written yet (first: {pending[0]})"
            )
        hashes = {IDS_FILE: sha256_file(self._path / IDS_FILE)}
        if hashes[IDS_FILE] != self._manifest["ids"]["sha256"]:
            raise StoreCorruptError(
                f"{self._path / IDS_FILE}: changed since the store was created; "
                f"delete {self._path} and rerun the featurisation"
            )
        damaged: set[int] = set()
        for name, (shape, dtype) in self._arrays.items():
            _check_npy(self._path / f"{name}.npy", (self.n, *shape), dtype)
            hashes[f"{name}.npy"], bad = self._scan(name)
            damaged |= bad
        if damaged:
            for chunk in damaged:
                del self._done[chunk]
            self._write_progress()
            raise StoreCorruptError(
                f"{self._path}: chunks {sorted(damaged)} no longer match the checksums recorded "
                "when they were written (the files were changed afterwards); they are marked "
                "pending again: rerun the featurisation to recompute them"
            )
        manifest = {**self._manifest, "complete": True, "sha256": hashes}
        write_json(self._path / MANIFEST_FILE, manifest)
        self._manifest = manifest
        self._writable = False

    # ------------------------------------------------------------------ reading

    def array(self, name: str) -> np.ndarray:
        """Return array ``name`` as a read-only ``(N, *shape)`` memmap.

        Raises:
            KeyError: No such array (the message lists the store's arrays).
        """
        if name not in self._arrays:
            raise KeyError(f"no array {name!r} in {self._path}; it has {sorted(self._arrays)}")
        return np.load(self._path / f"{name}.npy", mmap_mode="r")

    def describe(self) -> dict[str, Any]:
        """Return a JSON-serialisable summary.

        Returns:
            ``{"path", "n", "chunk_size", "num_chunks", "chunks_done", "complete", "arrays":
            {name: {"shape": [N, ...], "dtype"}}, "bytes", "settings"}``; ``bytes`` is the size
            of the array data.
        """
        arrays = {
            name: {"shape": [self.n, *shape], "dtype": dtype.name}
            for name, (shape, dtype) in self._arrays.items()
        }
        return {
            "path": str(self._path),
            "n": self.n,
            "chunk_size": self.chunk_size,
            "num_chunks": self.num_chunks,
            "chunks_done": self.num_chunks - len(self.pending_chunks()),
            "complete": self.complete,
            "arrays": arrays,
            "bytes": sum(
                self.n * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                for shape, dtype in self._arrays.values()
            ),
            "settings": self.settings,
        }

    # ------------------------------------------------------------------ internals

    def _verify(self) -> None:
        """Hash every file of a complete store against the SHA-256 that finalize() recorded."""
        for file, digest in sorted(self._manifest["sha256"].items()):
            if sha256_file(self._path / file) != digest:
                raise StoreCorruptError(
                    f"{self._path / file}: contents do not match the SHA-256 in {MANIFEST_FILE}; "
                    f"the store is damaged: delete {self._path} and rerun the featurisation"
                )

    def _prepare(
        self, chunk: int, rows: int, values: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Check every value before anything is written; return them contiguous, in store dtype."""
        if set(values) != set(self._arrays):
            raise ValueError(
                f"write_chunk({chunk}) needs exactly the arrays {sorted(self._arrays)}, "
                f"got {sorted(values)}"
            )
        prepared = {}
        for name, (shape, dtype) in self._arrays.items():
            value = np.asarray(values[name])
            if value.shape != (rows, *shape):
                raise ValueError(
                    f"write_chunk({chunk}): {name!r} has shape {value.shape}, "
                    f"expected {(rows, *shape)}"
                )
            if not np.can_cast(value.dtype, dtype, "same_kind"):
                raise ValueError(
                    f"write_chunk({chunk}): {name!r} has dtype {value.dtype}, "
                    f"which does not cast to the store's {dtype}"
                )
            prepared[name] = np.ascontiguousarray(value, dtype=dtype)
        return prepared

    def _scan(self, name: str) -> tuple[str, set[int]]:
        """Hash array ``name`` in one pass; return its SHA-256 and the chunks whose CRC differs."""
        digest = hashlib.sha256()
        damaged = set()
        shape, dtype = self._arrays[name]
        row_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        with open(self._path / f"{name}.npy", "rb") as handle:
            digest.update(handle.read(self._offsets[name]))
            for chunk in range(self.num_chunks):
                rows = self.chunk_slice(chunk)
                remaining = (rows.stop - rows.start) * row_bytes
                crc = 0
                while remaining > 0:
                    block = handle.read(min(remaining, _READ_BLOCK))
                    if not block:
                        break
                    crc = zlib.crc32(block, crc)
                    digest.update(block)
                    remaining -= len(block)
                if crc != self._done[chunk][name]:
                    damaged.add(chunk)
        return digest.hexdigest(), damaged

    def _write_progress(self) -> None:
        doc = {
            "format": PROGRESS_FORMAT,
            "checksum": "crc32",
            "chunks": {str(c): self._done[c] for c in sorted(self._done)},
        }
        # Compact: the file is rewritten after every chunk.
        text = json.dumps(doc, separators=(",", ":")) + "\n"
        atomic_write(self._path / PROGRESS_FILE, lambda tmp: tmp.write_text(text))


# ---------------------------------------------------------------------- argument checks


def _normalise_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(settings, Mapping):
        raise ConfigError(f"settings must be a dict, found {type(settings).__name__}")
    try:
        return json.loads(json.dumps(dict(settings), sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"settings must be JSON-serialisable without NaN/inf: {err}") from err


def _normalise_ids(ids: np.ndarray | Sequence[int]) -> np.ndarray:
    array = np.asarray(ids)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise DataError(f"ids must be a 1-D sequence of integers, found {array.dtype}{array.shape}")
    if array.size == 0:
        raise DataError("a feature store needs at least one sample id")
    if array.dtype.kind == "u" and array.max() > np.iinfo(np.int64).max:
        raise DataError(f"sample id {array.max()} does not fit in int64")
    array = array.astype(np.int64)
    unique, counts = np.unique(array, return_counts=True)
    if len(unique) != len(array):
        raise DataError(f"ids must be unique; sample id {unique[counts > 1][0]} repeats")
    return array


def _normalise_arrays(
    arrays: Mapping[str, tuple[Sequence[int], DTypeLike]],
) -> dict[str, ArraySpec]:
    if not isinstance(arrays, Mapping) or not arrays:
        raise ConfigError("arrays must be a non-empty dict of name -> (shape, dtype)")
    specs = {}
    for name, spec in arrays.items():
        if not isinstance(name, str) or not _NAME.match(name) or name == "ids":
            raise ConfigError(
                f"array name {name!r} is invalid: use a letter then letters, digits, '_' or '-' "
                "(and not 'ids')"
            )
        try:
            shape, dtype_like = spec
            shape = tuple(shape)
            if dtype_like is None:  # np.dtype(None) would silently mean float64
                raise TypeError("no dtype")
            dtype = np.dtype(dtype_like)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"arrays[{name!r}]={spec!r} is invalid: expected (shape, dtype)"
            ) from err
        if not all(
            isinstance(d, int | np.integer) and not isinstance(d, bool) and d >= 1 for d in shape
        ):
            raise ConfigError(
                f"arrays[{name!r}] shape {shape} is invalid: dimensions must be integers >= 1"
            )
        if dtype.kind not in "biufc":
            raise ConfigError(
                f"arrays[{name!r}] dtype {dtype} is invalid: must be bool, int, uint, float or "
                "complex"
            )
        # Native byte order: the name ("float32") is what the manifest records.
        specs[name] = (tuple(int(d) for d in shape), np.dtype(dtype.name))
    return specs


def _check_reusable(path: Path, specs: dict[str, ArraySpec]) -> None:
    """Allow creation in a missing or empty directory, or over an interrupted creation."""
    if not path.is_dir():
        return
    ours = {IDS_FILE, PROGRESS_FILE} | {f"{name}.npy" for name in specs}
    foreign = sorted(
        entry.name
        for entry in path.iterdir()
        if entry.name not in ours and not _is_temporary(entry.name)
    )
    if foreign:
        raise StoreError(
            f"{path}: directory is not empty and is not a feature store (no {MANIFEST_FILE}; "
            f"found {', '.join(foreign[:3])}); choose another path or empty it"
        )


# ---------------------------------------------------------------------- files


def _manifest_doc(
    settings: dict[str, Any],
    ids: np.ndarray,
    specs: dict[str, ArraySpec],
    chunk_size: int,
    ids_sha256: str,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "diffattr_version": __version__,
        "settings": settings,
        "ids": {"file": IDS_FILE, "sha256": ids_sha256},
        "n": len(ids),
        "chunk_size": chunk_size,
        "arrays": {
            name: {"file": f"{name}.npy", "shape": [len(ids), *shape], "dtype": dtype.name}
            for name, (shape, dtype) in specs.items()
        },
        "complete": False,
    }


def _read_manifest(path: Path) -> dict[str, Any]:
    doc = path / MANIFEST_FILE
    try:
        manifest = read_json(doc)
    except ValueError as err:
        raise StoreCorruptError(f"{err}; delete {path} and rerun the featurisation") from err
    problem = format_problem(manifest, doc, FORMAT, FORMAT_VERSION)
    if problem:
        raise StoreError(problem)
    return manifest


def _read_progress(path: Path, num_chunks: int, names: list[str]) -> dict[int, dict[str, int]]:
    """Return chunk -> array -> CRC-32 of the finished chunks; a missing file means none."""
    file = path / PROGRESS_FILE
    try:
        doc = read_json(file)
    except FileNotFoundError:
        return {}
    except (ValueError, OSError) as err:
        raise StoreCorruptError(
            f"{file}: unreadable progress record ({err}); delete {file} to recompute every "
            f"chunk, or {path} to start over"
        ) from err
    try:
        if doc["format"] != PROGRESS_FORMAT or doc["checksum"] != "crc32":
            raise ValueError(f"format {doc['format']!r}, checksum {doc['checksum']!r}")
        done = {}
        for key, sums in doc["chunks"].items():
            chunk = int(key)
            if str(chunk) != key or not 0 <= chunk < num_chunks:
                raise ValueError(f"chunk {key!r} out of range")
            if sorted(sums) != sorted(names) or not all(type(v) is int for v in sums.values()):
                raise ValueError(f"chunk {key}: bad checksums {sums!r}")
            done[chunk] = {name: sums[name] for name in names}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise StoreCorruptError(
            f"{file}: malformed progress record ({err}); delete {file} to recompute every "
            f"chunk, or {path} to start over"
        ) from err
    return done


def _missing(path: Path) -> str:
    """Describe how many chunks an incomplete store lacks, for error messages."""
    try:
        manifest = _read_manifest(path)
        num_chunks = -(-int(manifest["n"]) // int(manifest["chunk_size"]))
        done = _read_progress(path, num_chunks, list(manifest["arrays"]))
    except (StoreError, KeyError, TypeError, ValueError):
        return "progress unknown"
    missing = num_chunks - len(done)
    if missing == 0:
        return f"all {num_chunks} chunks written but not finalised"
    return f"{missing} of {num_chunks} chunks missing"


def _check_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Check a .npy file's header and size against the manifest; return its data offset."""
    hint = f"the store is damaged: delete {path.parent} and rerun the featurisation"
    if not path.is_file():
        raise StoreCorruptError(f"{path}: missing; {hint}")
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                found, fortran, found_dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                found, fortran, found_dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f".npy version {version} is not supported")
            offset = handle.tell()
    except (ValueError, OSError, SyntaxError) as err:
        raise StoreCorruptError(f"{path}: unreadable .npy header ({err}); {hint}") from err
    if tuple(found) != shape or found_dtype != dtype or fortran:
        raise StoreCorruptError(
            f"{path}: holds {found_dtype} {tuple(found)}, the manifest says {dtype} {shape}; {hint}"
        )
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise StoreCorruptError(f"{path}: {size} bytes, expected {expected} (truncated?); {hint}")
    return offset


def _is_temporary(name: str) -> bool:
    """Whether ``name`` is an atomic_write temporary of a store file."""
    prefixes = (f".{MANIFEST_FILE}.", f".{PROGRESS_FILE}.", f".{IDS_FILE}.")
    return name.startswith(prefixes) and name.endswith(".tmp")


def _remove_stale_temporaries(path: Path) -> None:
    # Left by a killed process; safe to remove because a store has a single writer.
    for entry in path.iterdir():
        if _is_temporary(entry.name):
            entry.unlink(missing_ok=True)


# ---------------------------------------------------------------------- mismatch messages


def _differences(
    store: FeatureStore,
    *,
    settings: dict[str, Any],
    ids: np.ndarray,
    arrays: dict[str, ArraySpec],
    chunk_size: int,
) -> list[str]:
    """List every way an existing store differs from the requested one, as dotted keys."""
    differences = _diff(store._manifest["settings"], settings, "")
    ids_difference = _ids_difference(store.ids, ids)
    if ids_difference:
        differences.append(ids_difference)
    requested = _manifest_doc(settings, ids, arrays, chunk_size, "")
    for key in ("arrays", "chunk_size"):
        differences += _diff(store._manifest[key], requested[key], key)
    return differences


def _diff(stored: Any, requested: Any, key: str) -> list[str]:
    """Describe differences between two JSON values, recursing into objects."""
    if isinstance(stored, dict) and isinstance(requested, dict):
        differences = []
        for name in sorted(set(stored) | set(requested)):
            sub = f"{key}.{name}" if key else str(name)
            if name not in stored or name not in requested:
                differences.append(
                    f"{sub}: store has {_show(stored, name)}, requested {_show(requested, name)}"
                )
            else:
                differences += _diff(stored[name], requested[name], sub)
        return differences
    # JSON text comparison: 1, 1.0 and true differ although Python finds them equal.
    if json.dumps(stored, sort_keys=True) == json.dumps(requested, sort_keys=True):
        return []
    return [
        f"{key or 'settings'}: store has {_show_value(stored)}, requested {_show_value(requested)}"
    ]


def _show(doc: dict[str, Any], name: str) -> str:
    return _show_value(doc[name]) if name in doc else "no such key"


def _show_value(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    if len(text) > _MAX_VALUE_CHARS:
        text = text[: _MAX_VALUE_CHARS - 3] + "..."
    return text


def _ids_difference(stored: np.ndarray, requested: np.ndarray) -> str | None:
    if len(stored) != len(requested):
        return f"ids: store has {len(stored)} sample ids, requested {len(requested)}"
    differ = np.flatnonzero(stored != requested)
    if len(differ) == 0:
        return None
    first = int(differ[0])
    what = (
        "the same samples in another order"
        if np.array_equal(np.sort(stored), np.sort(requested))
        else "other samples"
    )
    return (
        f"ids: {what}, {len(differ)} positions differ (first at row {first}: store has "
        f"{stored[first]}, requested {requested[first]})"
    )
