from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from diffattr.data import load_digits, split_dataset
from diffattr.features import Distributed, FeatureStore, ShardedStore
from diffattr.methods import Scores, attribute, fit_kernel, get_method
from diffattr.models import Checkpoint, TrainConfig, model_spec, train

from .distributed_worker import FEATURES, make

WORKER = Path(__file__).with_name("distributed_worker.py")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    digits = load_digits().select(np.arange(60))
    split = split_dataset(digits, query_fraction=0.2, seed=0)
    spec = model_spec("mlp-tiny", in_channels=1, sample_size=8)
    config = TrainConfig(steps=4, batch_size=8, seed=0, checkpoint_every=0)
    root = tmp_path_factory.mktemp("distributed")
    return train(spec, split.train, config, root / "model", split=split, progress=False)


def _torchrun(checkpoint: Checkpoint, out: Path, method: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(WORKER), str(checkpoint.path), str(out), method]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("method", ["das", "trak"])
def test_two_torchrun_processes_give_the_single_process_scores(
    checkpoint: Checkpoint, tmp_path: Path, method: str
) -> None:
    single = attribute(
        get_method(method)(),
        [checkpoint],
        checkpoint.training_data(),
        checkpoint.heldout_data(),
        FEATURES,
        tmp_path / "single",
        batch_size=8,
        chunk_size=8,
        progress=False,
    )
    _torchrun(checkpoint, tmp_path / "multi", method)
    multi = Scores.load(tmp_path / "multi" / "scores" / method)
    np.testing.assert_array_equal(multi.query_ids, single.query_ids)
    np.testing.assert_array_equal(multi.train_ids, single.train_ids)
    np.testing.assert_allclose(
        multi.values, single.values, rtol=1e-5, atol=1e-6 * abs(single.values).max()
    )
    assert multi.settings["world_size"] == 2
    # Each rank wrote its own part of the training features; together they are the whole store.
    whole = next((tmp_path / "single" / "features").glob("*/*/train-*"))
    parts = sorted(next((tmp_path / "multi" / "features").glob("*/*/train-*")).glob("part-*"))
    assert [p.name for p in parts] == ["part-000-of-002", "part-001-of-002"]
    sharded = ShardedStore([FeatureStore.open(p) for p in parts], Distributed(0, 2))
    np.testing.assert_array_equal(sharded.ids, FeatureStore.open(whole).ids)
    np.testing.assert_allclose(
        sharded.array("features")[:],
        FeatureStore.open(whole).array("features"),
        rtol=1e-5,
        atol=1e-7,
    )


@pytest.mark.parametrize("method", ["ekfac", "das-ekfac"])
def test_two_torchrun_processes_share_one_curvature(
    checkpoint: Checkpoint, tmp_path: Path, method: str
) -> None:
    """The curvature's sums are reduced over the ranks; each rank featurises its block."""
    single = attribute(
        make(method),
        [checkpoint],
        checkpoint.training_data(),
        checkpoint.heldout_data(),
        FEATURES,
        tmp_path / "single",
        batch_size=8,
        chunk_size=8,
        progress=False,
    )
    _torchrun(checkpoint, tmp_path / "multi", method)
    multi = Scores.load(tmp_path / "multi" / "scores" / make(method).name)
    np.testing.assert_allclose(
        multi.values, single.values, rtol=1e-4, atol=1e-5 * abs(single.values).max()
    )
    estimates = [
        load_file(next((tmp_path / run / "curvature").glob("*/*/curvature.safetensors")))
        for run in ("single", "multi")
    ]
    assert estimates[0].keys() == estimates[1].keys()
    for name, value in estimates[0].items():
        if name.endswith((".a", ".s", ".ekfac")) or name == "rest":
            # Summed over ranks in another order: equal to float64 rounding of the largest entry.
            # The eigenvalue correction is projected on an eigenbasis that rounding may rotate
            # within nearly equal eigenvalues, so its small entries move by more than that.
            scale = float(np.abs(value).max())
            atol = (1e-9 if name.endswith(".ekfac") else 1e-12) * scale
            np.testing.assert_allclose(estimates[1][name], value, rtol=1e-9, atol=atol)
    parts = sorted(next((tmp_path / "multi" / "features").glob("*/*/train-*")).glob("part-*"))
    assert [p.name for p in parts] == ["part-000-of-002", "part-001-of-002"]


class _UnreducedRank(Distributed):
    """Rank 1 of 2 whose reduction returns its own sum, to see what the rank contributes."""

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        return array


def test_sharded_store_reads_parts_as_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(10, 1, 4))
    parts = []
    for rank, rows in enumerate((slice(0, 3), slice(3, 10))):
        store = FeatureStore.create_or_resume(
            tmp_path / f"part-{rank}", settings={"a": 1, "dataset_fingerprint": str(rank)},
            ids=np.arange(10)[rows], arrays={"features": ((1, 4), "float64")}, chunk_size=4,
        )  # fmt: skip
        for chunk in store.pending_chunks():
            store.write_chunk(chunk, {"features": features[rows][store.chunk_slice(chunk)]})
        store.finalize()
        parts.append(FeatureStore.open(tmp_path / f"part-{rank}"))
    sharded = ShardedStore(parts, _UnreducedRank(1, 2))
    assert sharded.n == 10
    assert sharded.local_rows == slice(3, 10)
    assert sharded.settings == {"a": 1}
    array = sharded.array("features")
    assert array.shape == (10, 1, 4)
    np.testing.assert_array_equal(array[2:6], features[2:6])
    np.testing.assert_array_equal(np.asarray(array), features)
    # Each rank sums only its own rows before the reduction.
    local = fit_kernel(sharded, 0.0)
    expected = fit_kernel(features[3:], 0.0)
    assert local.mean_eigenvalue == pytest.approx(expected.mean_eigenvalue)
