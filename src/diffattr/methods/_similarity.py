"""Model-free baselines: cosine similarity of raw pixels or of a feature extractor's embeddings."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from diffattr.data import ImageDataset
from diffattr.errors import DataError
from diffattr.methods._scores import Scores

Extractor = Callable[[torch.Tensor], torch.Tensor]


def pixel_cosine_scores(queries: ImageDataset, train: ImageDataset) -> Scores:
    """Cosine similarity of the flattened pixels (in [-1, 1]) of each query and training image.

    Raises:
        DataError: The two sets differ in channels or image size.
    """
    _check_same_shape(queries, train)
    return _cosine(_flat(queries.images), _flat(train.images), queries, train, "pixel-cos", {})


@torch.no_grad()
def embedding_cosine_scores(
    queries: ImageDataset,
    train: ImageDataset,
    extractor: Extractor,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    name: str = "embedding",
) -> Scores:
    """Cosine similarity of embeddings from any user-supplied extractor (no downloaded weights).

    Args:
        queries: The images to explain.
        train: The training images.
        extractor: Maps a batch (B, C, H, W) in [-1, 1] to embeddings (B, d), e.g. a torch
            module in eval mode; called without gradients.
        batch_size: Images per call.
        device: Where to run the extractor.
        name: Recorded in the settings, to tell extractors apart.

    Raises:
        DataError: The extractor does not return one finite (B, d) row per image.
    """
    embed_queries = _embed(extractor, queries, batch_size, device)
    embed_train = _embed(extractor, train, batch_size, device)
    if embed_queries.shape[1] != embed_train.shape[1]:
        raise DataError("the extractor gave embeddings of different sizes to the two sets")
    return _cosine(
        embed_queries,
        embed_train,
        queries,
        train,
        "embedding-cos",
        {"extractor": name, "dim": int(embed_train.shape[1])},
    )


def _embed(
    extractor: Extractor, data: ImageDataset, batch_size: int, device: str | torch.device
) -> np.ndarray:
    parts = []
    for start in range(0, len(data), batch_size):
        batch = data.images[start : start + batch_size].to(device)
        out = extractor(batch)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or len(out) != len(batch):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DataError(
                f"the extractor must return a (B, d) tensor for {len(batch)} images, got {shape}"
            )
        parts.append(out.detach().double().cpu().numpy())
    embeddings = np.concatenate(parts)
    if not np.isfinite(embeddings).all():
        raise DataError(f"the extractor returned NaN or infinite embeddings for {data.name!r}")
    return embeddings


def _flat(images: torch.Tensor) -> np.ndarray:
    return images.reshape(len(images), -1).double().numpy()


def _cosine(
    queries: np.ndarray,
    train: np.ndarray,
    query_data: ImageDataset,
    train_data: ImageDataset,
    method: str,
    settings: dict,
) -> Scores:
    def unit(rows: np.ndarray) -> np.ndarray:
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)

    return Scores(
        values=unit(queries) @ unit(train).T,
        query_ids=query_data.ids,
        train_ids=train_data.ids,
        method=method,
        settings=settings,
    )


def _check_same_shape(queries: ImageDataset, train: ImageDataset) -> None:
    if queries.images.shape[1:] != train.images.shape[1:]:
        raise DataError(
            f"query images {tuple(queries.images.shape[1:])} and training images "
            f"{tuple(train.images.shape[1:])} differ in shape"
        )


def random_scores(queries: ImageDataset, train: ImageDataset, seed: int = 0) -> Scores:
    """Independent standard normal scores: the chance baseline every evaluation should show.

    A query's row is drawn from (seed, query id) and its columns are assigned by the rank of the
    training id, so the same images in another order get the same scores.
    """
    rows = np.array(
        [
            np.random.default_rng([seed, int(q) & 0xFFFFFFFF, 0x5EED]).standard_normal(len(train))
            for q in queries.ids
        ]
    )
    rank = np.argsort(np.argsort(train.ids, kind="stable"), kind="stable")
    return Scores(
        values=rows[:, rank].reshape(len(queries), len(train)),
        query_ids=queries.ids,
        train_ids=train.ids,
        method="random",
        settings={"seed": seed},
    )
