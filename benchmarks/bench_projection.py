"""Cost of projecting per-sample gradients: dense (kept or regenerated) and sparse JL.

Run: ``.venv/bin/python benchmarks/bench_projection.py [--elements 268435456] [--device auto]``.

For p = 651041 (unet-tiny) and k in 1024, 4096, 32768, with 64 and 640 gradient rows per call
(only the fewest rows from k = ``--wide`` on), it prints seconds per 64 gradients for the dense
Gaussian projection with P kept in memory (only where the full p x k matrix fits in
``--max-memory-mb``), with P regenerated on every call (and the Rademacher one regenerated,
"+-1"), and the sparse projection (s = 4), plus each one's throughput as a fraction of this
machine's dense matmul rate (2 p k flops per gradient, measured in the same run on randn
matrices of the same shapes). Every cost here is linear in p, so to keep the default run short
only the first ``min(p, elements // k)`` parameters (at least k) are timed and the times are
scaled to the full p (the ``p timed`` column; ``--elements 0`` times the full p). It also
prints the generator's cost per matrix element next to ``torch.randn`` and the mean relative
error of pairwise inner products (|<Pu,Pv> - <u,v>| / (|u| |v|)) of dense and sparse
projections of the same random vectors.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from diffattr import __version__
from diffattr._device import resolve_device
from diffattr.features._hashing import dense_block
from diffattr.features._projection import (
    DenseProjector,
    ProjectionConfig,
    Projector,
    SparseProjector,
)

UNET_TINY_PARAMETERS = 651041


def _run(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Call ``fn`` once; return (seconds, result), the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began, result


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes."""
    return _run(fn, device)[0]


def _generator_rates(device: torch.device) -> dict[str, float]:
    """Nanoseconds per element of torch.randn and of dense_block, best of 3 on an 8192 x 1024."""
    rows, k = 8192, 1024
    out = torch.empty(rows, k, device=device)
    cases: dict[str, Callable[[], object]] = {
        "torch.randn": lambda: torch.randn(rows, k, out=out),
        "dense_block gaussian": lambda: dense_block(0, range(rows), k, "gaussian", out=out),
        "dense_block rademacher": lambda: dense_block(0, range(rows), k, "rademacher", out=out),
    }
    return {
        name: 1e9 * min(_timed(fn, device) for _ in range(3)) / (rows * k)
        for name, fn in cases.items()
    }


def _pair_error(features: torch.Tensor, vectors: torch.Tensor) -> float:
    """Mean |<Pu,Pv> - <u,v>| / (|u| |v|) over the distinct pairs of rows."""
    upper = torch.triu_indices(len(vectors), len(vectors), offset=1, device=vectors.device)
    norms = vectors.double().norm(dim=1)
    exact = (vectors.double() @ vectors.double().T)[upper[0], upper[1]]
    approx = (features.double() @ features.double().T)[upper[0], upper[1]]
    return ((approx - exact).abs() / (norms[upper[0]] * norms[upper[1]])).mean().item()


def _matmul_rate(rows: int, timed_p: int, k: int, device: torch.device) -> float:
    """FLOP/s of a plain (rows x n)(n x k) randn matmul, with n <= timed_p and P <= 512 MB."""
    n = min(timed_p, max(1, (512 << 20) // (4 * k)))
    generator = torch.Generator().manual_seed(1)
    grads = torch.randn(rows, n, generator=generator).to(device)
    matrix = torch.randn(n, k, generator=generator).to(device)
    seconds = min(_timed(partial(torch.matmul, grads, matrix), device) for _ in range(2))
    return 2 * rows * n * k / seconds


def _bench_k(args: argparse.Namespace, k: int, device: torch.device) -> tuple[list[dict], dict]:
    """Time every method at one k; return table rows and the inner-product errors."""
    p = args.parameters
    timed_p = p if args.elements == 0 else max(k, min(p, args.elements // k))
    scale = p / timed_p  # every cost is linear in p
    # Regenerating a very wide P is slow whatever the rows: time the fewest rows only.
    row_counts = args.rows if k < args.wide else [min(args.rows)]
    generator = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(n, timed_p, generator=generator).to(device) for n in row_counts}
    rate = {n: _matmul_rate(n, timed_p, k, device) for n in row_counts}
    full_bytes = p * k * 4
    makers: dict[str, Callable[[], Projector]] = {
        "dense kept": partial(
            DenseProjector, ProjectionConfig(dim=k, max_memory_mb=1 << 30), timed_p, device
        ),
        "dense regenerated": partial(
            DenseProjector, ProjectionConfig(dim=k, max_memory_mb=0), timed_p, device
        ),
        "dense regen. +-1": partial(
            DenseProjector,
            ProjectionConfig(distribution="rademacher", dim=k, max_memory_mb=0),
            timed_p,
            device,
        ),
        "sparse s=4": partial(
            SparseProjector, ProjectionConfig(kind="sparse", dim=k, nnz=4), timed_p, device
        ),
    }
    table, features = [], {}
    for method, make in makers.items():
        if method == "dense kept" and full_bytes > args.max_memory_mb << 20:
            note = f"full P is {full_bytes / 2**30:.1f} GiB > --max-memory-mb"
            table += [{"k": k, "rows": n, "method": method, "note": note} for n in row_counts]
            continue
        projector = make()
        setup = scale * _timed(projector.prepare, device)
        for n, g in grads.items():
            seconds, features[method, n] = _run(partial(projector.project, g), device)
            per_64 = scale * seconds * 64 / n
            table.append(
                {
                    "k": k,
                    "p_timed": timed_p,
                    "rows": n,
                    "method": method,
                    "setup_s": setup,
                    "s_per_64": per_64,
                    "fraction_of_matmul": 2 * 64 * p * k / per_64 / rate[n],
                }
            )
        del projector  # free a kept P before the next method
    n = min(row_counts)
    errors = {
        "k": k,
        "dense": _pair_error(features["dense regenerated", n], grads[n]),
        "sparse": _pair_error(features["sparse s=4", n], grads[n]),
        "matmul_s_per_64": {r: 2 * 64 * p * k / v for r, v in rate.items()},
        "matmul_gflops": {r: v / 1e9 for r, v in rate.items()},
    }
    return table, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parameters", type=int, default=UNET_TINY_PARAMETERS, help="p")
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096, 32768])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 640], help="rows per call")
    parser.add_argument(
        "--elements",
        type=int,
        default=1 << 28,
        help="time only elements // k parameters and scale to p (0: time the full p)",
    )
    parser.add_argument("--max-memory-mb", type=int, default=4096, help="largest P kept in memory")
    parser.add_argument(
        "--wide", type=int, default=16384, help="from this k on, time the fewest rows only"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    generation = _generator_rates(device)
    table, errors = [], []
    for k in args.dims:
        rows, error = _bench_k(args, k, device)
        table += rows
        errors.append(error)

    print(f"device: {device}, threads: {torch.get_num_threads()}, p = {args.parameters:,}")
    print("generation, ns per matrix element:")
    for name, ns in generation.items():
        print(f"  {name:24s} {ns:6.2f}")
    print(
        f"{'k':>6s} {'p timed':>8s} {'rows':>5s} {'method':18s} {'setup s':>8s} "
        f"{'s per 64':>9s} {'of matmul':>9s}"
    )
    for row in table:
        if "note" in row:
            print(f"{row['k']:6d} {'':>8s} {row['rows']:5d} {row['method']:18s} {row['note']}")
            continue
        print(
            f"{row['k']:6d} {row['p_timed']:8d} {row['rows']:5d} {row['method']:18s} "
            f"{row['setup_s']:8.2f} {row['s_per_64']:9.3f} {row['fraction_of_matmul']:9.1%}"
        )
    print("plain matmul (64 x p)(p x k), s per 64 gradients and GFLOP/s, by rows per call:")
    for error in errors:
        cells = ", ".join(
            f"{r} rows: {s:.3f} s, {error['matmul_gflops'][r]:.0f} GFLOP/s"
            for r, s in error["matmul_s_per_64"].items()
        )
        print(f"  k={error['k']}: {cells}")
    print("mean relative inner-product error |<Pu,Pv> - <u,v>| / (|u||v|), random vectors:")
    for error in errors:
        print(
            f"  k={error['k']}: dense {error['dense']:.4f}, sparse {error['sparse']:.4f} "
            f"(1/sqrt(k) = {1 / math.sqrt(error['k']):.4f})"
        )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "generation_ns_per_element": generation,
            "rows": table,
            "errors": errors,
            "args": vars(args),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "versions": {"diffattr": __version__, "torch": torch.__version__},
        }
        out.write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
