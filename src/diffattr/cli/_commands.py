"""Implementations of the ``diffattr`` subcommands: parse-free functions over the public API."""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from diffattr._device import resolve_device
from diffattr._io import output_lock, write_json
from diffattr.cli._options import (
    dataclass_from_args,
    features_from_args,
    given_options,
    reject_foreign_options,
)
from diffattr.data import (
    ImageDataset,
    load_dataset,
    load_npz,
    save_grid,
    split_dataset,
)
from diffattr.errors import ConfigError, DataError
from diffattr.evaluation import ClassConfidence
from diffattr.features import (
    Distributed,
    FeatureConfig,
    FeatureStore,
    PlanConfig,
    ProjectionConfig,
)
from diffattr.features._store import MANIFEST_FILE
from diffattr.methods import (
    DAS,
    NDA,
    SIGN_CONVENTION,
    Attribution,
    DASConfig,
    Method,
    ModelFreeMethod,
    NDAConfig,
    Scores,
    get_method,
    nda_heatmaps,
    record_run,
    save_heatmap,
)
from diffattr.methods import attribute as attribute_images
from diffattr.methods._scores import META_FILE as SCORES_META
from diffattr.models import (
    Checkpoint,
    LoRAConfig,
    TrainConfig,
    VAEConfig,
    available_models,
    load_checkpoint,
    load_pipeline,
    model_spec,
    sample_checkpoint,
    save_samples,
    vae_latent_scale,
)
from diffattr.models import (
    train as train_model,
)
from diffattr.models import (
    train_vae as train_autoencoder,
)
from diffattr.models._checkpoint import CHECKPOINT_FILE
from diffattr.report import write_report

#: The demo's training length: enough for clean digits from unet-tiny (see README for timings).
DEMO_STEPS = 4000
#: Methods that need no gradients: the checkpoint only names the training data.
#: The demo's attribution: DAS defaults with 10 uniform timesteps and k = 1024.
DEMO_TIMESTEPS = 10
DEMO_PROJ_DIM = 1024

#: A subcommand: what ``set_defaults(run=...)`` names.
Command = Callable[[argparse.Namespace], None]


def locking_out(command: Command) -> Command:
    """Run ``command`` holding the lock on its ``--out`` directory (see :func:`output_lock`).

    The lock is taken before anything else, so an output that cannot be written is refused
    before any work, and a second process writing the same directory is refused outright.
    Under torchrun only rank 0 takes it: the other ranks write into the directory it holds.
    """

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> None:
        if int(os.environ.get("RANK", "0")) > 0:
            command(args)
            return
        with output_lock(args.out):
            command(args)

    return run


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


def info(args: argparse.Namespace) -> None:
    """``diffattr info``: print what a checkpoint, store, scores, samples or dataset holds."""
    path = Path(args.path)
    if (path / CHECKPOINT_FILE).is_file():
        # Trusted: describing a checkpoint builds nothing, and shows which factory it names.
        doc = load_checkpoint(path, trust_remote_code=True).describe()
        print(json.dumps(doc, indent=2, sort_keys=True))
    elif (path / MANIFEST_FILE).is_file():
        print(json.dumps(FeatureStore.open(path).describe(), indent=2, sort_keys=True))
    elif (path / SCORES_META).is_file():
        scores = Scores.load(path)
        summary = {
            "method": scores.method,
            "shape": list(scores.values.shape),
            "queries": _id_range(scores.query_ids),
            "training images": _id_range(scores.train_ids),
            "sign_convention": SIGN_CONVENTION,
            "settings": scores.settings,
        }
        print(json.dumps(summary, indent=2, sort_keys=True))
    elif path.is_dir() and (path / "samples.npz").is_file():
        _print_npz(path / "samples.npz")
    elif path.suffix == ".npz" and path.is_file():
        _print_npz(path)
    elif str(args.path) == "digits" or path.is_dir():
        print(json.dumps(load_dataset(args.path).describe(), indent=2, sort_keys=True))
    else:
        raise DataError(
            f"{path}: not a checkpoint, feature store, scores or samples directory, .npz file "
            "or image folder"
        )


def _id_range(ids: np.ndarray) -> str:
    return f"{len(ids)} ids ({int(ids.min())}..{int(ids.max())})"


def models(args: argparse.Namespace) -> None:
    """``diffattr models``: list the registry."""
    for name, description in available_models().items():
        print(f"{name:12s} {description}")


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
    method = DAS(DASConfig())
    features = FeatureConfig(
        plan=PlanConfig(num_steps=DEMO_TIMESTEPS),
        projection=ProjectionConfig(dim=DEMO_PROJ_DIM, max_memory_mb=4096),
    )
    attribution = out / "attribution"
    scores = attribute_images(
        method,
        [checkpoint],
        split.train,
        generated,
        features,
        attribution,
        device=str(device),
        progress=not args.quiet,
    )
    record_run(
        attribution,
        method.name,
        [checkpoint.path],
        str(npz),
        {"method": method.name, "timesteps": DEMO_TIMESTEPS, "proj_dim": DEMO_PROJ_DIM},
    )
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


def _side(dataset: Any) -> int:
    height, width = dataset.image_size
    if height != width:
        raise ConfigError(
            f"models take square images; {dataset.name} is {height}x{width}: pass --size"
        )
    return height


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


def _print_npz(path: Path) -> None:
    dataset = load_npz(path)
    print(json.dumps(dataset.describe(), indent=2, sort_keys=True))
    with np.load(path) as arrays:
        if "seeds" in arrays:
            seeds = arrays["seeds"]
            print(f"seeds: {len(seeds)} ({seeds.min()}..{seeds.max()})")
    sidecar = path.with_name("samples.json")
    if sidecar.is_file():
        print(sidecar.read_text())


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
        else (
            f", {_models_text(args, checkpoints)}, {args.timesteps} timesteps, k={args.proj_dim} "
            f"({scores.settings['features']['backend']} backend)"
        )
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
