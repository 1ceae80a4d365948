"""``diffattr info`` (what a path holds) and ``diffattr models`` (the model registry)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.data import load_dataset, load_npz
from diffattr.errors import DataError
from diffattr.features import FeatureStore
from diffattr.features._store import MANIFEST_FILE
from diffattr.methods import SIGN_CONVENTION, Scores
from diffattr.methods._scores import META_FILE as SCORES_META
from diffattr.models import available_models, load_checkpoint
from diffattr.models._checkpoint import CHECKPOINT_FILE


def add_parser(commands: Any) -> None:
    """Register ``diffattr info``."""
    parser = commands.add_parser(
        "info", help="print the metadata of a checkpoint, feature store, scores, samples or dataset"
    )
    parser.add_argument(
        "path",
        help="checkpoint, feature store or scores dir, samples dir or .npz, image folder, 'digits'",
    )
    parser.set_defaults(run=info)


def add_models_parser(commands: Any) -> None:
    """Register ``diffattr models``."""
    parser = commands.add_parser("models", help="list the built-in model configurations")
    parser.set_defaults(run=models)


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


def models(args: argparse.Namespace) -> None:
    """``diffattr models``: list the registry."""
    for name, description in available_models().items():
        print(f"{name:12s} {description}")
