from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffattr.data import load_from_source, load_image_folder
from diffattr.errors import DataError

from .helpers import write_image


def _scaled(values: np.ndarray, top: float = 255.0) -> np.ndarray:
    return (values / top * 2.0 - 1.0).astype(np.float32)


def test_grayscale_folder_sorted_by_name(tmp_path: Path) -> None:
    pixels = {
        name: np.full((4, 5), value, dtype=np.uint8)
        for name, value in [("c.png", 0), ("a.png", 255), ("b.PNG", 51)]
    }
    for name, array in pixels.items():
        write_image(tmp_path / name, array)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    write_image(tmp_path / "sub" / "d.png", pixels["a.png"])  # not recursive

    dataset = load_image_folder(tmp_path)

    assert dataset.images.shape == (3, 1, 4, 5)
    assert dataset.source["files"] == ["a.png", "b.PNG", "c.png"]
    np.testing.assert_array_equal(dataset.ids, [0, 1, 2])
    assert dataset.labels is None
    assert dataset.name == tmp_path.name
    assert dataset.source["path"] == str(tmp_path.resolve())
    assert dataset.source["channels"] == 1
    assert set(dataset.source) == {"kind", "path", "size", "channels", "files"}
    assert dataset.prompts is None
    np.testing.assert_allclose(dataset.images[:, 0, 0, 0].numpy(), [1.0, 51 / 255 * 2 - 1, -1.0])
    json.dumps(dataset.source)


def test_rgb_values_and_channel_order(tmp_path: Path) -> None:
    rgb = np.zeros((3, 3, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 0, 102
    write_image(tmp_path / "x.png", rgb)
    dataset = load_image_folder(tmp_path)
    assert dataset.images.shape == (1, 3, 3, 3)
    np.testing.assert_allclose(dataset.images[0, :, 1, 1].numpy(), _scaled(np.array([255, 0, 102])))


def test_mixed_gray_and_rgb_gives_three_channels(tmp_path: Path) -> None:
    write_image(tmp_path / "gray.png", np.full((4, 4), 204, dtype=np.uint8))
    write_image(tmp_path / "rgba.png", np.full((4, 4, 4), (10, 20, 30, 0), dtype=np.uint8))
    dataset = load_image_folder(tmp_path)
    assert dataset.images.shape == (2, 3, 4, 4)
    assert dataset.source["channels"] == 3
    np.testing.assert_allclose(dataset.images[0, :, 0, 0].numpy(), _scaled(np.full(3, 204.0)))
    # The alpha channel is dropped, not composited.
    np.testing.assert_allclose(dataset.images[1, :, 0, 0].numpy(), _scaled(np.array([10, 20, 30])))


def test_forced_channels(tmp_path: Path) -> None:
    write_image(tmp_path / "rgb.png", np.full((2, 2, 3), (200, 100, 50), dtype=np.uint8))
    write_image(tmp_path / "gray.png", np.full((2, 2), 7, dtype=np.uint8))
    gray = load_image_folder(tmp_path, channels=1)
    luma = 0.299 * 200 + 0.587 * 100 + 0.114 * 50
    np.testing.assert_allclose(
        gray.images[:, 0, 0, 0].numpy(), _scaled(np.array([7, luma])), atol=1e-6
    )
    only_gray = tmp_path / "only_gray"
    only_gray.mkdir()
    write_image(only_gray / "g.png", np.full((2, 2), 7, dtype=np.uint8))
    assert load_image_folder(only_gray, channels=3).images.shape == (1, 3, 2, 2)
    with pytest.raises(DataError, match="channels"):
        load_image_folder(tmp_path, channels=2)  # type: ignore[arg-type]


def test_palette_images(tmp_path: Path) -> None:
    gray = Image.fromarray(np.array([[0, 128], [255, 64]], dtype=np.uint8)).convert("P")
    gray.save(tmp_path / "gray_palette.png")
    assert Image.open(tmp_path / "gray_palette.png").mode == "P"
    assert load_image_folder(tmp_path).channels == 1
    colour = Image.fromarray(np.full((2, 2, 3), (255, 0, 0), dtype=np.uint8)).convert("P")
    colour.save(tmp_path / "red_palette.png")
    dataset = load_image_folder(tmp_path)
    assert dataset.channels == 3
    np.testing.assert_allclose(dataset.images[1, :, 0, 0].numpy(), [1.0, -1.0, -1.0])


def test_jpeg_is_read(tmp_path: Path) -> None:
    write_image(tmp_path / "a.jpg", np.full((8, 8), 128, dtype=np.uint8), quality=95)
    write_image(tmp_path / "b.JPEG", np.full((8, 8, 3), (200, 40, 90), dtype=np.uint8), quality=95)
    dataset = load_image_folder(tmp_path)
    assert dataset.images.shape == (2, 3, 8, 8)
    # JPEG is lossy; flat colours survive within a few levels.
    np.testing.assert_allclose(dataset.images[0].mean().item(), 128 / 255 * 2 - 1, atol=0.03)
    np.testing.assert_allclose(
        dataset.images[1].mean(dim=(1, 2)).numpy(), _scaled(np.array([200, 40, 90])), atol=0.05
    )


def test_sixteen_bit_png_uses_full_range(tmp_path: Path) -> None:
    pixels = np.array([[0, 65535], [32768, 257]], dtype=np.uint16)
    write_image(tmp_path / "deep.png", pixels)
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    dataset = load_image_folder(tmp_path)
    assert dataset.images.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(
        dataset.images[0, 0].numpy(), _scaled(pixels.astype(np.float64), 65535.0), atol=1e-6
    )


def test_resize(tmp_path: Path) -> None:
    write_image(tmp_path / "small.png", np.full((8, 8), 255, dtype=np.uint8))
    write_image(tmp_path / "big.png", np.full((16, 12), 0, dtype=np.uint8))
    write_image(tmp_path / "deep.png", np.full((10, 10), 65535, dtype=np.uint16))
    square = load_image_folder(tmp_path, size=4)
    assert square.images.shape == (3, 1, 4, 4)
    assert square.source["size"] == 4
    # A flat image stays flat under bicubic resampling.
    np.testing.assert_allclose(square.images[:, 0].amax(dim=(1, 2)).numpy(), [-1.0, 1.0, 1.0])
    np.testing.assert_allclose(square.images[:, 0].amin(dim=(1, 2)).numpy(), [-1.0, 1.0, 1.0])
    oblong = load_image_folder(tmp_path, size=(4, 6))
    assert oblong.images.shape == (3, 1, 4, 6)
    assert oblong.source["size"] == [4, 6]


def test_reload_from_source(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", np.arange(16, dtype=np.uint8).reshape(4, 4) * 16)
    write_image(tmp_path / "b.png", np.full((4, 4, 3), 9, dtype=np.uint8))
    dataset = load_image_folder(tmp_path, size=3)
    source = json.loads(json.dumps(dataset.source))
    assert load_from_source(source).fingerprint() == dataset.fingerprint()
    write_image(tmp_path / "c.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(DataError, match="changed"):
        load_from_source(source)


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as err:
        load_image_folder(missing)
    assert str(missing) in str(err.value)


def test_file_instead_of_folder(tmp_path: Path) -> None:
    file = write_image(tmp_path / "a.png", np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(DataError, match="not a directory") as err:
        load_image_folder(file)
    assert str(file) in str(err.value)


def test_empty_folder_and_folder_without_images(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no PNG/JPEG images in") as err:
        load_image_folder(tmp_path)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "readme.txt").write_text("hello")
    (tmp_path / "picture.gif").write_bytes(b"GIF89a")
    with pytest.raises(DataError, match="no PNG/JPEG images in"):
        load_image_folder(tmp_path)


def test_corrupt_png_names_the_file(tmp_path: Path) -> None:
    write_image(tmp_path / "good.png", np.zeros((2, 2), dtype=np.uint8))
    (tmp_path / "bad.png").write_bytes(np.random.default_rng(0).bytes(200))
    with pytest.raises(DataError, match="cannot read image") as err:
        load_image_folder(tmp_path)
    assert str(tmp_path / "bad.png") in str(err.value)


def test_truncated_png_names_the_file(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    good = write_image(tmp_path / "whole.png", noise)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:500])
    with pytest.raises(DataError, match=r"cut\.png"):
        load_image_folder(tmp_path)


def test_mixed_sizes_without_resize(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", np.zeros((8, 8), dtype=np.uint8))
    write_image(tmp_path / "b.png", np.zeros((16, 16), dtype=np.uint8))
    with pytest.raises(DataError, match="different sizes") as err:
        load_image_folder(tmp_path)
    message = str(err.value)
    assert "a.png is 8x8" in message
    assert "b.png is 16x16" in message
    assert "size=" in message


def _folder_with_metadata(folder: Path, metadata: str | bytes) -> Path:
    for name in ("a.png", "b.png", "c.jpg"):
        write_image(folder / name, np.zeros((4, 4), dtype=np.uint8))
    (folder / "notes.txt").write_text("not an image")
    path = folder / "metadata.jsonl"
    if isinstance(metadata, bytes):
        path.write_bytes(metadata)
    else:
        path.write_text(metadata, encoding="utf-8")
    return path


def test_metadata_gives_prompts_in_file_order(tmp_path: Path) -> None:
    metadata = _folder_with_metadata(
        tmp_path,
        '{"file_name": "c.jpg", "text": "a black café", "label": 3}\n'
        "\n"
        '{"file_name": "a.png", "text": "first"}\r\n'
        '{"text": "", "file_name": "b.png"}\n',
    )
    dataset = load_image_folder(tmp_path)
    assert dataset.prompts == ("first", "", "a black café")
    assert dataset.source["metadata_sha256"] == hashlib.sha256(metadata.read_bytes()).hexdigest()
    assert dataset.select([2]).prompts == ("a black café",)
    source = json.loads(json.dumps(dataset.select([2, 0]).source))
    reloaded = load_from_source(source)
    assert reloaded.prompts == ("a black café", "first")
    assert reloaded.fingerprint() == dataset.select([2, 0]).fingerprint()


def test_changed_or_removed_metadata_is_detected_on_reload(tmp_path: Path) -> None:
    lines = [f'{{"file_name": "{name}", "text": "{name}"}}' for name in ("a.png", "b.png", "c.jpg")]
    metadata = _folder_with_metadata(tmp_path, "\n".join(lines))
    source = load_image_folder(tmp_path).source
    metadata.write_text("\n".join([*lines[:2], lines[2].replace('"text": "c', '"text": "C')]))
    with pytest.raises(DataError, match=r"metadata\.jsonl in .* changed since it was loaded"):
        load_from_source(source)
    metadata.unlink()
    with pytest.raises(DataError, match=r"metadata\.jsonl in .* changed since it was loaded"):
        load_from_source(source)


def test_metadata_added_after_loading_is_detected(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", np.zeros((4, 4), dtype=np.uint8))
    source = load_image_folder(tmp_path).source
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "late"}\n')
    with pytest.raises(DataError, match="changed since it was loaded"):
        load_from_source(source)


_GOOD_A = '{"file_name": "a.png", "text": "a"}'
_GOOD_B = '{"file_name": "b.png", "text": "b"}'
_GOOD_C = '{"file_name": "c.jpg", "text": "c"}'


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        (f"{_GOOD_A}\n{{not json\n", "line 2: invalid JSON"),
        ('{"file_name": "a.png"}', "line 1: expected an object with file_name and text"),
        ('{"text": "a"}', "line 1: expected an object with file_name and text"),
        ('["a.png", "a"]', "line 1: expected an object with file_name and text"),
        ('{"file_name": "a.png", "text": 7}', "line 1: text must be a string, found int"),
        ('{"file_name": "a.png", "text": null}', "text must be a string, found NoneType"),
        (f'{_GOOD_A}\n{{"file_name": "d.png", "text": "d"}}', "line 2: file_name 'd.png' is not"),
        ('{"file_name": "notes.txt", "text": "n"}', "line 1: file_name 'notes.txt' is not an"),
        ('{"file_name": "sub/a.png", "text": "n"}', "file_name 'sub/a.png' is not an image in"),
        ('{"file_name": 3, "text": "n"}', "line 1: file_name 3 is not an image in"),
        (
            f"{_GOOD_A}\n{_GOOD_B}\n{_GOOD_C}\n{_GOOD_A}",
            r"line 4: 'a.png' is listed again \(first on line 1\)",
        ),
        (f"{_GOOD_A}\n{_GOOD_C}\n", "has no line for image 'b.png'"),
        (b'{"file_name": "a.png", "text": "\xff"}', "is not UTF-8 text"),
    ],
)
def test_bad_metadata_names_the_file_and_line(
    tmp_path: Path, metadata: str | bytes, match: str
) -> None:
    path = _folder_with_metadata(tmp_path, metadata)
    with pytest.raises(DataError, match=match) as err:
        load_image_folder(tmp_path)
    assert str(path.resolve()) in str(err.value)


def test_decompression_bomb_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow refuses images over twice MAX_IMAGE_PIXELS (a 14000 x 14000 PNG by default) with
    # an error that is not an OSError; a small limit makes a small image one.
    write_image(tmp_path / "small.png", np.zeros((4, 4), dtype=np.uint8))
    write_image(tmp_path / "huge.png", np.zeros((64, 64), dtype=np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="cannot read image") as err:
        load_image_folder(tmp_path, size=4)
    assert str(tmp_path / "huge.png") in str(err.value)
    assert "decompression bomb" in str(err.value)
