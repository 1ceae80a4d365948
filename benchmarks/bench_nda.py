"""NDA cost: the fast implementation against two reference formulations, and at N = 50,000.

Run: ``.venv/bin/python benchmarks/bench_nda.py [--sizes 8 16] [--queries 4 1] [--top-k 100 0]
[--threads 0] [--device cpu] [--out benchmarks/results/nda.json]`` (a few minutes on 2 CPU cores),
and ``... bench_nda.py --scale [--scale-n 250 500 1000 2000] [--target-n 50000]`` for the
32x32 RGB row. Both write to ``--out``, each replacing only its own keys (``rows`` and
``args``; ``scale`` and ``scale_args``).

On the digits (the first 1617 images as the training set, the next ones as queries), at each
image size and top-K (0: all positions; a top-K >= H W is the same and is skipped) it times
the same scores three ways (otherwise ``NDAConfig()`` defaults: k = 3, both scales, 5
timesteps, float32 unless ``--dtype``), each in a fresh subprocess:

- ``fast``: :func:`diffattr.methods._nda._nda_tau`: cross terms and norm term in one GEMM
  with the query patches (conv2d off the CPU), key norms by a box filter once per timestep for
  every query, the coarse scale on the four 2x2-pooled phases with k x k kernels, the top-K
  sums from rows sorted by numpy (no ``torch.topk``), cache-sized tiles shared out to
  ``--threads`` worker threads.
- ``naive`` (a reference): no convolution: every k x k (and projected 2k x 2k) patch unfolded,
  per query a full P x (N Q) distance matrix with ``torch.cdist`` (direct differences, no norm
  expansion), in chunks.
- ``unoptimised`` (a reference): the norm expansion with conv2d, but one query at a time, the
  key norms recomputed for every query, and the coarse scale as one conv with 2k x 2k kernels
  (the projected patch lifted back, ``P^T P a``) on the unpooled images: four times the
  multiply-adds.

The two references share one accumulation, the one the fast path used before: per chunk of
images (sized to 16 MB of logits), a log-sum-exp per (query patch, image) and ``torch.topk``
for the top-K. They use torch's intra-op threads (``--threads``). The table gives seconds per
query, the peak memory growth of the run (RSS, from ``getrusage`` in the subprocess, over its
level after loading the data; on CUDA the peak of ``torch.cuda.max_memory_allocated``), the
largest difference of each variant's scores from the fast one relative to the largest score,
and ``speedup_vs_reference``: a reference's seconds over the fast path's in the same run (on the
fast row: against the faster reference). Each variant first runs once on a small problem (one
query, one timestep, 128 training images) so that one-off start-up costs are not timed.

``--floor`` (after a comparison in the same ``--out``) asks how fast an exact fast path could be
on this CPU: on one cache-sized tile of logits (the fast path's tile shape, logits drawn with
the digits' spread) it times, per logit, the passes no exact algorithm skips here: the GEMM
that makes the logits, the exp and sums of the log-sum-exp (every logit enters the image's
total), and, with a top-K, numpy's row sort (the fastest exact selection measured; see the
module's ``_top_last_``). Their sum times the logits of a query is a floor on the fast path's
seconds per query (it leaves out the keys, the tables and the threads' overheads); the table
sets it against a tenth of each case's faster reference from ``--out``.

``--markdown`` prints the tables of the ``--out`` file in Markdown (for benchmarks/README.md).

``--scale`` times the fast path for one query against N random 32x32 RGB training images for
each N in ``--scale-n`` (fresh subprocesses), fits seconds = a + b N, reports how far each
measurement is from the fit (linearity) and the fit at ``--target-n``, next to the estimate of
:func:`diffattr.methods._nda.estimate_nda` (what ``diffattr plan --method nda`` prints).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from diffattr._device import resolve_device
from diffattr.data import ImageDataset, load_digits
from diffattr.methods import _nda
from diffattr.methods._nda import (
    NDAConfig,
    _exp_floor,
    _nda_tau,
    _noised,
    _scales,
    _schedule,
    estimate_nda,
)

N_TRAIN = 1617
VARIANTS = ("fast", "fast-intra-op", "naive", "unoptimised")
REFERENCES = ("naive", "unoptimised")

#: Logits per chunk of the references: the block the fast path used before its tiles.
REFERENCE_BLOCK_MB = 16


# ------------------------------------------------------------------------------ references


def _logsumexp_(values: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp over the last dimension, in place, exp floored off its subnormal path."""
    peak = values.amax(dim=-1, keepdim=True)
    values.sub_(peak).clamp_(min=_exp_floor(values.dtype)).exp_()
    return values.sum(dim=-1).log_().add_(peak.squeeze(-1))


def _reference_chunk(config: NDAConfig, shape: tuple[int, ...]) -> int:
    """Training images per chunk of the references: their (P, Q) logits within the block."""
    positions = shape[-2] * shape[-1]
    itemsize = 4 if config.dtype == "float32" else 8
    return max(1, (REFERENCE_BLOCK_MB << 20) // (positions * positions * 2 * itemsize))


class _Accumulator:
    """Chunked softmax of one query row at one scale: running normaliser and top-K log-sums."""

    def __init__(self, positions: int, n_train: int, like: torch.Tensor) -> None:
        self.lse = torch.full((positions,), -math.inf, dtype=like.dtype, device=like.device)
        self.top = torch.empty((positions, n_train), dtype=like.dtype, device=like.device)

    def add(self, logits: torch.Tensor, start: int, top_k: int | None) -> None:
        """``logits``: (Nc, P, Q) of training images ``start .. start + Nc``."""
        stop = start + logits.shape[0]
        best = None
        if top_k is not None and top_k < logits.shape[2]:
            best = _logsumexp_(logits.topk(top_k, dim=2, sorted=False).values)
        per_image = _logsumexp_(logits)
        self.lse = torch.logaddexp(self.lse, torch.logsumexp(per_image, dim=0))
        self.top[:, start:stop] = (per_image if best is None else best).T

    def shares(self) -> torch.Tensor:
        """(N,) top-K weight mass of each training image, summed over the query patches."""
        return torch.exp(self.top - self.lse[:, None]).sum(0).double().cpu()


def _coarse_patches(images: torch.Tensor, k: int, m: float) -> torch.Tensor:
    """(R, C k k, H W): every 2k x 2k patch (top-left (i - k, j - k)), 2x2-block projected."""
    rows, channels, height, width = images.shape
    padded = F.pad(images, (k, k, k, k), value=m)
    big = F.unfold(padded, 2 * k)  # (R, C 2k 2k, (H + 1) (W + 1))
    big = big.view(rows, channels * 4 * k * k, height + 1, width + 1)[..., :height, :width]
    big = big.reshape(rows, channels, k, 2, k, 2, height * width)
    return big.sum(dim=(3, 5)).reshape(rows, channels * k * k, height * width) / 2


def _fine_patches(images: torch.Tensor, k: int, m: float) -> torch.Tensor:
    """(R, C k k, H W): every centred k x k patch."""
    r = k // 2
    return F.unfold(F.pad(images, (r, r, r, r), value=m), k)


def _rows(queries: ImageDataset, config: NDAConfig) -> list[tuple[int, int]]:
    return [(q, d) for q in range(len(queries)) for d in range(config.noise_draws)]


# ------------------------------------------------------------------------------ naive


def naive_tau(
    queries: ImageDataset, train: ImageDataset, config: NDAConfig, device: torch.device
) -> np.ndarray:
    """Unfolded patches and a full cdist distance matrix per query row, in chunks."""
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    k, m = config.patch_size, config.mask_value
    train_images = train.images.to(device, dtype)
    shape = tuple(train.images.shape[1:])
    positions = shape[1] * shape[2]
    chunk = _reference_chunk(config, shape)
    tau = torch.zeros((len(queries), len(train)), dtype=torch.float64)
    unfold = {"fine": _fine_patches, "coarse": _coarse_patches}
    task, abars = _schedule(config, None)
    for t, abar in zip(config.timesteps, abars, strict=True):
        scaled = math.sqrt(abar) * train_images
        # (N, Q, D) key patches of each scale, once per timestep.
        keys = {s: unfold[s](scaled, k, m).transpose(1, 2) for s, _ in _scales(config.alpha)}
        for q, d in _rows(queries, config):
            image = queries.images[q : q + 1].to(device, dtype)
            x_t = _noised(image, queries.ids[q : q + 1], [d], t, task, config.seed)
            for scale, weight in _scales(config.alpha):
                patches = unfold[scale](x_t, k, m)[0].T  # (P, D)
                acc = _Accumulator(positions, len(train), patches)
                for start in range(0, len(train), chunk):
                    block = keys[scale][start : start + chunk]
                    distances = torch.cdist(
                        patches,
                        block.reshape(-1, block.shape[2]),
                        compute_mode="donot_use_mm_for_euclid_dist",
                    ).square_()
                    logits = distances.mul_(-0.5 / (1 - abar)).view(positions, len(block), -1)
                    acc.add(logits.transpose(0, 1), start, config.top_k)
                tau[q] += weight * acc.shares()
    return (tau / (len(config.timesteps) * config.noise_draws)).numpy()


# ------------------------------------------------------------------------------ unoptimised


def unoptimised_tau(
    queries: ImageDataset, train: ImageDataset, config: NDAConfig, device: torch.device
) -> np.ndarray:
    """The expansion with conv2d, one query at a time, norms per query, 2k x 2k coarse kernels."""
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    k, m = config.patch_size, config.mask_value
    r = k // 2
    train_images = train.images.to(device, dtype)
    channels, height, width = train.images.shape[1:]
    positions = height * width
    chunk = _reference_chunk(config, (channels, height, width))
    tau = torch.zeros((len(queries), len(train)), dtype=torch.float64)
    ones = torch.ones((1, channels, k, k), dtype=dtype, device=device)
    task, abars = _schedule(config, None)
    for t, abar in zip(config.timesteps, abars, strict=True):
        for q, d in _rows(queries, config):
            image = queries.images[q : q + 1].to(device, dtype)
            x_t = _noised(image, queries.ids[q : q + 1], [d], t, task, config.seed)
            # Recomputed for every query: the padded keys and their norms.
            scaled = math.sqrt(abar) * train_images
            fine_keys = F.pad(scaled, (r, r, r, r), value=m)
            coarse_keys = F.pad(scaled, (k, k, k, k), value=m)
            fine_norms = F.conv2d(fine_keys * fine_keys, ones).flatten(1)
            # ||P b||^2: squared block sums / 4, summed over the k x k blocks (dilation 2).
            blocks = F.avg_pool2d(coarse_keys, 2, stride=1) * 2
            coarse_norms = F.conv2d(blocks * blocks, ones, dilation=2)[..., :height, :width]
            coarse_norms = coarse_norms.flatten(1)
            fine = _fine_patches(x_t, k, m)[0].T  # (P, C k k)
            projected = _coarse_patches(x_t, k, m)[0].T
            # P^T P a: each projected entry / 2 spread over its 2x2 block -> 2k x 2k kernels.
            lifted = projected.reshape(positions, channels, k, k) / 2
            lifted = lifted.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            setups = {
                "fine": (fine_keys, fine.reshape(positions, channels, k, k), fine_norms, fine),
                "coarse": (coarse_keys, lifted, coarse_norms, projected),
            }
            for scale, weight in _scales(config.alpha):
                padded, kernels, norms, flat = setups[scale]
                query_norms = (flat * flat).sum(1)
                acc = _Accumulator(positions, len(train), flat)
                for start in range(0, len(train), chunk):
                    cross = F.conv2d(padded[start : start + chunk], kernels)
                    cross = cross[..., :height, :width].flatten(2)  # (Nc, P, Q)
                    distances = (
                        query_norms[None, :, None]
                        + norms[start : start + chunk, None, :]
                        - 2 * cross
                    )
                    acc.add(distances.mul_(-0.5 / (1 - abar)), start, config.top_k)
                tau[q] += weight * acc.shares()
    return (tau / (len(config.timesteps) * config.noise_draws)).numpy()


# ------------------------------------------------------------------------------ threads knob


@contextmanager
def _intra_op_threads(device: torch.device) -> Iterator[int]:
    """Stands in for ``_nda._cpu_workers``: one worker, torch's intra-op threads left on."""
    del device
    yield 1


def _intra_op_tau(
    queries: ImageDataset, train: ImageDataset, config: NDAConfig, device: torch.device
) -> np.ndarray:
    """The fast path with its threads spent inside each op instead of on whole tiles."""
    workers = _nda._cpu_workers
    _nda._cpu_workers = _intra_op_threads
    try:
        return _nda_tau(queries, train, config, device=device)[0]
    finally:
        _nda._cpu_workers = workers


# ------------------------------------------------------------------------------ driver


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _random_images(n: int, shape: tuple[int, ...], seed: int, first_id: int) -> ImageDataset:
    """Uniform images in [-1, 1] (the timing does not depend on the pixels)."""
    draw = torch.Generator().manual_seed(seed)
    images = torch.rand((n, *shape), generator=draw) * 2 - 1
    return ImageDataset(images=images, ids=first_id + np.arange(n), name=f"random{seed}")


def _data(args: argparse.Namespace) -> tuple[ImageDataset, ImageDataset]:
    """(training images, queries): the digits, or random 32x32 RGB images for ``--scale``."""
    if args.n_train:
        shape = (3, SCALE_SIZE, SCALE_SIZE)
        return _random_images(args.n_train, shape, 0, 0), _random_images(1, shape, 1, 10**9)
    digits = load_digits(None if args.size == 8 else args.size)
    train = digits.select(np.arange(N_TRAIN))
    return train, digits.select(np.arange(N_TRAIN, N_TRAIN + args.queries))


def _worker(args: argparse.Namespace) -> None:
    """One variant on one case in this (fresh) process; writes scores and a JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    train, queries = _data(args)
    config = NDAConfig(dtype=args.dtype, top_k=args.top_k or None)
    runs = {
        "fast": lambda q, n, c: _nda_tau(q, n, c, device=device)[0],
        "fast-intra-op": lambda q, n, c: _intra_op_tau(q, n, c, device),
        "naive": lambda q, n, c: naive_tau(q, n, c, device),
        "unoptimised": lambda q, n, c: unoptimised_tau(q, n, c, device),
    }
    # Warm up (kernel selection, thread pools, the scheduler) on a small problem, so that the
    # timing is the steady cost per query and the memory baseline is set after the warm-up.
    warm = (queries.select(queries.ids[:1]), train.select(train.ids[:128]))
    runs[args.worker](*warm, replace(config, timesteps=(100,)))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = _peak_bytes(device) if device.type == "cpu" else torch.cuda.memory_allocated(device)
    cpu_before = _cpu_seconds()
    began = time.perf_counter()
    scores = runs[args.worker](queries, train, config)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    cpu_seconds = _cpu_seconds() - cpu_before
    np.save(args.scores, scores)
    record = {
        "variant": args.worker,
        "size": args.size or SCALE_SIZE,
        "n_train": len(train),
        "queries": len(queries),
        "s_per_query": seconds / len(queries),
        "cpu_s_per_query": cpu_seconds / len(queries),
        "peak_mb": (_peak_bytes(device) - before) / 2**20,
        "device": str(device),
        "threads": args.threads or torch.get_num_threads(),
        "dtype": args.dtype,
    }
    print(json.dumps(record))


def _spawn(args: argparse.Namespace, variant: str, case: dict[str, int], path: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        *("--worker", variant, "--scores", str(path), "--device", args.device),
        *("--threads", str(args.threads), "--dtype", args.dtype),
        *(f"--{name.replace('_', '-')}={value}" for name, value in case.items()),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} on {case} failed:\n{done.stderr}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "top_k": case["top_k"]}


def _cases(args: argparse.Namespace) -> list[dict[str, int]]:
    """(size, top-K with 0 for all, queries), skipping a top-K >= H W (the same as all)."""
    counts = args.queries + [args.queries[-1]] * (len(args.sizes) - len(args.queries))
    cases = []
    for size, count in zip(args.sizes, counts, strict=False):
        effective = sorted(
            {0 if k == 0 or k >= size * size else k for k in args.top_k}, reverse=True
        )
        cases += [{"size": size, "top_k": k, "queries": count} for k in effective]
    return cases


def _compare(args: argparse.Namespace) -> list[dict]:
    """Every variant on every case; differences and times against the fast path."""
    # With one thread the intra-op variant is the fast path itself.
    variants = [v for v in args.variants if not (v == "fast-intra-op" and args.threads == 1)]
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in _cases(args):
            rows, scores = {}, {}
            for variant in variants:
                path = Path(tmp) / f"{variant}.npy"
                rows[variant] = _spawn(args, variant, case, path)
                scores[variant] = np.load(path)
            fast = rows.get("fast")
            for variant, row in rows.items():
                if fast is not None:
                    diff = np.abs(scores[variant] - scores["fast"]).max()
                    row["max_rel_diff"] = float(diff / np.abs(scores["fast"]).max())
                    row["time_vs_fast"] = row["s_per_query"] / fast["s_per_query"]
                    row["cpu_time_vs_fast"] = row["cpu_s_per_query"] / fast["cpu_s_per_query"]
                if fast is not None and variant in REFERENCES:
                    row["speedup_vs_reference"] = row["time_vs_fast"]
                    row["cpu_speedup_vs_reference"] = row["cpu_time_vs_fast"]
            references = [rows[v] for v in REFERENCES if v in rows]
            if fast is not None and references:
                fast["speedup_vs_reference"] = min(r["time_vs_fast"] for r in references)
                fast["cpu_speedup_vs_reference"] = min(r["cpu_time_vs_fast"] for r in references)
            table += rows.values()
    return table


def _with_threads(args: argparse.Namespace, threads: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "threads": threads})


def _print_compare(args: argparse.Namespace, table: list[dict]) -> None:
    print(
        f"digits, {N_TRAIN} training images, NDAConfig(dtype={args.dtype!r}) otherwise default "
        f"(k = 3, both scales, 5 timesteps); device {table[0]['device']}, "
        f"threads {table[0]['threads']}"
    )
    print(
        f"{'size':>6s} {'top-K':>5s} {'variant':14s} {'queries':>7s} {'s/query':>9s} "
        f"{'CPU s/query':>11s} {'peak MB':>8s} {'max rel diff':>12s} {'speedup vs ref':>15s}"
    )
    for row in table:
        top_k = str(row["top_k"] or "all")
        speedup = row.get("speedup_vs_reference")
        both = "" if speedup is None else f"{speedup:.1f}x ({row['cpu_speedup_vs_reference']:.1f}x)"
        print(
            f"{row['size']:>3d}x{row['size']:<2d} {top_k:>5s} {row['variant']:14s} "
            f"{row['queries']:7d} {row['s_per_query']:9.3f} {row['cpu_s_per_query']:11.3f} "
            f"{row['peak_mb']:8.1f} {row.get('max_rel_diff', math.nan):12.2e} {both:>15s}"
        )
    print(
        "max rel diff: from the fast path's scores, relative to the largest score; speedup vs "
        "ref: a reference's seconds over the fast path's, wall (CPU); on the fast row, against "
        "the faster reference"
    )


#: Side of the random RGB images of ``--scale``.
SCALE_SIZE = 32


def _scale(args: argparse.Namespace) -> dict:
    """The fast path for one query against N random 32x32 RGB images, N in ``--scale-n``."""
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.scale_n:
            case = {"n_train": n, "top_k": args.top_k[0], "queries": 1}
            points.append(_spawn(args, "fast", case, Path(tmp) / "fast.npy"))
    n = np.array([p["n_train"] for p in points], dtype=float)
    fits = {}
    for key in ("s_per_query", "cpu_s_per_query"):
        slope, intercept = np.polyfit(n, [p[key] for p in points], 1)
        fits[key] = {"per_image": float(slope), "fixed": float(intercept)}
        for point in points:
            point[f"{key}_off_fit"] = float(point[key] / (intercept + slope * point["n_train"]) - 1)
    config = NDAConfig(dtype=args.dtype, top_k=args.top_k[0] or None)
    if args.threads:
        torch.set_num_threads(args.threads)
    estimate = estimate_nda(
        args.target_n, (3, SCALE_SIZE, SCALE_SIZE), config, device=resolve_device(args.device)
    )
    return {
        "points": points,
        "fits": fits,
        "target_n": args.target_n,
        "extrapolated": {
            key: fit["fixed"] + fit["per_image"] * args.target_n for key, fit in fits.items()
        },
        "planner": estimate.to_dict(),
    }


def _print_scale(result: dict) -> None:
    points = result["points"]
    print(
        f"random {SCALE_SIZE}x{SCALE_SIZE} RGB training images, one query, NDAConfig() defaults "
        f"(top-K {points[0]['top_k'] or 'all'}); device {points[0]['device']}, "
        f"threads {points[0]['threads']}"
    )
    print(
        f"{'N':>7s} {'s/query':>9s} {'off fit':>8s} {'CPU s/query':>12s} {'off fit':>8s} "
        f"{'CPU s per 1k images':>20s} {'peak MB':>8s}"
    )
    for p in points:
        print(
            f"{p['n_train']:7d} {p['s_per_query']:9.2f} {p['s_per_query_off_fit']:+8.1%} "
            f"{p['cpu_s_per_query']:12.2f} {p['cpu_s_per_query_off_fit']:+8.1%} "
            f"{1000 * p['cpu_s_per_query'] / p['n_train']:20.3f} {p['peak_mb']:8.1f}"
        )
    plan, at = result["planner"], result["extrapolated"]
    print(
        f"N = {result['target_n']:,}, linear fit: {at['s_per_query']:.0f} s per query "
        f"({at['cpu_s_per_query']:.0f} CPU s); the planner's probe: "
        f"{plan['seconds_per_query']:.0f} s per query, {plan['peak_memory_bytes'] / 1e9:.2f} GB"
    )


def _logits_per_query(size: int, config: NDAConfig) -> int:
    """Logits of one query: P query patches x N images x Q positions, per scale and timestep."""
    positions = size * size
    return len(config.timesteps) * len(_scales(config.alpha)) * N_TRAIN * positions * positions


def _gemm(query: torch.Tensor, columns: torch.Tensor, out: torch.Tensor, _: object) -> None:
    torch.mm(query, columns, out=out)


def _ns_per_logit(fn, make, repeats: int = 30) -> float:
    """Median nanoseconds per logit of ``fn`` on a fresh tile from ``make`` (not timed)."""
    times, count = [], 0
    for _ in range(repeats):
        tile = make()
        count = tile.numel()
        began = time.perf_counter()
        fn(tile)
        times.append(time.perf_counter() - began)
    return float(np.median(times)) / count * 1e9


def _floor(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """Per case: the unavoidable passes' ns per logit and their floor against reference / 10."""
    torch.set_num_threads(1)
    out = []
    for case in _cases(args):
        size, top_k = case["size"], case["top_k"]
        config = NDAConfig(dtype=args.dtype, top_k=top_k or None)
        dtype = _nda._DTYPES[args.dtype]
        positions = size * size
        layout = _nda._plan(
            config, case["queries"], N_TRAIN, (1, size, size), torch.device("cpu"), 1
        )
        tile_rows, chunk = min(layout.tile_rows, positions), layout.chunk
        depth = config.patch_size**2 + 1
        draw = torch.Generator().manual_seed(0)
        query = torch.randn((tile_rows, depth), generator=draw, dtype=dtype)
        columns = torch.randn((depth, chunk * positions), generator=draw, dtype=dtype)
        # Logits with the digits' spread within an image row (tens of units).
        base = (torch.randn((tile_rows, chunk, positions), generator=draw) * 8).to(dtype)
        scratch = torch.empty((tile_rows, chunk * positions), dtype=dtype)
        passes = {
            "gemm": _ns_per_logit(
                functools.partial(_gemm, query, columns, scratch), scratch.detach
            ),
            "exp and sums": _ns_per_logit(lambda t: _nda._image_sums_(t, None), base.clone),
        }
        if top_k:
            passes["row sort"] = _ns_per_logit(lambda t: t.numpy().sort(axis=-1), base.clone)
        logits = _logits_per_query(size, config)
        floor = sum(passes.values()) * logits / 1e9
        measured = [
            r for r in rows if r["size"] == size and r["top_k"] == top_k and r["threads"] == 1
        ]
        references = [r["s_per_query"] for r in measured if r["variant"] in REFERENCES]
        fast = [r["s_per_query"] for r in measured if r["variant"] == "fast"]
        out.append(
            {
                "size": size,
                "top_k": top_k,
                "logits_per_query": logits,
                "ns_per_logit": passes,
                "floor_s_per_query": floor,
                "reference_s_per_query": min(references) if references else None,
                "fast_s_per_query": fast[0] if fast else None,
            }
        )
    return out


def _print_floor(floor: list[dict]) -> None:
    print("one thread; ns per logit of the passes an exact fast path cannot skip on this CPU")
    print(
        f"{'size':>6s} {'top-K':>5s} {'logits':>10s} {'gemm':>6s} {'exp+sums':>8s} "
        f"{'sort':>6s} {'floor s/query':>13s} {'reference / 10':>14s} {'fast':>6s}"
    )
    for row in floor:
        ns = row["ns_per_logit"]
        reference, fast = row["reference_s_per_query"], row["fast_s_per_query"]
        print(
            f"{row['size']:>3d}x{row['size']:<2d} {row['top_k'] or 'all'!s:>5s} "
            f"{row['logits_per_query']:10.3g} {ns['gemm']:6.3f} {ns['exp and sums']:8.3f} "
            f"{ns.get('row sort', 0.0):6.3f} {row['floor_s_per_query']:13.3f} "
            f"{'-' if reference is None else f'{reference / 10:.3f}':>14s} "
            f"{'-' if fast is None else f'{fast:.3f}':>6s}"
        )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _markdown(result: dict) -> str:
    """The tables of a results file (``--out``) in Markdown, for benchmarks/README.md."""
    lines = []
    if result.get("rows"):
        lines += [
            "| threads | size | top-K | variant | s/query | CPU s/query | peak MB | max rel diff "
            "| speedup vs reference: wall (CPU) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in result["rows"]:
            speedup = row.get("speedup_vs_reference")
            both = (
                ""
                if speedup is None
                else f"{speedup:.1f}x ({row['cpu_speedup_vs_reference']:.1f}x)"
            )
            lines.append(
                f"| {row['threads']} | {row['size']}x{row['size']} | {row['top_k'] or 'all'} "
                f"| {row['variant']} | {row['s_per_query']:.3f} | {row['cpu_s_per_query']:.3f} "
                f"| {row['peak_mb']:.0f} | {row.get('max_rel_diff', math.nan):.1e} | {both} |"
            )
    floor = result.get("floor")
    if floor:
        if lines:
            lines.append("")
        lines += [
            "| size | top-K | logits per query | ns per logit: GEMM / exp and sums / row sort "
            "| floor s/query | faster reference / 10 | fast s/query |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in floor:
            ns, reference = row["ns_per_logit"], row["reference_s_per_query"]
            sort = f"{ns['row sort']:.3f}" if "row sort" in ns else "-"
            lines.append(
                f"| {row['size']}x{row['size']} | {row['top_k'] or 'all'} "
                f"| {row['logits_per_query']:.3g} | {ns['gemm']:.3f} / {ns['exp and sums']:.3f} "
                f"/ {sort} | {row['floor_s_per_query']:.2f} "
                f"| {_seconds(None if reference is None else reference / 10)} "
                f"| {_seconds(row['fast_s_per_query'])} |"
            )
    scale = result.get("scale")
    if scale:
        if lines:
            lines.append("")
        lines += [
            "| N (32x32 RGB) | s/query | CPU s/query | off the linear fit (wall) | peak MB |",
            "|---|---|---|---|---|",
        ]
        for p in scale["points"]:
            lines.append(
                f"| {p['n_train']:,} | {p['s_per_query']:.2f} | {p['cpu_s_per_query']:.2f} "
                f"| {p['s_per_query_off_fit']:+.1%} | {p['peak_mb']:.0f} |"
            )
        at, plan = scale["extrapolated"], scale["planner"]
        lines.append(
            f"| {scale['target_n']:,}: linear fit | {at['s_per_query']:.0f} "
            f"| {at['cpu_s_per_query']:.0f} | | |"
        )
        lines.append(
            f"| {scale['target_n']:,}: `diffattr plan` probe | {plan['seconds_per_query']:.0f} "
            f"| | | {plan['peak_memory_bytes'] / 2**20:.0f} (estimate) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16], help="image sides")
    parser.add_argument(
        "--queries", type=int, nargs="+", default=[4, 1], help="queries timed at each size"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument(
        "--top-k", type=int, nargs="+", default=[100, 0], help="top-K values (0: all positions)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[0],
        help="torch threads, one table each (0: torch's default)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", action="store_true", help="the N scaling run (32x32 RGB)")
    parser.add_argument(
        "--scale-n", type=int, nargs="+", default=[250, 500, 1000, 2000], help="N measured"
    )
    parser.add_argument("--target-n", type=int, default=50_000, help="N extrapolated to")
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="time the passes an exact fast path cannot skip, against the --out comparison",
    )
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="measure nothing: print the tables of the --out file in Markdown",
    )
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--n-train", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--scores", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.markdown:
        print(_markdown(json.loads(Path(args.out).read_text())))
        return
    if args.worker:
        args.queries, args.top_k, args.threads = args.queries[0], args.top_k[0], args.threads[0]
        _worker(args)
        return
    if args.floor:
        known = args.out and Path(args.out).exists()
        recorded = json.loads(Path(args.out).read_text()) if known else {}
        result = {"floor": _floor(args, recorded.get("rows", []))}
        _print_floor(result["floor"])
    elif args.scale:
        args.threads = args.threads[0]
        result = {"scale": _scale(args), "scale_args": vars(args)}
        _print_scale(result["scale"])
    else:
        result = {"rows": [], "args": vars(args)}
        for threads in args.threads:
            rows = _compare(_with_threads(args, threads))
            _print_compare(args, rows)
            result["rows"] += rows
    if args.out:
        # The comparison and the scale run share one file: each replaces only its own keys.
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        kept = json.loads(out.read_text()) if out.exists() else {}
        out.write_text(json.dumps({**kept, **result}, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
