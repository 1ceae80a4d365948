"""The projections' random numbers: a counter-based integer hash, the same on every device.

A projection matrix ``P`` (see :mod:`diffattr.features._projection`) is never drawn from a torch
random generator: every entry is a pure function of (seed, row, column) computed by a
counter-based integer hash, so the same seed gives the same matrix on the CPU and on CUDA, for any
block size, batch split or order in which blocks are made, and each block is generated directly
on the gradients' device (no p x k matrix crosses a bus).

The hash stream (name in :data:`GENERATOR`; a store records it): for an index ``n`` and a 32-bit
key, ``index_hash(key, n) = mix(mix((n mod 2**32) ^ key) ^ (n >> 32))`` with ``mix`` the lowbias32
integer finaliser (xorshift 16, multiply 0x21F0AAAD, xorshift 15, multiply 0xD35A2D97,
xorshift 15, all mod 2**32). Entry hashes are ``mix(index_hash(row_key, i) ^ index_hash(slot_key,
q))`` for row ``i`` and column slot ``q``; the two keys are ``derive_seed(seed, "projection",
domain, "rows" | "slots") mod 2**32`` with domain ``"gaussian"``, ``"rademacher"`` or ``"sparse"``.
Arithmetic is done on int64 tensors holding values below 2**32; each multiplier is used through
its representative in [-2**31, 2**31), so no product ever leaves the int64 range and the bits are
the same on every device.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Literal

import torch
from torch import Tensor

from diffattr._seed import derive_seed

__all__ = ["GENERATOR", "Distribution", "dense_block", "sparse_buckets"]

#: Name of the integer hash stream; change it whenever the numbers it produces change.
GENERATOR = "lowbias32-v1"

Distribution = Literal["gaussian", "rademacher"]

_MASK32 = 0xFFFFFFFF
_UNIFORM_BITS = 24
# int64 values per generation tile. On the CPU: cache-sized, and below torch's intra-op grain size
# (32768) so that each op runs on one thread (see _for_each_tile); elsewhere large, as per-kernel
# launch cost dominates on accelerators.
_CPU_CHUNK = 32767
_DEVICE_CHUNK = 1 << 24


def _signed32(constant: int) -> int:
    """The representative of ``constant`` mod 2**32 in [-2**31, 2**31).

    For x in [0, 2**32) the product ``x * _signed32(c)`` lies strictly inside the int64 range and
    is congruent to ``x * c`` mod 2**32, so a multiplication is one int64 multiply and a mask.
    """
    return constant - (1 << 32) if constant >= (1 << 31) else constant


_MUL1 = _signed32(0x21F0AAAD)
_MUL2 = _signed32(0xD35A2D97)


def _mix32_(x: Tensor, tmp: Tensor) -> Tensor:
    """Apply the lowbias32 finaliser in place to int64 values in [0, 2**32); ``tmp`` is scratch."""
    torch.bitwise_right_shift(x, 16, out=tmp)
    x.bitwise_xor_(tmp)
    x.mul_(_MUL1).bitwise_and_(_MASK32)
    torch.bitwise_right_shift(x, 15, out=tmp)
    x.bitwise_xor_(tmp)
    x.mul_(_MUL2).bitwise_and_(_MASK32)
    torch.bitwise_right_shift(x, 15, out=tmp)
    return x.bitwise_xor_(tmp)


@lru_cache(maxsize=64)
def _keys(seed: int, domain: str) -> tuple[int, int]:
    """The 32-bit (row key, slot key) of one seed and hash domain."""
    return (
        derive_seed(seed, "projection", domain, "rows") & _MASK32,
        derive_seed(seed, "projection", domain, "slots") & _MASK32,
    )


def _index_hashes(key: int, index: Tensor) -> Tensor:
    """Hash non-negative int64 indices (rows or slots) under a 32-bit key, elementwise."""
    hashes = torch.bitwise_and(index, _MASK32).bitwise_xor_(key)
    scratch = torch.empty_like(hashes)
    _mix32_(hashes, scratch).bitwise_xor_(torch.bitwise_right_shift(index, 32))
    return _mix32_(hashes, scratch)


def _entry_hashes(seed: int, domain: str, rows: Tensor, slots: Tensor) -> Tensor:
    """The 32-bit hashes of every (row, slot) pair.

    Args:
        seed: The projection seed.
        domain: ``"gaussian"``, ``"rademacher"`` or ``"sparse"``.
        rows: (n,) non-negative int64 row indices.
        slots: (m,) non-negative int64 slot indices, on the same device.

    Returns:
        (n, m) int64 tensor of values in [0, 2**32).
    """
    row_key, slot_key = _keys(seed, domain)
    combined = _index_hashes(row_key, rows)[:, None] ^ _index_hashes(slot_key, slots)[None, :]
    return _mix32_(combined, torch.empty_like(combined))


def _rows_tensor(rows: range | Tensor, device: torch.device) -> Tensor:
    """Row indices as a (n,) int64 tensor on ``device``; negative indices are an error."""
    if isinstance(rows, range):
        if len(rows) and min(rows[0], rows[-1]) < 0:
            raise ValueError(f"row indices must be >= 0, got {rows}")
        return torch.arange(rows.start, rows.stop, rows.step, dtype=torch.int64, device=device)
    index = rows.to(device=device, dtype=torch.int64).reshape(-1)
    if index.numel() and int(index.min()) < 0:
        raise ValueError("row indices must be >= 0")
    return index


Tile = tuple[int, int, int, int]


def _tiles(num_rows: int, width: int, per_column: int, device: torch.device) -> list[Tile]:
    """Split (num_rows x width) hash columns into tiles of at most one chunk of int64 values.

    Args:
        num_rows: Rows to generate.
        width: Hash columns per row.
        per_column: int64 values held per hash column (32 for the Rademacher bits).
        device: The generation device, which sets the chunk size.

    Returns:
        ``(row_start, row_stop, column_start, column_stop)`` tiles covering everything.
    """
    budget = _CPU_CHUNK if device.type == "cpu" else _DEVICE_CHUNK
    columns = max(1, min(width, budget // per_column))
    rows = max(1, budget // (columns * per_column))
    return [
        (r, min(r + rows, num_rows), c, min(c + columns, width))
        for r in range(0, num_rows, rows)
        for c in range(0, width, columns)
    ]


def _for_each_tile(
    tiles: list[Tile], make_worker: Callable[[], Callable[[Tile], None]], device: torch.device
) -> None:
    """Run ``make_worker()(tile)`` over the tiles; on the CPU, on torch's number of threads.

    A CPU tile is below torch's intra-op grain size, so each op runs on one thread: the tiles are
    shared out to Python threads instead (torch releases the GIL in its kernels). Many small ops
    split by intra-op threads would each end in a barrier, which stalls badly whenever another
    process holds a core.
    """
    threads = min(torch.get_num_threads(), len(tiles)) if device.type == "cpu" else 1
    if threads <= 1:
        work = make_worker()
        for tile in tiles:
            work(tile)
        return
    pending, lock = iter(tiles), threading.Lock()

    def drain() -> None:
        work = make_worker()  # its own scratch buffers
        while True:
            with lock:
                tile = next(pending, None)
            if tile is None:
                return
            work(tile)

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(drain) for _ in range(threads)]:
            future.result()


def _scratch(
    tiles: list[Tile], per_column: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A flat buffer large enough for any tile's (rows, columns, per_column) values."""
    size = max((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in tiles) * per_column
    return torch.empty(size, dtype=dtype, device=device)


def _fill_gaussian(out: Tensor, seed: int, rows: Tensor) -> None:
    """Write N(0, 1/k) entries of ``rows`` into ``out`` (n, k), float32 or float64.

    Pair m (m < ceil(k/2)) takes a uniform u in (0, 1] from slot 2m and an angle from slot 2m+1,
    both from the top 24 bits of their hashes; Box-Muller gives column m = r cos(angle) and column
    ceil(k/2) + m = r sin(angle) with r = sqrt(-2 ln u / k). Both values are used, so each entry
    costs one hash.
    """
    n, k = out.shape
    pairs = (k + 1) // 2
    rest = k - pairs  # columns that take a sine
    row_key, slot_key = _keys(seed, "gaussian")
    slot_hashes = _index_hashes(slot_key, torch.arange(2 * pairs, device=out.device))
    radius_slots, angle_slots = slot_hashes[0::2], slot_hashes[1::2]
    row_hashes = _index_hashes(row_key, rows)[:, None]
    tiles = _tiles(n, pairs, 1, out.device)
    drop = 32 - _UNIFORM_BITS

    def make_worker() -> Callable[[Tile], None]:
        ints = [_scratch(tiles, 1, torch.int64, out.device) for _ in range(3)]
        floats = [_scratch(tiles, 1, out.dtype, out.device) for _ in range(2)]

        def work(tile: Tile) -> None:
            r0, r1, c0, c1 = tile
            shape, size = (r1 - r0, c1 - c0), (r1 - r0) * (c1 - c0)
            r_bits, a_bits, tmp = (buffer[:size].view(shape) for buffer in ints)
            radius, angle = (buffer[:size].view(shape) for buffer in floats)
            torch.bitwise_xor(row_hashes[r0:r1], radius_slots[c0:c1], out=r_bits)
            _mix32_(r_bits, tmp)
            torch.bitwise_xor(row_hashes[r0:r1], angle_slots[c0:c1], out=a_bits)
            _mix32_(a_bits, tmp)
            # ln u, u = 1 - b / 2**24 in (0, 1]: exact in float32, never 0, so ln u <= 0 is finite.
            radius.copy_(r_bits.bitwise_right_shift_(drop)).mul_(-(2.0**-_UNIFORM_BITS))
            radius.add_(1.0).log_().mul_(-2.0 / k).sqrt_()
            angle.copy_(a_bits.bitwise_right_shift_(drop)).mul_(2.0 * math.pi * 2.0**-_UNIFORM_BITS)
            torch.cos(angle, out=out[r0:r1, c0:c1]).mul_(radius)
            if c0 < rest:
                end = min(c1, rest) - c0
                sines = out[r0:r1, pairs + c0 : pairs + c0 + end]
                torch.sin(angle[:, :end], out=sines).mul_(radius[:, :end])

        return work

    _for_each_tile(tiles, make_worker, out.device)


def _fill_rademacher(out: Tensor, seed: int, rows: Tensor) -> None:
    """Write +-1/sqrt(k) entries of ``rows`` into ``out`` (n, k), float32 or float64.

    Column j takes bit j % 32 of the hash of slot j // 32; a set bit is the negative sign.
    """
    n, k = out.shape
    words = (k + 31) // 32
    row_key, slot_key = _keys(seed, "rademacher")
    slot_hashes = _index_hashes(slot_key, torch.arange(words, device=out.device))
    row_hashes = _index_hashes(row_key, rows)[:, None]
    shifts = torch.arange(32, device=out.device)
    # Hash a whole tile at once, then unpack its bits in parts of at most a tile of values.
    tiles = _tiles(n, words, 1, out.device)
    # 0-dim scale in the output dtype: a float64 matrix holds the float64 1/sqrt(k).
    scale = torch.tensor(1.0 / math.sqrt(k), dtype=out.dtype, device=out.device)

    def make_worker() -> Callable[[Tile], None]:
        hashes, tmp = (_scratch(tiles, 1, torch.int64, out.device) for _ in range(2))
        shapes = {(r1 - r0, c1 - c0) for r0, r1, c0, c1 in tiles}
        parts = [part for shape in shapes for part in _tiles(*shape, 32, out.device)]
        bits = _scratch(parts, 32, torch.int64, out.device)
        signs = _scratch(parts, 32, torch.int8, out.device)

        def work(tile: Tile) -> None:
            r0, r1, c0, c1 = tile
            h = hashes[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            torch.bitwise_xor(row_hashes[r0:r1], slot_hashes[c0:c1], out=h)
            _mix32_(h, tmp[: h.numel()].view(h.shape))
            for p0, p1, q0, q1 in _tiles(r1 - r0, c1 - c0, 32, out.device):
                m, w = p1 - p0, q1 - q0
                part_bits = bits[: m * w * 32].view(m, w, 32)
                torch.bitwise_right_shift(h[p0:p1, q0:q1, None], shifts, out=part_bits)
                # The signs as int8 (1 - 2 * bit), converted once into the output.
                sign = signs[: m * w * 32].view(m, w * 32)
                sign.copy_(part_bits.view(m, w * 32)).bitwise_and_(1).mul_(-2).add_(1)
                first = 32 * (c0 + q0)
                target = out[r0 + p0 : r0 + p1, first : min(first + 32 * w, k)]
                torch.mul(sign[:, : target.shape[1]], scale, out=target)

        return work

    _for_each_tile(tiles, make_worker, out.device)


def dense_block(
    seed: int,
    rows: range | Tensor,
    k: int,
    distribution: Distribution,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Return rows ``rows`` of the dense projection matrix P (p x k) of ``seed``.

    Entry (i, j) depends only on (seed, i, j, k, distribution): not on p, the device or which
    other rows are made with it. Gaussian entries are N(0, 1/k) (Box-Muller from 24-bit hashed
    uniforms), Rademacher entries exactly +-1/sqrt(k) (one hash bit each). The numbers are made
    in float64 for a float64 ``dtype`` and in float32 otherwise.

    Args:
        seed: The projection seed (``ProjectionConfig.seed``).
        rows: Row indices i >= 0: a ``range`` or a 1-D integer tensor.
        k: The projection dimension (number of columns), >= 1.
        distribution: ``"gaussian"`` or ``"rademacher"``.
        dtype: Floating dtype of the result.
        device: Device to generate on; default the CPU, or ``out``'s device.
        out: Optional (len(rows), k) float32/float64 tensor to fill (its dtype and device win).

    Returns:
        (len(rows), k) tensor of P's entries.

    Raises:
        ValueError: For k < 1, negative row indices, an unknown distribution or a bad ``out``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    fill = {"gaussian": _fill_gaussian, "rademacher": _fill_rademacher}.get(distribution)
    if fill is None:
        raise ValueError(f"distribution must be 'gaussian' or 'rademacher', got {distribution!r}")
    if out is not None:
        device = out.device
    index = _rows_tensor(rows, torch.device("cpu" if device is None else device))
    if out is not None:
        if out.shape != (len(index), k) or out.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"out must be a ({len(index)}, {k}) float32/float64 tensor, "
                f"got {tuple(out.shape)} {out.dtype}"
            )
        fill(out, seed, index)
        return out
    work = torch.float64 if dtype == torch.float64 else torch.float32
    block = torch.empty((len(index), k), dtype=work, device=index.device)
    fill(block, seed, index)
    return block.to(dtype)


def sparse_buckets(
    seed: int, coords: range | Tensor, k: int, nnz: int, *, device: str | torch.device = "cpu"
) -> tuple[Tensor, Tensor]:
    """The sparse projection's buckets and signs for some coordinates.

    Coordinate i's m-th non-zero (m < nnz) has hash h of (i, slot m): bucket (h >> 1) mod k,
    negative sign when h is odd. It depends only on (seed, i, m, k).

    Args:
        seed: The projection seed.
        coords: Coordinate indices i >= 0: a ``range`` or a 1-D integer tensor.
        k: The projection dimension.
        nnz: Non-zeros per coordinate.
        device: Device to generate on.

    Returns:
        ``(buckets, negative)``: (n, nnz) int64 buckets in [0, k) and (n, nnz) bool sign bits.
    """
    device = torch.device(device)
    slots = torch.arange(nnz, device=device)
    hashes = _entry_hashes(seed, "sparse", _rows_tensor(coords, device), slots)
    return torch.bitwise_right_shift(hashes, 1) % k, (hashes & 1).bool()
