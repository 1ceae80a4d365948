"""How well factored (Kronecker) features keep gradient inner products, beside a dense projection.

    .venv/bin/python benchmarks/bench_kronecker_error.py [--n 48] [--dims 512,2048,4096]

For n training images of the shipped digits-mlp benchmark (its trained mlp-tiny base) and for a
freshly initialised unet-tiny on the same digits (8x8), the exact per-sample gradients of the
loss at one timestep are computed (vmap, float64), and so are the factored features (factored
backend, total k from ``--dims``) and a dense Gaussian projection of the exact gradients with the
same total k. The factored features come in two forms: "kron. 1 stage", per-layer factors
straight to k (``factored_dim = k``), and the default "kron. 64k+sp", factors to 64 k features
then a sparse map to k. For each of the n (n - 1) / 2 pairs the error of the projected inner
product is taken relative to the product of the norms, (<Pg_i, Pg_j> - <g_i, g_j>) / (|g_i||g_j|):
the error in the cosine, which is what the kernels see. Prints its median and 90th percentile of
the absolute value, the largest, and the Pearson correlation of the projected against the exact
inner products, and the mean |(|Pg|^2 / |g|^2) - 1| ("norm^2 err"); both maps are unbiased,
so the spread is the whole story.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from diffattr.evaluation import LDSBenchmark
from diffattr.features import (
    FactoredGradientComputer,
    GradientComputer,
    OutputConfig,
    ProjectionConfig,
    make_projector,
)
from diffattr.models import build_model, model_spec

HERE = Path(__file__).resolve().parent
TIMESTEP = 500


def pair_errors(features: np.ndarray, exact: np.ndarray) -> tuple[np.ndarray, float]:
    """Cosine-scale errors of every pair, and the correlation of the inner products."""
    norms = np.linalg.norm(exact, axis=1)
    upper = np.triu_indices(len(exact), k=1)
    true = (exact @ exact.T)[upper]
    projected = (features @ features.T)[upper]
    errors = (projected - true) / np.outer(norms, norms)[upper]
    return errors, float(np.corrcoef(projected, true)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default=str(HERE / "digits-mlp"))
    parser.add_argument("--n", type=int, default=48, help="images (pairs: n (n - 1) / 2)")
    parser.add_argument("--dims", default="512,2048,4096", help="total k values")
    parser.add_argument("--seed", type=int, default=0, help="projection seed")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    benchmark = LDSBenchmark.open(args.benchmark)
    base = benchmark.base
    data = benchmark.train_data()
    x0 = data.images[: args.n].double()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=x0.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = build_model(model_spec("unet-tiny", in_channels=1, sample_size=8))
    models = {"mlp-tiny (trained base)": base.load_model(), "unet-tiny (initialised)": unet}
    output = OutputConfig(kind="loss")
    print(
        f"# .venv/bin/python benchmarks/bench_kronecker_error.py --n {args.n} --dims {args.dims}"
        f" ({time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} threads)"
    )
    print(f"{args.n} digits, t = {TIMESTEP}, loss gradients; error = (<Pg,Ph> - <g,h>) / |g||h|")
    header = f"{'model':26s} {'k':>6s} {'projection':14s} {'median |err|':>12s} "
    print(header + f"{'90% |err|':>10s} {'max |err|':>10s} {'corr':>7s} {'norm^2 err':>10s}")
    for label, model in models.items():
        exact = GradientComputer(model, base.scheduler_config, output, dtype=torch.float64)
        grads = exact.compute(x0, TIMESTEP, noise).grads[:, 0]
        exact_np = grads.numpy()
        for dim in (int(d) for d in args.dims.split(",")):
            results = {}
            for name, factored_dim in (("kron. 1 stage", dim), ("kron. 64k+sp", 0)):
                projection = ProjectionConfig(
                    kind="kronecker", dim=dim, seed=args.seed, factored_dim=factored_dim
                )
                factored = FactoredGradientComputer(
                    model, base.scheduler_config, output, projection, dtype=torch.float64
                )
                k = factored.proj_dim
                batch = factored.compute_features(x0, TIMESTEP, noise)
                results[name] = batch.features[:, 0]
            dense = make_projector(
                ProjectionConfig(kind="dense", dim=k, seed=args.seed, max_memory_mb=4096),
                grads.shape[1],
            )
            results["dense"] = dense.project(grads)
            for name, features in results.items():
                features_np = features.numpy()
                errors, corr = pair_errors(features_np, exact_np)
                norm_error = np.abs((features_np**2).sum(1) / (exact_np**2).sum(1) - 1).mean()
                magnitude = np.abs(errors)
                print(
                    f"{label:26s} {k:6d} {name:14s} {np.median(magnitude):12.4f} "
                    f"{np.quantile(magnitude, 0.9):10.4f} {magnitude.max():10.4f} "
                    f"{corr:7.4f} {norm_error:10.4f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
