"""Loading of real image files, arrays and tensors into RGB, and crops sized for a model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageFile

from patch_matters_core.errors import ImageLoadError
from patch_matters_core.images import (
    BACKGROUND_RGB,
    SUPPORTED_EXTENSIONS,
    crop_for_model,
    image_sha256,
    is_supported_file,
    load_image,
)
from patch_matters_core.types import Box

# Every file of bad_images/ with what loading it gives: a size (width, height) for files that
# load, or the words that the ImageLoadError message must contain.
BAD_IMAGES = {
    "animated.gif": (160, 120),
    "cmyk.jpg": (480, 640),
    "empty.png": "empty",
    "exif_rotate_90.jpg": (640, 480),
    "gray_16bit.png": (480, 640),
    "grayscale.png": (480, 640),
    "grayscale_alpha.png": (480, 640),
    "large_8000x6000.jpg": (8000, 6000),
    "name with spaces é 猫.jpg": (480, 640),
    "not_an_image.jpg": "not an image",
    "one_bit.png": (480, 640),
    "one_pixel.png": (1, 1),
    "palette.png": (480, 640),
    "photo.webp": (480, 640),
    "rgba_half_transparent.png": (480, 640),
    "thin_2000x3.png": (2000, 3),
    "truncated.jpg": "truncated",
}


@pytest.fixture(scope="module")
def bad_images(shared_data):
    return shared_data / "bad_images"


@pytest.fixture(scope="module")
def reference_photo(bad_images):
    """The plain RGB JPEG of the photograph that most bad_images files were made from."""
    return np.asarray(load_image(bad_images / "name with spaces é 猫.jpg"), dtype=np.float64)


def test_every_bad_image_loads_or_raises(bad_images):
    files = sorted(path.name for path in bad_images.iterdir())
    assert set(files) == set(BAD_IMAGES), "bad_images/ changed; update BAD_IMAGES"

    for file_name in files:
        expected = BAD_IMAGES[file_name]
        if isinstance(expected, str):
            with pytest.raises(ImageLoadError) as raised:
                load_image(bad_images / file_name)
            message = str(raised.value)
            assert file_name in message, message
            assert expected in message, message
            continue

        image = load_image(bad_images / file_name)
        assert image.mode == "RGB", file_name
        assert image.size == expected, file_name


def test_truncated_jpeg_keeps_pillow_setting(bad_images):
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(bad_images / "truncated.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_exif_orientation_rotates(bad_images):
    path = bad_images / "exif_rotate_90.jpg"
    with Image.open(path) as raw:
        assert raw.size == (480, 640)
        # Orientation 6 means the camera was turned 90 degrees clockwise.
        upright = raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)

    image = load_image(path)
    assert image.size == (640, 480)
    assert np.array_equal(np.asarray(image), np.asarray(upright))


def test_rgba_transparent_half_is_grey(bad_images):
    path = bad_images / "rgba_half_transparent.png"
    with Image.open(path) as raw:
        rgba = np.asarray(raw.convert("RGBA"))
    transparent_columns = rgba[:, :, 3].max(axis=0) == 0
    assert transparent_columns[:240].all()

    pixels = np.asarray(load_image(path))
    assert (pixels[:, :240] == BACKGROUND_RGB).all()
    opaque = rgba[:, :, 3] == 255
    assert np.array_equal(pixels[opaque], rgba[opaque][:, :3])


def test_grayscale_modes_give_equal_channels(bad_images):
    for file_name in ("grayscale.png", "grayscale_alpha.png", "one_bit.png", "gray_16bit.png"):
        pixels = np.asarray(load_image(bad_images / file_name))
        assert np.array_equal(pixels[:, :, 0], pixels[:, :, 1]), file_name
        assert np.array_equal(pixels[:, :, 1], pixels[:, :, 2]), file_name


def test_sixteen_bit_is_scaled_not_saturated(bad_images):
    path = bad_images / "gray_16bit.png"
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
        source = np.asarray(raw).astype(np.float64)

    gray = np.asarray(load_image(path))[:, :, 0]
    assert (gray < 255).mean() > 0.5
    assert len(np.unique(gray)) > 100
    assert gray.std() > 10
    assert np.abs(gray - source / 257.0).max() <= 0.5 + 1e-9


def test_cmyk_converts_to_matching_colours(bad_images, reference_photo):
    with Image.open(bad_images / "cmyk.jpg") as raw:
        assert raw.mode == "CMYK"
    pixels = np.asarray(load_image(bad_images / "cmyk.jpg"), dtype=np.float64)
    # An inverted conversion would put the mean error near 100 levels.
    assert np.abs(pixels - reference_photo).mean() < 10


def test_palette_and_webp_match_photo(bad_images, reference_photo):
    for file_name in ("palette.png", "photo.webp"):
        pixels = np.asarray(load_image(bad_images / file_name), dtype=np.float64)
        assert np.abs(pixels - reference_photo).mean() < 10, file_name


def test_animation_gives_first_frame(bad_images):
    path = bad_images / "animated.gif"
    with Image.open(path) as raw:
        assert raw.n_frames == 2
        first = np.asarray(raw.convert("RGB"))
        raw.seek(1)
        second = np.asarray(raw.convert("RGB"))
    assert not np.array_equal(first, second)

    assert np.array_equal(np.asarray(load_image(path)), first)


def test_one_pixel_and_thin_values(bad_images):
    assert load_image(bad_images / "one_pixel.png").getpixel((0, 0)) == (200, 10, 10)
    thin = load_image(bad_images / "thin_2000x3.png")
    assert thin.getpixel((1999, 2)) == (30, 120, 200)


def test_path_as_string(bad_images):
    image = load_image(str(bad_images / "photo.webp"))
    assert image.size == (480, 640)


def test_pixel_limit_names_limit(bad_images):
    with pytest.raises(ImageLoadError) as raised:
        load_image(bad_images / "large_8000x6000.jpg", max_pixels=1_000_000)
    message = str(raised.value)
    assert "large_8000x6000.jpg" in message
    assert "1,000,000" in message
    assert "48,000,000" in message


def test_missing_file_raises(tmp_path):
    with pytest.raises(ImageLoadError, match="not found") as raised:
        load_image(tmp_path / "nowhere.png")
    assert "nowhere.png" in str(raised.value)


def test_directory_raises(tmp_path):
    folder = tmp_path / "album.jpg"
    folder.mkdir()
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(folder)


def test_name_replaces_label(tmp_path):
    empty = tmp_path / "x.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="upload 7"):
        load_image(empty, name="upload 7")


def test_unsupported_input_type():
    with pytest.raises(ImageLoadError, match="unsupported input type"):
        load_image(12345)


def test_pil_rgba_input_flattened():
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))
    rgba.putpixel((3, 1), (0, 255, 0, 255))
    image = load_image(rgba)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == BACKGROUND_RGB
    assert image.getpixel((3, 1)) == (0, 255, 0)
    assert rgba.mode == "RGBA"


def test_pil_half_alpha_blends_with_grey():
    image = load_image(Image.new("LA", (2, 2), (255, 128)))
    # 255 * 128/255 + 128 * 127/255 = 191.75
    value = image.getpixel((0, 0))
    assert value[0] == value[1] == value[2]
    assert abs(value[0] - 192) <= 1


def test_pil_palette_with_transparency_flattened():
    palette_image = Image.new("P", (2, 1), 0)
    palette_image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette_image.putpixel((1, 0), 1)
    palette_image.info["transparency"] = 0
    image = load_image(palette_image)
    assert image.getpixel((0, 0)) == BACKGROUND_RGB
    assert image.getpixel((1, 0)) == (0, 0, 255)


def test_pil_float_and_int32_modes():
    float_image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert float_image.mode == "F"
    assert [load_image(float_image).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]

    wide = Image.fromarray(np.array([[0, 65535, 32896]], dtype=np.int32))
    assert wide.mode == "I"
    assert [load_image(wide).getpixel((x, 0))[0] for x in range(3)] == [0, 255, 128]


def test_pil_zero_size_raises():
    with pytest.raises(ImageLoadError, match="zero-size"):
        load_image(Image.new("RGB", (0, 5)))


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.array([[0, 255]], dtype=np.uint8), [(0, 0, 0), (255, 255, 255)]),
        (np.array([[[0], [255]]], dtype=np.uint8), [(0, 0, 0), (255, 255, 255)]),
        (np.array([[[10, 20, 30], [40, 50, 60]]], dtype=np.uint8), [(10, 20, 30), (40, 50, 60)]),
        (np.array([[[255, 0, 0, 0], [0, 0, 255, 255]]], dtype=np.uint8), [BACKGROUND_RGB, (0, 0, 255)]),
        (np.array([[0, 65535]], dtype=np.uint16), [(0, 0, 0), (255, 255, 255)]),
        (np.array([[[0.0, 0.5, 1.0], [1.5, -0.5, 0.25]]], dtype=np.float32), [(0, 128, 255), (255, 0, 64)]),
        (np.array([[0.0, 1.0]], dtype=np.float64), [(0, 0, 0), (255, 255, 255)]),
        (np.array([[0.0, 1.0]], dtype=np.float16), [(0, 0, 0), (255, 255, 255)]),
        (np.array([[False, True]]), [(0, 0, 0), (255, 255, 255)]),
        (np.array([[[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]], dtype=np.float32), [(255, 0, 0), (0, 255, 0)]),
    ],
    ids=["uint8-hw", "uint8-hw1", "uint8-rgb", "uint8-rgba", "uint16", "float32", "float64", "float16", "bool", "batch-of-one"],
)
def test_array_dtypes_convert(array, expected):
    image = load_image(array)
    assert image.mode == "RGB"
    assert image.size == (2, 1)
    assert [image.getpixel((x, 0)) for x in range(2)] == expected


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.zeros((4, 4, 2), dtype=np.uint8), "shape (4, 4, 2)"),
        (np.zeros((3, 4, 5), dtype=np.uint8), "channels last"),
        (np.zeros(10, dtype=np.uint8), "shape (10,)"),
        (np.zeros((2, 4, 4, 3), dtype=np.float32), "images[0]"),
        (np.zeros((0, 5, 3), dtype=np.uint8), "zero-size"),
        (np.zeros((4, 4), dtype=np.int64), "unsupported dtype int64"),
        (np.zeros((4, 4), dtype=np.complex64), "unsupported dtype"),
        (np.full((2, 2), np.nan, dtype=np.float32), "NaN"),
    ],
    ids=["two-channels", "channels-first", "one-dim", "batch-of-two", "zero-size", "int64", "complex", "nan"],
)
def test_array_invalid_raises(array, words):
    with pytest.raises(ImageLoadError) as raised:
        load_image(array)
    message = str(raised.value)
    assert "array input" in message
    assert words in message


def test_torch_tensors_convert():
    torch = pytest.importorskip("torch")

    comfy_image = torch.tensor([[[0.0, 0.5, 1.0], [1.0, 1.0, 1.0]]], dtype=torch.float32)
    assert load_image(comfy_image).getpixel((0, 0)) == (0, 128, 255)
    assert load_image(comfy_image.unsqueeze(0)).size == (2, 1)
    assert load_image(comfy_image.to(torch.bfloat16)).getpixel((1, 0)) == (255, 255, 255)
    assert load_image(torch.zeros((3, 5, 3), dtype=torch.uint8)).size == (5, 3)

    with pytest.raises(ImageLoadError, match="images\\[0\\]"):
        load_image(torch.zeros((2, 4, 4, 3)))


def test_sha256_depends_on_pixels_and_size():
    red = Image.new("RGB", (2, 3), (255, 0, 0))
    digest = image_sha256(red)
    assert len(digest) == 64
    assert digest == image_sha256(red.copy())
    assert digest == image_sha256(red.convert("RGBA"))
    assert digest != image_sha256(Image.new("RGB", (3, 2), (255, 0, 0)))
    assert digest != image_sha256(Image.new("RGB", (2, 3), (254, 0, 0)))


def test_supported_extensions_case_insensitive():
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} == set(SUPPORTED_EXTENSIONS)
    assert is_supported_file("a/B.JPG")
    assert is_supported_file("photo.TiFf")
    assert not is_supported_file("notes.txt")
    assert not is_supported_file("archive")


def test_crop_rounds_outward_and_keeps_pixels():
    pixels = np.arange(100 * 100 * 3, dtype=np.uint32).reshape(100, 100, 3) % 251
    image = Image.fromarray(pixels.astype(np.uint8))
    crop = crop_for_model(image, Box(10.2, 10.7, 20.1, 30.0), max_pixels=10_000, min_side=1)
    assert crop.size == (11, 20)
    assert np.array_equal(np.asarray(crop), pixels[10:30, 10:21].astype(np.uint8))


def test_crop_clips_to_image():
    image = Image.new("RGB", (50, 40), (1, 2, 3))
    assert crop_for_model(image, Box(-10, -10, 30, 100), 100_000, 1).size == (30, 40)
    outside = crop_for_model(image, Box(80, 80, 90, 90), 100_000, 1)
    assert outside.size == (1, 1)


def test_crop_one_pixel_scales_up():
    crop = crop_for_model(Image.new("RGB", (1, 1), (200, 10, 10)), Box(0, 0, 1, 1), 1024 * 1024, 32)
    assert crop.size == (32, 32)
    assert crop.getpixel((16, 16)) == (200, 10, 10)


def test_crop_thin_strip_keeps_aspect():
    strip = Image.new("RGB", (2000, 3), (30, 120, 200))
    crop = crop_for_model(strip, Box(0, 0, 2000, 3), 1024 * 1024, 32)
    # Scale 32 / 3 keeps the aspect: 2000 * 32 / 3 = 21333 x 32 = 682,656 pixels.
    assert crop.size == (21333, 32)


def test_crop_thin_strip_capped():
    strip = Image.new("RGB", (2000, 3), (30, 120, 200))
    crop = crop_for_model(strip, Box(0, 0, 2000, 3), 10_000, 32)
    # 21333 x 32 would exceed 10,000 pixels; the long side is cut to 10,000 // 32 = 312.
    assert crop.size == (312, 32)
    assert crop.width * crop.height <= 10_000


def test_crop_large_scales_down():
    large = Image.new("RGB", (8000, 6000), (90, 90, 90))
    max_pixels = 1024 * 1024
    crop = crop_for_model(large, Box(0, 0, 8000, 6000), max_pixels, 32)
    assert crop.width * crop.height <= max_pixels
    assert crop.width * crop.height > 0.99 * max_pixels
    assert math.isclose(crop.width / crop.height, 4 / 3, rel_tol=0.01)
    assert crop.getpixel((0, 0)) == (90, 90, 90)


def test_crop_within_limits_is_unscaled():
    image = Image.new("RGB", (300, 200))
    assert crop_for_model(image, Box(10, 10, 110, 60), 1024 * 1024, 32).size == (100, 50)


@pytest.mark.parametrize(
    ("size", "box", "max_pixels", "min_side"),
    [
        ((1, 1), Box(0, 0, 1, 1), 1024, 32),
        ((2000, 3), Box(0, 0, 2000, 3), 1024, 32),
        ((3, 2000), Box(0, 0, 3, 2000), 4096, 40),
        ((640, 480), Box(100.5, 20.25, 101.0, 470.0), 50_000, 28),
        ((640, 480), Box(0, 0, 640, 480), 28 * 28, 28),
    ],
)
def test_crop_always_within_limits(size, box, max_pixels, min_side):
    crop = crop_for_model(Image.new("RGB", size), box, max_pixels, min_side)
    assert min(crop.size) >= min_side
    assert crop.width * crop.height <= max_pixels


def test_crop_rejects_impossible_limits():
    image = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="min_side squared"):
        crop_for_model(image, Box(0, 0, 10, 10), 100, 32)
    with pytest.raises(ValueError, match="at least 1"):
        crop_for_model(image, Box(0, 0, 10, 10), 100, 0)


def _png_with_header_size(path, width: int, height: int) -> None:
    """Write a 1x1 PNG whose header claims ``width`` x ``height``; only the header is read."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    # The IHDR chunk starts at byte 8: length (4), type (4), width (4), height (4), ..., CRC.
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_decompression_bomb_raises(tmp_path):
    bomb = tmp_path / "bomb.png"
    _png_with_header_size(bomb, 20_000, 10_000)
    with pytest.raises(ImageLoadError) as raised:
        load_image(bomb)
    message = str(raised.value)
    assert "bomb.png" in message
    assert "MAX_IMAGE_PIXELS" in message


def test_pixel_limit_checked_before_decoding(tmp_path):
    claimed = tmp_path / "claimed.png"
    _png_with_header_size(claimed, 5_000, 4_000)
    with pytest.raises(ImageLoadError, match="20,000,000 pixels, above the limit of 10,000,000"):
        load_image(claimed, max_pixels=10_000_000)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_float_array_0_to_255_scaled(dtype, caplog):
    array = np.array([[[0.0, 128.0, 255.0], [10.0, 20.0, 30.0]]], dtype=dtype)
    with caplog.at_level("WARNING", logger="patch_matters_core.images"):
        image = load_image(array)
    assert image.getpixel((0, 0)) == (0, 128, 255)
    assert image.getpixel((1, 0)) == (10, 20, 30)
    assert "read as 0..255" in caplog.text


def test_float_tensor_0_to_255_scaled(caplog):
    torch = pytest.importorskip("torch")

    tensor = torch.tensor([[[[0.0, 64.0, 200.0], [255.0, 255.0, 255.0]]]], dtype=torch.float32)
    with caplog.at_level("WARNING", logger="patch_matters_core.images"):
        image = load_image(tensor)
    assert image.getpixel((0, 0)) == (0, 64, 200)
    assert image.getpixel((1, 0)) == (255, 255, 255)
    assert "read as 0..255" in caplog.text


def test_pil_float_mode_0_to_255_scaled(caplog):
    float_image = Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32))
    assert float_image.mode == "F"
    with caplog.at_level("WARNING", logger="patch_matters_core.images"):
        image = load_image(float_image)
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]
    assert "read as 0..255" in caplog.text


def test_float_unit_range_has_no_warning(caplog):
    with caplog.at_level("WARNING", logger="patch_matters_core.images"):
        image = load_image(np.array([[0.0, 0.25, 1.0]], dtype=np.float32))
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 64, 255]
    assert caplog.records == []


def test_float_overshoot_clipped_with_warning(caplog):
    with caplog.at_level("WARNING", logger="patch_matters_core.images"):
        image = load_image(np.array([[0.5, 1.2, -0.1]], dtype=np.float32))
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [128, 255, 0]
    assert "2 float pixel values lie outside 0..1" in caplog.text


@pytest.mark.parametrize(
    "source",
    [
        np.array([[0.0, 300.0]], dtype=np.float32),
        Image.fromarray(np.array([[0.0, 65535.0]], dtype=np.float32)),
    ],
    ids=["array", "pil-mode-F"],
)
def test_float_above_255_raises(source):
    with pytest.raises(ImageLoadError) as raised:
        load_image(source)
    message = str(raised.value)
    assert "outside both 0..1 and 0..255" in message
    assert "from 0 to" in message
    assert "convert them to uint8" in message
