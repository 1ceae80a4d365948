"""``diffattr plan``: memory, disk and time of an attribution run, before anything long starts.

Gradient methods: their featurisation (:func:`diffattr.features.estimate_featurization`). NDA
(``--method nda``), which needs no model: its pass over the training set
(:func:`diffattr.methods._nda.estimate_nda`). The curvature stage of K-FAC, EK-FAC and DAS with
curvature (``--method curvature``): its two passes over the training set and its factors
(:func:`diffattr.features._curvature_plan.estimate_curvature_cost`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from diffattr._device import resolve_device
from diffattr.cli._options import (
    add_dataclass_options,
    add_feature_options,
    dataclass_from_args,
    features_from_args,
)
from diffattr.features import choose_backend, estimate_featurization
from diffattr.features._curvature import CurvatureConfig
from diffattr.features._curvature_plan import estimate_curvature_cost
from diffattr.methods._journey import estimate_journey
from diffattr.methods._nda import NDAConfig, estimate_nda
from diffattr.methods._unlearn import estimate_unlearn
from diffattr.models import (
    LoRAConfig,
    available_models,
    build_model,
    default_scheduler_config,
    model_spec,
)


def add_parser(commands: Any) -> None:
    """Register ``diffattr plan``."""
    parser = commands.add_parser(
        "plan",
        help="expected memory, disk and time of featurising a dataset, or of NDA (a short probe)",
    )
    parser.add_argument(
        "--method",
        choices=["features", "nda", "curvature", "journey-trak", "unlearn"],
        default="features",
        help="features (default): a gradient method's featurisation; nda: NDA's pass over the "
        "training set (no model; its settings below, --max-memory-mb as for attribute); "
        "curvature: the K-FAC / EK-FAC stage over the training set (CurvatureConfig below); "
        "journey-trak, unlearn: their time once and per query (the methods' defaults)",
    )
    parser.add_argument(
        "--model",
        default="unet-tiny",
        help=f"registry name ({', '.join(available_models())}) or module:factory",
    )
    parser.add_argument("--channels", type=int, default=1, help="image channels (default: 1)")
    parser.add_argument("--image-size", type=int, default=8, help="image side (default: 8)")
    parser.add_argument("--n-train", type=int, required=True, help="training images")
    parser.add_argument("--n-queries", type=int, default=100, help="query images (default: 100)")
    # The same feature options as `attribute`, so a plan describes the run it precedes.
    add_feature_options(parser.add_argument_group("features (FeatureConfig settings)"))
    parser.add_argument(
        "--parameters", nargs="+", metavar="GLOB", help="only parameters matching these globs"
    )
    parser.add_argument(
        "--lora",
        type=int,
        metavar="RANK",
        help="plan attribution over LoRA adapters of this rank (what a fine-tune's are)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    add_dataclass_options(parser, NDAConfig, skip=("seed", "mask_value"))
    add_dataclass_options(parser, CurvatureConfig, skip=("seed",))
    parser.set_defaults(run=plan_command)


def plan_command(args: argparse.Namespace) -> None:
    """Build the model from its config (no weights needed), probe, and print the estimate."""
    device = resolve_device(args.device)
    if args.method == "nda":
        _plan_nda(args, device)
        return
    spec = model_spec(args.model, in_channels=args.channels, sample_size=args.image_size)
    if args.lora is not None:
        spec = spec.with_lora(LoRAConfig(rank=args.lora))
    model = build_model(spec).to(device)
    n = args.n_train + args.n_queries
    features = features_from_args(args)
    if args.method == "curvature":
        _plan_curvature(args, model, features, device)
        return
    if args.method in ("journey-trak", "unlearn"):
        _plan_per_query(args, model, features, device)
        return
    estimate = estimate_featurization(
        model,
        default_scheduler_config(),
        features,
        image_shape=(args.channels, args.image_size, args.image_size),
        n_samples=n,
        batch_size=args.batch_size,
        device=device,
    )
    if args.json:
        print(json.dumps(estimate.to_dict(), indent=2))
        return
    print(
        f"{args.model}: {estimate.parameters:,} parameters; {n:,} images x {estimate.timesteps} "
        f"timesteps, k = {estimate.proj_dim}, batch {estimate.batch_size}, on {device}"
    )
    backend = estimate.backend
    choice = choose_backend(model, args.parameters)
    if features.backend == "auto":
        print(f"backend: {backend} (auto: {choice.reason})")
    else:
        print(
            f"backend: {backend} (asked for; the default rule says {choice.backend}: "
            f"{choice.reason})"
        )
    if estimate.layout:
        print("per-layer factored features (d_out x d_in -> k_out x k_in):")
        print("\n".join(estimate.layout))
    _table(
        "memory (GB):",
        estimate.memory_bytes,
        1e9,
        ("sum (upper bound)", estimate.peak_memory_bytes),
    )
    if backend == "vmap":
        kept = "kept in memory" if estimate.matrix_kept else "regenerated per buffer"
        print(f"projection matrix: {kept}")
    print(f"disk for the feature stores: {estimate.disk_bytes / 1e9:.3f} GB")
    _table("time (hours):", estimate.seconds, 3600, ("total", estimate.total_seconds))
    probe = estimate.probe
    if backend == "factored":
        print(
            f"probe: {probe['seconds_per_gradient_pair'] * 1e3:.2f} ms per (image, timestep) "
            "projected gradient"
        )
        return
    print(
        f"probe: {probe['seconds_per_gradient_pair'] * 1e3:.2f} ms per (image, timestep) "
        f"gradient, {probe['seconds_per_matrix_element'] * 1e9:.2f} ns per matrix entry, "
        f"{probe['matmul_gflops']:.0f} GFLOP/s multiply"
    )


def _plan_nda(args: argparse.Namespace, device: torch.device) -> None:
    """Probe NDA's pass on random images of the given shape and print the estimate."""
    config = dataclass_from_args(
        NDAConfig,
        args,
        # --timesteps is the features' K; NDA's timesteps are its own (as for attribute).
        timesteps=NDAConfig().timesteps,
        max_memory_mb=args.max_memory_mb,
    )
    shape = (args.channels, args.image_size, args.image_size)
    estimate = estimate_nda(args.n_train, shape, config, n_queries=args.n_queries, device=device)
    if args.json:
        print(json.dumps(estimate.to_dict(), indent=2))
        return
    top_k = "all" if config.top_k is None else config.top_k
    print(
        f"nda: {args.n_queries:,} queries x {args.n_train:,} training images of "
        f"{'x'.join(map(str, shape))}, top-K {top_k}, {len(config.timesteps)} timesteps x "
        f"{config.noise_draws} noise draws, {config.dtype}, on {device} "
        f"({estimate.workers} worker threads, {estimate.batch} query rows per batch)"
    )
    _table(
        "memory (GB):",
        estimate.memory_bytes,
        1e9,
        ("sum (upper bound)", estimate.peak_memory_bytes),
    )
    _table("time (hours):", estimate.seconds, 3600, ("total", estimate.total_seconds))
    probe = estimate.probe
    print(
        f"per query: {estimate.seconds_per_query:.2f} s (probe: {probe['query_rows']} query rows "
        f"against {probe['training_images']} random training images, "
        f"{probe['seconds_scoring']:.3f} s per timestep; scaled linearly to N)"
    )


def _plan_curvature(
    args: argparse.Namespace, model: torch.nn.Module, features: Any, device: torch.device
) -> None:
    """Probe the curvature stage on random images of the given shape and print the estimate."""
    config = dataclass_from_args(CurvatureConfig, args)
    shape = (args.channels, args.image_size, args.image_size)
    estimate = estimate_curvature_cost(
        model,
        default_scheduler_config(),
        features,
        config,
        image_shape=shape,
        n_images=args.n_train,
        batch_size=args.batch_size,
        device=device,
    )
    if args.json:
        print(json.dumps(estimate.to_dict(), indent=2))
        return
    print(
        f"curvature stage of {args.model}: {estimate.parameters:,} parameters in "
        f"{len(estimate.layers)} layers (+ {estimate.rest:,} on the diagonal); "
        f"{args.n_train:,} images x {estimate.timesteps} timesteps x {estimate.directions} "
        f"output directions, batch {estimate.batch_size}, on {device}"
    )
    _table(
        "memory (GB):",
        estimate.memory_bytes,
        1e9,
        ("peak", estimate.peak_memory_bytes),
    )
    print(f"disk for curvature.safetensors: {estimate.disk_bytes / 1e9:.3f} GB")
    _table("time (hours):", estimate.seconds, 3600, ("total", estimate.total_seconds))
    print(
        f"probe: {estimate.probe['seconds_per_factor_batch']:.3f} s (factors) and "
        f"{estimate.probe['seconds_per_eigen_batch']:.3f} s (EK-FAC) per batch and timestep; "
        f"largest factor side {estimate.probe['largest_factor_side']:.0f}"
    )


def _plan_per_query(
    args: argparse.Namespace, model: torch.nn.Module, features: Any, device: torch.device
) -> None:
    """Journey-TRAK's or unlearning's time once and per query, from short probes.

    :func:`diffattr.methods._journey.estimate_journey` (a DDPM chain of the default steps) and
    :func:`diffattr.methods._unlearn.estimate_unlearn`, with the methods' default settings.
    """
    shape = (args.channels, args.image_size, args.image_size)
    common = {"image_shape": shape, "n_train": args.n_train, "n_queries": args.n_queries}
    if args.method == "journey-trak":
        estimate: Any = estimate_journey(
            model,
            default_scheduler_config(),
            features,
            batch_size=args.batch_size,
            device=device,
            **common,
        )
    else:
        estimate = estimate_unlearn(
            model, default_scheduler_config(), features=features, device=device, **common
        )
    if args.json:
        print(json.dumps(estimate.to_dict(), indent=2))
        return
    print(
        f"{args.method} on {args.model}: {args.n_train:,} training images, "
        f"{args.n_queries:,} queries, on {device} (the method's default settings)"
    )
    _table(
        "memory (GB):",
        estimate.memory_bytes,
        1e9,
        ("sum (upper bound)", estimate.peak_memory_bytes),
    )
    _table("time once (hours):", estimate.seconds_once, 3600)
    _table(
        "time per query (seconds):",
        estimate.seconds_per_query,
        1,
        ("per query", estimate.per_query_seconds),
    )
    print(f"total (hours): {estimate.total_seconds / 3600:.3f}")


def _table(
    title: str, rows: dict[str, float], unit: float, last: tuple[str, float] | None = None
) -> None:
    """Print ``title``, then one line per row (and ``last``, a sum or peak) in ``unit``s."""
    print(title)
    for name, value in [*rows.items(), *([last] if last else [])]:
        print(f"  {name:24s} {value / unit:10.3f}")
