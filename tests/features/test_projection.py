from __future__ import annotations

import math

import pytest
import torch

from diffattr._seed import derive_seed
from diffattr.errors import ConfigError
from diffattr.features import _hashing as hashing
from diffattr.features._hashing import (
    GENERATOR,
    _entry_hashes,
    _mix32_,
    dense_block,
    sparse_buckets,
)
from diffattr.features._projection import (
    DenseProjector,
    IdentityProjector,
    ProjectionConfig,
    SparseProjector,
    make_projector,
)

DISTRIBUTIONS = ["gaussian", "rademacher"]

# --- pure-Python reference of the integer stream ------------------------------------------------

M32 = 0xFFFFFFFF


def ref_mix(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & M32
    x ^= x >> 15
    x = (x * 0xD35A2D97) & M32
    return x ^ (x >> 15)


def ref_index(key: int, n: int) -> int:
    return ref_mix(ref_mix((n & M32) ^ key) ^ (n >> 32))


def ref_entry(seed: int, domain: str, row: int, slot: int) -> int:
    row_key = derive_seed(seed, "projection", domain, "rows") & M32
    slot_key = derive_seed(seed, "projection", domain, "slots") & M32
    return ref_mix(ref_index(row_key, row) ^ ref_index(slot_key, slot))


def ref_dense(seed: int, row: int, col: int, k: int, distribution: str) -> float:
    if distribution == "rademacher":
        bit = (ref_entry(seed, "rademacher", row, col // 32) >> (col % 32)) & 1
        return (-1.0 if bit else 1.0) / math.sqrt(k)
    pairs = (k + 1) // 2
    pair = col if col < pairs else col - pairs
    u = 1.0 - (ref_entry(seed, "gaussian", row, 2 * pair) >> 8) * 2.0**-24
    angle = (ref_entry(seed, "gaussian", row, 2 * pair + 1) >> 8) * (2.0 * math.pi * 2.0**-24)
    radius = math.sqrt(math.log(u) * (-2.0 / k))
    return radius * (math.cos(angle) if col < pairs else math.sin(angle))


ROWS = [0, 1, 2, 977, 2**31 + 3, 2**32 + 5, 2**40 + 7]
SLOTS = [0, 1, 7, 63, 4095]


@pytest.mark.parametrize("domain", ["gaussian", "rademacher", "sparse"])
@pytest.mark.parametrize("seed", [0, 12345, 2**62 + 1])
def test_integer_stream_matches_python_reference(domain, seed):
    got = _entry_hashes(seed, domain, torch.tensor(ROWS), torch.tensor(SLOTS))
    want = [[ref_entry(seed, domain, i, q) for q in SLOTS] for i in ROWS]
    assert got.dtype == torch.int64
    assert got.tolist() == want


def test_integer_stream_is_pinned():
    # Changing these numbers changes every stored projection: bump GENERATOR if it is deliberate.
    assert GENERATOR == "lowbias32-v1"
    rows, slots = torch.tensor([0, 1, 2**32 + 5]), torch.tensor([0, 7])
    assert _entry_hashes(0, "gaussian", rows, slots).tolist() == [
        [1629408284, 3198956528],
        [666711919, 3018139980],
        [731898283, 2585486484],
    ]
    assert _entry_hashes(0, "sparse", rows, slots).tolist() == [
        [1459450002, 1420242819],
        [288261999, 634166285],
        [986165140, 3928338619],
    ]
    assert dense_block(0, range(2), 4, "rademacher").tolist() == [
        [0.5, -0.5, 0.5, 0.5],
        [-0.5, 0.5, 0.5, -0.5],
    ]


def test_mixer_matches_reference_at_the_extremes():
    values = [0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
    values += torch.randint(0, 2**32, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    x = torch.tensor(values)
    _mix32_(x, torch.empty_like(x))
    assert x.tolist() == [ref_mix(v) for v in values]


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("k", [8, 37])
def test_dense_entries_match_python_reference(distribution, k):
    rows = [0, 5, 2**33 + 1]
    got = dense_block(3, torch.tensor(rows), k, distribution, dtype=torch.float64)
    want = torch.tensor(
        [[ref_dense(3, i, j, k, distribution) for j in range(k)] for i in rows],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_sparse_buckets_match_python_reference():
    buckets, negative = sparse_buckets(5, range(10, 14), 100, 3)
    hashes = [[ref_entry(5, "sparse", i, m) for m in range(3)] for i in range(10, 14)]
    assert buckets.tolist() == [[(h >> 1) % 100 for h in row] for row in hashes]
    assert negative.tolist() == [[bool(h & 1) for h in row] for row in hashes]


# --- the dense matrix ---------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_dense_block_rows_are_independent_of_the_block(distribution):
    full = dense_block(1, range(50), 40, distribution)
    assert torch.equal(dense_block(1, range(17, 33), 40, distribution), full[17:33])
    order = torch.tensor([49, 0, 3, 3, 20])
    assert torch.equal(dense_block(1, order, 40, distribution), full[order])
    float64 = dense_block(1, range(50), 40, distribution, dtype=torch.float64)
    assert float64.dtype == torch.float64
    torch.testing.assert_close(float64.float(), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_dense_block_is_independent_of_tiles_and_threads(distribution, monkeypatch):
    reference = dense_block(2, range(70), 101, distribution)  # one thread (conftest), one tile
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        # Small tiles, split across rows and columns, shared out to three Python threads.
        monkeypatch.setattr(hashing, "_CPU_CHUNK", 40)
        assert torch.equal(dense_block(2, range(70), 101, distribution), reference)
    finally:
        torch.set_num_threads(threads)


def test_dense_block_seeds_and_distributions_differ():
    a = dense_block(0, range(20), 16, "gaussian")
    assert not torch.equal(a, dense_block(1, range(20), 16, "gaussian"))
    rademacher = dense_block(0, range(20), 16, "rademacher")
    assert not torch.equal(rademacher, dense_block(1, range(20), 16, "rademacher"))
    assert (a.sign() != rademacher.sign()).any()


def test_gaussian_moments():
    k = 1000
    z = dense_block(7, range(1000), k, "gaussian", dtype=torch.float64).flatten() * math.sqrt(k)
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
    assert z.var().item() == pytest.approx(1.0, abs=0.01)
    assert (z**4).mean().item() == pytest.approx(3.0, abs=0.05)  # Gaussian kurtosis
    assert (z > 1.0).double().mean().item() == pytest.approx(0.158655, abs=0.002)
    assert z.isfinite().all()


def test_rademacher_values_and_balance():
    k = 1000
    block = dense_block(7, range(1000), k, "rademacher", dtype=torch.float64)
    assert set(block.unique().tolist()) == {-1 / math.sqrt(k), 1 / math.sqrt(k)}
    signs = block.sign()
    assert abs(signs.mean().item()) < 5e-3
    # Rows and columns come from hash(row) ^ hash(column): no 2x2 structure may survive the mixer.
    rectangles = signs[:-1, :-1] * signs[1:, :-1] * signs[:-1, 1:] * signs[1:, 1:]
    assert abs(rectangles.mean().item()) < 5e-3
    assert abs((signs[:, :-1] * signs[:, 1:]).mean().item()) < 5e-3


# --- projectors ---------------------------------------------------------------------------------


def _grads(batch: int, p: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, p, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("max_memory_mb", [2048, 0])
def test_dense_projection_equals_explicit_matrix(distribution, max_memory_mb):
    p, k = 300, 64
    config = ProjectionConfig(distribution=distribution, dim=k, max_memory_mb=max_memory_mb)
    projector = DenseProjector(config, p, block_rows=37)
    grads = _grads(5, p)
    matrix = dense_block(0, range(p), k, distribution, dtype=torch.float64)
    out = projector.project(grads)
    assert out.shape == (5, k)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, grads @ matrix, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_dense_cached_equals_regenerated_in_float32(distribution):
    p, k = 300, 64
    grads = _grads(9, p, torch.float32)
    cached = DenseProjector(ProjectionConfig(distribution=distribution, dim=k), p, block_rows=50)
    regenerated = DenseProjector(
        ProjectionConfig(distribution=distribution, dim=k, max_memory_mb=0), p, block_rows=50
    )
    out = cached.project(grads)
    assert cached._matrix is not None
    assert regenerated._cached(grads.device, grads.dtype) is None
    assert out.dtype == torch.float32
    # Same blocks, same multiply: identical bits, not merely close.
    assert torch.equal(out, regenerated.project(grads))
    want = grads.double() @ dense_block(0, range(p), k, distribution).double()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_dense_projection_is_independent_of_block_rows_and_batch_split():
    p, k = 300, 64
    grads = _grads(10, p)
    config = ProjectionConfig(dim=k, max_memory_mb=0)
    reference = DenseProjector(config, p).project(grads)
    for block_rows in (1, 7, 299, 1000):
        torch.testing.assert_close(
            DenseProjector(config, p, block_rows=block_rows).project(grads),
            reference,
            rtol=1e-12,
            atol=1e-12,
        )
    projector = DenseProjector(config, p, block_rows=64)
    parts = torch.cat([projector.project(grads[:3]), projector.project(grads[3:])])
    torch.testing.assert_close(parts, reference, rtol=1e-12, atol=1e-12)


def test_dense_cache_is_kept_and_prepared():
    projector = make_projector(ProjectionConfig(dim=16), 100)
    assert projector._matrix is None
    projector.prepare()
    matrix = projector._matrix
    assert matrix is not None
    assert matrix.shape == (100, 16)
    assert matrix.dtype == torch.float32
    projector.project(_grads(2, 100, torch.float32))
    assert projector._matrix is matrix
    projector.project(_grads(2, 100))
    assert projector._matrix.dtype == torch.float64


def test_sparse_projection_equals_explicit_matrix():
    p, k, s = 300, 64, 3
    config = ProjectionConfig(kind="sparse", dim=k, nnz=s, seed=4)
    buckets, negative = sparse_buckets(4, range(p), k, s)
    matrix = torch.zeros(p, k, dtype=torch.float64)
    rows = torch.arange(p)[:, None].expand(p, s)
    values = torch.where(negative, -1.0, 1.0).double() / math.sqrt(s)
    matrix.index_put_((rows, buckets), values, accumulate=True)
    grads = _grads(6, p)
    want = grads @ matrix
    for projector in (
        make_projector(config, p),
        SparseProjector(config, p, block_coords=41),
        SparseProjector(ProjectionConfig.from_dict(config.to_dict() | {"max_memory_mb": 0}), p),
    ):
        out = projector.project(grads)
        assert out.dtype == torch.float64
        assert out.is_contiguous()
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    float32 = make_projector(config, p).project(grads.float())
    assert float32.dtype == torch.float32
    torch.testing.assert_close(float32.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("max_memory_mb", [2048, 0])
def test_half_precision_gradients_keep_their_dtype(kind, max_memory_mb):
    config = ProjectionConfig(kind=kind, dim=16, max_memory_mb=max_memory_mb)
    grads = _grads(3, 100, torch.float32)
    out = make_projector(config, 100).project(grads.bfloat16())
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous()
    want = make_projector(config, 100).project(grads.bfloat16().float())
    torch.testing.assert_close(out.float(), want, rtol=0.02, atol=0.05)


def _pairwise(features: torch.Tensor) -> torch.Tensor:
    upper = torch.triu_indices(len(features), len(features), offset=1)
    return (features @ features.T)[upper[0], upper[1]]


def test_inner_products_are_preserved_within_jl_tolerance():
    p, k, n = 20000, 1024, 20
    vectors = _grads(n, p, seed=1)
    norms = vectors.norm(dim=1)
    scale = _pairwise(norms[:, None])
    exact = _pairwise(vectors)
    errors = {}
    configs = {
        "gaussian": ProjectionConfig(dim=k),
        "rademacher": ProjectionConfig(distribution="rademacher", dim=k),
        "sparse": ProjectionConfig(kind="sparse", dim=k),
    }
    for name, config in configs.items():
        projected = make_projector(config, p).project(vectors)
        error = (_pairwise(projected) - exact).abs()
        assert (error <= 4 * scale / math.sqrt(k)).all(), name
        ratio = projected.norm(dim=1) / norms
        assert ((ratio - 1).abs() < 0.15).all(), name
        errors[name] = (error / scale).mean().item()
    # Sparse JL with s = 4 is as accurate as a dense map, up to a small constant.
    assert errors["sparse"] <= 2 * max(errors["gaussian"], errors["rademacher"]) + 0.005


# --- settings and errors ------------------------------------------------------------------------


def test_identity_returns_grads_unchanged():
    projector = make_projector(ProjectionConfig(kind="identity", dim=10**6), 50)
    assert isinstance(projector, IdentityProjector)
    assert projector.proj_dim == 50
    grads = _grads(3, 50)
    assert projector.project(grads) is grads
    assert projector.to_dict() == {"kind": "identity", "grad_dim": 50, "proj_dim": 50}


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_dim_larger_than_parameters_is_an_error(kind):
    with pytest.raises(ConfigError, match=r"projection dim k=65 exceeds the number of parameters"):
        make_projector(ProjectionConfig(kind=kind, dim=65), 64)


def test_sparse_nnz_larger_than_dim_is_an_error():
    with pytest.raises(ConfigError, match=r"nnz=9 is invalid"):
        make_projector(ProjectionConfig(kind="sparse", dim=8, nnz=9), 64)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"kind": "fft"}, "kind"),
        ({"distribution": "uniform"}, "distribution"),
        ({"dim": 0}, "dim"),
        ({"dim": 2.5}, "dim"),
        ({"seed": True}, "seed"),
        ({"nnz": 0}, "nnz"),
        ({"max_memory_mb": -1}, "max_memory_mb"),
    ],
)
def test_config_validation(changes, field):
    with pytest.raises(ConfigError, match=rf"ProjectionConfig\.{field}=.* is invalid: must be"):
        ProjectionConfig(**changes)


def test_config_round_trip_and_projector_settings():
    config = ProjectionConfig(kind="sparse", distribution="rademacher", dim=32, seed=3, nnz=2)
    assert ProjectionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="no fields"):
        ProjectionConfig.from_dict(config.to_dict() | {"bogus": 1})
    assert make_projector(config, 100).to_dict() == {
        "kind": "sparse",
        "grad_dim": 100,
        "proj_dim": 32,
        "nnz": 2,
        "seed": 3,
        "generator": GENERATOR,
    }
    # Memory settings change the speed, not the numbers, so they are not part of the identity.
    dense = make_projector(ProjectionConfig(dim=32, max_memory_mb=0), 100)
    assert dense.to_dict() == make_projector(ProjectionConfig(dim=32), 100).to_dict()
    assert dense.to_dict()["distribution"] == "gaussian"


@pytest.mark.parametrize("kind", ["dense", "sparse", "identity"])
def test_wrong_gradient_shape_is_an_error(kind):
    projector = make_projector(ProjectionConfig(kind=kind, dim=8), 20)
    for bad in (torch.zeros(3, 21), torch.zeros(20), torch.zeros(3, 20, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"grads must be a \(B, 20\) floating tensor"):
            projector.project(bad)


def test_bad_grad_dim_is_an_error():
    with pytest.raises(ConfigError, match="grad_dim=0 is invalid"):
        make_projector(ProjectionConfig(kind="identity"), 0)


# --- devices --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_cuda_matches_cpu(distribution):
    rows, slots = torch.tensor(ROWS), torch.tensor(SLOTS)
    for domain in ("gaussian", "rademacher", "sparse"):
        on_gpu = _entry_hashes(0, domain, rows.cuda(), slots.cuda())
        assert on_gpu.cpu().tolist() == _entry_hashes(0, domain, rows, slots).tolist()
    for dtype in (torch.float32, torch.float64):
        cpu = dense_block(2, range(300), 96, distribution, dtype=dtype)
        gpu = dense_block(2, range(300), 96, distribution, dtype=dtype, device="cuda")
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-7)
    grads = _grads(4, 300)
    for config in (
        ProjectionConfig(distribution=distribution, dim=96),
        ProjectionConfig(distribution=distribution, dim=96, max_memory_mb=0),
        ProjectionConfig(kind="sparse", dim=96),
    ):
        projector = make_projector(config, 300, "cuda")
        out = projector.project(grads.cuda())
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), make_projector(config, 300).project(grads))
