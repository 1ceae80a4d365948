"""Cost of the curvature stage and of curvature scoring against kernel DAS at the same k.

Run: ``.venv/bin/python benchmarks/bench_curvature.py [--model unet-tiny] [--size 16]
[--n-train 128] [--n-query 16] [--timesteps 2] [--dim 1024] [--batch 16] [--threads 1]
[--out benchmarks/results/curvature.txt] [--append] [--rows ...]``.

``--model`` is a registry name or ``sd-small`` (Stable Diffusion 1.5's UNet layout at reduced
width with a fixed random text context, from ``bench_factored.py``); unet-cifar and sd-small take
their channels and side from ``bench_factored.MODELS`` unless ``--channels`` / ``--size`` say
otherwise. One randomly initialised model (costs do not depend on training), random images, the
factored backend in float32 for every row, each row in a fresh subprocess:

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
included), and what the row leaves on disk. A last line gives the stage's plan
(``estimate_curvature_cost``, from a one-batch probe in its own process) to set against the
stage's measured row. ``--append`` adds the table to ``--out`` instead of replacing it.

``--per-image``: for models too slow to run the rows on the CPU, only the one-batch probes, each
in a fresh process: kernel DAS's featurisation (``estimate_featurization``, factored, k, mean
output) and the stage's two passes and eigen-decompositions (``estimate_curvature_cost``), per
(image, timestep) and with the process's peak RSS; then those costs scaled to ``--n-train``
images and ``--timesteps`` steps, an extrapolation and labelled so. The exact route's work per
training image and step is the EK-FAC pass's (the same rotation of the full-size gradient), so
its scoring is extrapolated from that.
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
from diffattr.features import (
    FeatureConfig,
    PlanConfig,
    ProjectionConfig,
    estimate_featurization,
    featurize,
)
from diffattr.features._curvature import CurvatureConfig, estimate_curvature
from diffattr.features._curvature_plan import estimate_curvature_cost
from diffattr.features._preconditioned import stage_directory
from diffattr.methods import DAS, EKFAC, DASConfig, InfluenceConfig
from diffattr.models import build_model, default_scheduler_config, model_spec

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_factored import MODELS, build  # noqa: E402

ROWS = [
    "kernel DAS",
    "curvature stage",
    "EK-FAC, projected",
    "DAS, EK-FAC, projected",
    "EK-FAC, exact",
    "DAS, EK-FAC, exact",
]


def _shape(args: argparse.Namespace) -> tuple[int, int]:
    """(channels, side) of the images: the flags, else bench_factored's, else (1, 16)."""
    channels, side = MODELS.get(args.model, (1, 16))
    return args.channels or channels, args.size or side


def _setting(args: argparse.Namespace) -> dict[str, Any]:
    channels, side = _shape(args)
    torch.manual_seed(0)
    if args.model == "sd-small":
        model = build(args.model)
    else:
        model = build_model(model_spec(args.model, in_channels=channels, sample_size=side))
    draw = torch.Generator().manual_seed(1)

    def images(n: int, first: int) -> ImageDataset:
        pixels = torch.rand((n, channels, side, side), generator=draw) * 2 - 1
        return ImageDataset(images=pixels, ids=np.arange(first, first + n), name=f"r{first}")

    features = FeatureConfig(
        plan=PlanConfig(num_steps=args.timesteps),
        projection=ProjectionConfig(kind="kronecker", dim=args.dim),
        backend="factored",
    )
    return {
        "model": model,
        "train": None if args.per_image else images(args.n_train, 0),
        "query": None if args.per_image else images(args.n_query, 100_000),
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
    if row == "plan":
        plan = estimate_curvature_cost(
            model,
            scheduler,
            setting["features"],
            CurvatureConfig(),
            image_shape=(_shape(args)[0], _shape(args)[1], _shape(args)[1]),
            n_images=args.n_train,
            batch_size=args.batch,
            repeats=1 if args.per_image else 2,
        )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            json.dumps(
                plan.to_dict() | {"peak_mb": peak, "wall_seconds": time.perf_counter() - began}
            )
        )
        return
    if row == "kernel probe":
        estimate = estimate_featurization(
            model,
            scheduler,
            DAS().features(setting["features"]),
            image_shape=(_shape(args)[0], _shape(args)[1], _shape(args)[1]),
            n_samples=args.n_train,
            batch_size=args.batch,
            repeats=1,
        )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(estimate.to_dict() | {"peak_mb": peak}))
        return
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
    parser.add_argument("--size", type=int, default=0, help="image side (0: the model's)")
    parser.add_argument("--channels", type=int, default=0, help="image channels (0: the model's)")
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-query", type=int, default=16)
    parser.add_argument("--timesteps", type=int, default=2)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results" / "curvature.txt"))
    parser.add_argument("--append", action="store_true", help="add to --out, not replace it")
    parser.add_argument("--rows", nargs="+", default=ROWS, help="these rows only")
    parser.add_argument(
        "--per-image", action="store_true", help="one-batch probes only, then extrapolated"
    )
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        run_row(args.row, args, Path(args.root))
        return
    if args.per_image:
        per_image(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-curvature-") as tmp:
        results = {}
        for row in [*args.rows, "plan"]:
            command = [sys.executable, __file__, *sys.argv[1:], "--row", row, "--root", tmp]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[row] = json.loads(done.stdout.strip().splitlines()[-1])
            if row != "plan":
                print(f"{row:24s} {results[row]}", flush=True)
    plan = results.pop("plan")
    p = sum(x.numel() for x in _setting(args)["model"].parameters())
    channels, side = _shape(args)
    lines = [
        f"# .venv/bin/python benchmarks/bench_curvature.py {shlex.join(sys.argv[1:])} "
        f"({time.strftime('%Y-%m-%d %H:%M')}, cpu, {args.threads} thread(s))",
        f"# {args.model} {channels}x{side}x{side} (p = {p:,}), {args.n_train} training images, "
        f"{args.n_query} queries, {args.timesteps} timesteps, k = {args.dim}, batch "
        f"{args.batch}, float32, factored backend",
        f"{'row':24s} {'seconds':>8s} {'peak MB':>8s} {'disk MB':>8s}",
    ]
    for row, values in results.items():
        lines.append(
            f"{row:24s} {values['seconds']:8.1f} {values['peak_mb']:8.0f} {values['disk_mb']:8.2f}"
        )
    seconds = plan["seconds"]
    lines.append(
        f"# plan of the stage (estimate_curvature_cost, one-batch probe): "
        f"{plan['total_seconds']:.1f} s (factors {seconds['factors']:.1f}, "
        f"eigen-decompositions {seconds['eigendecompositions']:.1f}, EK-FAC pass "
        f"{seconds['eigenvalues']:.1f}), peak {plan['peak_memory_bytes'] / 2**20:.0f} MB "
        f"(activations measured by the probe), curvature.safetensors "
        f"{plan['disk_bytes'] / 2**20:.2f} MB; "
        f"{len(plan['layers'])} layers, largest side {plan['probe']['largest_factor_side']:.0f}"
    )
    _write(args, lines)


def _write(args: argparse.Namespace, lines: list[str]) -> None:
    """Print the table and write it to ``--out`` (after its text with ``--append``)."""
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = Path(args.out)
    if args.append and out.exists():
        text = out.read_text() + "\n" + text
    out.write_text(text)


def per_image(args: argparse.Namespace) -> None:
    """The one-batch probes of kernel DAS and of the stage, and their extrapolation."""
    probes = {}
    with tempfile.TemporaryDirectory(prefix="bench-curvature-") as tmp:
        for row in ("kernel probe", "plan"):
            command = [sys.executable, __file__, *sys.argv[1:], "--row", row, "--root", tmp]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            probes[row] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{row}: {json.dumps(probes[row])}", flush=True)
    kernel, plan = probes["kernel probe"], probes["plan"]
    batch = plan["batch_size"]
    pair = {
        "kernel DAS features": kernel["probe"]["seconds_per_gradient_pair"],
        "factor pass": plan["probe"]["seconds_per_factor_batch"] / batch,
        "EK-FAC pass": plan["probe"]["seconds_per_eigen_batch"] / batch,
    }
    n, steps, p = args.n_train, args.timesteps, plan["parameters"]
    channels, side = _shape(args)
    stage = (pair["factor pass"] + pair["EK-FAC pass"]) * n * steps
    eigh = plan["seconds"]["eigendecompositions"]
    lines = [
        f"# .venv/bin/python benchmarks/bench_curvature.py {shlex.join(sys.argv[1:])} "
        f"({time.strftime('%Y-%m-%d %H:%M')}, cpu, {args.threads} thread(s))",
        f"# {args.model} {channels}x{side}x{side} (p = {p:,}; {len(plan['layers'])} covered "
        f"layers, largest factor side {plan['probe']['largest_factor_side']:.0f}), k = "
        f"{args.dim}, batch {batch}, float32, factored backend: one-batch probes, each in a "
        "fresh process (fastest of 1 after a warm-up)",
        f"{'measured, per (image, timestep)':40s} {'seconds':>8s}",
    ]
    for name, value in pair.items():
        lines.append(f"{name:40s} {value:8.3f}")
    lines += [
        f"{'eigen-decompositions (once; timed to side 1024, d^3 above)':40s} {eigh:8.1f}",
        f"peak RSS of the probe processes (from their last probe's start, where diffattr._probe "
        f"resets the mark): kernel DAS {kernel['peak_mb']:.0f} MB, curvature "
        f"{plan['peak_mb']:.0f} MB; curvature.safetensors {plan['disk_bytes'] / 2**20:.1f} MB "
        f"(exact, from the layout) against kernel DAS's store {kernel['disk_bytes'] / 2**20:.1f} "
        f"MB for {n} images; planned stage memory (activations measured) "
        f"{plan['peak_memory_bytes'] / 2**20:.0f} MB; the exact route keeps {p * 4 / 2**20:.0f} "
        "MB per query",
        f"extrapolated to {n} training images x {steps} timesteps (per-pair seconds x pairs; "
        "not measured):",
        f"  kernel DAS featurisation of the training set  "
        f"{pair['kernel DAS features'] * n * steps:10.0f} s",
        f"  curvature stage (both passes + eigen-decompositions)  {stage + eigh:10.0f} s",
        f"  EK-FAC projected featurisation (the kernel's work at the same k)  "
        f"{pair['kernel DAS features'] * n * steps:10.0f} s",
        f"  EK-FAC exact scoring, one query set (training set streamed once)  "
        f"{pair['EK-FAC pass'] * n * steps:10.0f} s",
    ]
    _write(args, lines)


if __name__ == "__main__":
    main()
