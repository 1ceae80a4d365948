"""NDA against a brute-force reference written straight from the definition.

The definition: docs/methods.md, section "NDA: attribution without the model".

The reference extracts every patch with explicit loops over positions from numpy-padded images,
forms all squared distances by subtraction, takes one softmax per query patch over every
(image, position) and sums the top-K weights by sorting: no convolution, no norm expansion, no
pooling phases, no chunking. The fast implementation must match it in float64.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffattr._seed import generator
from diffattr.data import ImageDataset
from diffattr.errors import ConfigError, DataError
from diffattr.methods import _nda as nda
from diffattr.methods._nda import (
    NDAConfig,
    _keys,
    _nda_tau,
    _plan,
    estimate_nda,
    nda_heatmaps,
    nda_scores,
)
from diffattr.models import default_scheduler_config

ABAR = DDPMScheduler.from_config(default_scheduler_config()).alphas_cumprod.double().numpy()


def make(n: int, seed: int, first_id: int, shape=(1, 6, 6)) -> ImageDataset:
    draw = torch.Generator().manual_seed(seed)
    images = torch.rand((n, *shape), generator=draw) * 2 - 1
    return ImageDataset(images=images, ids=first_id + 3 * np.arange(n), name=f"rand{seed}")


# ------------------------------------------------------------------------------ reference


def fine_patch(padded: np.ndarray, i: int, j: int, k: int) -> np.ndarray:
    """The k x k patch centred at (i, j) of an image padded by k // 2 on every side."""
    return padded[:, i : i + k, j : j + k].reshape(-1)


def coarse_patch(padded: np.ndarray, i: int, j: int, k: int) -> np.ndarray:
    """The 2k x 2k patch with top-left (i - k, j - k) of an image padded by k, 2x2-projected."""
    big = padded[:, i : i + 2 * k, j : j + 2 * k]
    channels = big.shape[0]
    out = np.empty((channels, k, k))
    for u in range(k):
        for v in range(k):
            out[:, u, v] = big[:, 2 * u : 2 * u + 2, 2 * v : 2 * v + 2].sum(axis=(1, 2)) / 2
    return out.reshape(-1)


def all_patches(image: np.ndarray, scale: str, k: int, m: float) -> np.ndarray:
    """(H * W, D) patches in raster order, entries outside the image set to m."""
    pad = k // 2 if scale == "fine" else k
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), constant_values=m)
    height, width = image.shape[1:]
    extract = fine_patch if scale == "fine" else coarse_patch
    return np.stack([extract(padded, i, j, k) for i in range(height) for j in range(width)])


def reference_weights(x: np.ndarray, train: np.ndarray, abar: float, scale: str, config):
    """W(p; n, q) of one noised query x (C, H, W) against the scaled keys, shape (P, N, Q)."""
    k, m = config.patch_size, config.mask_value
    a = all_patches(x, scale, k, m)
    b = np.stack([all_patches(math.sqrt(abar) * z, scale, k, m) for z in train])
    distances = ((a[:, None, None, :] - b[None]) ** 2).sum(-1)
    logits = -distances / (2 * (1 - abar))
    flat = logits.reshape(len(a), -1)
    flat = np.exp(flat - flat.max(axis=1, keepdims=True))
    return (flat / flat.sum(axis=1, keepdims=True)).reshape(logits.shape)


def top_sum(weights: np.ndarray, top_k: int | None) -> np.ndarray:
    """(P, N): the sum of the top-K weights over q."""
    ordered = -np.sort(-weights, axis=2)
    return ordered[:, :, :top_k].sum(axis=2)


def noised(query: np.ndarray, query_id: int, t: int, draw: int, seed: int) -> np.ndarray:
    eps = torch.randn(query.shape, generator=generator(seed, "nda-noise", t, draw, query_id))
    return math.sqrt(ABAR[t]) * query + math.sqrt(1 - ABAR[t]) * eps.double().numpy()


def reference(queries: ImageDataset, train: ImageDataset, config: NDAConfig):
    """Scores (n_query, n_train) and, per query, the fine-scale heatmaps of every image."""
    train_np = train.images.double().numpy()
    scores = np.zeros((len(queries), len(train)))
    maps = []
    count = len(config.timesteps) * config.noise_draws
    for row, (query, qid) in enumerate(
        zip(queries.images.double().numpy(), queries.ids, strict=True)
    ):
        query_map = np.zeros((len(train), query.shape[1] * query.shape[2]))
        train_map = np.zeros_like(query_map)
        for t in config.timesteps:
            for draw in range(config.noise_draws):
                x = noised(query, int(qid), t, draw, config.seed)
                for scale, share in (("fine", config.alpha), ("coarse", 1 - config.alpha)):
                    weights = reference_weights(x, train_np, ABAR[t], scale, config)
                    tops = top_sum(weights, config.top_k)
                    scores[row] += share * tops.sum(axis=0) / count
                    if scale == "fine":
                        query_map += tops.T / count
                        train_map += weights.sum(axis=0) / count
        maps.append((query_map, train_map))
    return scores, maps


def rel_error(fast: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(fast - ref).max() / np.abs(ref).max())


# ------------------------------------------------------------------------------ exactness

CASES = {
    "fine only": ({"alpha": 1.0, "top_k": None}, {}),
    "two scales": ({"alpha": 0.5, "top_k": None}, {}),
    "coarse only": ({"alpha": 0.0, "top_k": None}, {}),
    "top-k < H*W": ({"alpha": 0.3, "top_k": 7}, {}),
    "chunked": ({"alpha": 0.5, "top_k": 5}, {"chunk": 2, "batch": 1}),
    "timesteps and draws": ({"timesteps": (50, 300, 700), "noise_draws": 2, "top_k": 4}, {}),
    "three channels": ({"top_k": 6}, {"shape": (3, 5, 6)}),
    "patch 1": ({"patch_size": 1, "top_k": 3}, {}),
    "patch 5": ({"patch_size": 5, "top_k": 8, "mask_value": 3.0}, {"chunk": 3}),
    "odd sizes": ({"top_k": 4, "seed": 7}, {"shape": (1, 5, 7), "batch": 2}),
    "top-k = H*W - 1": ({"top_k": 35}, {}),
    "top-k = H*W": ({"top_k": 36}, {}),
    "row tiles": ({"top_k": 5}, {"tile_rows": 7, "chunk": 2, "batch": 2}),
    "two workers": ({"top_k": 5}, {"workers": 2, "chunk": 1}),
    "columns per chunk": ({"top_k": 5, "alpha": 0.4}, {"keep_columns": False, "chunk": 2}),
}

LAYOUT = ("batch", "chunk", "tile_rows", "workers", "keep_columns")


@pytest.mark.parametrize("case", CASES)
def test_matches_brute_force_reference(case: str) -> None:
    settings, options = dict(CASES[case][0]), CASES[case][1]
    shape = options.get("shape", (1, 6, 6))
    config = NDAConfig(dtype="float64", timesteps=settings.pop("timesteps", (200,)), **settings)
    train, queries = make(5, 0, first_id=4, shape=shape), make(2, 1, first_id=100, shape=shape)
    fast, abars = _nda_tau(queries, train, config, **{k: options.get(k) for k in LAYOUT})
    ref, _ = reference(queries, train, config)
    assert rel_error(fast, ref) < 1e-6
    np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-12 * ref.max())
    assert abars == [float(ABAR[t]) for t in config.timesteps]


@pytest.mark.parametrize("case", ["top-k < H*W", "row tiles", "timesteps and draws"])
def test_partition_path_matches_brute_force_reference(case: str, monkeypatch) -> None:
    """Rows longer than _SORT_MAX_POSITIONS are partitioned instead of sorted."""
    monkeypatch.setattr(nda, "_SORT_MAX_POSITIONS", 0)
    test_matches_brute_force_reference(case)


@pytest.mark.parametrize("case", ["top-k < H*W", "patch 5", "three channels"])
def test_torch_sort_path_matches_brute_force_reference(case: str, monkeypatch) -> None:
    """torch.sort (used where numpy cannot sort in place, e.g. CUDA), run here on the CPU."""
    monkeypatch.setattr(nda, "_NUMPY_SORT_DEVICE_TYPES", ())
    test_matches_brute_force_reference(case)


@pytest.mark.parametrize("sorter", ["sort", "partition", "torch"])
@pytest.mark.parametrize("top_k", [3, 10, 30])
def test_ties_at_the_top_k_boundary(sorter: str, top_k: int, monkeypatch) -> None:
    """Flat regions give equal patches, so equal logits straddle the K-th largest (checked:
    4 equal fine-scale logits at K = 3 and K = 30, some inside the top-K and some not)."""
    if sorter == "partition":
        monkeypatch.setattr(nda, "_SORT_MAX_POSITIONS", 0)
    if sorter == "torch":
        monkeypatch.setattr(nda, "_NUMPY_SORT_DEVICE_TYPES", ())
    train = make(4, 0, first_id=0)
    train.images[:, :, 1:5, 1:5] = -1.0  # a flat 4x4 block in every image
    train.images[2] = 0.5  # a flat image: its 16 interior patches are equal
    queries = make(2, 1, first_id=20)
    config = NDAConfig(dtype="float64", top_k=top_k, timesteps=(20, 600))
    fast, _ = _nda_tau(queries, train, config)
    ref, _ = reference(queries, train, config)
    np.testing.assert_allclose(fast, ref, rtol=1e-9, atol=1e-12 * ref.max())


def test_workers_do_not_change_the_scores() -> None:
    train, queries = make(9, 0, first_id=0, shape=(1, 7, 7)), make(3, 1, 20, shape=(1, 7, 7))
    config = NDAConfig(top_k=6, timesteps=(100, 400))
    alone, _ = _nda_tau(queries, train, config, chunk=1, workers=1)
    shared, _ = _nda_tau(queries, train, config, chunk=1, workers=3)
    np.testing.assert_array_equal(shared, alone)


def test_torch_threads_are_restored() -> None:
    before = torch.get_num_threads()
    train, queries = make(3, 0, first_id=0), make(1, 1, first_id=20)
    _nda_tau(queries, train, NDAConfig(timesteps=(100,)), workers=2, chunk=1)
    nda_heatmaps(queries, train, 20, 0, NDAConfig(timesteps=(100,)))
    assert torch.get_num_threads() == before


def test_progress_counts_queries(capsys: pytest.CaptureFixture[str]) -> None:
    train, queries = make(3, 0, first_id=0), make(2, 1, first_id=20)
    nda_scores(queries, train, NDAConfig(timesteps=(100, 200)), progress=True)
    assert "2.0/2 queries" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["two scales", "top-k < H*W", "three channels", "odd sizes"])
def test_conv2d_path_matches_brute_force_reference(case: str, monkeypatch) -> None:
    """The CUDA path (conv2d cross terms, torch.sort) against the reference, run on the CPU."""
    monkeypatch.setattr(nda, "_GEMM_DEVICE_TYPES", ())
    monkeypatch.setattr(nda, "_NUMPY_SORT_DEVICE_TYPES", ())
    test_matches_brute_force_reference(case)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cuda_matches_cpu(dtype: str) -> None:
    train, queries = make(6, 0, 0, (3, 8, 7)), make(3, 1, 50, (3, 8, 7))
    config = NDAConfig(dtype=dtype, top_k=9, noise_draws=2)
    cpu, _ = _nda_tau(queries, train, config)
    cuda, _ = _nda_tau(queries, train, config, device="cuda")
    assert rel_error(cuda, cpu) < (1e-10 if dtype == "float64" else 1e-3)
    for got, want in zip(
        nda_heatmaps(queries, train, 53, 3, config, device="cuda"),
        nda_heatmaps(queries, train, 53, 3, config),
        strict=True,
    ):
        assert rel_error(got, want) < (1e-10 if dtype == "float64" else 1e-3)


def test_public_scores_chunk_within_a_tiny_memory_budget() -> None:
    train, queries = make(6, 0, 0, (1, 12, 12)), make(2, 1, 50, (1, 12, 12))
    config = NDAConfig(dtype="float64", top_k=5, max_memory_mb=1)
    chunk = _plan(config, 2, len(train), (1, 12, 12), torch.device("cpu")).chunk
    assert chunk < len(train)  # the budget forces several chunks
    scores = nda_scores(queries, train, config, progress=False)
    ref, _ = reference(queries, train, config)
    assert rel_error(scores.values.astype(np.float64), ref) < 1e-6
    assert scores.method == "nda"
    assert scores.settings["top_k"] == 5
    assert scores.settings["num_train_timesteps"] == 1000
    assert np.allclose(scores.settings["alphas_cumprod"], ABAR[list(config.timesteps)])
    np.testing.assert_array_equal(scores.query_ids, queries.ids)
    np.testing.assert_array_equal(scores.train_ids, train.ids)


# ------------------------------------------------------------------------------ properties


def test_noise_depends_only_on_the_query_id() -> None:
    train, queries = make(4, 0, first_id=0), make(3, 1, first_id=20)
    config = NDAConfig(dtype="float64", noise_draws=2, timesteps=(100, 400))
    together, _ = _nda_tau(queries, train, config)
    alone = np.concatenate(
        [_nda_tau(queries.select([i]), train, config)[0] for i in queries.ids[::-1]]
    )[::-1]
    np.testing.assert_allclose(together, alone, rtol=1e-10)


def test_top_k_at_least_positions_equals_all() -> None:
    train, queries = make(4, 0, first_id=0), make(2, 1, first_id=20)
    everything, _ = _nda_tau(queries, train, NDAConfig(dtype="float64", top_k=None))
    at_least, _ = _nda_tau(queries, train, NDAConfig(dtype="float64", top_k=36))
    beyond, _ = _nda_tau(queries, train, NDAConfig(dtype="float64", top_k=100))
    np.testing.assert_allclose(at_least, everything, rtol=1e-12)
    np.testing.assert_allclose(beyond, everything, rtol=1e-12)


@pytest.mark.parametrize("alpha", [1.0, 0.0, 0.4])
def test_each_query_patch_spends_one_unit_of_weight(alpha: float) -> None:
    train, queries = make(5, 0, first_id=0, shape=(3, 5, 4)), make(2, 1, 20, (3, 5, 4))
    config = NDAConfig(dtype="float64", top_k=None, alpha=alpha, timesteps=(10, 500))
    tau, _ = _nda_tau(queries, train, config)
    assert (tau >= 0).all()
    np.testing.assert_allclose(tau.sum(axis=1), 5 * 4, rtol=1e-10)


def test_top_k_scores_are_non_negative_and_at_most_all() -> None:
    train, queries = make(5, 0, first_id=0), make(2, 1, first_id=20)
    top, _ = _nda_tau(queries, train, NDAConfig(dtype="float64", top_k=3))
    everything, _ = _nda_tau(queries, train, NDAConfig(dtype="float64", top_k=None))
    assert (top >= 0).all()
    assert (top <= everything + 1e-12).all()


def test_a_training_image_as_query_ranks_itself_first() -> None:
    train = make(8, 0, first_id=0)
    queries = ImageDataset(images=train.images[[2, 5]], ids=np.array([900, 901]), name="copies")
    scores = nda_scores(queries, train, NDAConfig(timesteps=(1,)), progress=False)
    assert scores.top_k(900, 1)[0][0] == train.ids[2]
    assert scores.top_k(901, 1)[0][0] == train.ids[5]


def test_float32_agrees_with_float64() -> None:
    train, queries = make(6, 0, first_id=0), make(2, 1, first_id=20)
    single, _ = _nda_tau(queries, train, NDAConfig(top_k=5))
    double, _ = _nda_tau(queries, train, NDAConfig(top_k=5, dtype="float64"))
    assert rel_error(single, double) < 1e-3


# ------------------------------------------------------------------------------ heatmaps


@pytest.mark.parametrize("top_k", [None, 4])
def test_heatmaps_match_the_reference(top_k: int | None) -> None:
    train, queries = make(4, 0, first_id=0, shape=(1, 5, 6)), make(2, 1, 20, shape=(1, 5, 6))
    config = NDAConfig(dtype="float64", top_k=top_k, timesteps=(150, 450), noise_draws=2)
    query_map, train_map = nda_heatmaps(queries, train, 23, 6, config)
    assert query_map.shape == train_map.shape == (5, 6)
    assert (query_map >= 0).all()
    assert (train_map >= 0).all()
    _, maps = reference(queries, train, config)
    ref_query, ref_train = maps[1]
    assert rel_error(query_map.reshape(-1), ref_query[2]) < 1e-6
    assert rel_error(train_map.reshape(-1), ref_train[2]) < 1e-6
    # The query map spends exactly the image's fine-scale score.
    fine, _ = _nda_tau(queries, train, NDAConfig(**{**config.to_dict(), "alpha": 1.0}))
    assert query_map.sum() == pytest.approx(fine[1, 2], rel=1e-10)
    if top_k is None:
        assert train_map.sum() == pytest.approx(query_map.sum(), rel=1e-10)


def test_heatmaps_use_the_global_normaliser_when_chunked() -> None:
    train, queries = make(8, 0, 0, (1, 12, 12)), make(1, 1, 20, (1, 12, 12))
    tiny = NDAConfig(dtype="float64", top_k=5, max_memory_mb=1, timesteps=(300,))
    assert _plan(tiny, 1, 8, (1, 12, 12), torch.device("cpu")).chunk < 8
    _, maps = reference(queries, train, tiny)
    for got, want in zip(nda_heatmaps(queries, train, 20, 12, tiny), maps[0], strict=True):
        assert rel_error(got.reshape(-1), want[4]) < 1e-6


def test_heatmaps_reject_unknown_ids() -> None:
    train, queries = make(3, 0, first_id=0), make(1, 1, first_id=20)
    with pytest.raises(DataError, match="query id 21"):
        nda_heatmaps(queries, train, 21, 0, NDAConfig())
    with pytest.raises(DataError, match="training id 1"):
        nda_heatmaps(queries, train, 20, 1, NDAConfig())


# ------------------------------------------------------------------------------ estimate


@pytest.mark.parametrize("budget", [4096, 1])
def test_estimate_counts_the_keys_as_built(budget: int) -> None:
    """A small budget leaves the key columns to each chunk: they then count in the tiles."""
    config = NDAConfig(top_k=10, max_memory_mb=budget)
    estimate = estimate_nda(20_000, (3, 8, 8), config, n_queries=4, repeats=1)
    layout = _plan(config, 4, 20_000, (3, 8, 8), torch.device("cpu"), estimate.workers)
    assert layout.keep_columns == (budget == 4096)
    scaled = torch.zeros((20_000, 3, 8, 8))
    built = scaled.numel()
    for scale in ("fine", "coarse"):
        keys = _keys(scale, scaled, 3, 10.0, layout.keep_columns)
        built += sum(p.numel() for p in keys.planes) + keys.half_norms.numel()
        built += 0 if keys.columns is None else keys.columns.numel()
    assert estimate.memory_bytes["keys (one timestep)"] == 4 * built
    assert estimate.memory_bytes["scores"] == 4 * 20_000 * 8
    assert 0 < estimate.probe["training_images"] < 20_000  # a subset, scaled up
    assert estimate.seconds["queries"] == pytest.approx(4 * estimate.seconds_per_query)
    assert estimate.seconds_per_query > 0
    assert json.loads(json.dumps(estimate.to_dict()))["image_shape"] == [3, 8, 8]


@pytest.mark.parametrize(
    ("n_train", "shape", "n_queries"), [(0, (1, 4, 4), 1), (5, (4, 4), 1), (5, (1, 4, 4), 0)]
)
def test_estimate_rejects_bad_counts_and_shapes(n_train: int, shape: tuple, n_queries: int) -> None:
    with pytest.raises(ConfigError, match="image_shape"):
        estimate_nda(n_train, shape, n_queries=n_queries)


# ------------------------------------------------------------------------------ errors, config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("patch_size", 2),
        ("patch_size", 0),
        ("patch_size", 3.0),
        ("top_k", 0),
        ("top_k", True),
        ("alpha", 1.5),
        ("alpha", -0.1),
        ("alpha", float("nan")),
        ("mask_value", float("inf")),
        ("timesteps", ()),
        ("timesteps", (100, 100)),
        ("timesteps", (-1,)),
        ("timesteps", 100),
        ("noise_draws", 0),
        ("seed", 1.5),
        ("max_memory_mb", 0),
        ("dtype", "float16"),
    ],
)
def test_config_validation(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"NDAConfig\.{field}="):
        NDAConfig(**{field: value})


def test_config_round_trip() -> None:
    config = NDAConfig(patch_size=5, top_k=None, alpha=1, timesteps=(7, 3), dtype="float64")
    data = json.loads(json.dumps(config.to_dict()))
    assert NDAConfig.from_dict(data) == config
    assert NDAConfig.from_dict(data).timesteps == (7, 3)
    assert NDAConfig.from_dict(NDAConfig().to_dict()) == NDAConfig()
    with pytest.raises(ConfigError, match="no fields"):
        NDAConfig.from_dict({**data, "temperature": 1.0})


def test_mismatched_images_are_a_data_error() -> None:
    train = make(3, 0, first_id=0)
    for shape in [(3, 6, 6), (1, 6, 5)]:
        queries = make(1, 1, first_id=20, shape=shape)
        with pytest.raises(DataError, match="same channels and image size"):
            nda_scores(queries, train, progress=False)
        with pytest.raises(DataError, match="same channels and image size"):
            nda_heatmaps(queries, train, 20, 0)


def test_timestep_outside_the_schedule_is_a_config_error() -> None:
    train, queries = make(3, 0, first_id=0), make(1, 1, first_id=20)
    with pytest.raises(ConfigError, match=r"outside \[0, 1000\)"):
        nda_scores(queries, train, NDAConfig(timesteps=(100, 1000)), progress=False)
    with pytest.raises(ConfigError, match=r"outside \[0, 1000\)"):
        nda_heatmaps(queries, train, 20, 0, NDAConfig(timesteps=(1000,)))
