"""``diffattr sample``: generate images from a checkpoint, one seed per image."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from diffattr._device import resolve_device
from diffattr.cli._common import add_common_options, locking_out
from diffattr.cli._options import add_trust_option, positive_int
from diffattr.errors import ConfigError
from diffattr.models import DEFAULT_STEPS, load_checkpoint, sample_checkpoint, save_samples


def add_parser(commands: Any) -> None:
    """Register ``diffattr sample``."""
    parser = commands.add_parser("sample", help="generate images from a checkpoint")
    parser.add_argument("checkpoint", help="checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=positive_int, default=64, help="number of images (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="first seed: images use seed..seed+n-1")
    parser.add_argument("--seeds", help="explicit comma-separated seeds (overrides --n/--seed)")
    parser.add_argument("--sampler", choices=sorted(DEFAULT_STEPS), default="ddpm")
    parser.add_argument("--steps", type=int, help=f"denoising steps (default: {DEFAULT_STEPS})")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale (default: 0)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--prompt",
        action="append",
        help="conditional models: the prompt; repeat it for several, used in turn over the seeds",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance weight (default: 1, the conditional model alone)",
    )
    parser.add_argument(
        "--weights",
        choices=["auto", "ema", "raw"],
        default="auto",
        help="which weights: auto = EMA when saved (default: auto)",
    )
    add_common_options(parser)
    add_trust_option(parser)
    parser.set_defaults(run=sample)


@locking_out
def sample(args: argparse.Namespace) -> None:
    """``diffattr sample``: generate images from a checkpoint, one seed per image."""
    device = resolve_device(args.device)
    checkpoint = load_checkpoint(args.checkpoint, trust_remote_code=args.trust_remote_code)
    seeds = _parse_seeds(args.seeds) if args.seeds else list(range(args.seed, args.seed + args.n))
    prompts = None
    if args.prompt:
        prompts = [args.prompt[i % len(args.prompt)] for i in range(len(seeds))]
    began = time.perf_counter()
    images = sample_checkpoint(
        checkpoint,
        seeds,
        sampler=args.sampler,
        num_inference_steps=args.steps,
        eta=args.eta,
        batch_size=args.batch_size,
        weights=args.weights,
        prompts=prompts,
        guidance_scale=args.guidance_scale,
        device=device,
        progress=not args.quiet,
    )
    seconds = time.perf_counter() - began
    npz = save_samples(
        images, seeds, args.out, _sample_metadata(checkpoint.path, args), prompts=prompts
    )
    print(
        f"generated {len(seeds)} images with {args.sampler} in {seconds:.0f} s on {device}\n"
        f"samples: {npz}\ngrid: {Path(args.out) / 'grid.png'}"
    )


def _parse_seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None


def _sample_metadata(checkpoint: Path, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "checkpoint": str(checkpoint),
        "sampler": args.sampler,
        "steps": args.steps,
        "eta": args.eta,
        "weights": args.weights,
        "guidance_scale": args.guidance_scale,
    }
