r"""NDA: nonparametric, patch-level, multiscale data attribution.

No model is needed: the attribution reads the weights of the optimal denoiser of the empirical
(patch) distribution of the training set (docs/methods.md, section "NDA: attribution without
the model").

**Definition.** Let ``x`` be a query image (C, H, W) in [-1, 1], ``z_1..z_N`` the training images,
``abar_t`` the DDPM ``alphas_cumprod`` of the scheduler, ``k`` the (odd) patch size, ``r = k // 2``
and ``m`` the mask value. For every timestep ``t`` and noise draw ``d``:

- ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps`` with ``eps ~ N(0, I)`` drawn (float32, on the
  CPU) from ``diffattr._seed.generator(seed, "nda-noise", t, d, query_id)``, so a query's noise
  depends on its sample id only, never on which other queries are scored with it.
- Keys are the scaled training images ``sqrt(abar_t) z_n``; every image (noised query and scaled
  keys) is padded with the constant ``m`` *after* the scaling.
- Fine scale: ``a_p`` is the ``k x k`` patch of ``x_t`` centred at pixel ``p = (i, j)`` (rows
  ``i - r .. i + r``, columns likewise, all channels), and ``b_{n,q}`` the same patch of key ``n``
  at pixel ``q``; ``p`` and ``q`` range over all ``H W`` pixels.
- Coarse scale: the ``2k x 2k`` patch with top-left corner ``(i - k, j - k)`` passed through the
  orthonormal 2x2 block projection (each non-overlapping 2x2 block of the patch, per channel,
  becomes the sum of its 4 entries / 2), giving a ``k x k x C`` patch, at every pixel, for the
  query and every key.
- At each scale, one softmax per query patch ``p`` over all training images and positions
  jointly::

      W_t(p; n, q) = exp(l(p; n, q)) / sum_{n', q'} exp(l(p; n', q')),
      l(p; n, q)   = -||a_p - b_{n,q}||^2 / (2 (1 - abar_t)).

- ``tau_scale(x, z_n) = sum_p TopK_q W_t(p; n, q)``: the sum of the ``top_k`` largest weights of
  image ``n`` over its positions ``q`` (all of them when ``top_k`` is None or ``>= H W``: then
  ``sum_n tau_fine = H W`` exactly, every query patch spending a unit of weight).
- ``tau_t = alpha tau_fine + (1 - alpha) tau_coarse``, and the score is the mean of ``tau_t`` over
  the timesteps and noise draws. Scores are non-negative; a larger score means the training image
  explains more of the query (the project's sign convention: positive helps).

**Computation.** Exact, in one pass over the training set, never forming a patch-distance
matrix:

- ``||a - b||^2 = ||a||^2 + ||b||^2 - 2 <a, b>``. ``||a_p||^2`` is the same for every ``(n, q)``
  of a query patch, so it cancels in the softmax and is never computed; the logits used are
  ``(<a_p, b_{n,q}> - ||b_{n,q}||^2 / 2) / (1 - abar_t)``, which differ from ``l`` by a constant
  per ``p``.
- The cross terms ``<a_p, b_{n,q}>`` for all ``p`` and ``q`` are one convolution of the padded
  keys with the query's patches as kernels (weight ``(H W, C, k, k)``; several queries and draws
  are stacked along the output channels): ``conv2d`` on CUDA (TF32 off), and on the CPU the same
  convolution as one explicit im2col GEMM with the norm term as one more depth, which is faster
  there (the im2col of the keys is built once per timestep when it fits a quarter of
  ``max_memory_mb``, else per chunk).
- The key norms ``||b_{n,q}||^2`` are a box filter (``conv2d`` of the squared keys with ones) over
  the whole training set, computed once per timestep and reused by every query and draw.
- The coarse scale runs on 2x2-pooled images: the projection of the ``2k x 2k`` patch at pixel
  ``(i, j)`` is the ``k x k`` window at ``(i // 2, j // 2)`` of the image pooled (sum / 2) in
  phase ``(i mod 2, j mod 2)``, so four pooled images (one per phase) give every stride-1 position
  exactly, with ``k x k`` kernels: the cost of the fine scale, not four times it.
- The top-K needs no selection with indices: each (query patch, image) row of logits is sorted
  (numpy's vectorised sort in place on the CPU; a partition for rows over 512 positions), its
  top-K are then its last K entries, and one exp pass gives both the row's total and its top-K
  sum. Exact, ties included (any K equal values have the same sum); with ``top_k`` None or
  ``>= H W`` nothing is sorted.
- The training set is processed in chunks sized from ``max_memory_mb`` (on the CPU, tiles of
  about 1 MB of logits, shared out to ``torch.get_num_threads()`` worker threads whose torch ops
  run single-threaded). Per query patch the pass keeps, per image ``n``, the log-sum-exp of all
  its logits and of its top-K; the normaliser is the log-sum-exp of the first table, and the
  top-K sum of weights is ``exp(top-K log-sum - normaliser)``, so the chunked softmax is exact and
  does not depend on the chunking or on the number of workers.
- Inside each log-sum-exp, terms below ``exp(-83)`` (float32; ``exp(-704)`` in float64) times
  the largest are raised to that floor, which keeps ``exp`` off its slow subnormal path; the
  relative change of a sum is below ``Q exp(-83) < 1e-32``, far under rounding.

Memory: besides the per-chunk tensors (bounded by ``max_memory_mb``), each timestep holds the
scaled, padded and pooled training images and their norms (about 5 times the training set; 20-30
times with their im2col), and each query row being scored two ``(H W, N)`` tables of log-sums,
which the one-pass algorithm keeps until the normaliser is final. :func:`estimate_nda`
(``diffattr plan --method nda``) gives the bytes and a measured time per query for a given N,
image size and settings.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from tqdm.auto import tqdm

from diffattr._config import check_fields, is_int, known_fields
from diffattr._device import resolve_device
from diffattr._probe import measure
from diffattr._seed import generator
from diffattr.data import ImageDataset
from diffattr.errors import ConfigError, DataError
from diffattr.methods._scores import Scores
from diffattr.models import DiffusionTask, default_scheduler_config

__all__ = [
    "NDAConfig",
    "NDAPlanEstimate",
    "estimate_nda",
    "nda_heatmaps",
    "nda_scores",
]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _is_real(value: object) -> bool:
    return (
        isinstance(value, int | float | np.integer | np.floating)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class NDAConfig:
    """NDA settings: patch size, top-K, scale weights, timesteps and the memory budget."""

    patch_size: int = field(
        default=3, metadata={"help": "side k of the fine-scale patches (odd; coarse: 2k x 2k)"}
    )
    top_k: int | None = field(
        default=100,
        metadata={"help": "sum the top-K weights of each image per query patch (None: all)"},
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "weight of the fine scale in [0, 1] (1: fine only, 0: coarse only)"},
    )
    mask_value: float = field(
        default=10.0, metadata={"help": "constant m for patch entries outside the image"}
    )
    timesteps: tuple[int, ...] = field(
        default=(100, 200, 300, 400, 500),
        metadata={"help": "diffusion timesteps whose scores are averaged"},
    )
    noise_draws: int = field(default=1, metadata={"help": "noise draws per timestep"})
    seed: int = field(default=0, metadata={"help": "root seed of the query noise"})
    max_memory_mb: int = field(
        default=512,
        metadata={"help": "budget for the per-chunk tensors; sizes training chunks and batches"},
    )
    dtype: Literal["float32", "float64"] = field(
        default="float32", metadata={"help": "compute precision (float64 for small timesteps)"}
    )

    def __post_init__(self) -> None:
        timesteps = self.timesteps
        timesteps_ok = (
            isinstance(timesteps, list | tuple)
            and len(timesteps) > 0
            and all(is_int(t) and t >= 0 for t in timesteps)
            and len(set(timesteps)) == len(timesteps)
        )
        checks = {
            "patch_size": is_int(self.patch_size)
            and self.patch_size >= 1
            and self.patch_size % 2 == 1,
            "top_k": self.top_k is None or (is_int(self.top_k) and self.top_k >= 1),
            "alpha": _is_real(self.alpha) and 0 <= self.alpha <= 1,
            "mask_value": _is_real(self.mask_value),
            "timesteps": timesteps_ok,
            "noise_draws": is_int(self.noise_draws) and self.noise_draws >= 1,
            "seed": is_int(self.seed),
            "max_memory_mb": is_int(self.max_memory_mb) and self.max_memory_mb >= 1,
            "dtype": self.dtype in _DTYPES,
        }
        allowed = {
            "patch_size": "an odd int >= 1",
            "top_k": "None or an int >= 1",
            "alpha": "a number in [0, 1]",
            "mask_value": "a finite number",
            "timesteps": "a non-empty list of distinct ints >= 0",
            "noise_draws": "an int >= 1",
            "seed": "an int",
            "max_memory_mb": "an int >= 1",
            "dtype": f"one of {sorted(_DTYPES)}",
        }
        check_fields(self, checks, allowed)
        # Normalise (frozen, so through object.__setattr__): JSON lists and numpy scalars in,
        # plain Python values out, so that to_dict / from_dict round-trips compare equal.
        object.__setattr__(self, "timesteps", tuple(int(t) for t in timesteps))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "mask_value", float(self.mask_value))
        for name in ("patch_size", "noise_draws", "seed", "max_memory_mb"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.top_k is not None:
            object.__setattr__(self, "top_k", int(self.top_k))

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict."""
        data = asdict(self)
        data["timesteps"] = list(self.timesteps)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NDAConfig:
        """Rebuild settings from :meth:`to_dict` output; unknown keys are an error."""
        return cls(**known_fields(cls, data))


# --------------------------------------------------------------------------------------------
# Patch geometry: a scale is a list of "planes" (images on which a valid k x k conv gives some
# of the H*W positions). The fine scale has one plane, in raster order; the coarse scale has
# one per pooling phase, so its positions come phase by phase (the scores do not depend on the
# order; the heatmaps, fine-scale only, use raster order).

#: Pooling phases (row offset, column offset) of the coarse scale.
_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


def _fine_planes(images: torch.Tensor, k: int, m: float) -> list[torch.Tensor]:
    """The image padded by k // 2 with m: its valid k x k windows are the centred patches."""
    r = k // 2
    return [F.pad(images, (r, r, r, r), value=m)]


def _coarse_planes(images: torch.Tensor, k: int, m: float) -> list[torch.Tensor]:
    """Pooled (2x2 sum / 2) images in the four phases; empty phases (H or W = 1) are skipped.

    The projected 2k x 2k patch with top-left (i - k, j - k) is the k x k window at
    (i // 2, j // 2) of the phase (i % 2, j % 2) plane: padding by k puts image row i - k + 2u at
    padded row i + 2u = (i % 2) + 2 (i // 2 + u).
    """
    height, width = images.shape[-2:]
    padded = F.pad(images, (k, k, k, k), value=m)
    planes = []
    for ph, pw in _PHASES:
        rows, cols = (height - ph + 1) // 2, (width - pw + 1) // 2
        if rows == 0 or cols == 0:
            continue
        window = padded[..., ph : ph + 2 * (rows + k - 1), pw : pw + 2 * (cols + k - 1)]
        # avg_pool2d divides the block sum by 4; times 2 is the orthonormal sum / 2 (exactly:
        # both are powers of two).
        planes.append(F.avg_pool2d(window, 2) * 2)
    return planes


def _planes(scale: str, images: torch.Tensor, k: int, m: float) -> list[torch.Tensor]:
    return _fine_planes(images, k, m) if scale == "fine" else _coarse_planes(images, k, m)


def _patches(planes: list[torch.Tensor], k: int) -> torch.Tensor:
    """(R, C, h, w) planes -> (R * P, C, k, k) patches, query-major, positions in plane order."""
    channels = planes[0].shape[1]
    unfolded = torch.cat([F.unfold(plane, k) for plane in planes], dim=2)  # (R, C k k, P)
    return unfolded.transpose(1, 2).reshape(-1, channels, k, k)


@contextmanager
def _ieee_convolutions(device: torch.device) -> Iterator[None]:
    """Run cuDNN float32 convolutions in full precision (no TF32) on CUDA.

    TF32 keeps 10 mantissa bits: with patch norms in the hundreds (the mask value m enters
    squared) and temperatures near 0.1 it would move logits by whole units.
    """
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


@dataclass(frozen=True, slots=True)
class _Keys:
    """One scale's keys at one timestep for the whole training set (reused by every query)."""

    planes: list[torch.Tensor]  # (N, C, h, w) each
    half_norms: torch.Tensor  # (N, Q): ||b_{n,q}||^2 / 2, positions in plane order
    columns: torch.Tensor | None = None  # (C k k + 1, N Q) from _key_columns, when kept


def _keys(scale: str, scaled: torch.Tensor, k: int, m: float, keep_columns: bool = False) -> _Keys:
    planes = _planes(scale, scaled, k, m)
    ones = torch.ones((1, scaled.shape[1], k, k), dtype=scaled.dtype, device=scaled.device)
    # Box filter of the squared keys: ||b_{n,q}||^2 at every position in one conv per plane,
    # once per timestep for the whole training set.
    with _ieee_convolutions(scaled.device):
        norms = [F.conv2d(plane * plane, ones).flatten(1) for plane in planes]
    keys = _Keys(planes=planes, half_norms=torch.cat(norms, dim=1) * 0.5)
    if not keep_columns:
        return keys
    # The GEMM operand of every chunk, built once per timestep instead of once per query batch.
    return replace(keys, columns=_key_columns(keys, 0, len(scaled), k))


def _columns(plane: torch.Tensor, k: int) -> torch.Tensor:
    """(Nc, C, h, w) -> (C k k, Nc, (h - k + 1) (w - k + 1)): every k x k window, im2col.

    A strided view and one copy: 5-10 times faster than ``F.unfold`` on the CPU.
    """
    windows = plane.unfold(2, k, 1).unfold(3, k, 1)  # (Nc, C, h', w', k, k), a view
    depth = plane.shape[1] * k * k
    return windows.permute(1, 4, 5, 0, 2, 3).reshape(depth, plane.shape[0], -1)


def _key_columns(keys: _Keys, start: int, stop: int, k: int) -> torch.Tensor:
    """(C k k + 1, Nc Q): the chunk's key windows (im2col), then their half norms as a last row.

    Times :func:`_query_rows` this is the logits in one plain GEMM: the norm term rides along
    as one more depth instead of ``addmm``'s broadcast bias, which halves the GEMM's time at
    these shapes (depth 9-27; measured). A view of the kept columns where ``keys`` has them.
    """
    if keys.columns is not None:
        positions = keys.half_norms.shape[1]
        return keys.columns[:, start * positions : stop * positions]
    columns = torch.cat([_columns(plane[start:stop], k) for plane in keys.planes], dim=2)
    half_norms = keys.half_norms[start:stop].reshape(1, -1)
    return torch.cat([columns.reshape(columns.shape[0], -1), half_norms])


def _query_rows(weight: torch.Tensor, inv_var: float) -> torch.Tensor:
    """(R P, C k k + 1): each query patch, then -1, all times 1 / (1 - abar)."""
    flat = weight.reshape(weight.shape[0], -1)
    return torch.cat([flat, flat.new_full((flat.shape[0], 1), -1.0)], dim=1).mul_(inv_var)


#: Device types whose cross terms run as an explicit im2col GEMM rather than conv2d, split into
#: tiles shared out to worker threads.
_GEMM_DEVICE_TYPES = ("cpu",)


def _logits(
    weight: torch.Tensor, keys: _Keys, start: int, stop: int, inv_var: float
) -> torch.Tensor:
    """(R * P, Nc, Q) logits (<a_p, b_{n,q}> - ||b_{n,q}||^2 / 2) / (1 - abar) of a key chunk.

    The cross terms <a_p, b_{n,q}> are the chunk's key planes convolved with the query patches
    as kernels. On CUDA that is ``conv2d`` (weight ``(R * P, C, k, k)``). On the CPU the same
    convolution runs as one explicit im2col GEMM fused with the norm term
    (:func:`_query_rows` times :func:`_key_columns`): oneDNN's conv2d is 1.5-8 times slower at
    these shapes (1-3 input channels, hundreds of output channels; measured on the digits), and
    the coarse scale's four phases then share one GEMM instead of concatenating four conv
    outputs.
    """
    rows, k = weight.shape[0], weight.shape[-1]
    if weight.device.type in _GEMM_DEVICE_TYPES:
        logits = _query_rows(weight, inv_var) @ _key_columns(keys, start, stop, k)
        return logits.view(rows, stop - start, -1)
    planes = [plane[start:stop] for plane in keys.planes]
    with _ieee_convolutions(weight.device):
        parts = [F.conv2d(plane, weight).flatten(2) for plane in planes]
    cross = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # (Nc, R * P, Q)
    return cross.transpose(0, 1).sub_(keys.half_norms[start:stop][None]).mul_(inv_var)


def _exp_floor(dtype: torch.dtype) -> float:
    """-83.3 in float32, -704.4 in float64: exp of it is still a normal number."""
    return math.log(torch.finfo(dtype).tiny) + 4.0


#: Device types whose rows numpy rearranges in place: its vectorised sorting networks and
#: selection (AVX-512 or AVX2) move a row's K largest logits to its end 10-25 times faster than
#: ``torch.topk`` on this CPU (0.7 ns per logit for rows of 256, 1.2 ns for 1024; measured).
_NUMPY_SORT_DEVICE_TYPES = ("cpu",)

#: Rows longer than this are partitioned rather than sorted: numpy's sort was twice as fast as
#: its partition for rows of 64-512 logits, its partition faster from 1024 (measured).
_SORT_MAX_POSITIONS = 512


def _top_last_(values: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` with each row's ``top_k`` largest moved to its end, and each row's maximum.

    Rows are along the last dimension. In place where numpy does it (a sort, or a partition for
    long rows); elsewhere a sort.
    """
    if values.device.type not in _NUMPY_SORT_DEVICE_TYPES:
        values = values.sort(dim=-1).values
        return values, values[..., -1].clone()
    rows = values.numpy()
    positions = rows.shape[-1]
    if positions > _SORT_MAX_POSITIONS:
        rows.partition(positions - top_k, axis=-1)
        return values, values[..., -top_k:].amax(dim=-1)
    rows.sort(axis=-1)
    # A copy: the caller shifts the rows by it in place.
    return values, values[..., -1].clone()


def _image_sums_(logits: torch.Tensor, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, image): the log-sum-exp of its Q logits and of its ``top_k`` largest.

    ``logits`` (rows, Nc, Q) is overwritten. For a top-K each row is first rearranged so that
    its top-K are its last K entries (:func:`_top_last_`; ties need no care: any K of equal
    values have the same sum), and one exp pass then gives both sums: the top-K costs a sort
    instead of a selection with indices (``torch.topk``, which took 85% of the time). With
    ``top_k`` None the two results are the same tensor.

    The shifted values are floored at :func:`_exp_floor` before ``exp``: below it ``exp`` takes
    its subnormal path, about 25 times slower on CPUs, and every floored term adds less than
    ``exp(floor) < 1e-35`` to a sum that the peak alone makes >= 1, so the sums are unchanged
    to rounding (the relative change is at most ``Q exp(floor)``).
    """
    if top_k is None:
        peak = logits.amax(dim=-1)
    else:
        logits, peak = _top_last_(logits, top_k)
    weights = logits.sub_(peak[..., None]).clamp_(min=_exp_floor(logits.dtype)).exp_()
    per_image = weights.sum(dim=-1).log_().add_(peak)
    if top_k is None:
        return per_image, per_image
    return per_image, weights[..., -top_k:].sum(dim=-1).log_().add_(peak)


@dataclass(frozen=True, slots=True)
class _Layout:
    """How a pass is cut up, from :func:`_plan`."""

    batch: int  # query rows (query, draw) per batch
    chunk: int  # training images per chunk
    tile_rows: int  # query patches per GEMM tile (CPU)
    workers: int  # threads sharing the chunks (CPU)
    keep_columns: bool  # build each timestep's key columns once for every batch (CPU)


@contextmanager
def _cpu_workers(device: torch.device) -> Iterator[int]:
    """Yield the number of worker threads for a run; torch ops are single-threaded meanwhile.

    On the CPU the workers are torch's intra-op threads (``torch.set_num_threads``,
    ``OMP_NUM_THREADS``), each running whole tiles with single-threaded ops: torch releases the
    GIL in its kernels and numpy in its sort. Intra-op threads split every op and meet at a
    barrier after it, which stalls whenever another process holds a core (measured on a shared
    2-core machine: NDA with 2 intra-op threads ran 5-10 times slower than with 1), and their
    idle threads spin between ops, taking CPU from the workers. Other devices use one worker.
    """
    if device.type not in _GEMM_DEVICE_TYPES:
        yield 1
        return
    workers = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield workers
    finally:
        torch.set_num_threads(workers)


def _run_workers(
    count: int, make_worker: Callable[[], Callable[[int], None]], workers: int
) -> None:
    """Run ``make_worker()(i)`` for ``i < count``, shared out to ``workers`` threads."""
    if workers <= 1:
        work = make_worker()
        for index in range(count):
            work(index)
        return
    pending, lock = iter(range(count)), threading.Lock()

    def drain() -> None:
        work = make_worker()  # its own scratch buffer
        while True:
            with lock:
                index = next(pending, None)
            if index is None:
                return
            work(index)

    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(drain) for _ in range(workers)]:
            future.result()


def _scale_pass(
    weight: torch.Tensor, keys: _Keys, inv_var: float, top_k: int | None, layout: _Layout
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the training set for a stack of query patches.

    Returns:
        ``(lse, top)``: ``lse`` (R * P,) the log-sum-exp of every logit of each query patch,
        ``top`` (R * P, N) the log-sum-exp of image n's top-K logits; ``exp(top - lse)`` is the
        top-K sum of the softmax weights. The top-K log-sums need no normaliser: it is
        subtracted at the end, once the global one (the log-sum-exp of every image's total) is
        known.
    """
    n, positions = keys.half_norms.shape
    rows = weight.shape[0]
    keep = top_k if top_k is not None and top_k < positions else None
    starts = range(0, n, layout.chunk)
    top = torch.empty((rows, n), dtype=weight.dtype, device=weight.device)
    # Each image's log-sum-exp of all its logits, reduced once at the end: the normaliser then
    # does not depend on how the images were chunked or which worker ran which chunk.
    totals = top if keep is None else torch.empty_like(top)

    if weight.device.type not in _GEMM_DEVICE_TYPES:
        for start in starts:
            stop = min(n, start + layout.chunk)
            logits = _logits(weight, keys, start, stop, inv_var)
            totals[:, start:stop], top[:, start:stop] = _image_sums_(logits, keep)
        return torch.logsumexp(totals, dim=1), top

    query = _query_rows(weight, inv_var)
    tile = min(rows, layout.tile_rows)

    def make_worker() -> Callable[[int], None]:
        scratch = weight.new_empty(tile * layout.chunk * positions)

        def work(index: int) -> None:
            start = starts[index]
            stop = min(n, start + layout.chunk)
            columns = _key_columns(keys, start, stop, weight.shape[-1])  # shared by the tiles
            for first in range(0, rows, tile):
                last = min(rows, first + tile)
                out = scratch[: (last - first) * columns.shape[1]].view(last - first, -1)
                logits = torch.mm(query[first:last], columns, out=out)
                sums = _image_sums_(logits.view(last - first, stop - start, -1), keep)
                totals[first:last, start:stop], top[first:last, start:stop] = sums

        return work

    _run_workers(len(starts), make_worker, min(layout.workers, len(starts)))
    return torch.logsumexp(totals, dim=1), top


def _image_shares(lse: torch.Tensor, top: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, N) float64: each image's top-K weight mass, summed over the query patches.

    In float64: the weights of distant images, far below float32's normal range, stay accurate
    (and off the slow subnormal path of exp).
    """
    shares = top.double().sub_(lse.double()[:, None]).exp_()
    return shares.view(rows, -1, top.shape[1]).sum(1)


# --------------------------------------------------------------------------------------------
# Driver


def _schedule(
    config: NDAConfig, scheduler_config: dict[str, Any] | None
) -> tuple[DiffusionTask, list[float]]:
    """The diffusion task and abar_t of each configured timestep; ConfigError outside [0, T)."""
    task = DiffusionTask(scheduler_config or default_scheduler_config())
    total = task.num_train_timesteps
    bad = [t for t in config.timesteps if t >= total]
    if bad:
        raise ConfigError(
            f"NDAConfig.timesteps={list(config.timesteps)} is invalid: timesteps {bad} are "
            f"outside [0, {total}) of the noise schedule"
        )
    return task, [float(task.alphas_cumprod[t]) for t in config.timesteps]


def _check_shapes(queries: ImageDataset, train: ImageDataset) -> None:
    if queries.channels != train.channels or queries.image_size != train.image_size:
        raise DataError(
            f"queries {queries.name!r} have shape {tuple(queries.images.shape[1:])} but training "
            f"images {train.name!r} have {tuple(train.images.shape[1:])}; NDA compares patches "
            "and needs the same channels and image size"
        )


def _noised(
    images: torch.Tensor,
    ids: np.ndarray,
    draws: list[int],
    t: int,
    task: DiffusionTask,
    seed: int,
) -> torch.Tensor:
    """x_t of each (image, draw) row by the task; the noise depends on (seed, t, draw, id) only."""
    noise = torch.stack(
        [
            torch.randn(images.shape[1:], generator=generator(seed, "nda-noise", int(t), d, int(i)))
            for i, d in zip(ids, draws, strict=True)
        ]
    ).to(device=images.device, dtype=images.dtype)
    return task.noised(images, noise, torch.full((len(images),), t))


#: On the CPU each worker's logits tile is kept near L2 cache size whatever the budget: 0.5-1 MB
#: tiles ran 25% faster than 4-16 MB ones, the sort and the exp passes reading from cache
#: (measured on the digits). Other devices use the whole budget.
_CPU_BLOCK_MB = 1

#: On the CPU a batch holds enough query rows for this many query patches, so that a chunk's
#: im2col (depth C k k + 1 per key position) is a small part of its GEMM.
_CPU_BATCH_PATCHES = 256


def _plan(
    config: NDAConfig,
    rows_total: int,
    n_train: int,
    shape: tuple[int, ...],
    device: torch.device,
    workers: int = 1,
) -> _Layout:
    """How to cut a run into batches, chunks and tiles within ``max_memory_mb``."""
    positions = shape[-2] * shape[-1]
    itemsize = torch.finfo(_DTYPES[config.dtype]).bits // 8
    budget = config.max_memory_mb << 20
    most_rows = max(1, min(rows_total, (budget // 2) // _row_table_bytes(config, shape, n_train)))
    if device.type in _GEMM_DEVICE_TYPES:
        block = min(budget // workers, _CPU_BLOCK_MB << 20)
        batch = min(most_rows, -(-_CPU_BATCH_PATCHES // positions))
        # A tile is (query patches, images of the chunk, key positions) logits.
        tile_rows = max(1, min(batch * positions, block // (positions * itemsize)))
        chunk = max(1, min(n_train, block // (tile_rows * positions * itemsize)))
        return _Layout(
            batch=batch,
            chunk=chunk,
            tile_rows=tile_rows,
            workers=workers,
            keep_columns=_columns_bytes(config, shape, n_train) <= budget // 4,
        )
    # Per (query row, training image) in a chunk: the P x Q conv output and the coarse scale's
    # concatenation copy, plus the sorted values and their int64 indices for a top-K.
    pair = positions * positions * 2 * itemsize
    if config.top_k is not None and config.top_k < positions:
        pair += positions * positions * (itemsize + 8)
    # Batch as many query rows as fit (wider convolutions), then fill the budget with images.
    batch = max(1, min(most_rows, budget // pair))
    chunk = max(1, min(n_train, budget // (batch * pair)))
    return _Layout(
        batch=batch, chunk=chunk, tile_rows=batch * positions, workers=1, keep_columns=False
    )


def _columns_bytes(config: NDAConfig, shape: tuple[int, ...], n_train: int) -> int:
    """Bytes of one timestep's key columns (:func:`_key_columns`), both scales."""
    depth = shape[0] * config.patch_size**2 + 1
    itemsize = torch.finfo(_DTYPES[config.dtype]).bits // 8
    return 2 * depth * n_train * shape[-2] * shape[-1] * itemsize


def _row_table_bytes(config: NDAConfig, shape: tuple[int, ...], n_train: int) -> int:
    """Bytes per query row held through a scale pass: the (P, N) tables of its log-sums.

    The top-K and all-position log-sums during the pass (one table without a top-K), then the
    top-K table and its float64 shares.
    """
    positions = shape[-2] * shape[-1]
    itemsize = torch.finfo(_DTYPES[config.dtype]).bits // 8
    return positions * n_train * max(2 * itemsize, itemsize + 8)


def _scales(alpha: float) -> list[tuple[str, float]]:
    return [(s, w) for s, w in (("fine", alpha), ("coarse", 1.0 - alpha)) if w > 0]


def _nda_tau(
    queries: ImageDataset,
    train: ImageDataset,
    config: NDAConfig,
    *,
    scheduler_config: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    **layout: int | bool | None,
) -> tuple[np.ndarray, list[float]]:
    """The NDA scores as float64 (n_query, n_train), and the abar of each timestep.

    ``layout`` overrides fields of the :class:`_Layout` that ``max_memory_mb`` and the CPU's
    threads would choose (None: keep; tests use them to exercise the chunked softmax, the
    tiles, the workers and the per-chunk key columns).
    """
    _check_shapes(queries, train)
    task, abars = _schedule(config, scheduler_config)
    device = resolve_device(device)
    dtype = _DTYPES[config.dtype]
    k, m = config.patch_size, config.mask_value
    scales = _scales(config.alpha)
    draws = config.noise_draws
    # Rows are (query, draw) pairs, query-major; each is one noised query.
    row_query = np.repeat(np.arange(len(queries)), draws)
    row_draw = np.tile(np.arange(draws), len(queries)).tolist()
    rows_total = len(row_query)
    train_images = train.images.to(device=device, dtype=dtype)
    query_images = queries.images.to(device=device, dtype=dtype)
    tau = torch.zeros((len(queries), len(train)), dtype=torch.float64)
    # Counted in (query row, timestep) passes, shown in queries: every batch at every timestep
    # is a share of a query, so the rate and the time left are per query although a query's
    # score is complete only after the last timestep.
    bar = tqdm(
        total=rows_total * len(abars),
        desc="nda",
        unit="query",
        unit_scale=1 / (draws * len(abars)),
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f} queries [{elapsed}<{remaining}, {rate_fmt}]",
        disable=not progress,
    )
    with _cpu_workers(device) as workers:
        plan = _plan(config, rows_total, len(train), train.images.shape[1:], device, workers)
        plan = replace(plan, **{name: v for name, v in layout.items() if v is not None})
        starts = range(0, rows_total, plan.batch)
        for t, abar in zip(config.timesteps, abars, strict=True):
            inv_var = 1.0 / (1.0 - abar)
            # Keys depend on t only: scaled, padded, pooled and their norms once for every query.
            scaled = math.sqrt(abar) * train_images
            keys = {scale: _keys(scale, scaled, k, m, plan.keep_columns) for scale, _ in scales}
            for start in starts:
                sel = row_query[start : start + plan.batch]
                x_t = _noised(
                    query_images[torch.from_numpy(sel).to(device)],
                    queries.ids[sel],
                    row_draw[start : start + plan.batch],
                    t,
                    task,
                    config.seed,
                )
                for scale, weight in scales:
                    patches = _patches(_planes(scale, x_t, k, m), k)
                    lse, top = _scale_pass(patches, keys[scale], inv_var, config.top_k, plan)
                    shares = _image_shares(lse, top, len(sel)).cpu()
                    del top  # before the next scale's pass allocates its tables
                    tau.index_add_(0, torch.from_numpy(sel), shares, alpha=weight)
                bar.update(len(sel))
            del keys, scaled  # before the next timestep's are built
    bar.close()
    tau /= len(abars) * draws
    return tau.numpy(), abars


def nda_scores(
    queries: ImageDataset,
    train: ImageDataset,
    config: NDAConfig | None = None,
    *,
    scheduler_config: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Scores:
    """Score every query against every training image with NDA (see the module docstring).

    Args:
        queries: Query images (e.g. generated samples), (Q, C, H, W) in [-1, 1].
        train: Training images with the same channels and size.
        config: The NDA settings (default: ``NDAConfig()``).
        scheduler_config: diffusers noise-scheduler config giving ``abar_t`` (default:
            :func:`diffattr.models.default_scheduler_config`, DDPM linear betas).
        device: Where to compute ("cpu", "cuda", "auto"...).
        progress: Show a progress bar.

    Returns:
        Scores with method ``"nda"``: ``values[q, n] = tau(x_q, z_n) >= 0``, settings the
        config's :meth:`NDAConfig.to_dict` plus ``alphas_cumprod`` (one per timestep) and
        ``num_train_timesteps``.

    Raises:
        DataError: The queries and training images differ in channels or size.
        ConfigError: A timestep is outside ``[0, T)`` of the noise schedule, or a bad device.
    """
    config = config or NDAConfig()
    values, abars = _nda_tau(
        queries,
        train,
        config,
        scheduler_config=scheduler_config,
        device=device,
        progress=progress,
    )
    settings = {
        **config.to_dict(),
        "alphas_cumprod": abars,
        "num_train_timesteps": _schedule(config, scheduler_config)[0].num_train_timesteps,
    }
    return Scores(
        values=values,
        query_ids=queries.ids,
        train_ids=train.ids,
        method="nda",
        settings=settings,
    )


#: Logits a probe of :func:`estimate_nda` computes per scale (about 0.1 s on one CPU core).
_PROBE_LOGITS = 1 << 25


@dataclass(frozen=True)
class NDAPlanEstimate:
    """What an NDA run will need: bytes, seconds, and what they were derived from."""

    n_train: int
    n_queries: int
    image_shape: tuple[int, int, int]
    device: str
    workers: int
    batch: int
    memory_bytes: dict[str, int]
    seconds: dict[str, float]
    seconds_per_query: float
    probe: dict[str, float]

    @property
    def peak_memory_bytes(self) -> int:
        """The sum of the resident pieces (an upper bound: not all live at once)."""
        return sum(self.memory_bytes.values())

    @property
    def total_seconds(self) -> float:
        """Expected time of the whole run."""
        return sum(self.seconds.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            **asdict(self),
            "image_shape": list(self.image_shape),
            "peak_memory_bytes": self.peak_memory_bytes,
            "total_seconds": self.total_seconds,
        }


def estimate_nda(
    n_train: int,
    image_shape: tuple[int, int, int],
    config: NDAConfig | None = None,
    *,
    n_queries: int = 1,
    scheduler_config: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    repeats: int = 2,
) -> NDAPlanEstimate:
    """Estimate the memory and time of scoring ``n_queries`` queries against ``n_train`` images.

    Memory follows from the shapes and the run's layout (:func:`_plan`). Time comes from a short
    probe on ``device`` with random images: one timestep's keys and one batch of query rows
    scored against a subset of the training set sized to about ``2^25`` logits per scale, timed
    after a warm-up (fastest of ``repeats``), then scaled linearly to ``n_train`` images (the
    pass is linear in N: ``benchmarks/bench_nda.py --scale`` measures it), the timesteps and
    the noise draws.

    Args:
        n_train: Training images N.
        image_shape: (C, H, W).
        config: The NDA settings (default: ``NDAConfig()``).
        n_queries: Query images.
        scheduler_config: As for :func:`nda_scores`.
        device: Where the probe runs, and the run would (CPU: on torch's threads).
        repeats: Timed repetitions of the probe.

    Raises:
        ConfigError: Bad counts or shape, a timestep outside the schedule, or a bad device.
    """
    config = config or NDAConfig()
    if not (
        is_int(n_train)
        and n_train >= 1
        and is_int(n_queries)
        and n_queries >= 1
        and len(image_shape) == 3
        and all(is_int(d) and d >= 1 for d in image_shape)
    ):
        raise ConfigError(
            f"n_train={n_train!r}, n_queries={n_queries!r} and image_shape={image_shape!r} are "
            "invalid: counts must be ints >= 1 and the shape three ints >= 1 (C, H, W)"
        )
    abar = _schedule(config, scheduler_config)[1][0]
    device = resolve_device(device)
    dtype = _DTYPES[config.dtype]
    itemsize = torch.finfo(dtype).bits // 8
    channels, height, width = image_shape
    positions = height * width
    k, m = config.patch_size, config.mask_value
    scales = _scales(config.alpha)
    rows_total = n_queries * config.noise_draws
    draw = torch.Generator().manual_seed(0)
    with _cpu_workers(device) as workers:
        layout = _plan(config, rows_total, n_train, image_shape, device, workers)
        n_probe = min(
            n_train, max(layout.chunk * layout.workers, -(-_PROBE_LOGITS // positions**2))
        )
        rows = min(layout.batch, rows_total)
        train = (torch.rand((n_probe, *image_shape), generator=draw) * 2 - 1).to(device, dtype)
        x_t = (torch.rand((rows, *image_shape), generator=draw) * 2 - 1).to(device, dtype)
        inv_var = 1.0 / (1.0 - abar)

        def build_keys() -> dict[str, _Keys]:
            scaled = math.sqrt(abar) * train
            return {scale: _keys(scale, scaled, k, m, layout.keep_columns) for scale, _ in scales}

        keys = build_keys()

        def score() -> None:
            for scale, _ in scales:
                patches = _patches(_planes(scale, x_t, k, m), k)
                _image_shares(
                    *_scale_pass(patches, keys[scale], inv_var, config.top_k, layout), rows
                )

        keys_seconds = measure(build_keys, repeats, device).seconds
        score_seconds = measure(score, repeats, device).seconds
    per_image = len(config.timesteps) * n_train / n_probe
    seconds_per_query = score_seconds / rows * config.noise_draws * per_image
    # Per training image, one timestep's keys: the scaled image, and at each scale the padded
    # (pooled) planes, the norms and, where kept, the GEMM columns.
    one = torch.zeros((1, *image_shape), dtype=dtype)
    depth = channels * k * k + 1
    key_values = channels * positions + sum(
        sum(plane.numel() for plane in _planes(scale, one, k, m))
        + positions
        + (depth * positions if layout.keep_columns else 0)
        for scale, _ in scales
    )
    tile = layout.tile_rows * layout.chunk * positions
    chunk_columns = 0 if layout.keep_columns else depth * layout.chunk * positions
    return NDAPlanEstimate(
        n_train=n_train,
        n_queries=n_queries,
        image_shape=(channels, height, width),
        device=str(device),
        workers=layout.workers,
        batch=layout.batch,
        memory_bytes={
            "training images": n_train * channels * positions * itemsize,
            "keys (one timestep)": n_train * key_values * itemsize,
            "score tables (a batch)": layout.batch * _row_table_bytes(config, image_shape, n_train),
            "logit tiles": layout.workers * (tile + chunk_columns) * itemsize,
            "scores": n_queries * n_train * 8,
        },
        seconds={
            "keys": keys_seconds * per_image,
            "queries": seconds_per_query * n_queries,
        },
        seconds_per_query=seconds_per_query,
        probe={
            "training_images": n_probe,
            "query_rows": rows,
            "seconds_keys": keys_seconds,
            "seconds_scoring": score_seconds,
        },
    )


def _position(dataset: ImageDataset, sample_id: int, what: str) -> int:
    found = np.flatnonzero(dataset.ids == sample_id)
    if len(found) == 0:
        raise DataError(f"{what} id {sample_id} is not in dataset {dataset.name!r}")
    return int(found[0])


def nda_heatmaps(
    queries: ImageDataset,
    train: ImageDataset,
    query_id: int,
    train_id: int,
    config: NDAConfig | None = None,
    *,
    scheduler_config: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Fine-scale spatial attribution of one query to one training image.

    The weights are normalised over the whole training set (the same chunked pass as
    :func:`nda_scores`), then read for image ``train_id``; both maps are averaged over the
    timesteps and noise draws.

    Args:
        queries: Dataset holding the query.
        train: The training set (all of it: it sets the softmax normaliser).
        query_id: Sample id of the query in ``queries``.
        train_id: Sample id of the training image in ``train``.
        config: The NDA settings (``alpha`` is ignored: the maps are fine-scale).
        scheduler_config: As for :func:`nda_scores`.
        device: Where to compute.

    Returns:
        ``(query_map, train_map)``, each (H, W) float64 and non-negative.
        ``query_map[p]`` is the top-K weight mass image ``train_id`` takes at query patch ``p``
        (which query pixels that image explains; it sums to the image's fine-scale score), and
        ``train_map[q] = sum_p W(p; train_id, q)`` (where in the training image the matching
        patches lie).

    Raises:
        DataError: Unknown sample ids, or mismatched channels / sizes.
        ConfigError: A timestep outside the noise schedule.
    """
    config = config or NDAConfig()
    _check_shapes(queries, train)
    query_pos = _position(queries, query_id, "query")
    target = _position(train, train_id, "training")
    task, abars = _schedule(config, scheduler_config)
    device = resolve_device(device)
    dtype = _DTYPES[config.dtype]
    k, m = config.patch_size, config.mask_value
    height, width = train.image_size
    positions = height * width
    draws = list(range(config.noise_draws))
    train_images = train.images.to(device=device, dtype=dtype)
    query = queries.images[query_pos : query_pos + 1].to(device=device, dtype=dtype)
    query_map = torch.zeros(positions, dtype=torch.float64)
    train_map = torch.zeros(positions, dtype=torch.float64)
    with _cpu_workers(device) as workers:
        layout = _plan(config, len(draws), len(train), train.images.shape[1:], device, workers)
        for t, abar in zip(config.timesteps, abars, strict=True):
            inv_var = 1.0 / (1.0 - abar)
            keys = _keys("fine", math.sqrt(abar) * train_images, k, m, layout.keep_columns)
            x_t = _noised(
                query.expand(len(draws), -1, -1, -1),
                np.full(len(draws), queries.ids[query_pos]),
                draws,
                t,
                task,
                config.seed,
            )
            patches = _patches(_planes("fine", x_t, k, m), k)
            lse, top = _scale_pass(patches, keys, inv_var, config.top_k, layout)
            # Fine-scale positions are in raster order, rows draw-major. The top-K weight mass of
            # the target at each query patch, and each of its positions' weight summed over
            # patches.
            mass = torch.exp(top[:, target].double() - lse.double())
            mass = mass.reshape(len(draws), positions).sum(0)
            logits = _logits(patches, keys, target, target + 1, inv_var)[:, 0].double()
            weights = torch.exp(logits - lse.double()[:, None])
            spread = weights.reshape(len(draws), positions, positions).sum((0, 1))
            query_map += mass.double().cpu()
            train_map += spread.double().cpu()
    scale = len(abars) * len(draws)
    return (
        (query_map / scale).reshape(height, width).numpy(),
        (train_map / scale).reshape(height, width).numpy(),
    )
