"""``diffattr train`` and ``diffattr train-vae``: train a model, or the autoencoder of a latent one.

Both read a dataset with the same data options and split it the same way.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import Any

import numpy as np

from diffattr._device import resolve_device
from diffattr.cli._common import add_common_options, int_list, locking_out
from diffattr.cli._options import (
    add_dataclass_options,
    add_trust_option,
    dataclass_from_args,
    positive_int,
)
from diffattr.data import ImageDataset, load_dataset, split_dataset
from diffattr.errors import ConfigError, DataError
from diffattr.models import (
    Checkpoint,
    LoRAConfig,
    TrainConfig,
    VAEConfig,
    available_models,
    load_checkpoint,
    model_spec,
    vae_latent_scale,
)
from diffattr.models import (
    train as train_model,
)
from diffattr.models import (
    train_vae as train_autoencoder,
)


def add_parser(commands: Any) -> None:
    """Register ``diffattr train`` and ``diffattr train-vae``."""
    parser = commands.add_parser("train", help="train a diffusion model on a dataset")
    _add_data_options(parser)
    parser.add_argument(
        "--model",
        default="unet-tiny",
        help=f"registry name ({', '.join(available_models())}) or module:factory",
    )
    parser.add_argument("--out", required=True, help="checkpoint directory (resumed if present)")
    parser.add_argument(
        "--until", type=positive_int, help="stop after this many steps in total; resume later"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a different run in --out")
    parser.add_argument(
        "--snapshots",
        action="store_true",
        help="keep every checkpoint under OUT/snapshots/ (for TracIn over training)",
    )
    start = parser.add_argument_group("starting point")
    start.add_argument(
        "--init",
        help="checkpoint to start from: the pretrained model a --lora fine-tune adapts, or the "
        "trained vae-tiny of --model ldm-tiny",
    )
    start.add_argument(
        "--lora",
        type=int,
        metavar="RANK",
        help="fine-tune LoRA adapters of this rank on the --init model's attention projections "
        "(its model replaces --model); only the adapters train",
    )
    start.add_argument(
        "--lora-alpha", type=float, help="LoRA scale alpha (default: the rank, a scale of 1)"
    )
    add_common_options(parser)
    add_trust_option(parser)
    add_dataclass_options(parser, TrainConfig)
    parser.set_defaults(run=train)

    vae = commands.add_parser(
        "train-vae", help="train the autoencoder of a latent diffusion model (vae-tiny)"
    )
    _add_data_options(vae)
    vae.add_argument("--out", required=True, help="checkpoint directory")
    vae.add_argument("--overwrite", action="store_true", help="replace a different run in --out")
    add_common_options(vae)
    add_dataclass_options(vae, VAEConfig)
    vae.set_defaults(run=train_vae)


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        default="digits",
        help="'digits' (built in), an image folder, or an .npz (default: digits)",
    )
    group.add_argument("--size", type=int, help="resize images to SIZE x SIZE")
    group.add_argument(
        "--value-range",
        type=_value_range,
        help="pixel range LOW,HIGH of an .npz's float images, e.g. 0,1 (default: inferred)",
    )
    group.add_argument(
        "--layout",
        choices=["auto", "NCHW", "NHWC"],
        default="auto",
        help="axis order of an .npz's 4-D images (default: auto, from the axis of 1 or 3 entries)",
    )
    group.add_argument(
        "--query-fraction", type=float, default=0.1, help="held-out query fraction (default: 0.1)"
    )
    group.add_argument("--split-seed", type=int, default=0, help="seed of the split (default: 0)")
    group.add_argument(
        "--prompts",
        help="a prompt per image from this template, e.g. 'a handwritten {label}' ({label} and "
        "{id} are replaced); folders and .npz files may carry their own prompts",
    )
    group.add_argument(
        "--labels",
        type=int_list,
        help="keep only the images of these labels, comma-separated (e.g. 0,1,2,3,4)",
    )


def _value_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None
    return low, high


@locking_out
def train(args: argparse.Namespace) -> None:
    """``diffattr train``: train (or resume) a model on a dataset's training split."""
    device = resolve_device(args.device)
    dataset = _training_dataset(args)
    split = split_dataset(dataset, query_fraction=args.query_fraction, seed=args.split_seed)
    config = dataclass_from_args(TrainConfig, args)
    init = (
        load_checkpoint(args.init, trust_remote_code=args.trust_remote_code) if args.init else None
    )
    spec = _train_spec(args, dataset, init)
    began = time.perf_counter()
    checkpoint = train_model(
        spec,
        split.train,
        config,
        args.out,
        split=split,
        init=init,
        device=str(device),
        until=args.until,
        overwrite=args.overwrite,
        snapshots=args.snapshots,
        progress=not args.quiet,
    )
    seconds = time.perf_counter() - began
    meta = checkpoint.metadata
    what = f"LoRA rank {spec.lora['rank']} on {spec.name}" if spec.lora else spec.name
    print(
        f"trained {what} ({meta['n_parameters']:,} trainable parameters) to step "
        f"{checkpoint.step}/{config.steps} on {dataset.name} ({len(split.train)} training images, "
        f"{len(split.query)} held out) in {seconds:.0f} s on {device}; "
        f"last loss {meta['last_call']['final_loss']:.4f}\ncheckpoint: {checkpoint.path}"
    )


def _training_dataset(args: argparse.Namespace) -> ImageDataset:
    dataset = load_dataset(
        args.data,
        size=args.size,
        value_range=args.value_range,
        prompts=args.prompts,
        layout=args.layout,
    )
    if args.labels is None:
        return dataset
    if dataset.labels is None:
        raise DataError(f"--labels needs labelled images; {dataset.name} has no labels")
    keep = np.isin(dataset.labels, args.labels)
    if not keep.any():
        raise DataError(f"{dataset.name} has no images with labels {list(args.labels)}")
    return dataset.select(dataset.ids[keep])


def _train_spec(args: argparse.Namespace, dataset: ImageDataset, init: Checkpoint | None) -> Any:
    if args.lora is not None:
        if init is None:
            raise ConfigError("--lora fine-tunes a pretrained model: give its checkpoint as --init")
        return init.model_spec.with_lora(LoRAConfig(rank=args.lora, alpha=args.lora_alpha))
    if args.lora_alpha is not None:
        raise ConfigError("--lora-alpha applies to a --lora fine-tune only")
    spec = model_spec(args.model, in_channels=dataset.channels, sample_size=_side(dataset))
    if init is None or "vae" not in spec.config:
        # train() explains an --init that fits neither a fine-tune nor an autoencoder.
        return spec
    return replace(spec, config={**spec.config, "latent_scale": vae_latent_scale(init)})


def _side(dataset: Any) -> int:
    height, width = dataset.image_size
    if height != width:
        raise ConfigError(
            f"models take square images; {dataset.name} is {height}x{width}: pass --size"
        )
    return height


@locking_out
def train_vae(args: argparse.Namespace) -> None:
    """``diffattr train-vae``: train the autoencoder of a latent diffusion model."""
    device = resolve_device(args.device)
    dataset = _training_dataset(args)
    split = split_dataset(dataset, query_fraction=args.query_fraction, seed=args.split_seed)
    config = dataclass_from_args(VAEConfig, args)
    began = time.perf_counter()
    checkpoint = train_autoencoder(
        split.train,
        config,
        args.out,
        device=str(device),
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    meta = checkpoint.metadata
    print(
        f"trained vae-tiny for {config.steps} steps on {len(split.train)} images of "
        f"{dataset.name} in {time.perf_counter() - began:.0f} s on {device}; reconstruction "
        f"RMSE {meta['reconstruction_rmse']:.4f}, latent scale {meta['latent_scale']:.4f}\n"
        f"checkpoint: {checkpoint.path} (train a latent model on it: diffattr train "
        f"--model ldm-tiny --init {checkpoint.path})"
    )
