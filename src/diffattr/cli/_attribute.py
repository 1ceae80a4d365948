"""``diffattr attribute``: score query images against a checkpoint's training images.

Any registered method (``--method``), over checkpoints or a local diffusers pipeline; under
torchrun the featurisation is shared between the processes.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from diffattr._device import resolve_device
from diffattr.cli._common import add_common_options, float_list, int_list, locking_out
from diffattr.cli._options import (
    add_dataclass_options,
    add_feature_options,
    add_trust_option,
    dataclass_from_args,
    features_from_args,
    given_options,
    non_negative_int,
    positive_int,
    reject_foreign_options,
)
from diffattr.data import ImageDataset, load_dataset
from diffattr.errors import ConfigError
from diffattr.features import Distributed
from diffattr.methods import (
    METHODS,
    NDA,
    Attribution,
    DASConfig,
    InfluenceConfig,
    JourneyTRAKConfig,
    Method,
    ModelFreeMethod,
    NDAConfig,
    Scores,
    TracInConfig,
    UnlearnConfig,
    get_method,
    nda_heatmaps,
    record_run,
)
from diffattr.models import load_checkpoint, load_pipeline
from diffattr.report import save_heatmap


def add_parser(commands: Any) -> None:
    """Register ``diffattr attribute``."""
    parser = commands.add_parser(
        "attribute", help="score query images against a checkpoint's training images"
    )
    parser.add_argument(
        "checkpoints", nargs="*", help="checkpoint dir(s); several: ensemble (or --pipeline)"
    )
    parser.add_argument(
        "--pipeline",
        help="a diffusers pipeline saved with save_pretrained (DDPM or Stable-Diffusion style), "
        "instead of checkpoints; its training images come from --data",
    )
    parser.add_argument(
        "--lora-weights",
        help="--pipeline: LoRA weights to load (default: the pipeline folder's "
        "pytorch_lora_weights.safetensors, if any)",
    )
    parser.add_argument(
        "--data", help="--pipeline: the training images (image folder with metadata.jsonl, .npz)"
    )
    parser.add_argument(
        "--prompts",
        help="a prompt template for images without prompts, e.g. 'a handwritten {label}'",
    )
    parser.add_argument("--out", required=True, help="run directory (features are resumed)")
    parser.add_argument("--method", choices=sorted(METHODS), default="das")
    parser.add_argument(
        "--queries",
        default="held-out",
        help="'held-out' (the checkpoint's held-out split), a samples dir/.npz or image folder",
    )
    parser.add_argument("--n-queries", type=positive_int, help="only the first N queries")
    parser.add_argument(
        "--layout",
        choices=["auto", "NCHW", "NHWC"],
        default="auto",
        help="axis order of the 4-D images of .npz --queries and --data (default: auto, from "
        "the axis of 1 or 3 entries)",
    )
    add_feature_options(parser.add_argument_group("features (FeatureConfig settings)"))
    parser.add_argument(
        "--parameters",
        nargs="+",
        metavar="GLOB",
        help="only parameters matching these globs (e.g. '*attentions*')",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument(
        "--show-top",
        type=positive_int,
        default=5,
        help="proponents shown per query (default: 5)",
    )
    parser.add_argument(
        "--show", type=non_negative_int, default=5, help="queries shown (default: 5)"
    )
    add_common_options(parser)
    add_trust_option(parser)
    nda = parser.add_argument_group("nda")
    nda.add_argument(
        "--heatmaps",
        type=non_negative_int,
        default=0,
        help="save NDA heatmaps (query and top training image) for the first N queries",
    )
    nda.add_argument(
        "--nda-timesteps",
        type=int_list,
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
        names += add_dataclass_options(parser, config_cls, skip=("dtype",))
    parser.add_argument(
        "--learning-rates",
        type=float_list,
        help="tracin, retrac: one learning rate per model, comma-separated (default: each "
        "checkpoint's rate at its step; a --pipeline records none)",
    )
    names.append("learning_rates")
    parser.set_defaults(run=attribute, method_options=names)


@locking_out
def attribute(args: argparse.Namespace) -> None:
    """``diffattr attribute``: score query images against a checkpoint's training images.

    A thin layer over :class:`~diffattr.methods.Attribution`: a rerun into the same ``--out``
    (new ``--queries``, another method) reuses the training features and the method's fit.
    """
    device = resolve_device(args.device)
    checkpoints = _attributed_models(args)
    method_cls = get_method(args.method)
    model_free = issubclass(method_cls, ModelFreeMethod)
    if _launched_by_torchrun():
        if model_free:
            raise ConfigError(f"--method {args.method} runs in one process, not under torchrun")
        device = _join_process_group(device)
    method = method_cls(_method_config(args, method_cls))
    if args.heatmaps and not isinstance(method, NDA):
        raise ConfigError("--heatmaps applies to --method nda only")
    train_data, queries = _attribution_data(checkpoints[0], args)
    if args.n_queries is not None:
        queries = queries.select(queries.ids[: args.n_queries])
    run = Attribution(
        args.out,
        checkpoints,
        train_data,
        features_from_args(args),
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        device=str(device),
        progress=not args.quiet,
    )
    began = time.perf_counter()
    scores = run.score(method, queries)
    seconds = time.perf_counter() - began
    if Distributed.current().rank != 0:
        return
    heatmaps = []
    if isinstance(method, NDA):
        heatmaps = _save_heatmaps(
            args, queries, train_data, scores, method.config, checkpoints[0], device
        )
    # The command's own record: the queries as named on the command line, and its options.
    record_run(args.out, scores.method, _model_paths(args), args.queries, _command_settings(args))
    _print_top(args, scores)
    how = (
        ""
        if model_free
        else f", {_models_text(args, checkpoints)}, {method.describe(scores.settings)}"
    )
    print(
        f"{method.name}: {len(scores.query_ids)} queries x {len(scores.train_ids)} training "
        f"images{how}, in {seconds:.0f} s on {device}\n"
        f"scores: {run.layout.scores(method.name)}"
    )
    if heatmaps:
        print(f"heatmaps: {len(heatmaps)} files in {heatmaps[0].parent}")


def _method_config(args: argparse.Namespace, method_cls: type[Method]) -> Any:
    """The method's settings from its options; options of other methods are refused."""
    reject_foreign_options(args, args.method_options, method_cls.config_cls, args.method)
    if method_cls is NDA:
        # NDA shares --precision and --max-memory-mb with the features; its timesteps are its own.
        timesteps = args.nda_timesteps or NDAConfig().timesteps
        return dataclass_from_args(
            NDAConfig,
            args,
            dtype=args.precision,
            max_memory_mb=args.max_memory_mb,
            timesteps=timesteps,
        )
    return dataclass_from_args(method_cls.config_cls, args)


def _attributed_models(args: argparse.Namespace) -> list[Any]:
    """The checkpoints, or the one local diffusers pipeline, that ``attribute`` explains."""
    if args.pipeline is not None:
        if args.checkpoints:
            raise ConfigError("give checkpoints or --pipeline, not both")
        if args.data is None:
            raise ConfigError("--pipeline records no training images: give them as --data")
        if args.data != "digits":
            # run.json records it, and the report reloads the images from it.
            args.data = str(Path(args.data).resolve())
        return [load_pipeline(args.pipeline, lora=args.lora_weights)]
    if not args.checkpoints:
        raise ConfigError("give one or more checkpoints, or --pipeline PATH")
    for option in ("lora_weights", "data"):
        if getattr(args, option) is not None:
            flag = "--" + option.replace("_", "-")
            raise ConfigError(f"{flag} applies to --pipeline; a checkpoint records its own")
    return [
        load_checkpoint(path, trust_remote_code=args.trust_remote_code) for path in args.checkpoints
    ]


def _models_text(args: argparse.Namespace, checkpoints: list[Any]) -> str:
    return "1 pipeline" if args.pipeline is not None else f"{len(checkpoints)} checkpoint(s)"


def _model_paths(args: argparse.Namespace) -> list[str]:
    return [args.pipeline] if args.pipeline is not None else list(args.checkpoints)


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _join_process_group(device: torch.device) -> torch.device:
    """Join torchrun's job: NCCL with one GPU per local rank, or gloo on the CPU."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _save_heatmaps(
    args: argparse.Namespace,
    queries: ImageDataset,
    train: ImageDataset,
    scores: Scores,
    config: NDAConfig,
    checkpoint: Any,
    device: torch.device,
) -> list[Path]:
    """For the first ``--heatmaps`` queries and their top training image: both NDA maps."""
    folder = Path(args.out) / "heatmaps"
    paths = []
    for query_id in scores.query_ids[: args.heatmaps]:
        best = int(scores.top_k(int(query_id), 1)[0][0])
        query_map, train_map = nda_heatmaps(
            queries,
            train,
            int(query_id),
            best,
            config,
            scheduler_config=checkpoint.scheduler_config,
            device=device,
        )
        stem = f"query-{int(query_id)}-train-{best}"
        paths.append(
            save_heatmap(
                queries.select([int(query_id)]).images[0], query_map, folder / f"{stem}-query.png"
            )
        )
        paths.append(
            save_heatmap(train.select([best]).images[0], train_map, folder / f"{stem}-train.png")
        )
    return paths


def _command_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The options given to ``attribute``, for run.json; the scores hold the resolved settings."""
    recorded_elsewhere = {"run", "method_options", "checkpoints", "queries", "out"}
    display = {"debug", "quiet", "show", "show_top"}
    return given_options(args, recorded_elsewhere | display)


def _print_top(args: argparse.Namespace, scores: Scores) -> None:
    for query_id in scores.query_ids[: args.show]:
        proponents, opponents = scores.top_k(int(query_id), args.show_top)
        print(f"query {query_id}: top {proponents.tolist()}  bottom {opponents.tolist()}")


def _attribution_data(checkpoint: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """The training images (the checkpoint's, or --data), and the queries (held-out or a path).

    ``--prompts`` gives prompts to images that have none (a template), ``--layout`` the axis
    order of those in .npz files; a pipeline's held-out split does not exist, so its queries
    must be a path.
    """
    if args.data is not None:
        train = load_dataset(args.data, prompts=args.prompts, layout=args.layout)
    else:
        train = checkpoint.training_data()
    if args.queries != "held-out":
        return train, load_dataset(args.queries, prompts=args.prompts, layout=args.layout)
    if args.data is not None:
        raise ConfigError("a --pipeline has no held-out split: give --queries PATH")
    return train, checkpoint.heldout_data()
