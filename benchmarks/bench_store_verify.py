"""What verifying a finished feature store on every opening costs, on a synthetic store of ~1 GB.

    .venv/bin/python benchmarks/bench_store_verify.py [--gb 1] [--repeats 3] [--dir /tmp]

Writes a store shaped like the engine's (``features`` (N, 1, 1024) float32, which is nearly all
of it, and the small ``losses``, ``grad_norms`` and ``residuals`` of 10 plan steps) into a fresh
temporary directory, finalises it, and times, best of ``--repeats``:

- opening without hashing (headers and sizes only: what an opening cost before verification);
- ``FeatureStore.open``, which hashes every file against its recorded SHA-256, with the files in
  the page cache ("warm") and evicted from it first with ``posix_fadvise(DONTNEED)`` ("cold"; in
  a virtual machine the host may still serve them from its own cache);
- reading the features once (a sum over the memmap), what any scoring of the store pays anyway;
- SHA-256 and zlib CRC-32 over the features file alone, the throughput of the two checks.

The store is deleted at the end. Numbers depend on the CPU (SHA-NI) and the disk; run it on an
idle machine for figures to quote.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffattr.features._store import FeatureStore

K = 1024  # projection dimension: 4 KiB of float32 features per image
STEPS = 10  # plan steps of the small per-step arrays
CHUNK = 8192  # rows per chunk (32 MiB of features)
BLOCK = 1 << 24  # bytes per read of the raw checksums


def build_store(path: Path, n: int) -> FeatureStore:
    """Write and finalise a store of n random rows; print how long that took."""
    arrays = {
        "features": ((1, K), "float32"),
        "losses": ((STEPS,), "float32"),
        "grad_norms": ((STEPS,), "float32"),
        "residuals": ((STEPS, 1), "float32"),
    }
    store = FeatureStore.create_or_resume(
        path, settings={"bench": "store-verify"}, ids=np.arange(n), arrays=arrays, chunk_size=CHUNK
    )
    rng = np.random.default_rng(0)
    began = time.perf_counter()
    for chunk in store.pending_chunks():
        rows = store.chunk_slice(chunk)
        count = rows.stop - rows.start
        values = {
            name: rng.standard_normal((count, *shape), dtype=np.float32)
            for name, (shape, _) in arrays.items()
        }
        store.write_chunk(chunk, values)
    written = time.perf_counter() - began
    began = time.perf_counter()
    store.finalize()
    print(f"wrote {n} rows in {written:.1f} s; finalize (CRC-32 + SHA-256) {_since(began)}")
    return store


def evict(path: Path) -> None:
    """Drop the store's files from the page cache, so the next read comes from the disk."""
    for file in path.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def best(
    repeats: int, run: Callable[[], object], before: Callable[[], None] | None = None
) -> float:
    """The fastest of ``repeats`` timed calls of ``run``, each after ``before``."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return min(times)


def checksum(file: Path, update: Callable[[memoryview], None]) -> None:
    """Feed a file to ``update`` in blocks of ``BLOCK`` bytes."""
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            update(memoryview(block))


def sha256(file: Path) -> str:
    """The hex SHA-256 of a file."""
    digest = hashlib.sha256()
    checksum(file, digest.update)
    return digest.hexdigest()


def crc32(file: Path) -> int:
    """The zlib CRC-32 of a file."""
    value = 0

    def update(block: memoryview) -> None:
        nonlocal value
        value = zlib.crc32(block, value)

    checksum(file, update)
    return value


def _since(began: float) -> str:
    return f"{time.perf_counter() - began:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="store size in GB (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (default: 3)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the store")
    args = parser.parse_args()
    n = int(args.gb * 1e9) // (K * 4)
    path = Path(tempfile.mkdtemp(prefix="diffattr-store-verify-", dir=args.dir))
    try:
        store = build_store(path / "store", n)
        size = sum(f.stat().st_size for f in store.path.iterdir()) / 1e9
        features = store.path / "features.npy"
        feature_gb = features.stat().st_size / 1e9
        rows = [
            (
                "open, headers only (before)",
                size,
                best(args.repeats, lambda: FeatureStore._load(store.path, writable=False)),
            ),
            (
                "open, verified, warm cache",
                size,
                best(args.repeats, lambda: FeatureStore.open(store.path)),
            ),
            (
                "open, verified, cold cache",
                size,
                best(
                    args.repeats, lambda: FeatureStore.open(store.path), lambda: evict(store.path)
                ),
            ),
            (
                "read all features once (warm)",
                feature_gb,
                best(args.repeats, lambda: float(store.array("features").sum(dtype=np.float64))),
            ),
            (
                "SHA-256 of features.npy (warm)",
                feature_gb,
                best(args.repeats, lambda: sha256(features)),
            ),
            (
                "CRC-32 of features.npy (warm)",
                feature_gb,
                best(args.repeats, lambda: crc32(features)),
            ),
        ]
        print(f"\nstore: {size:.3f} GB in {store.num_chunks} chunks, {os.cpu_count()} CPUs")
        print(f"{'step':34s} {'GB':>6s} {'seconds':>8s} {'GB/s':>6s}")
        for name, gb, seconds in rows:
            print(f"{name:34s} {gb:6.3f} {seconds:8.3f} {gb / seconds:6.2f}")
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
