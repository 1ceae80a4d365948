from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffattr._seed import derive_seed
from diffattr.data import DatasetSplit, ImageDataset, split_dataset
from diffattr.errors import DataError

from .helpers import make_dataset


def test_split_partitions_the_dataset(digits: ImageDataset) -> None:
    split = split_dataset(digits, seed=0)
    assert len(split.query) == round(0.1 * 1797) == 180
    assert len(split.train) == 1797 - 180
    train_ids, query_ids = set(split.train.ids.tolist()), set(split.query.ids.tolist())
    assert not train_ids & query_ids
    assert train_ids | query_ids == set(range(1797))
    assert split.seed == 0


def test_query_is_the_smallest_derived_keys() -> None:
    dataset = make_dataset(n=12)
    split = split_dataset(dataset, n_query=4, seed=7)
    ranked = sorted(dataset.ids.tolist(), key=lambda i: derive_seed(7, "query-split", i))
    assert sorted(split.query.ids.tolist()) == sorted(ranked[:4])


def test_split_is_pinned(digits: ImageDataset) -> None:
    # Guards against accidental changes to the draw: old runs must get the same query set.
    assert split_dataset(digits, seed=0).to_dict()["query_ids"][:5] == [1, 7, 10, 11, 53]


def test_split_keeps_ids_rows_and_order() -> None:
    dataset = make_dataset(n=12)
    split = split_dataset(dataset, n_query=3, seed=1)
    position = {int(i): p for p, i in enumerate(dataset.ids)}
    for part in (split.train, split.query):
        positions = [position[int(i)] for i in part.ids]
        assert positions == sorted(positions)  # the dataset's order is kept
        torch.testing.assert_close(part.images, dataset.images[positions], rtol=0, atol=0)
        np.testing.assert_array_equal(part.labels, dataset.labels[positions])
        assert part.name == dataset.name


def test_split_does_not_depend_on_row_order() -> None:
    dataset = make_dataset(n=20)
    shuffled = dataset.select(dataset.ids[::-1])
    a = split_dataset(dataset, n_query=5, seed=3)
    b = split_dataset(shuffled, n_query=5, seed=3)
    assert a.to_dict() == b.to_dict()


def test_seed_controls_the_split(digits: ImageDataset) -> None:
    first = split_dataset(digits, n_query=50, seed=0).to_dict()
    assert split_dataset(digits, n_query=50, seed=0).to_dict() == first
    assert split_dataset(digits, n_query=50, seed=1).to_dict()["query_ids"] != first["query_ids"]


def test_to_dict_from_dict_round_trip() -> None:
    dataset = make_dataset(n=12)
    split = split_dataset(dataset, query_fraction=0.25, seed=5)
    record = json.loads(json.dumps(split.to_dict()))
    assert record["n_query"] == 3
    assert record["n_train"] == 9
    assert record["seed"] == 5
    assert record["query_ids"] == sorted(record["query_ids"])
    rebuilt = DatasetSplit.from_dict(dataset, record)
    assert rebuilt.seed == 5
    assert rebuilt.query.fingerprint() == split.query.fingerprint()
    assert rebuilt.train.fingerprint() == split.train.fingerprint()


def test_from_dict_rejects_a_different_dataset() -> None:
    split = split_dataset(make_dataset(n=12), n_query=3, seed=0)
    other = make_dataset(n=12, first_id=5000)
    with pytest.raises(DataError, match=r"split query id \d+ is not in dataset"):
        DatasetSplit.from_dict(other, split.to_dict())
    bigger = make_dataset(n=15)
    with pytest.raises(DataError, match="different dataset"):
        DatasetSplit.from_dict(bigger, split.to_dict())
    with pytest.raises(DataError, match="lacks n_train"):
        DatasetSplit.from_dict(bigger, {"seed": 0, "query_ids": [100], "n_query": 1})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_query": 0}, "n_query=0"),
        ({"n_query": 12}, "n_query=12"),
        ({"query_fraction": 0.01}, "n_query=0"),
        ({"query_fraction": 1.5}, "query_fraction"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_split_sizes(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(DataError, match=match):
        split_dataset(make_dataset(n=12), **kwargs)  # type: ignore[arg-type]
