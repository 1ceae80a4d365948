"""``diffattr demo``: the whole pipeline on the built-in digits: train, sample, attribute."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattr._device import resolve_device
from diffattr._io import write_json
from diffattr.cli._common import add_common_options, locking_out
from diffattr.cli._options import positive_int
from diffattr.data import ImageDataset, load_dataset, load_npz, save_grid, split_dataset
from diffattr.evaluation import ClassConfidence
from diffattr.methods import DAS, Attribution, Scores
from diffattr.models import TrainConfig, model_spec, sample_checkpoint, save_samples
from diffattr.models import train as train_model
from diffattr.report import write_report

#: The demo's training length: enough for clean digits from unet-tiny (see README for timings).
DEMO_STEPS = 4000


def add_parser(commands: Any) -> None:
    """Register ``diffattr demo``."""
    parser = commands.add_parser(
        "demo", help="the whole pipeline on the built-in digits: train, sample, measure"
    )
    parser.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    parser.add_argument(
        "--steps",
        type=int,
        default=DEMO_STEPS,
        help=f"training steps (default: {DEMO_STEPS})",
    )
    parser.add_argument(
        "--n-samples", type=positive_int, default=64, help="images to generate (default: 64)"
    )
    add_common_options(parser)
    parser.set_defaults(run=demo)


@locking_out
def demo(args: argparse.Namespace) -> None:
    """``diffattr demo``: train unet-tiny on the digits, sample, measure quality, attribute."""
    device = resolve_device(args.device)
    out = Path(args.out)
    began = time.perf_counter()
    dataset = load_dataset("digits")
    split = split_dataset(dataset, query_fraction=0.1, seed=0)
    spec = model_spec("unet-tiny", in_channels=1, sample_size=8)
    config = TrainConfig(steps=args.steps, seed=0)
    checkpoint = train_model(
        spec,
        split.train,
        config,
        out / "model",
        split=split,
        device=str(device),
        progress=not args.quiet,
    )
    seeds = list(range(args.n_samples))
    images = sample_checkpoint(checkpoint, seeds, device=device, progress=not args.quiet)
    npz = save_samples(
        images, seeds, out / "samples", {"checkpoint": str(checkpoint.path), "sampler": "ddpm"}
    )
    confidence = ClassConfidence(split.train)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    figures = {
        "generated": confidence(images),
        "held-out real": confidence(split.query.images),
        "noise": confidence(noise),
    }
    print("\nattributing the generated digits with DAS...", flush=True)
    generated = load_npz(npz)
    # The library's defaults, as a user who calls Attribution with none would get them.
    method = DAS()
    run = Attribution(
        out / "attribution",
        checkpoint,
        split.train,
        device=str(device),
        progress=not args.quiet,
    )
    scores = run.score(method, generated)
    attribution = run.path
    top = {int(q): scores.top_k(int(q), 5)[0].tolist() for q in scores.query_ids}
    write_json(attribution / "top.json", {"method": method.name, "top5": top})
    save_grid(
        _attribution_grid(generated, split.train, scores, rows=8, k=5),
        attribution / "top.png",
        nrow=6,
    )
    report = write_report(attribution, out / "report.html")
    seconds = time.perf_counter() - began
    write_json(
        out / "summary.json",
        {
            "class_confidence": figures,
            "seconds": round(seconds, 1),
            "checkpoint": str(checkpoint.path),
            "samples": str(npz),
            "scores": str(attribution / "scores" / method.name),
            "report": str(report),
        },
    )
    print(f"\ndemo finished in {seconds:.0f} s on {device}")
    print("sample quality (mean top-class probability of a kernel classifier; higher is better):")
    for name, value in figures.items():
        print(f"  {name:14s} {value:.3f}")
    print("top-5 training images (sample ids, digit labels) by DAS, first 8 generated digits:")
    for query_id in scores.query_ids[:8]:
        ids = top[int(query_id)]
        print(f"  seed {int(query_id):3d}: ids {ids}  labels {_labels(split.train, ids)}")
    print(
        f"checkpoint: {checkpoint.path}\nsamples:    {npz}\n"
        f"grid:       {out / 'samples/grid.png'}\n"
        f"top images: {attribution / 'top.png'} (rows: a generated digit, then its top 5)\n"
        f"report:     {report} (open it in a browser)"
    )


def _attribution_grid(
    queries: ImageDataset, train: ImageDataset, scores: Scores, rows: int, k: int
) -> torch.Tensor:
    """Images for a grid whose rows are a query followed by its top-k training images."""
    tiles = []
    for query_id in scores.query_ids[:rows]:
        tiles.append(queries.select([int(query_id)]).images)
        tiles.append(train.select(scores.top_k(int(query_id), k)[0]).images)
    return torch.cat(tiles)


def _labels(dataset: ImageDataset, ids: list[int]) -> list[int]:
    if dataset.labels is None:
        return []
    rows = [int(np.flatnonzero(dataset.ids == i)[0]) for i in ids]
    return dataset.labels[rows].tolist()
