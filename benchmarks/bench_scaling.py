"""How featurisation and scoring grow with the training-set size N, and our projection vs traker's.

Run: ``.venv/bin/python benchmarks/bench_scaling.py [--model mlp-tiny] [--base 256]``.

1. Featurises N = base, 2 base, 4 base digits (and 64 queries) with DAS's features and times
   featurisation and DAS's fit + score separately; prints each time and its ratio to the N = base
   run. Featurisation should double with N; the kernel fit grows with N and scoring with
   N x queries, so both should also about double.
2. If traker is importable (``pip install --no-deps traker`` into any path on PYTHONPATH; it is
   not a dependency), times traker's pure-torch ``BasicProjector`` against our dense projector on
   the same gradients (p of the model, k = 1024 and 4096, 64 rows), in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from diffattr.data import load_digits
from diffattr.features import FeatureConfig, PlanConfig, ProjectionConfig, featurize, make_projector
from diffattr.methods import DAS
from diffattr.models import build_model, count_parameters, default_scheduler_config, model_spec


def scaling(model_name: str, base: int, proj_dim: int, timesteps: int) -> list[dict[str, float]]:
    digits = load_digits()
    model = build_model(model_spec(model_name, in_channels=1, sample_size=8)).eval()
    method = DAS()
    config = method.features(
        FeatureConfig(
            plan=PlanConfig(num_steps=timesteps), projection=ProjectionConfig(dim=proj_dim)
        )
    )
    queries = digits.select(digits.ids[-64:])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        query_store = featurize(
            model, default_scheduler_config(), queries, config, Path(tmp) / "q",
            model_id="bench", batch_size=64, chunk_size=1024, progress=False,
        )  # fmt: skip
        for factor in (1, 2, 4):
            n = base * factor
            train = digits.select(digits.ids[:n])
            began = time.perf_counter()
            store = featurize(
                model, default_scheduler_config(), train, config, Path(tmp) / f"t{n}",
                model_id="bench", batch_size=64, chunk_size=1024, progress=False,
            )  # fmt: skip
            featurise = time.perf_counter() - began
            began = time.perf_counter()
            method.fit(store).score(query_store)
            score = time.perf_counter() - began
            rows.append({"n": n, "featurise": featurise, "fit_score": score})
    return rows


def projection_vs_traker(p: int, rows: int = 64) -> list[tuple[int, float, float | None]]:
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError:
        return []
    grads = torch.randn(rows, p)
    out = []
    for k in (1024, 4096):
        ours = make_projector(ProjectionConfig(dim=k, max_memory_mb=0), p, "cpu")
        began = time.perf_counter()
        ours.project(grads)
        ours_seconds = time.perf_counter() - began
        theirs = BasicProjector(
            grad_dim=p, proj_dim=k, seed=0, proj_type=ProjectionType.normal, device="cpu"
        )
        began = time.perf_counter()
        theirs.project(grads, model_id=0)
        out.append((k, ours_seconds, time.perf_counter() - began))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mlp-tiny")
    parser.add_argument("--base", type=int, default=256)
    parser.add_argument("--proj-dim", type=int, default=512)
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = scaling(args.model, args.base, args.proj_dim, args.timesteps)
    first = rows[0]
    print(f"{args.model}, {args.timesteps} timesteps, k = {args.proj_dim}, 64 queries")
    print(f"{'N':>6s} {'featurise s':>12s} {'ratio':>6s} {'fit+score s':>12s} {'ratio':>6s}")
    for row in rows:
        print(
            f"{row['n']:6d} {row['featurise']:12.2f} {row['featurise'] / first['featurise']:6.2f} "
            f"{row['fit_score']:12.3f} {row['fit_score'] / first['fit_score']:6.2f}"
        )
    p = count_parameters(build_model(model_spec(args.model, in_channels=1, sample_size=8)))
    compared = projection_vs_traker(p)
    if not compared:
        print("traker is not importable: projection comparison skipped")
    for k, ours, theirs in compared:
        print(
            f"projection of 64 gradients, p = {p}, k = {k}: ours (regenerated) {ours:.2f} s, "
            f"traker BasicProjector {theirs:.2f} s, ratio {theirs / ours:.1f}x"
        )


if __name__ == "__main__":
    main()
