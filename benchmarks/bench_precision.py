"""Accuracy and speed of mixed-precision featurisation against float32.

Run: ``.venv/bin/python benchmarks/bench_precision.py [--device auto] [--n 64]``.

Featurises the first N digits with DAS's features (T timesteps, dense k) in float32 and with
each mixed-precision mode the device supports (bf16 everywhere; tf32 on CUDA), and prints per
model: seconds and their ratio to float32, the median and largest relative error of the
projected features ||phi_mixed - phi_32|| / ||phi_32||, and the mean Spearman correlation of
each image's inner products with the others (what attribution ranks).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from diffattr._device import resolve_device
from diffattr.data import load_digits
from diffattr.features import FeatureConfig, PlanConfig, ProjectionConfig, featurize
from diffattr.methods import DAS
from diffattr.models import build_model, default_scheduler_config, model_spec


def features(model: torch.nn.Module, config: FeatureConfig, n: int, device: str) -> tuple:
    data = load_digits().select(np.arange(n))
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        store = featurize(
            model, default_scheduler_config(), data, config, Path(tmp) / "s",
            model_id="bench", batch_size=32, chunk_size=4096, device=device, progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - began
        return np.array(store.array("features"), dtype=np.float64)[:, 0], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--proj-dim", type=int, default=1024)
    args = parser.parse_args()
    device = resolve_device(args.device)
    modes = ["bf16", "tf32"] if device.type == "cuda" else ["bf16"]
    base = DAS().features(
        FeatureConfig(
            plan=PlanConfig(num_steps=args.timesteps),
            projection=ProjectionConfig(dim=args.proj_dim),
        )
    )
    print(f"device {device}, {args.n} digits, T = {args.timesteps}, k = {args.proj_dim}")
    print(f"{'model':10s} {'mode':5s} {'s':>7s} {'x fp32':>7s} {'median rel':>11s} "
          f"{'max rel':>8s} {'rank corr':>9s}")  # fmt: skip
    for name in ("mlp-tiny", "unet-tiny"):
        model = build_model(model_spec(name, in_channels=1, sample_size=8)).eval()
        features(model, base, 8, str(device))  # warm-up
        exact, seconds = features(model, base, args.n, str(device))
        print(f"{name:10s} {'fp32':5s} {seconds:7.2f} {1.0:7.2f}")
        gram = exact @ exact.T
        for mode in modes:
            mixed, mixed_seconds = features(
                model, replace(base, mixed_precision=mode), args.n, str(device)
            )
            relative = np.linalg.norm(mixed - exact, axis=1) / np.linalg.norm(exact, axis=1)
            mixed_gram = mixed @ mixed.T
            rank = np.mean([spearmanr(gram[i], mixed_gram[i]).statistic for i in range(args.n)])
            print(
                f"{name:10s} {mode:5s} {mixed_seconds:7.2f} {mixed_seconds / seconds:7.2f} "
                f"{np.median(relative):11.2e} {relative.max():8.2e} {rank:9.4f}"
            )


if __name__ == "__main__":
    main()
