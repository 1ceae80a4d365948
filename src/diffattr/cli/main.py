"""The ``diffattr`` command: a thin layer over the public API.

Exit status: 0 on success, 1 with a one-line message for bad input (any ``DiffattrError``) or
a file that cannot be read or written (any ``OSError``; ``--debug`` shows the traceback for
both), 2 for usage errors. Output cut short by its reader (``diffattr info m | head``) ends
quietly with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from diffattr._version import __version__
from diffattr.cli import _commands, _lds, _plan, _report
from diffattr.cli._options import (
    add_dataclass_options,
    add_feature_options,
    add_trust_option,
    non_negative_int,
    positive_int,
)
from diffattr.errors import DiffattrError
from diffattr.methods import (
    METHODS,
    DASConfig,
    InfluenceConfig,
    JourneyTRAKConfig,
    NDAConfig,
    TracInConfig,
    UnlearnConfig,
)
from diffattr.models import DEFAULT_STEPS, TrainConfig, VAEConfig, available_models


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``diffattr`` command."""
    parser = argparse.ArgumentParser(
        prog="diffattr",
        description="Training-data attribution for diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"diffattr {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a diffusion model on a dataset")
    _add_data_options(train)
    train.add_argument(
        "--model",
        default="unet-tiny",
        help=f"registry name ({', '.join(available_models())}) or module:factory",
    )
    train.add_argument("--out", required=True, help="checkpoint directory (resumed if present)")
    train.add_argument(
        "--until", type=positive_int, help="stop after this many steps in total; resume later"
    )
    train.add_argument("--overwrite", action="store_true", help="replace a different run in --out")
    train.add_argument(
        "--snapshots",
        action="store_true",
        help="keep every checkpoint under OUT/snapshots/ (for TracIn over training)",
    )
    start = train.add_argument_group("starting point")
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
    _add_common_options(train)
    add_trust_option(train)
    add_dataclass_options(train, TrainConfig)
    train.set_defaults(run=_commands.train)

    vae = commands.add_parser(
        "train-vae", help="train the autoencoder of a latent diffusion model (vae-tiny)"
    )
    _add_data_options(vae)
    vae.add_argument("--out", required=True, help="checkpoint directory")
    vae.add_argument("--overwrite", action="store_true", help="replace a different run in --out")
    _add_common_options(vae)
    add_dataclass_options(vae, VAEConfig)
    vae.set_defaults(run=_commands.train_vae)

    sample = commands.add_parser("sample", help="generate images from a checkpoint")
    sample.add_argument("checkpoint", help="checkpoint directory")
    sample.add_argument("--out", required=True, help="output directory")
    sample.add_argument("--n", type=positive_int, default=64, help="number of images (default: 64)")
    sample.add_argument("--seed", type=int, default=0, help="first seed: images use seed..seed+n-1")
    sample.add_argument("--seeds", help="explicit comma-separated seeds (overrides --n/--seed)")
    sample.add_argument("--sampler", choices=sorted(DEFAULT_STEPS), default="ddpm")
    sample.add_argument("--steps", type=int, help=f"denoising steps (default: {DEFAULT_STEPS})")
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale (default: 0)")
    sample.add_argument("--batch-size", type=int, default=64)
    sample.add_argument(
        "--prompt",
        action="append",
        help="conditional models: the prompt; repeat it for several, used in turn over the seeds",
    )
    sample.add_argument(
        "--guidance-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance weight (default: 1, the conditional model alone)",
    )
    sample.add_argument(
        "--weights",
        choices=["auto", "ema", "raw"],
        default="auto",
        help="which weights: auto = EMA when saved (default: auto)",
    )
    _add_common_options(sample)
    add_trust_option(sample)
    sample.set_defaults(run=_commands.sample)

    info = commands.add_parser(
        "info", help="print the metadata of a checkpoint, feature store, scores, samples or dataset"
    )
    info.add_argument(
        "path",
        help="checkpoint, feature store or scores dir, samples dir or .npz, image folder, 'digits'",
    )
    info.set_defaults(run=_commands.info)

    _add_attribute_parser(commands)
    _lds.add_parser(commands)
    _report.add_parser(commands)
    _lds.add_counterfactual_parser(commands)
    _plan.add_parser(commands)

    models = commands.add_parser("models", help="list the built-in model configurations")
    models.set_defaults(run=_commands.models)

    demo = commands.add_parser(
        "demo", help="the whole pipeline on the built-in digits: train, sample, measure"
    )
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument(
        "--steps",
        type=int,
        default=_commands.DEMO_STEPS,
        help=f"training steps (default: {_commands.DEMO_STEPS})",
    )
    demo.add_argument(
        "--n-samples", type=positive_int, default=64, help="images to generate (default: 64)"
    )
    _add_common_options(demo)
    demo.set_defaults(run=_commands.demo)
    return parser


def _add_attribute_parser(commands: Any) -> None:
    attribute = commands.add_parser(
        "attribute", help="score query images against a checkpoint's training images"
    )
    attribute.add_argument(
        "checkpoints", nargs="*", help="checkpoint dir(s); several: ensemble (or --pipeline)"
    )
    attribute.add_argument(
        "--pipeline",
        help="a diffusers pipeline saved with save_pretrained (DDPM or Stable-Diffusion style), "
        "instead of checkpoints; its training images come from --data",
    )
    attribute.add_argument(
        "--lora-weights",
        help="--pipeline: LoRA weights to load (default: the pipeline folder's "
        "pytorch_lora_weights.safetensors, if any)",
    )
    attribute.add_argument(
        "--data", help="--pipeline: the training images (image folder with metadata.jsonl, .npz)"
    )
    attribute.add_argument(
        "--prompts",
        help="a prompt template for images without prompts, e.g. 'a handwritten {label}'",
    )
    attribute.add_argument("--out", required=True, help="run directory (features are resumed)")
    attribute.add_argument("--method", choices=sorted(METHODS), default="das")
    attribute.add_argument(
        "--queries",
        default="held-out",
        help="'held-out' (the checkpoint's held-out split), a samples dir/.npz or image folder",
    )
    attribute.add_argument("--n-queries", type=positive_int, help="only the first N queries")
    attribute.add_argument(
        "--layout",
        choices=["auto", "NCHW", "NHWC"],
        default="auto",
        help="axis order of the 4-D images of .npz --queries and --data (default: auto, from "
        "the axis of 1 or 3 entries)",
    )
    add_feature_options(attribute.add_argument_group("features (FeatureConfig settings)"))
    attribute.add_argument(
        "--parameters",
        nargs="+",
        metavar="GLOB",
        help="only parameters matching these globs (e.g. '*attentions*')",
    )
    attribute.add_argument("--batch-size", type=int, default=32)
    attribute.add_argument("--chunk-size", type=int, default=256)
    attribute.add_argument(
        "--show-top",
        type=positive_int,
        default=5,
        help="proponents shown per query (default: 5)",
    )
    attribute.add_argument(
        "--show", type=non_negative_int, default=5, help="queries shown (default: 5)"
    )
    _add_common_options(attribute)
    add_trust_option(attribute)
    nda = attribute.add_argument_group("nda")
    nda.add_argument(
        "--heatmaps",
        type=non_negative_int,
        default=0,
        help="save NDA heatmaps (query and top training image) for the first N queries",
    )
    nda.add_argument(
        "--nda-timesteps",
        type=_int_list,
        help="NDA's timesteps, comma-separated (default: 100,200,300,400,500)",
    )
    names: list[str] = []
    for config_cls in (
        DASConfig,
        InfluenceConfig,
        TracInConfig,
        NDAConfig,
        JourneyTRAKConfig,
        UnlearnConfig,
    ):
        names += add_dataclass_options(attribute, config_cls, skip=("dtype",))
    attribute.add_argument(
        "--learning-rates",
        type=_float_list,
        help="tracin, retrac: one learning rate per model, comma-separated (default: each "
        "checkpoint's rate at its step; a --pipeline records none)",
    )
    names.append("learning_rates")
    attribute.set_defaults(run=_commands.attribute, method_options=names)


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
        type=_int_list,
        help="keep only the images of these labels, comma-separated (e.g. 0,1,2,3,4)",
    )


def _number_list(parse: type, what: str) -> Callable[[str], tuple[Any, ...]]:
    """An argparse type for comma-separated ``what`` (``parse`` applied to each part)."""

    def parse_list(text: str) -> tuple[Any, ...]:
        try:
            return tuple(parse(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {text!r}"
            ) from None

    return parse_list


_int_list = _number_list(int, "integers")
_float_list = _number_list(float, "numbers")


def _value_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None
    return low, high


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
        # Flushed here, so that a reader that has gone (`| head`) is noticed while it can be
        # handled, not by the interpreter's last flush, which prints a traceback.
        sys.stdout.flush()
    except BrokenPipeError:
        # As the Python docs recommend: nothing more can be shown, so send the rest of the
        # output to devnull, where the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except DiffattrError as err:
        if args.debug:
            raise
        print(f"diffattr: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if args.debug:
            raise
        print(f"diffattr: error: {_os_error_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "diffattr: interrupted (finished checkpoints are kept; rerun to resume)",
            file=sys.stderr,
        )
        return 130
    return 0


def _os_error_message(err: OSError) -> str:
    """``path: reason``, rather than the ``[Errno 13] Permission denied: 'path'`` of str()."""
    if err.filename is None:
        return str(err)
    where = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else err.filename
    return f"{where}: {err.strerror or err}"


if __name__ == "__main__":
    sys.exit(main())
