"""Per-sample gradient throughput of GradientComputer against a plain training step.

Run: ``.venv/bin/python benchmarks/bench_gradients.py [--batch 64] [--repeats 3] [--device cpu]``.
Prints a table: (sample, timestep) gradient features per second for unet-tiny and mlp-tiny by
output kind; a training step's per-sample throughput (forward + backward of the batch's mean
loss, no optimiser) and the ratio; and, for unet-tiny, vmap with diffusers' default SDPA
attention against the classic processor that GradientComputer switches to.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from diffattr._device import resolve_device
from diffattr.features._gradients import GradientComputer
from diffattr.features._outputs import OutputConfig
from diffattr.models import (
    build_model,
    count_parameters,
    default_scheduler_config,
    model_spec,
    predict,
)

TIMESTEP = 500


def seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def train_step_seconds(
    model: torch.nn.Module, x0: torch.Tensor, noise: torch.Tensor, repeats: int
) -> float:
    """Forward + backward of the mean epsilon loss over the batch, as in training."""
    model = model.train()
    t = torch.full((x0.shape[0],), TIMESTEP, device=x0.device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        x_t = 0.5 * x0 + 0.75 * noise  # the schedule's values do not change the cost
        torch.nn.functional.mse_loss(predict(model, x_t, t), noise).backward()

    return seconds(step, repeats, x0.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=8, help="image side (digits are 8x8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    parser.add_argument("--kinds", default="loss,mean", help="comma-separated output kinds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    draw = torch.Generator().manual_seed(0)
    shape = (args.batch, 1, args.size, args.size)
    x0 = (torch.rand(shape, generator=draw) * 2 - 1).to(device)
    noise = torch.randn(shape, generator=draw).to(device)
    scheduler_config = default_scheduler_config()

    print(
        f"device: {device}, threads: {torch.get_num_threads()}, batch {args.batch}, "
        f"{args.size}x{args.size} images, median of {args.repeats} calls"
    )
    print(
        f"{'model':10s} {'params':>9s} {'output':>18s} {'attention':>9s} "
        f"{'features/s':>11s} {'train samples/s':>16s} {'ratio':>6s}"
    )
    for name in ("unet-tiny", "mlp-tiny"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_model(model_spec(name, in_channels=1, sample_size=args.size)).to(device)
        train_rate = args.batch / train_step_seconds(model, x0, noise, args.repeats)
        cases = [(kind, "classic") for kind in args.kinds.split(",")]
        if name == "unet-tiny":
            cases.append(("mean", "sdpa"))
        for kind, attention in cases:
            computer = GradientComputer(
                model, scheduler_config, OutputConfig(kind=kind), device=device
            )
            if attention == "sdpa":
                # Undo the computer's switch to the classic processor, to measure what it saves.
                for module in computer._model.modules():
                    if hasattr(module, "set_processor"):
                        module.set_processor(AttnProcessor2_0())
            with warnings.catch_warnings():
                # vmap's "no batching rule for SDPA, falling back to a loop" performance warning.
                warnings.simplefilter("ignore", UserWarning)
                rate = args.batch / seconds(
                    lambda c=computer: c.compute(x0, TIMESTEP, noise), args.repeats, device
                )
            print(
                f"{name:10s} {count_parameters(model):9,d} {kind:>18s} {attention:>9s} "
                f"{rate:11.1f} {train_rate:16.1f} {rate / train_rate:6.3f}"
            )


if __name__ == "__main__":
    main()
