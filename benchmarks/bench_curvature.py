"""Cost of the curvature stage and of curvature scoring against kernel DAS at the same k.

Run: ``.venv/bin/python benchmarks/bench_curvature.py [--model unet-tiny] [--size 16]
[--n-train 128] [--n-query 16] [--timesteps 2] [--dim 1024] [--batch 16] [--threads 1]
[--out benchmarks/results/curvature.txt]``.

One randomly initialised model (costs do not depend on training), random images, the factored
backend in float32 for every row, each row in a fresh subprocess:

- ``kernel DAS``: featurise the training images and the queries (mean output, k features),
  fit the kernel, score.
- ``curvature stage``: K-FAC factors (one pass), their eigen-decompositions and the EK-FAC
  eigenvalues (a second pass), sampled Fisher with one direction per image and step.
- ``EK-FAC, projected``: the top eigenvectors within k, preconditioned features of the training
  images and queries, scores by inner products (the curvature loaded from the stage's row).
- ``DAS, EK-FAC, projected``: the same features with DAS's mean output, and DAS's formula.
- ``EK-FAC, exact`` and ``DAS, EK-FAC, exact``: every eigenvector (k = p), queries kept in
  memory, training gradients streamed.

Columns: wall seconds, the subprocess's peak resident memory (``ru_maxrss``, model and Python
included), and what the row leaves on disk.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr.data import ImageDataset
from diffattr.features import FeatureConfig, PlanConfig, ProjectionConfig, featurize
from diffattr.features._curvature import CurvatureConfig, estimate_curvature
from diffattr.features._preconditioned import stage_directory
from diffattr.methods import DAS, EKFAC, DASConfig, InfluenceConfig
from diffattr.models import build_model, default_scheduler_config, model_spec

HERE = Path(__file__).resolve().parent
ROWS = [
    "kernel DAS",
    "curvature stage",
    "EK-FAC, projected",
    "DAS, EK-FAC, projected",
    "EK-FAC, exact",
    "DAS, EK-FAC, exact",
]


def _setting(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(model_spec(args.model, in_channels=1, sample_size=args.size))
    draw = torch.Generator().manual_seed(1)

    def images(n: int, first: int) -> ImageDataset:
        pixels = torch.rand((n, 1, args.size, args.size), generator=draw) * 2 - 1
        return ImageDataset(images=pixels, ids=np.arange(first, first + n), name=f"r{first}")

    features = FeatureConfig(
        plan=PlanConfig(num_steps=args.timesteps),
        projection=ProjectionConfig(kind="kronecker", dim=args.dim),
        backend="factored",
    )
    return {
        "model": model,
        "train": images(args.n_train, 0),
        "query": images(args.n_query, 100_000),
        "features": features,
        "common": {"model_id": "bench", "batch_size": args.batch, "progress": False},
    }


def run_row(row: str, args: argparse.Namespace, root: Path) -> None:
    """One row, in this process; prints seconds, peak RSS and the bytes it wrote, as JSON."""
    torch.set_num_threads(args.threads)
    setting = _setting(args)
    model, train, query = setting["model"], setting["train"], setting["query"]
    scheduler = default_scheduler_config()
    common = setting["common"]
    began = time.perf_counter()
    if row == "kernel DAS":
        method = DAS()
        features = method.features(setting["features"])
        stores = [
            featurize(model, scheduler, data, features, root / row / part, **common)
            for part, data in (("train", train), ("query", query))
        ]
        method.fit(stores[0]).score(stores[1])
        written = root / row
    elif row == "curvature stage":
        # Where the curvature rows' featurizer finds the estimate and loads it.
        written = stage_directory(root, setting["features"], CurvatureConfig(), train, "bench")
        estimate_curvature(
            model, scheduler, train, setting["features"], CurvatureConfig(), written, **common
        )
    else:
        method = {
            "EK-FAC, projected": EKFAC(InfluenceConfig(route="projected")),
            "DAS, EK-FAC, projected": DAS(DASConfig(curvature="ekfac", route="projected")),
            "EK-FAC, exact": EKFAC(InfluenceConfig(route="exact")),
            "DAS, EK-FAC, exact": DAS(DASConfig(curvature="ekfac", route="exact")),
        }[row]
        features = method.features(setting["features"])
        # The stage row's estimate is loaded, not recomputed.
        featurizer = method.featurizer(model, scheduler, train, features, root, **common)
        method.fit(featurizer(train, "train")).score(featurizer(query, "query"))
        written = featurizer.directory  # type: ignore[union-attr]
    seconds = time.perf_counter() - began
    size = sum(f.stat().st_size for f in Path(written).rglob("*") if f.is_file())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "disk_mb": size / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="unet-tiny")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-query", type=int, default=16)
    parser.add_argument("--timesteps", type=int, default=2)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results" / "curvature.txt"))
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        run_row(args.row, args, Path(args.root))
        return
    with tempfile.TemporaryDirectory(prefix="bench-curvature-") as tmp:
        results = {}
        for row in ROWS:
            command = [sys.executable, __file__, *sys.argv[1:], "--row", row, "--root", tmp]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[row] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{row:24s} {results[row]}", flush=True)
    p = sum(x.numel() for x in _setting(args)["model"].parameters())
    lines = [
        f"# .venv/bin/python benchmarks/bench_curvature.py {shlex.join(sys.argv[1:])} "
        f"({time.strftime('%Y-%m-%d %H:%M')}, cpu, {args.threads} thread(s))",
        f"# {args.model} {args.size}x{args.size} (p = {p:,}), {args.n_train} training images, "
        f"{args.n_query} queries, {args.timesteps} timesteps, k = {args.dim}, batch "
        f"{args.batch}, float32, factored backend",
        f"{'row':24s} {'seconds':>8s} {'peak MB':>8s} {'disk MB':>8s}",
    ]
    for row, values in results.items():
        lines.append(
            f"{row:24s} {values['seconds']:8.1f} {values['peak_mb']:8.0f} {values['disk_mb']:8.2f}"
        )
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
