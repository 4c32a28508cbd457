"""Image decoding of every pixel format a dataset may hold: 16-bit and float images are scaled to
0..255, not clipped to white; the 8-bit modes go through PIL's conversion."""

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.transforms import BadImageError, load_image

# 16-bit values and their 8-bit counterparts, round(v * 255 / 65535) worked out by hand
V16 = [0, 257, 1000, 32768, 65000, 65535]
V8 = [0, 1, 4, 128, 253, 255]


def _gray(arr: np.ndarray) -> np.ndarray:
    return np.repeat(arr[None], 3, axis=0)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([V16, V16[::-1]], dtype=np.uint16)).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    image = load_image(tmp_path / "a.png", (2, 6))
    assert image.dtype == torch.uint8 and image.shape == (3, 2, 6)
    assert np.array_equal(image.numpy(), _gray(np.array([V8, V8[::-1]])))


@pytest.mark.parametrize("mode,values,expected", [
    ("I;16B", V16, V8),
    ("I", [0, 1000, 32768, 65535, 70000, -5], [0, 4, 128, 255, 255, 0]),  # 16-bit range, out of it clipped
    ("F", [0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]),  # a 0..1 float image
    ("F", [0.0, 2.0, 100.4, 300.0], [0, 2, 100, 255]),  # a 0..255 float image
])
def test_wide_and_float_tiffs_are_scaled(tmp_path, mode, values, expected):
    arr = np.array([values], dtype={"I;16B": ">u2", "I": np.int32, "F": np.float32}[mode])
    img = Image.frombytes(mode, (len(values), 1), arr.tobytes()) if mode == "I;16B" else Image.fromarray(arr)
    img.save(tmp_path / "a.tif")
    assert Image.open(tmp_path / "a.tif").mode == mode
    assert np.array_equal(load_image(tmp_path / "a.tif").numpy(), _gray(np.array([expected])))


def test_float_image_with_nan_is_a_bad_image(tmp_path):
    Image.fromarray(np.array([[0.5, np.nan]], dtype=np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(BadImageError, match=r"nan.tif: .*NaN"):
        load_image(tmp_path / "nan.tif")


def _png(rows: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit colour)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = rows.shape[:2]
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_rgb_png_keeps_its_colours(tmp_path):
    (tmp_path / "rgb16.png").write_bytes(_png(np.array([[[0, 32768, 65535], [65535, 1000, 257]]]), color_type=2))
    image = load_image(tmp_path / "rgb16.png").numpy()
    # PIL reads it as 8-bit RGB from the high bytes: within 1 of the exact scaling
    expected = np.array([[[0, 128, 255], [255, 4, 1]]]).transpose(2, 0, 1)
    assert np.abs(image.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("mode,pixel,expected,ext", [
    ("L", 100, (100, 100, 100), "png"),
    ("1", 1, (255, 255, 255), "png"),
    ("P", 0, (10, 200, 30), "png"),  # palette entry 0 set below
    ("LA", (100, 0), (100, 100, 100), "png"),  # alpha dropped
    ("RGBA", (10, 20, 30, 0), (10, 20, 30), "png"),
    ("CMYK", (0, 255, 0, 0), (255, 0, 255), "tif"),
])
def test_8_bit_modes_become_rgb(tmp_path, mode, pixel, expected, ext):
    img = Image.new(mode, (3, 2), pixel)
    if mode == "P":
        img.putpalette([10, 200, 30] + [0, 0, 0] * 255)
    img.save(tmp_path / f"a.{ext}")
    image = load_image(tmp_path / f"a.{ext}")
    assert image.shape == (3, 2, 3) and image[:, 0, 0].tolist() == list(expected)


def test_dataset_reads_16_bit_images(tmp_path):
    Image.fromarray(np.full((48, 64), 32768, dtype=np.uint16)).save(tmp_path / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 48, "width": 64}],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 10], "iscrowd": 0,
                             "segmentation": [[5, 5, 25, 5, 25, 15, 5, 15]]}]}
    (tmp_path / "a.json").write_text(json.dumps(data))
    image, _ = CocoDataset(tmp_path / "a.json", tmp_path, train=True)[0]
    assert (image == 128).all()
