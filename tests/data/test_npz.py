from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffattr.data import load_dataset, load_from_source, load_npz
from diffattr.errors import DataError


def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _uint8_images(shape: tuple[int, ...]) -> np.ndarray:
    return (np.arange(np.prod(shape)) % 256).astype(np.uint8).reshape(shape)


def test_nchw_uint8_exact_values(tmp_path: Path) -> None:
    raw = _uint8_images((4, 3, 5, 6))
    raw[0, 0, 0, 0], raw[0, 0, 0, 1] = 0, 255
    dataset = load_npz(_save(tmp_path / "cifar_like.npz", images=raw))
    assert dataset.images.shape == (4, 3, 5, 6)
    assert dataset.name == "cifar_like"
    assert float(dataset.images[0, 0, 0, 0]) == -1.0
    assert float(dataset.images[0, 0, 0, 1]) == 1.0
    np.testing.assert_allclose(dataset.images.numpy(), raw / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(dataset.ids, np.arange(4))
    assert dataset.labels is None
    assert dataset.source["layout"] == "NCHW"
    assert dataset.source["value_range"] == [0.0, 255.0]


def test_nhwc_is_transposed(tmp_path: Path) -> None:
    raw = _uint8_images((2, 5, 6, 3))
    dataset = load_npz(_save(tmp_path / "x.npz", images=raw))
    assert dataset.images.shape == (2, 3, 5, 6)
    assert dataset.source["layout"] == "NHWC"
    np.testing.assert_allclose(
        dataset.images.numpy(), raw.transpose(0, 3, 1, 2) / 127.5 - 1.0, atol=1e-6
    )


def test_nhw_is_grayscale(tmp_path: Path) -> None:
    raw = _uint8_images((3, 4, 4))
    dataset = load_npz(_save(tmp_path / "x.npz", images=raw))
    assert dataset.images.shape == (3, 1, 4, 4)
    np.testing.assert_allclose(dataset.images[:, 0].numpy(), raw / 127.5 - 1.0, atol=1e-6)


def test_explicit_layout_resolves_ambiguity(tmp_path: Path) -> None:
    raw = _uint8_images((2, 3, 4, 3))
    path = _save(tmp_path / "x.npz", images=raw)
    with pytest.raises(DataError, match="layout=") as err:
        load_npz(path)
    assert "(2, 3, 4, 3)" in str(err.value)
    nhwc = load_npz(path, layout="NHWC")
    assert nhwc.images.shape == (2, 3, 3, 4)
    nchw = load_npz(path, layout="NCHW")
    assert nchw.images.shape == (2, 3, 4, 3)


def test_float_minus_one_to_one_is_kept(tmp_path: Path) -> None:
    raw = np.linspace(-1, 1, 2 * 16, dtype=np.float64).reshape(2, 1, 4, 4)
    dataset = load_npz(_save(tmp_path / "x.npz", images=raw))
    np.testing.assert_allclose(dataset.images.numpy(), raw, atol=1e-6)
    assert dataset.source["value_range"] == [-1.0, 1.0]


def test_float_zero_one_is_ambiguous(tmp_path: Path) -> None:
    raw = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 4, 4)
    path = _save(tmp_path / "x.npz", images=raw)
    with pytest.raises(DataError, match=r"ambiguous: pass value_range=\(0, 1\) or \(-1, 1\)"):
        load_npz(path)
    dataset = load_npz(path, value_range=(0, 1))
    np.testing.assert_allclose(dataset.images[0, 0].numpy(), raw[0] * 2 - 1, atol=1e-6)
    as_signed = load_npz(path, value_range=(-1, 1))
    np.testing.assert_allclose(as_signed.images[0, 0].numpy(), raw[0], atol=1e-6)


def test_float16_with_embedded_value_range(tmp_path: Path) -> None:
    raw = np.array([[[0, 127.5], [255, 51]]], dtype=np.float16)
    path = _save(tmp_path / "x.npz", images=raw, value_range=np.array([0.0, 255.0]))
    dataset = load_npz(path)
    np.testing.assert_allclose(dataset.images[0, 0].numpy(), [[-1, 0], [1, -0.6]], atol=1e-3)
    # The argument wins over the stored range.
    with pytest.raises(DataError, match="outside value_range"):
        load_npz(path, value_range=(0, 1))


def test_out_of_range_names_the_image(tmp_path: Path) -> None:
    raw = np.zeros((5, 1, 2, 2), dtype=np.float32)
    raw[3, 0, 1, 1] = 1.5
    raw[4, 0, 0, 0] = -2.0
    raw[0, 0, 0, 0] = -0.5  # makes the default range (-1, 1)
    with pytest.raises(DataError, match=r"image 3 has values in \[0, 1.5\]"):
        load_npz(_save(tmp_path / "x.npz", images=raw))


def test_uint8_out_of_given_range(tmp_path: Path) -> None:
    raw = np.zeros((3, 2, 2), dtype=np.uint8)
    raw[2, 0, 0] = 200
    with pytest.raises(DataError, match="image 2 "):
        load_npz(_save(tmp_path / "x.npz", images=raw), value_range=(0, 100))


def test_nan_names_the_image(tmp_path: Path) -> None:
    raw = np.zeros((4, 2, 2), dtype=np.float32)
    raw[2, 1, 0] = np.nan
    raw[3, 0, 0] = np.inf
    with pytest.raises(DataError, match="image 2 has NaN or inf"):
        load_npz(_save(tmp_path / "x.npz", images=raw), value_range=(-1, 1))


def test_missing_images_key_lists_keys(tmp_path: Path) -> None:
    path = _save(tmp_path / "x.npz", pixels=np.zeros((1, 2, 2)), labels=np.zeros(1, dtype=int))
    with pytest.raises(DataError, match="no 'images' array") as err:
        load_npz(path)
    assert "labels" in str(err.value)
    assert "pixels" in str(err.value)


def test_ids_and_labels_are_kept(tmp_path: Path) -> None:
    raw = _uint8_images((3, 2, 2))
    path = _save(
        tmp_path / "x.npz",
        images=raw,
        ids=np.array([30, 10, 20], dtype=np.int32),
        labels=np.array([1, 0, 1]),
    )
    dataset = load_npz(path)
    np.testing.assert_array_equal(dataset.ids, [30, 10, 20])
    assert dataset.ids.dtype == np.int64
    np.testing.assert_array_equal(dataset.labels, [1, 0, 1])
    np.testing.assert_allclose(dataset.select([10]).images[0, 0].numpy(), raw[1] / 127.5 - 1)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"ids": np.array([1, 1, 2])}, "unique"),
        ({"ids": np.array([1, 2])}, "'ids' must be 3 integers"),
        ({"ids": np.array([1.0, 2.0, 3.0])}, "'ids' must be 3 integers"),
        ({"labels": np.array([0, 1])}, "'labels' must be 3 integers"),
    ],
)
def test_bad_ids_or_labels(tmp_path: Path, extra: dict[str, np.ndarray], match: str) -> None:
    path = _save(tmp_path / "x.npz", images=_uint8_images((3, 2, 2)), **extra)
    with pytest.raises(DataError, match=match):
        load_npz(path)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (np.zeros((2, 4), dtype=np.uint8), "found shape"),
        (np.zeros((2, 1, 2, 2, 1), dtype=np.uint8), "found shape"),
        (np.zeros((0, 4, 4), dtype=np.uint8), "empty"),
        (np.zeros((2, 2, 2), dtype=np.int64), "uint8 or float"),
        (np.zeros((2, 4, 5, 6), dtype=np.uint8), "layout="),
    ],
)
def test_malformed_images(tmp_path: Path, images: np.ndarray, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_npz(_save(tmp_path / "x.npz", images=images))


def test_explicit_layout_with_bad_channel_count(tmp_path: Path) -> None:
    path = _save(tmp_path / "x.npz", images=np.zeros((2, 4, 5, 6), dtype=np.uint8))
    with pytest.raises(DataError, match="1 or 3 channels, found 4"):
        load_npz(path, layout="NCHW")


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as err:
        load_npz(tmp_path / "nope.npz")
    assert "nope.npz" in str(err.value)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(DataError, match=r"not a valid \.npz") as err:
        load_npz(garbage)
    assert "garbage.npz" in str(err.value)
    single = tmp_path / "single.npz"
    with open(single, "wb") as handle:
        np.save(handle, np.zeros((1, 2, 2), dtype=np.uint8))
    with pytest.raises(DataError, match="not a zip archive"):
        load_npz(single)


def test_resize_and_reload_from_source(tmp_path: Path) -> None:
    raw = _uint8_images((3, 8, 8, 3))
    path = _save(tmp_path / "x.npz", images=raw, labels=np.array([2, 1, 0]))
    dataset = load_npz(path, size=4)
    assert dataset.images.shape == (3, 3, 4, 4)
    assert float(dataset.images.min()) >= -1
    assert float(dataset.images.max()) <= 1
    source = json.loads(json.dumps(dataset.source))
    assert load_from_source(source).fingerprint() == dataset.fingerprint()
    _save(path, images=raw[::-1].copy())
    with pytest.raises(DataError, match="changed"):
        load_from_source(source)


def test_pickled_arrays_are_refused(tmp_path: Path) -> None:
    path = _save(tmp_path / "obj.npz", images=np.array([None, 1], dtype=object))
    with pytest.raises(DataError, match=r"obj\.npz is not a valid \.npz file"):
        load_npz(path)


def test_prompts_round_trip(tmp_path: Path) -> None:
    path = _save(
        tmp_path / "x.npz",
        images=_uint8_images((3, 2, 2)),
        ids=np.array([30, 10, 20]),
        prompts=np.array(["a red car", "ein Bär", ""]),
    )
    dataset = load_npz(path)
    assert dataset.prompts == ("a red car", "ein Bär", "")
    assert "prompts" not in dataset.source  # the file's hash covers them
    assert dataset.select([20, 30]).prompts == ("", "a red car")
    source = json.loads(json.dumps(dataset.select([20, 30]).source))
    assert load_from_source(source).prompts == ("", "a red car")
    assert load_npz(_save(tmp_path / "y.npz", images=_uint8_images((3, 2, 2)))).prompts is None


@pytest.mark.parametrize(
    "prompts",
    [
        np.array(["a", "b"]),
        np.array([1, 2, 3]),
        np.array([b"a", b"b", b"c"]),
        np.array([["a", "b", "c"]]),
        np.array("abc"),
    ],
)
def test_bad_prompts(tmp_path: Path, prompts: np.ndarray) -> None:
    path = _save(tmp_path / "x.npz", images=_uint8_images((3, 2, 2)), prompts=prompts)
    with pytest.raises(DataError, match=r"x\.npz: 'prompts' must be 3 strings") as err:
        load_npz(path)
    assert str(prompts.dtype) in str(err.value)


def test_object_prompts_are_refused(tmp_path: Path) -> None:
    path = _save(
        tmp_path / "x.npz",
        images=_uint8_images((2, 2, 2)),
        prompts=np.array(["a", "b"], dtype=object),
    )
    with pytest.raises(DataError, match=r"x\.npz is not a valid \.npz file: .*allow_pickle"):
        load_npz(path)


@pytest.mark.parametrize("key", ["ids", "labels"])
def test_uint64_values_past_int64_are_refused_not_wrapped(tmp_path: Path, key: str) -> None:
    # astype(int64) turns 2**63 into -2**63; the loader must refuse rather than renumber.
    values = np.array([0, 1, 2**63], dtype=np.uint64)
    path = _save(tmp_path / "x.npz", images=_uint8_images((3, 2, 2)), **{key: values})
    with pytest.raises(DataError, match=f"'{key}' holds {2**63}, which does not fit"):
        load_npz(path)
    largest = np.array([0, 1, 2**63 - 1], dtype=np.uint64)
    fits = _save(tmp_path / "y.npz", images=_uint8_images((3, 2, 2)), **{key: largest})
    assert getattr(load_npz(fits), key).tolist() == [0, 1, 2**63 - 1]


def test_ambiguous_layout_hint_names_the_command_line_option(tmp_path: Path) -> None:
    path = _save(tmp_path / "x.npz", images=_uint8_images((2, 3, 4, 3)))
    with pytest.raises(DataError, match="--layout NCHW"):
        load_npz(path)
    # load_dataset passes the layout on to .npz files, as the CLI's --layout does.
    assert load_dataset(path, layout="NHWC").images.shape == (2, 3, 3, 4)
    assert load_dataset(path, layout="NCHW").images.shape == (2, 3, 4, 3)
