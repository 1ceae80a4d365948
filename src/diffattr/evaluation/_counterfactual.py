"""Counterfactual evaluation: remove a query's top attributed training images and retrain.

The retrained model regenerates the query from its seed (and prompt), and the distance the image
moves is compared with the distance after removing as many random training images.

Layout of the output directory::

    models/<unit>/          retrained checkpoints (resumed if interrupted; deleted when done
                            unless kept)
    pieces/<unit>.npz       regenerated images of one retrained model (the unit of resumption)
    counterfactual.json     settings, removed ids and distances per query and removal
    counterfactual.png      rows: a query, then its regeneration after each removal
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from diffattr._config import is_int
from diffattr._io import write_json, write_npz
from diffattr._seed import generator
from diffattr.data import ImageDataset, save_grid
from diffattr.errors import ConfigError, DataError
from diffattr.evaluation._retrain import recorded_init, recorded_recipe, retrain_like
from diffattr.methods import Scores
from diffattr.models import Checkpoint, TrainConfig, sample_checkpoint

#: Maps images (B, C, H, W) in [-1, 1] to feature rows (B, d) for the feature distance.
FeatureMap = Callable[[torch.Tensor], np.ndarray]


@dataclass(frozen=True, kw_only=True, slots=True)
class CounterfactualConfig:
    """Settings of a counterfactual removal-and-retrain experiment."""

    k: int = field(default=10, metadata={"help": "training images removed per query"})
    n_random: int = field(default=1, metadata={"help": "random removals of k images per query"})
    sampler: Literal["ddpm", "ddim"] = field(
        default="ddpm", metadata={"help": "the sampler the queries were generated with"}
    )
    sampling_steps: int | None = field(
        default=None, metadata={"help": "its denoising steps (default: the sampler's default)"}
    )
    guidance_scale: float = field(
        default=1.0,
        metadata={
            "help": "conditional models: the classifier-free guidance the queries were "
            "generated with (1: the conditional model alone)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the random removals"})

    def __post_init__(self) -> None:
        if not is_int(self.k) or self.k < 1:
            raise ConfigError(f"CounterfactualConfig.k={self.k!r} is invalid: must be >= 1")
        if not is_int(self.n_random) or self.n_random < 0:
            raise ConfigError(
                f"CounterfactualConfig.n_random={self.n_random!r} is invalid: must be >= 0"
            )
        if self.sampler not in ("ddpm", "ddim"):
            raise ConfigError(f"CounterfactualConfig.sampler={self.sampler!r}: ddpm or ddim")
        scale = self.guidance_scale
        if not (isinstance(scale, float | int) and math.isfinite(scale) and scale >= 0):
            raise ConfigError(
                f"CounterfactualConfig.guidance_scale={scale!r} is invalid: must be a finite "
                "number >= 0"
            )


@dataclass(frozen=True)
class CounterfactualResult:
    """Distances of each query's regeneration from the original, per removal.

    Attributes:
        pixel_l2: removal label -> (Q,) root-mean-square pixel difference to the original.
        feature_distance: removal label -> (Q,) distance in the feature map's space (empty
            without a feature map).
        removed: removal label -> (Q, k) removed training ids.
        query_ids: (Q,) the queries' seeds.
        control_l2: RMS pixel difference after retraining with nothing removed: the numerical
            noise floor (0 when retraining is deterministic).
    """

    pixel_l2: dict[str, np.ndarray]
    feature_distance: dict[str, np.ndarray]
    removed: dict[str, np.ndarray]
    query_ids: np.ndarray
    control_l2: np.ndarray

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean distances per removal label."""
        out = {}
        for label, values in self.pixel_l2.items():
            out[label] = {"pixel_l2": float(values.mean())}
            if label in self.feature_distance:
                out[label]["feature_distance"] = float(self.feature_distance[label].mean())
        return out


def counterfactual(
    base: Checkpoint,
    queries: ImageDataset,
    scores: Mapping[str, Scores],
    config: CounterfactualConfig,
    out_dir: str | os.PathLike[str],
    *,
    feature_map: FeatureMap | None = None,
    device: str | torch.device = "cpu",
    keep_models: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> CounterfactualResult:
    """Run the removal-and-retrain experiment for generated queries.

    Every retrained model repeats the base's training (see
    :func:`~diffattr.evaluation.retrain_like`: its recipe and seed, and the pretrained model or
    autoencoder it started from) on the training set minus the removed images, and regenerates
    each query from its own seed and prompt, so the only difference from the base is the
    removal.

    Args:
        base: The checkpoint that generated the queries.
        queries: Generated images; their ids are the sampling seeds, and a conditional
            model's carry the prompts they were generated from.
        scores: Removal label (e.g. the method) -> :class:`~diffattr.methods.Scores` of these
            queries against the base's training images; each query's top-k are removed.
        config: k, random removals, the sampler the queries came from.
        out_dir: Output directory (resumed if present).
        feature_map: Images -> feature rows, for the feature distance (None: pixels only).
        device: Where to train and sample.
        keep_models: Keep each retrained checkpoint under ``models/`` after sampling from it.
        trust_remote_code: Allow a pretrained model (or autoencoder) that the base started from
            whose model is an importable ``module:factory``; see
            :func:`~diffattr.models.load_checkpoint`.
        progress: Show a progress bar.

    Raises:
        CheckpointError: The base records no training recipe, or the checkpoint it started from
            is missing or has changed since.
        DataError: Scores do not cover the queries or the training images, or the queries are
            not what the base generates from their seeds (and prompts) with this sampler.
    """
    out = Path(out_dir)
    train_data = base.training_data()
    recipe = recorded_recipe(base)
    init = recorded_init(base, trust_remote_code=trust_remote_code)
    if config.k >= len(train_data):
        raise ConfigError(f"k={config.k} removes the whole training set of {len(train_data)}")
    seeds = [int(i) for i in queries.ids]
    prompts = None if queries.prompts is None else dict(zip(seeds, queries.prompts, strict=True))
    originals = sample_checkpoint(
        base, seeds, **_sampling(config, prompts, seeds), device=device, progress=False
    )
    mismatch = float((originals - queries.images).abs().max()) if len(seeds) else 0.0
    if mismatch > 1e-2:
        raise DataError(
            f"the queries are not what {base.path} generates from their seeds with "
            f"{config.sampler} (max pixel difference {mismatch:.3f}); pass the sampler used"
        )
    removals = {"none": {s: np.array([], dtype=np.int64) for s in seeds}}
    for label, matrix in scores.items():
        removals[label] = _top_k(matrix, seeds, train_data, config.k, label)
    for j in range(config.n_random):
        label = f"random-{j}"
        removals[label] = {
            s: np.sort(
                train_data.ids[
                    torch.randperm(len(train_data), generator=generator(config.seed, label, s))[
                        : config.k
                    ].numpy()
                ]
            )
            for s in seeds
        }
    units = [("none", None)] + [(lb, s) for lb in removals if lb != "none" for s in seeds]
    regenerated: dict[str, dict[int, torch.Tensor]] = {label: {} for label in removals}
    shared = _Retrain(base, init, recipe, train_data, config, prompts, device, keep_models)
    bar = tqdm(units, desc="counterfactual", unit="model", disable=not progress)
    for label, seed in bar:
        removed = removals[label][seeds[0] if seed is None else seed]
        which = seeds if seed is None else [seed]
        name = label if seed is None else f"{label}-seed-{seed}"
        images = _retrain_and_sample(shared, removed, which, out / name)
        for s, image in zip(which, images, strict=True):
            regenerated[label][s] = image
    control = _rms(torch.stack([regenerated["none"][s] for s in seeds]), originals)
    pixel, feature, removed_ids = {}, {}, {}
    for label in removals:
        if label == "none":
            continue
        after = torch.stack([regenerated[label][s] for s in seeds])
        pixel[label] = _rms(after, originals)
        if feature_map is not None:
            feature[label] = np.linalg.norm(feature_map(after) - feature_map(originals), axis=1)
        removed_ids[label] = np.stack([removals[label][s] for s in seeds])
    result = CounterfactualResult(pixel, feature, removed_ids, np.asarray(seeds), control)
    _save(out, result, config, originals, regenerated, seeds)
    return result


def _sampling(
    config: CounterfactualConfig, prompts: dict[int, str] | None, seeds: list[int]
) -> dict[str, Any]:
    return {
        "sampler": config.sampler,
        "num_inference_steps": config.sampling_steps,
        "prompts": None if prompts is None else [prompts[s] for s in seeds],
        "guidance_scale": config.guidance_scale,
    }


def _top_k(
    scores: Scores, seeds: list[int], train_data: ImageDataset, k: int, label: str
) -> dict[int, np.ndarray]:
    train_ids = {int(i) for i in train_data.ids}
    if {int(i) for i in scores.train_ids} != train_ids:
        raise DataError(f"{label}: the scores' training ids are not the base's training images")
    rows = {int(q): n for n, q in enumerate(scores.query_ids)}
    missing = [s for s in seeds if s not in rows]
    if missing:
        raise DataError(f"{label}: the scores have no row for queries {missing[:5]}")
    return {s: np.sort(scores.top_k(s, k)[0]) for s in seeds}


@dataclass(frozen=True)
class _Retrain:
    """What every retrained model of one experiment shares."""

    base: Checkpoint
    init: Checkpoint | None
    recipe: TrainConfig
    train_data: ImageDataset
    config: CounterfactualConfig
    prompts: dict[int, str] | None
    device: str | torch.device
    keep_model: bool


def _retrain_and_sample(
    shared: _Retrain, removed: np.ndarray, seeds: list[int], unit: Path
) -> torch.Tensor:
    piece = unit.parent / "pieces" / f"{unit.name}.npz"
    if piece.is_file():
        with np.load(piece) as data:
            if data["removed"].tolist() == removed.tolist() and data["seeds"].tolist() == seeds:
                return torch.from_numpy(data["images"])
    train_data = shared.train_data
    keep = train_data.ids[~np.isin(train_data.ids, removed)]
    model_dir = unit.parent / "models" / unit.name
    checkpoint = retrain_like(
        shared.base,
        train_data.select(keep),
        model_dir,
        init=shared.init,
        recipe=shared.recipe,
        device=shared.device,
    )
    images = sample_checkpoint(
        checkpoint,
        seeds,
        **_sampling(shared.config, shared.prompts, seeds),
        device=shared.device,
        progress=False,
    )
    arrays = {"images": images.numpy(), "removed": removed, "seeds": np.asarray(seeds)}
    write_npz(piece, arrays)
    if not shared.keep_model:
        shutil.rmtree(model_dir, ignore_errors=True)
    return images


def _rms(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return (a - b).double().pow(2).flatten(1).mean(1).sqrt().numpy()


def _save(
    out: Path,
    result: CounterfactualResult,
    config: CounterfactualConfig,
    originals: torch.Tensor,
    regenerated: dict[str, dict[int, torch.Tensor]],
    seeds: list[int],
) -> None:
    doc = {
        "config": asdict(config),
        "query_ids": seeds,
        "summary": result.summary(),
        "control_pixel_l2": result.control_l2.tolist(),
        "pixel_l2": {k: v.tolist() for k, v in result.pixel_l2.items()},
        "feature_distance": {k: v.tolist() for k, v in result.feature_distance.items()},
        "removed": {k: v.tolist() for k, v in result.removed.items()},
    }
    write_json(out / "counterfactual.json", json.loads(json.dumps(doc)))
    labels = [lb for lb in regenerated if lb != "none"]
    tiles = []
    for n, s in enumerate(seeds):
        tiles.append(originals[n : n + 1])
        tiles += [regenerated[lb][s][None] for lb in labels]
    save_grid(torch.cat(tiles), out / "counterfactual.png", nrow=len(labels) + 1)
