from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffattr.data import (
    ImageDataset,
    load_dataset,
    load_digits,
    load_from_source,
)
from diffattr.errors import DataError

from .helpers import make_dataset, write_image


def test_fingerprint_tracks_content(digits: ImageDataset) -> None:
    base = make_dataset()
    same = make_dataset()
    assert base.fingerprint() == same.fingerprint()
    assert len(base.fingerprint()) == 64
    renamed = ImageDataset(base.images, base.ids, "other", base.labels, source={"kind": "x"})
    assert renamed.fingerprint() == base.fingerprint()  # content only, not metadata
    changed_pixel = base.images.clone()
    changed_pixel[3, 0, 1, 1] = 0.123
    variants = [
        ImageDataset(changed_pixel, base.ids, "toy", base.labels),
        ImageDataset(base.images, base.ids + 1, "toy", base.labels),
        ImageDataset(base.images, base.ids, "toy", (base.labels + 1) % 3),
        ImageDataset(base.images, base.ids, "toy", None),
    ]
    fingerprints = {v.fingerprint() for v in variants} | {base.fingerprint()}
    assert len(fingerprints) == 5
    assert digits.fingerprint() != load_digits(16).fingerprint()


def test_describe_and_properties() -> None:
    dataset = make_dataset(n=6, channels=3, size=5)
    info = dataset.describe()
    assert info == {
        "name": "toy",
        "n": 6,
        "shape": [3, 5, 5],
        "fingerprint": dataset.fingerprint(),
        "source": {"kind": "memory"},
    }
    json.dumps(info)
    assert (len(dataset), dataset.channels, dataset.image_size) == (6, 3, (5, 5))
    assert repr(dataset) == "ImageDataset(name='toy', n=6, shape=(3, 5, 5))"


def test_select_follows_the_given_order() -> None:
    dataset = make_dataset(n=6)  # ids 100, 103, ..., 115
    subset = dataset.select([112, 100, 106])
    np.testing.assert_array_equal(subset.ids, [112, 100, 106])
    torch.testing.assert_close(subset.images, dataset.images[[4, 0, 2]], rtol=0, atol=0)
    np.testing.assert_array_equal(subset.labels, dataset.labels[[4, 0, 2]])
    assert subset.source["ids"] == [112, 100, 106]


def test_select_errors() -> None:
    dataset = make_dataset(n=6)
    with pytest.raises(DataError, match="sample id 101 is not in dataset 'toy'"):
        dataset.select([100, 101, 102])
    with pytest.raises(DataError, match="more than once"):
        dataset.select([100, 100])
    with pytest.raises(DataError, match="at least one"):
        dataset.select([])


def test_selected_digits_reload_from_source(digits: ImageDataset) -> None:
    subset = digits.select([5, 3, 1000])
    source = json.loads(json.dumps(subset.source))
    reloaded = load_from_source(source)
    assert reloaded.fingerprint() == subset.fingerprint()
    np.testing.assert_array_equal(reloaded.ids, [5, 3, 1000])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"images": torch.full((2, 1, 2, 2), 1.5)}, r"image 0 .* outside \[-1, 1\]"),
        ({"images": torch.tensor([0.0, float("nan")]).reshape(2, 1, 1, 1)}, "image 1 .* NaN"),
        ({"images": torch.zeros(2, 1, 2, 2, dtype=torch.float64)}, "float32"),
        ({"images": torch.zeros(2, 2, 2, 2)}, "1 or 3 channels"),
        ({"images": torch.zeros(2, 2, 2)}, r"\(N, C, H, W\)"),
        ({"images": torch.zeros(0, 1, 2, 2), "ids": np.zeros(0, dtype=int)}, "no images"),
        ({"ids": np.array([4, 4])}, "sample id 4 repeats"),
        ({"ids": np.array([1, 2, 3])}, r"ids must have shape \(2,\)"),
        ({"ids": np.array([1.0, 2.0])}, "integers"),
        ({"labels": np.array([1])}, "labels must have shape"),
        ({"source": {"path": Path("/x")}}, "JSON"),
    ],
)
def test_validation(change: dict[str, object], match: str) -> None:
    fields = {"images": torch.zeros(2, 1, 2, 2), "ids": np.array([0, 1]), "name": "t"} | change
    with pytest.raises(DataError, match=match):
        ImageDataset(**fields)  # type: ignore[arg-type]


def test_ids_are_copied_and_read_only() -> None:
    ids = np.array([7, 8], dtype=np.int32)
    dataset = ImageDataset(torch.zeros(2, 1, 2, 2), ids, "t")
    ids[0] = 99
    assert dataset.ids.tolist() == [7, 8]
    assert dataset.ids.dtype == np.int64
    with pytest.raises(ValueError, match="read-only"):
        dataset.ids[0] = 1


def test_load_dataset_dispatch(tmp_path: Path, digits: ImageDataset) -> None:
    assert load_dataset("digits").fingerprint() == digits.fingerprint()
    assert load_dataset("digits", size=12).images.shape == (1797, 1, 12, 12)
    folder = tmp_path / "pics"
    folder.mkdir()
    write_image(folder / "a.png", np.zeros((4, 4), dtype=np.uint8))
    from_folder = load_dataset(folder, size=2)
    assert (from_folder.source["kind"], from_folder.images.shape) == ("folder", (1, 1, 2, 2))
    with open(tmp_path / "arr.NPZ", "wb") as handle:  # np.savez would append ".npz" to a path
        np.savez(handle, images=np.zeros((2, 3, 3), dtype=np.uint8))
    from_npz = load_dataset(str(tmp_path / "arr.NPZ"))
    assert (from_npz.source["kind"], from_npz.name) == ("npz", "arr")


@pytest.mark.parametrize("spec", ["mnist", "data.txt"])
def test_load_dataset_rejects_unknown_specs(spec: str) -> None:
    with pytest.raises(DataError, match="expected 'digits', a folder of PNG/JPEG images") as err:
        load_dataset(spec)
    assert repr(spec) in str(err.value)


def test_load_from_source_errors() -> None:
    with pytest.raises(DataError, match="'kind'"):
        load_from_source({"path": "x"})
    with pytest.raises(DataError, match="unknown dataset source kind 'tfds'"):
        load_from_source({"kind": "tfds"})
    with pytest.raises(DataError, match="cannot be reloaded"):
        load_from_source(make_dataset().source)
    with pytest.raises(DataError, match="lacks path"):
        load_from_source({"kind": "npz", "size": None})


def test_a_samples_folder_loads_its_npz_not_its_pngs(tmp_path: Path) -> None:
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    folder = tmp_path / "samples"
    folder.mkdir()
    np.savez(folder / "samples.npz", images=images.numpy(), ids=np.array([5, 6, 7]))
    write_image(folder / "grid.png", np.zeros((20, 30), dtype=np.uint8))
    loaded = load_dataset(folder)
    assert loaded.ids.tolist() == [5, 6, 7]
    torch.testing.assert_close(loaded.images, images)
