from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffattr.data import ImageDataset, load_dataset, load_digits, load_from_source
from diffattr.errors import DataError

from .helpers import make_dataset, write_image

TEMPLATE = "a handwritten {label}"


def _old_fingerprint(dataset: ImageDataset) -> str:
    """The digest as computed before datasets had prompts (recorded in existing checkpoints)."""
    digest = hashlib.sha256()
    digest.update(np.asarray(dataset.images.shape, dtype="<i8").tobytes())
    digest.update(dataset.ids.astype("<i8").tobytes())
    digest.update(dataset.images.numpy().astype("<f4", copy=False).tobytes())
    if dataset.labels is None:
        digest.update(b"no-labels")
    else:
        digest.update(b"labels")
        digest.update(dataset.labels.astype("<i8").tobytes())
    return digest.hexdigest()


def test_fingerprint_without_prompts_is_unchanged(digits: ImageDataset) -> None:
    # Digests recorded before prompts existed; checkpoints and stores compare against them.
    assert digits.fingerprint() == (
        "7d5ed5780f0dd2354b157335eeb379e8619969cf13daf766094dc6bcf9ad610b"
    )
    assert digits.select([5, 3, 1000]).fingerprint() == (
        "eb200225a62207da0b13b38fdfa1e521abfc3869bf9ad9cdd601bb248b415de2"
    )
    toy = make_dataset()
    unlabelled = ImageDataset(toy.images, toy.ids, "toy")
    assert toy.fingerprint() == _old_fingerprint(toy)
    assert unlabelled.fingerprint() == _old_fingerprint(unlabelled)


def test_prompts_change_the_fingerprint() -> None:
    base = make_dataset(n=2)
    variants = [
        ImageDataset(base.images, base.ids, "toy", base.labels, prompts=["ab", "c"]),
        ImageDataset(base.images, base.ids, "toy", base.labels, prompts=["a", "bc"]),
        ImageDataset(base.images, base.ids, "toy", base.labels, prompts=["c", "ab"]),
        ImageDataset(base.images, base.ids, "toy", base.labels, prompts=["", ""]),
    ]
    fingerprints = {v.fingerprint() for v in variants} | {base.fingerprint()}
    assert len(fingerprints) == 5
    same = ImageDataset(base.images, base.ids, "other", base.labels, prompts=("ab", "c"))
    assert same.fingerprint() == variants[0].fingerprint()


def test_prompts_are_stored_as_a_tuple_of_str() -> None:
    base = make_dataset(n=3)
    from_array = ImageDataset(base.images, base.ids, "toy", prompts=np.array(["x", "yé", "z"]))
    assert from_array.prompts == ("x", "yé", "z")
    assert all(type(prompt) is str for prompt in from_array.prompts)
    prompts = ["p", "q", "r"]
    from_list = ImageDataset(base.images, base.ids, "toy", prompts=prompts)
    prompts[0] = "changed"
    assert from_list.prompts == ("p", "q", "r")
    assert from_list.describe()["source"] == {"kind": "memory"}


@pytest.mark.parametrize(
    ("prompts", "match"),
    [
        (["a", "b", "c"], "prompts must have one string per image: 3 prompts for 5 images"),
        (["a", "b", 3, None, "e"], "prompt 2 must be a str, found int"),
        ("abcde", "prompts must be a sequence of strings, found str"),
        ({"a": 1}, "prompts must be a sequence of strings, found dict"),
        (np.arange(5), "prompts must be a 1-D array of strings, found shape .* dtype int64"),
        (np.array(["a"] * 5, dtype=object), "1-D array of strings, found shape .* dtype object"),
        (np.array([["a"] * 5]), r"1-D array of strings, found shape \(1, 5\)"),
        (["a", "b", "c", "\ud800", "e"], "prompt 3 is not valid Unicode text"),
    ],
)
def test_prompt_validation(prompts: object, match: str) -> None:
    with pytest.raises(DataError, match=match):
        ImageDataset(torch.zeros(5, 1, 2, 2), np.arange(5), "t", prompts=prompts)  # type: ignore[arg-type]


def test_select_keeps_the_prompts_of_the_selected_rows() -> None:
    dataset = make_dataset(n=6).with_prompts([f"p{k}" for k in range(6)])  # ids 100, 103, ...
    subset = dataset.select([112, 100, 106])
    assert subset.prompts == ("p4", "p0", "p2")
    assert make_dataset(n=6).select([100]).prompts is None


def test_with_prompts_from_a_template() -> None:
    base = make_dataset(n=4)  # ids 100, 103, 106, 109; labels 0, 1, 2, 0
    dataset = base.with_prompts("image {id} of class {label}")
    assert dataset.prompts == (
        "image 100 of class 0",
        "image 103 of class 1",
        "image 106 of class 2",
        "image 109 of class 0",
    )
    assert dataset.source == {
        "kind": "memory",
        "prompts": {"template": "image {id} of class {label}"},
    }
    assert base.prompts is None  # a copy, not a change
    assert dataset.fingerprint() != base.fingerprint()
    torch.testing.assert_close(dataset.images, base.images, rtol=0, atol=0)
    np.testing.assert_array_equal(dataset.labels, base.labels)
    unlabelled = ImageDataset(base.images, base.ids, "toy").with_prompts("sample {id}")
    assert unlabelled.prompts[-1] == "sample 109"


def test_with_prompts_from_a_list_records_its_hash() -> None:
    prompts = ["a", "b", "c", "ü"]
    dataset = make_dataset(n=4).with_prompts(prompts)
    assert dataset.prompts == tuple(prompts)
    expected = hashlib.sha256(json.dumps(prompts).encode("utf-8")).hexdigest()
    assert dataset.source["prompts"] == {"list_sha256": expected}
    # A template given later replaces both the prompts and their record.
    templated = dataset.with_prompts("{id}")
    assert (templated.prompts[0], templated.source["prompts"]) == ("100", {"template": "{id}"})


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{label}", r"template '\{label\}' uses \{label\} but dataset 'toy' has no labels"),
        ("a {colour} one", r"uses unknown field \{colour\}; only \{label\} and \{id\}"),
        ("{}", "invalid prompt template '{}'"),
        ("{id", "invalid prompt template '{id'"),
        ("{id.real.x}", "invalid prompt template"),
    ],
)
def test_with_prompts_rejects_bad_templates(template: str, match: str) -> None:
    base = make_dataset(n=3)
    with pytest.raises(DataError, match=match):
        ImageDataset(base.images, base.ids, "toy").with_prompts(template)


def test_with_prompts_rejects_a_wrong_number_of_prompts() -> None:
    with pytest.raises(DataError, match="one string per image: 2 prompts for 3 images"):
        make_dataset(n=3).with_prompts(["a", "b"])


def test_digits_with_a_template(digits: ImageDataset) -> None:
    dataset = load_digits(prompts=TEMPLATE)
    assert dataset.prompts[:3] == ("a handwritten 0", "a handwritten 1", "a handwritten 2")
    assert dataset.source == {"kind": "digits", "size": None, "prompts": {"template": TEMPLATE}}
    assert dataset.fingerprint() != digits.fingerprint()
    assert digits.prompts is None
    resized = load_digits(16, prompts="{id}")
    assert resized.source == {"kind": "digits", "size": 16, "prompts": {"template": "{id}"}}
    assert load_dataset("digits", prompts=TEMPLATE).fingerprint() == dataset.fingerprint()


@pytest.mark.parametrize("prompts", [["a"], 3])
def test_digits_need_a_template_string(prompts: object) -> None:
    with pytest.raises(DataError, match="prompts must be a template string"):
        load_digits(prompts=prompts)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="prompts must be a template string"):
        load_dataset("digits", prompts=prompts)  # type: ignore[arg-type]


def test_templated_subset_reloads_from_source() -> None:
    subset = load_digits(prompts=TEMPLATE).select([5, 3, 1000])
    assert subset.prompts == ("a handwritten 5", "a handwritten 3", "a handwritten 1")
    source = json.loads(json.dumps(subset.source))
    reloaded = load_from_source(source)
    assert reloaded.fingerprint() == subset.fingerprint()
    assert reloaded.prompts == subset.prompts
    assert reloaded.source == subset.source
    # As a checkpoint reloads a held-out split: the whole dataset first, then the ids.
    whole = load_from_source({k: v for k, v in source.items() if k != "ids"})
    assert whole.select([5, 3, 1000]).fingerprint() == subset.fingerprint()


def test_prompts_given_in_memory_cannot_be_reloaded(digits: ImageDataset) -> None:
    listed = digits.with_prompts([str(k) for k in range(len(digits))]).select([0, 1])
    with pytest.raises(DataError, match="prompts given in memory cannot be reloaded"):
        load_from_source(listed.source)
    with pytest.raises(DataError, match="malformed prompts"):
        load_from_source({"kind": "digits", "size": None, "prompts": {"template": 3}})
    with pytest.raises(DataError, match="malformed prompts"):
        load_from_source({"kind": "digits", "size": None, "prompts": "a {label}"})


def test_load_dataset_applies_a_template_to_files(tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        write_image(folder / name, np.zeros((4, 4), dtype=np.uint8))
    from_folder = load_dataset(folder, prompts="picture {id}")
    assert from_folder.prompts == ("picture 0", "picture 1")
    assert load_from_source(from_folder.source).fingerprint() == from_folder.fingerprint()
    np.savez(tmp_path / "arr.npz", images=np.zeros((2, 3, 3), dtype=np.uint8))
    from_npz = load_dataset(tmp_path / "arr.npz", prompts="array {id}")
    assert from_npz.prompts == ("array 0", "array 1")
    assert load_from_source(from_npz.source).fingerprint() == from_npz.fingerprint()
    with pytest.raises(DataError, match="has no labels"):
        load_dataset(folder, prompts=TEMPLATE)


def test_load_dataset_refuses_a_template_for_files_with_prompts(tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    folder.mkdir()
    write_image(folder / "a.png", np.zeros((4, 4), dtype=np.uint8))
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a square"}\n')
    assert load_dataset(folder).prompts == ("a square",)
    with pytest.raises(DataError, match="pics has its own prompts; do not pass a template"):
        load_dataset(folder, prompts="picture {id}")
    path = tmp_path / "arr.npz"
    np.savez(path, images=np.zeros((2, 3, 3), dtype=np.uint8), prompts=np.array(["x", "y"]))
    assert load_dataset(path).prompts == ("x", "y")
    with pytest.raises(DataError, match=r"arr\.npz has its own prompts; do not pass a template"):
        load_dataset(path, prompts="array {id}")
    samples = tmp_path / "samples"
    samples.mkdir()
    np.savez(samples / "samples.npz", images=np.zeros((1, 3, 3), dtype=np.uint8), prompts=["s"])
    with pytest.raises(DataError, match=r"samples\.npz has its own prompts"):
        load_dataset(samples, prompts="sample {id}")
