"""Safe image loading: every broken or unusual file a dataset can hold, built in a temporary folder."""

import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from magic_align.config import DataConfig
from magic_align.data.check import check_images
from magic_align.data.images import BadImageError, encode_png, load_image, scale_to_uint8, sha256_file
from magic_align.data.records import Record

LIMIT = 89_478_485


def _jpeg_bytes(size=(64, 48), seed=0):
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        chunks.append(data[offset + 4:offset + 8])
        offset += 12 + length
    return chunks


# ------------------------------------------------------------------------------------------ bad files
def test_missing_file_names_file_and_row(tmp_path):
    with pytest.raises(BadImageError) as error:
        load_image(tmp_path / "absent.jpg", LIMIT, row=7, source="meta.csv")
    message = str(error.value)
    assert "absent.jpg" in message and "meta.csv row 7" in message and "not found" in message


def test_truncated_jpeg_is_reported(tmp_path):
    data = _jpeg_bytes((256, 256))
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match=r"half\.jpg \(CSV row 3\): truncated"):
        load_image(path, LIMIT, row=3)


def test_text_file_named_jpg_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(BadImageError, match=r"notes\.jpg.*not an image file"):
        load_image(path, LIMIT)


def test_empty_file_and_directory_are_bad(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadImageError, match="empty.png"):
        load_image(tmp_path / "empty.png", LIMIT)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(BadImageError, match="not a file"):
        load_image(tmp_path / "dir.png", LIMIT)


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (120, 100), "red").save(path)
    with pytest.raises(BadImageError, match=r"120 x 100 = 12000 pixels is over the limit of 5000"):
        load_image(path, max_pixels=5000)
    assert load_image(path, max_pixels=12000).size == (120, 100)


def _png_with_header_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: decoding it would need the claimed memory."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.parametrize("side", [9000, 30000])  # below and far above Pillow's own bomb limit
def test_decompression_bomb_header_is_refused(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_header_size(side, side))
    with pytest.raises(BadImageError, match="bomb.png.*pixel"):
        load_image(path, max_pixels=1_000_000)


# ------------------------------------------------------------------------------------------ modes
def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path, LIMIT)
    assert image.mode == "RGB"
    red = np.asarray(image)[0, :, 0]
    # 65535 -> 255, 32896 -> 128, 1000 -> 4 (round(1000 / 257)); clipping would give 255 for all but 0
    assert red.tolist() == [0, 128, 255, 4]


def test_scale_to_uint8_modes_by_hand():
    assert scale_to_uint8(np.array([0, 100, 255], dtype=np.int32), "I").tolist() == [0, 100, 255]
    assert scale_to_uint8(np.array([0, 65535], dtype=np.int32), "I").tolist() == [0, 255]
    assert scale_to_uint8(np.array([-10, 0, 10], dtype=np.int32), "I").tolist() == [0, 128, 255]
    assert scale_to_uint8(np.array([0.0, 0.5, 1.0], dtype=np.float32), "F").tolist() == [0, 128, 255]
    assert scale_to_uint8(np.array([2.0, 4.0], dtype=np.float32), "F").tolist() == [0, 255]


def test_float_tiff_is_loaded(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32), mode="F").save(path)
    assert np.asarray(load_image(path, LIMIT))[0, :, 1].tolist() == [0, 64, 255]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # no cyan, full magenta+yellow: red
    assert Image.open(path).mode == "CMYK"
    r, g, b = np.asarray(load_image(path, LIMIT)).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (4, 1))
    image.putpalette([0, 0, 255] + [0, 255, 0] + [0] * 762)
    image.putdata([0, 1, 0, 1])
    image.info["transparency"] = 0  # index 0 (blue) is see-through
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    pixels = np.asarray(load_image(path, LIMIT))[0]
    assert pixels.tolist() == [[255, 255, 255], [0, 255, 0], [255, 255, 255], [0, 255, 0]]


def test_rgba_and_grayscale_become_rgb(tmp_path):
    Image.new("RGBA", (2, 2), (255, 0, 0, 128)).save(tmp_path / "half.png")
    pixel = np.asarray(load_image(tmp_path / "half.png", LIMIT))[0, 0].tolist()
    assert pixel[0] == 255 and 120 <= pixel[1] <= 135 and pixel[1] == pixel[2]  # half red over white
    Image.new("L", (2, 2), 77).save(tmp_path / "gray.png")
    assert np.asarray(load_image(tmp_path / "gray.png", LIMIT))[0, 0].tolist() == [77, 77, 77]
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert np.asarray(load_image(tmp_path / "la.png", LIMIT))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :10] = (255, 0, 0)  # left half red, right half blue, 20 wide and 10 high
    pixels[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the viewer rotates 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    image = load_image(path, LIMIT)
    assert image.size == (10, 20)
    array = np.asarray(image).astype(int)
    assert array[2, 5, 0] > 200 and array[2, 5, 2] < 60  # the left (red) half is now on top
    assert array[17, 5, 2] > 200 and array[17, 5, 0] < 60


# ------------------------------------------------------------------------------------------ encode/hash
def test_encode_png_strips_every_metadata_chunk(tmp_path):
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    exif[0x0112] = 1
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", "patient 1234")
    path = tmp_path / "tagged.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, exif=exif.tobytes(), pnginfo=info)
    original = Image.open(path)
    assert {b"eXIf", b"tEXt"} <= set(_png_chunks(path.read_bytes()))
    encoded = encode_png(original)
    assert set(_png_chunks(encoded)) == {b"IHDR", b"IDAT", b"IEND"}
    assert b"patient" not in encoded and b"CameraMaker" not in encoded
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encoded))), np.asarray(original.convert("RGB")))
    assert encode_png(Image.open(path)) == encoded  # same pixels, same bytes (hashable for the ledger)


def test_sha256_file_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "blob.bin").write_bytes(data)
    assert sha256_file(tmp_path / "blob.bin", chunk_size=1000) == hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------ check_images
def _records(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(_jpeg_bytes())
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(_jpeg_bytes((128, 128))[:300])
    return [
        Record("a", good, "acne", row=1, source="meta.csv"),
        Record("b", tmp_path / "gone.jpg", "acne", row=2, source="meta.csv"),
        Record("c", broken, "acne", row=3, source="meta.csv"),
    ]


def test_check_images_skips_bad_files_with_a_count(tmp_path):
    good, report = check_images(_records(tmp_path), DataConfig(on_bad_image="skip"))
    assert [r.id for r in good] == ["a"]
    assert (report.checked, report.good, len(report.bad)) == (3, 1, 2)
    summary = report.summary()
    assert "gone.jpg (meta.csv row 2): file not found" in summary and "broken.jpg (meta.csv row 3)" in summary


def test_check_images_stops_at_the_first_bad_file(tmp_path):
    with pytest.raises(BadImageError, match=r"gone\.jpg \(meta\.csv row 2\).*on_bad_image = 'stop'"):
        check_images(_records(tmp_path), DataConfig(on_bad_image="stop"))
