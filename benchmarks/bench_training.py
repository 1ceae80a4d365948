"""Training and sampling speed of the tiny model configurations, side by side in one run.

Run: ``.venv/bin/python benchmarks/bench_training.py [--steps 200] [--device cpu]``. Prints a
table (seconds per 1000 training steps at batch 64, and sampling throughput) and writes
``benchmarks/results/training.json`` with the configuration, device and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import diffusers
import torch

from diffattr import __version__
from diffattr._device import resolve_device
from diffattr.data import load_digits, split_dataset
from diffattr.models import TrainConfig, count_parameters, model_spec, sample, train

CASES = [("unet-tiny", 8), ("unet-tiny", 16), ("mlp-tiny", 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps timed per model")
    parser.add_argument("--sample-images", type=int, default=64)
    parser.add_argument("--sample-steps", type=int, default=100)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "training.json"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    rows = []
    for name, size in CASES:
        split = split_dataset(load_digits(size=size), query_fraction=0.1, seed=0)
        spec = model_spec(name, in_channels=1, sample_size=size)
        config = TrainConfig(steps=args.steps, warmup_steps=10, checkpoint_every=0)
        with tempfile.TemporaryDirectory() as tmp:
            began = time.perf_counter()
            checkpoint = train(spec, split.train, config, tmp, device=str(device), progress=False)
            train_seconds = time.perf_counter() - began
            model = checkpoint.load_model(device=str(device))
        began = time.perf_counter()
        sample(
            model,
            checkpoint.scheduler_config,
            list(range(args.sample_images)),
            shape=(1, size, size),
            num_inference_steps=args.sample_steps,
            device=device,
            progress=False,
        )
        sample_seconds = time.perf_counter() - began
        rows.append(
            {
                "model": name,
                "image": f"{size}x{size}",
                "parameters": count_parameters(model),
                "s_per_1000_steps": 1000 * train_seconds / args.steps,
                "images_x_steps_per_s": args.sample_images * args.sample_steps / sample_seconds,
            }
        )
    print(
        f"device: {device}, threads: {torch.get_num_threads()}, batch 64, "
        f"{args.steps} steps timed (checkpoint save included)"
    )
    print(
        f"{'model':10s} {'image':6s} {'params':>9s} {'s/1000 steps':>13s} "
        f"{'sampling img*step/s':>20s}"
    )
    for row in rows:
        print(
            f"{row['model']:10s} {row['image']:6s} {row['parameters']:9,d} "
            f"{row['s_per_1000_steps']:13.1f} {row['images_x_steps_per_s']:20.0f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "rows": rows,
                "args": vars(args),
                "device": str(device),
                "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
                "versions": {
                    "diffattr": __version__,
                    "torch": torch.__version__,
                    "diffusers": diffusers.__version__,
                },
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
