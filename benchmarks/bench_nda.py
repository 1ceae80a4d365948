"""NDA cost: the fast implementation against a conv-free one and the unoptimised formulation.

Run: ``.venv/bin/python benchmarks/bench_nda.py [--sizes 8 16] [--queries 4 1] [--top-k 100 0]
[--device cpu]`` (about 2 minutes on 2 CPU cores).

On the digits (the first 1617 images as the training set, the next ones as queries), at each
image size and top-K (0: all positions; a top-K >= H W is the same and is skipped) it times
three implementations of the same scores (otherwise ``NDAConfig()`` defaults: k = 3, both
scales, 5 timesteps, float32 unless ``--dtype``), each in a fresh subprocess:

- ``fast``: :func:`diffattr.methods._nda._nda_tau`: cross terms by conv2d with the query patches
  as kernels, key norms by a box filter once per timestep for every query, the coarse scale on
  the four 2x2-pooled phases with k x k kernels, queries batched, chunks near cache size.
- ``naive``: no convolution: every k x k (and projected 2k x 2k) patch unfolded, per query a full
  P x (N Q) distance matrix with ``torch.cdist`` (direct differences, no norm expansion), in
  chunks of the same size.
- ``unoptimised``: the expansion and conv2d, but one query at a time, the key norms recomputed
  for every query, and the coarse scale as one conv with 2k x 2k kernels (the projected patch
  lifted back, ``P^T P a``) on the unpooled images: four times the multiply-adds.

All three share the chunked log-sum-exp / top-K accumulation, so the table isolates how the
distances are formed. It prints seconds per query, the peak memory growth of the run (RSS, from
``getrusage`` in the subprocess, over its level after loading the data; on CUDA the peak of
``torch.cuda.max_memory_allocated``) and the largest difference of each variant's scores from
the fast one, relative to the largest score. Each variant first runs once on a small problem
(one query, one timestep, 128 training images) so that one-off start-up costs are not timed.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from diffattr._device import resolve_device
from diffattr.data import ImageDataset, load_digits
from diffattr.methods._nda import (
    NDAConfig,
    _alphas_cumprod,
    _logsumexp_,
    _nda_tau,
    _noised,
    _plan,
    _scales,
)

N_TRAIN = 1617
VARIANTS = ("fast", "naive", "unoptimised")


# ------------------------------------------------------------------------------ shared parts


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
    _, chunk = _plan(config, 1, len(train), shape, 2, device)
    tau = torch.zeros((len(queries), len(train)), dtype=torch.float64)
    unfold = {"fine": _fine_patches, "coarse": _coarse_patches}
    for t, abar in zip(config.timesteps, _alphas_cumprod(config, None), strict=True):
        scaled = math.sqrt(abar) * train_images
        # (N, Q, D) key patches of each scale, once per timestep.
        keys = {s: unfold[s](scaled, k, m).transpose(1, 2) for s, _ in _scales(config.alpha)}
        for q, d in _rows(queries, config):
            image = queries.images[q : q + 1].to(device, dtype)
            x_t = _noised(image, queries.ids[q : q + 1], [d], t, abar, config.seed)
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
    _, chunk = _plan(config, 1, len(train), (channels, height, width), 2, device)
    tau = torch.zeros((len(queries), len(train)), dtype=torch.float64)
    ones = torch.ones((1, channels, k, k), dtype=dtype, device=device)
    for t, abar in zip(config.timesteps, _alphas_cumprod(config, None), strict=True):
        for q, d in _rows(queries, config):
            image = queries.images[q : q + 1].to(device, dtype)
            x_t = _noised(image, queries.ids[q : q + 1], [d], t, abar, config.seed)
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


# ------------------------------------------------------------------------------ driver


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _worker(args: argparse.Namespace) -> None:
    """One variant at one size in this (fresh) process; writes scores and a JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    digits = load_digits(None if args.size == 8 else args.size)
    train = digits.select(np.arange(N_TRAIN))
    queries = digits.select(np.arange(N_TRAIN, N_TRAIN + args.queries))
    config = NDAConfig(dtype=args.dtype, top_k=args.top_k or None)
    runs = {
        "fast": lambda q, n, c: _nda_tau(q, n, c, device=device)[0],
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
    began = time.perf_counter()
    scores = runs[args.worker](queries, train, config)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    np.save(args.scores, scores)
    record = {
        "variant": args.worker,
        "size": args.size,
        "queries": args.queries,
        "s_per_query": seconds / args.queries,
        "peak_mb": (_peak_bytes(device) - before) / 2**20,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(record))


def _spawn(args: argparse.Namespace, variant: str, case: tuple[int, int, int], path: Path) -> dict:
    size, top_k, queries = case
    command = [
        sys.executable,
        __file__,
        *("--worker", variant, "--size", str(size), "--queries", str(queries)),
        *("--scores", str(path), "--device", args.device, "--threads", str(args.threads)),
        *("--dtype", args.dtype, "--top-k", str(top_k)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} at {size}x{size} failed:\n{done.stderr}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "top_k": top_k}


def _cases(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """(size, top-K with 0 for all, queries), skipping a top-K >= H W (the same as all)."""
    counts = args.queries + [args.queries[-1]] * (len(args.sizes) - len(args.queries))
    cases = []
    for size, count in zip(args.sizes, counts, strict=False):
        effective = sorted(
            {0 if k == 0 or k >= size * size else k for k in args.top_k}, reverse=True
        )
        cases += [(size, k, count) for k in effective]
    return cases


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
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scores", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.queries, args.top_k = args.queries[0], args.top_k[0]
        _worker(args)
        return
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in _cases(args):
            fast = None
            for variant in args.variants:
                path = Path(tmp) / f"{variant}.npy"
                row = _spawn(args, variant, case, path)
                scores = np.load(path)
                fast = scores if fast is None else fast
                row["max_rel_diff"] = float(np.abs(scores - fast).max() / np.abs(fast).max())
                table.append(row)
    print(
        f"digits, {N_TRAIN} training images, NDAConfig(dtype={args.dtype!r}) otherwise default "
        f"(k = 3, both scales, 5 timesteps); device {table[0]['device']}, "
        f"threads {table[0]['threads']}"
    )
    print(
        f"{'size':>6s} {'top-K':>5s} {'variant':12s} {'queries':>7s} {'s/query':>9s} "
        f"{'peak MB':>9s} {'max rel diff vs ' + args.variants[0]:>24s}"
    )
    for row in table:
        top_k = str(row["top_k"] or "all")
        print(
            f"{row['size']:>3d}x{row['size']:<2d} {top_k:>5s} {row['variant']:12s} "
            f"{row['queries']:7d} {row['s_per_query']:9.3f} {row['peak_mb']:9.1f} "
            f"{row['max_rel_diff']:24.2e}"
        )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"rows": table, "args": vars(args)}, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
