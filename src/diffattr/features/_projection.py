"""Random projections of per-sample gradients: dense (Gaussian or Rademacher), sparse JL, identity.

A projection maps a flattened gradient g (p values) to ``P^T g`` (k values). ``P`` is never drawn
from a torch random generator: every entry is a pure function of (seed, row, column) computed by a
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
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from diffattr._config import check_fields, known_fields
from diffattr._seed import derive_seed
from diffattr.errors import ConfigError

__all__ = [
    "GENERATOR",
    "DenseProjector",
    "IdentityProjector",
    "ProjectionConfig",
    "Projector",
    "SparseProjector",
    "dense_block",
    "make_projector",
    "sparse_buckets",
]

#: Name of the integer hash stream; change it whenever the numbers it produces change.
GENERATOR = "lowbias32-v1"

ProjectionKind = Literal["auto", "dense", "sparse", "identity", "kronecker"]
Distribution = Literal["gaussian", "rademacher"]

_MASK32 = 0xFFFFFFFF
_UNIFORM_BITS = 24
# A dense block's size when it is regenerated per call; large enough for an efficient matmul.
_BLOCK_BYTES = 64 << 20
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


@dataclass(frozen=True, kw_only=True, slots=True)
class ProjectionConfig:
    """How per-sample gradients are compressed to ``dim`` features."""

    kind: ProjectionKind = field(
        default="dense",
        metadata={
            "help": "dense random matrix, sparse JL (nnz per coordinate), identity, or "
            "kronecker (per-layer factors P_out (x) P_in; the factored backend's projection); "
            "auto: the backend's (kronecker for factored, dense for vmap; FeatureConfig decides)"
        },
    )
    distribution: Distribution = field(
        default="gaussian",
        metadata={"help": "dense entries: N(0, 1/k) or +-1/sqrt(k) (ignored by sparse/identity)"},
    )
    dim: int = field(default=1024, metadata={"help": "projection dimension k (not for identity)"})
    seed: int = field(default=0, metadata={"help": "seed of the projection matrix"})
    nnz: int = field(default=4, metadata={"help": "sparse: buckets (non-zeros) per coordinate"})
    factored_dim: int = field(
        default=0,
        metadata={
            "help": "kronecker: size of the per-layer factored features before the final "
            "sparse projection to dim (0: 64 x dim; equal to dim: no second stage)"
        },
    )
    max_memory_mb: int = field(
        default=4096,
        metadata={"help": "keep the projection state in memory up to this size, else regenerate"},
    )

    def __post_init__(self) -> None:
        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        checks = {
            "kind": (self.kind in get_args(ProjectionKind), _one_of(ProjectionKind)),
            "distribution": (self.distribution in get_args(Distribution), _one_of(Distribution)),
            "dim": (is_int(self.dim) and self.dim >= 1, "an int >= 1"),
            "seed": (is_int(self.seed), "an int"),
            "nnz": (is_int(self.nnz) and self.nnz >= 1, "an int >= 1"),
            "factored_dim": (
                is_int(self.factored_dim)
                and (
                    self.factored_dim == 0 or (is_int(self.dim) and self.factored_dim >= self.dim)
                ),
                "0 (automatic) or an int >= dim",
            ),
            "max_memory_mb": (
                is_int(self.max_memory_mb) and self.max_memory_mb >= 0,
                "an int >= 0",
            ),
        }
        check_fields(
            self,
            {name: ok for name, (ok, _) in checks.items()},
            {name: allowed for name, (_, allowed) in checks.items()},
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProjectionConfig:
        """Rebuild settings from :meth:`to_dict` output; unknown keys are an error."""
        return cls(**known_fields(cls, data))


def _same_device(held: torch.device, wanted: str | torch.device) -> bool:
    """Whether state on ``held`` serves ``wanted`` (``"cuda"`` with no index: the current GPU)."""
    wanted = torch.device(wanted)
    if held.type != wanted.type:
        return False
    if wanted.index is None and wanted.type == "cuda":
        return held.index == torch.cuda.current_device()
    return wanted.index is None or held.index == wanted.index


def _one_of(literal: object) -> str:
    return "one of " + ", ".join(repr(v) for v in get_args(literal))


class Projector(ABC):
    """Maps (B, p) gradients to (B, k) features with a fixed random linear map.

    Attributes:
        config: The settings it was made from.
        grad_dim: p, the gradient length.
        proj_dim: k, the feature length.
        device: Where :meth:`prepare` builds the cached state; :meth:`project` works on the
            gradients' device whatever this is (rebuilding its state there if needed).
    """

    def __init__(
        self,
        config: ProjectionConfig,
        grad_dim: int,
        proj_dim: int,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(grad_dim, int) or isinstance(grad_dim, bool) or grad_dim < 1:
            raise ConfigError(f"grad_dim={grad_dim!r} is invalid: must be an int >= 1")
        if proj_dim > grad_dim:
            raise ConfigError(
                f"projection dim k={proj_dim} exceeds the number of parameters p={grad_dim}; "
                f"use a smaller ProjectionConfig.dim or kind='identity'"
            )
        self.config = config
        self.grad_dim = grad_dim
        self.proj_dim = proj_dim
        self.device = torch.device(device)

    @abstractmethod
    def project(self, grads: Tensor) -> Tensor:
        """Project gradients.

        Args:
            grads: (B, p) floating tensor on any device.

        Returns:
            (B, k) tensor in ``grads``' dtype and device.

        Raises:
            ValueError: If ``grads`` is not a (B, p) floating tensor.
        """

    def prepare(self, dtype: torch.dtype = torch.float32) -> None:  # noqa: B027
        """Build the cached state (if any) on :attr:`device` now, not on the first call.

        Args:
            dtype: The dtype of the gradients that will be projected.
        """

    def to_dict(self) -> dict[str, Any]:
        """What determines the projection's values (JSON types), e.g. for a store's manifest.

        Memory settings are left out: they change the speed, never the numbers.
        """
        return {"kind": self.config.kind, "grad_dim": self.grad_dim, "proj_dim": self.proj_dim}

    def _check(self, grads: Tensor) -> None:
        if grads.ndim != 2 or grads.shape[1] != self.grad_dim or not grads.is_floating_point():
            raise ValueError(
                f"grads must be a (B, {self.grad_dim}) floating tensor, "
                f"got {tuple(grads.shape)} {grads.dtype}"
            )

    def _fits(self, num_bytes: int) -> bool:
        return num_bytes <= self.config.max_memory_mb << 20


class IdentityProjector(Projector):
    """No projection: features are the gradients themselves (k = p)."""

    def __init__(
        self, config: ProjectionConfig, grad_dim: int, device: str | torch.device = "cpu"
    ) -> None:
        super().__init__(config, grad_dim, grad_dim, device)

    def project(self, grads: Tensor) -> Tensor:
        """Return ``grads`` unchanged ((B, p) -> (B, p))."""
        self._check(grads)
        return grads


class DenseProjector(Projector):
    """``grads @ P`` with P (p x k) from :func:`dense_block`.

    When P fits in ``max_memory_mb`` it is generated once on the gradients' device and kept;
    otherwise it is regenerated block by block on every call, which costs far more than the
    multiply, so callers should pass as many gradient rows per call as memory allows. Both paths
    accumulate ``out += grads[:, rows] @ P[rows]`` over the same row blocks, so they give
    bit-identical results.

    Args:
        config: Settings (kind ``"dense"``).
        grad_dim: p.
        device: Where :meth:`prepare` builds the cached matrix.
        block_rows: Rows of P per block (default: a block of about 64 MB).
    """

    def __init__(
        self,
        config: ProjectionConfig,
        grad_dim: int,
        device: str | torch.device = "cpu",
        *,
        block_rows: int | None = None,
    ) -> None:
        super().__init__(config, grad_dim, config.dim, device)
        if block_rows is not None and block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.block_rows = block_rows or max(1, _BLOCK_BYTES // (4 * config.dim))
        self._matrix: Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """See :meth:`Projector.to_dict`; adds distribution, seed and the generator name."""
        extra = {"distribution": self.config.distribution, "seed": self.config.seed}
        return super().to_dict() | extra | {"generator": GENERATOR}

    def prepare(self, dtype: torch.dtype = torch.float32) -> None:
        """Generate and keep P on :attr:`device` now, when it fits in ``max_memory_mb``."""
        self._cached(self.device, dtype)

    def project(self, grads: Tensor) -> Tensor:
        """Return ``grads @ P``: (B, p) -> (B, k), in ``grads``' dtype and on its device."""
        self._check(grads)
        p, k = self.grad_dim, self.proj_dim
        out = torch.zeros((grads.shape[0], k), dtype=grads.dtype, device=grads.device)
        matrix = self._cached(grads.device, grads.dtype)
        buffer = None
        for start in range(0, p, self.block_rows):
            stop = min(start + self.block_rows, p)
            if matrix is not None:
                block = matrix[start:stop]
            else:
                if buffer is None:
                    work = torch.float64 if grads.dtype == torch.float64 else torch.float32
                    size = (min(self.block_rows, p), k)
                    buffer = torch.empty(size, dtype=work, device=grads.device)
                block = dense_block(
                    self.config.seed,
                    range(start, stop),
                    k,
                    self.config.distribution,
                    out=buffer[: stop - start],
                ).to(grads.dtype)
            out.addmm_(grads[:, start:stop], block)
        return out

    def _cached(self, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        """P on ``device`` in ``dtype``, generated once; None when it does not fit in memory."""
        p, k = self.grad_dim, self.proj_dim
        if not self._fits(p * k * dtype.itemsize):
            return None
        matrix = self._matrix
        if matrix is None or not _same_device(matrix.device, device) or matrix.dtype != dtype:
            self._matrix = None  # free the old copy before making the new one
            matrix = dense_block(
                self.config.seed, range(p), k, self.config.distribution, dtype=dtype, device=device
            )
            self._matrix = matrix
        return matrix


class SparseProjector(Projector):
    """Sparse Johnson-Lindenstrauss projection with ``nnz`` = s non-zeros per coordinate.

    Coordinate i adds sign_m(i) * g_i to bucket b_m(i) for m < s, where the hash h of (i, slot m)
    gives b_m(i) = (h >> 1) mod k and sign_m(i) = -1/sqrt(s) if h is odd else +1/sqrt(s) (buckets
    may coincide). The map is applied as a (k x p) CSR matrix times the gradients, in blocks of
    coordinates; the blocks are kept when they fit in ``max_memory_mb``. ``distribution`` is
    ignored.

    Args:
        config: Settings (kind ``"sparse"``).
        grad_dim: p.
        device: Where :meth:`prepare` builds the cached blocks.
        block_coords: Coordinates per block (default 2**20).
    """

    def __init__(
        self,
        config: ProjectionConfig,
        grad_dim: int,
        device: str | torch.device = "cpu",
        *,
        block_coords: int | None = None,
    ) -> None:
        super().__init__(config, grad_dim, config.dim, device)
        if config.nnz > config.dim:
            raise ConfigError(
                f"ProjectionConfig.nnz={config.nnz} is invalid: must be <= dim={config.dim}"
            )
        if block_coords is not None and block_coords < 1:
            raise ValueError(f"block_coords must be >= 1, got {block_coords}")
        self.block_coords = block_coords or 1 << 20
        self._blocks: list[Tensor] | None = None

    def to_dict(self) -> dict[str, Any]:
        """See :meth:`Projector.to_dict`; adds nnz, seed and the generator name."""
        extra = {"nnz": self.config.nnz, "seed": self.config.seed}
        return super().to_dict() | extra | {"generator": GENERATOR}

    def prepare(self, dtype: torch.dtype = torch.float32) -> None:
        """Build and keep the CSR blocks on :attr:`device` now, when they fit in memory."""
        self._cached(self.device, dtype)

    def project(self, grads: Tensor) -> Tensor:
        """Return the sparse projection: (B, p) -> (B, k), in ``grads``' dtype and device."""
        self._check(grads)
        # Sparse kernels exist for float32 and float64 only; half-precision input goes via float32.
        dtype = grads.dtype if grads.dtype in (torch.float32, torch.float64) else torch.float32
        blocks = self._cached(grads.device, dtype)
        out_t = torch.zeros((self.proj_dim, grads.shape[0]), dtype=dtype, device=grads.device)
        for number, start in enumerate(range(0, self.grad_dim, self.block_coords)):
            stop = min(start + self.block_coords, self.grad_dim)
            if blocks is not None:
                block = blocks[number]
            else:
                block = self._csr_block(start, stop, grads.device, dtype)
            # (k x n) CSR @ (n x B): reads each gradient coordinate once per non-zero.
            out_t += block @ grads[:, start:stop].t().to(dtype)
        return out_t.t().contiguous().to(grads.dtype)

    def _cached(self, device: torch.device, dtype: torch.dtype) -> list[Tensor] | None:
        """All CSR blocks on ``device`` in ``dtype``; None when they do not fit in memory."""
        if not self._fits(self.grad_dim * self.config.nnz * (8 + dtype.itemsize)):
            return None
        blocks = self._blocks
        if blocks is None or not _same_device(blocks[0].device, device) or blocks[0].dtype != dtype:
            self._blocks = None
            blocks = [
                self._csr_block(start, min(start + self.block_coords, self.grad_dim), device, dtype)
                for start in range(0, self.grad_dim, self.block_coords)
            ]
            self._blocks = blocks
        return blocks

    def _csr_block(self, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The (k x (stop - start)) CSR matrix of coordinates [start, stop), built on ``device``."""
        s, k = self.config.nnz, self.proj_dim
        buckets, negative = sparse_buckets(
            self.config.seed, range(start, stop), k, s, device=device
        )
        buckets, negative = buckets.reshape(-1), negative.reshape(-1)
        order = torch.argsort(buckets, stable=True)
        columns = torch.div(order, s, rounding_mode="floor")
        scale = 1.0 / math.sqrt(s)
        values = negative[order].to(dtype).mul_(-2.0).add_(1.0).mul_(scale)
        crow = torch.zeros(k + 1, dtype=torch.int64, device=device)
        torch.cumsum(torch.bincount(buckets, minlength=k), 0, out=crow[1:])
        with warnings.catch_warnings():
            # torch flags CSR tensors as beta; the product used here is stable since torch 2.0.
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*", category=UserWarning)
            return torch.sparse_csr_tensor(
                crow, columns, values, size=(k, stop - start), check_invariants=False
            )


def make_projector(
    config: ProjectionConfig, grad_dim: int, device: str | torch.device = "cpu"
) -> Projector:
    """Return the projector ``config`` describes for gradients of length ``grad_dim``.

    Args:
        config: The projection settings.
        grad_dim: p, the number of selected parameters.
        device: Where the projector's cached state is built by :meth:`Projector.prepare`.

    Returns:
        A :class:`DenseProjector`, :class:`SparseProjector` or :class:`IdentityProjector`.

    Raises:
        ConfigError: If k > p for dense or sparse, nnz > k for sparse, or grad_dim < 1.
    """
    if config.kind == "kronecker":
        raise ConfigError(
            "a kronecker projection follows the model's layers: build it with "
            "KroneckerProjector(KroneckerLayout(model, parameter_names, config))"
        )
    if config.kind == "auto":
        raise ConfigError(
            "projection kind 'auto' is the backend's choice: resolve it with "
            "FeatureConfig.resolve(model), or name a kind"
        )
    if config.kind == "identity":
        return IdentityProjector(config, grad_dim, device)
    if config.kind == "sparse":
        return SparseProjector(config, grad_dim, device)
    return DenseProjector(config, grad_dim, device)
