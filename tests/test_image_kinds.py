"""Every image kind people have decodes to RGB uint8 [3, H, W] by one rule, the same for the store and for
streamed batches: 16-bit samples scaled (not clipped), CMYK, palette, gray and alpha images made RGB, EXIF
orientation applied, an animation's first frame; unreadable files raise UnreadableImage with their path."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image


from bcpkd_cli.data import images as image_data
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.data.decode import (DECODER, UnreadableImage, decode_file, decode_images, header_problem,
                                   nvjpeg_orientations, orient, read_bytes, to_8_bits)
from bcpkd_cli.data.rows import StreamedRows

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI

RNG = np.random.default_rng(0)


def rgb(h=6, w=9):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)  # [H, W, 3]


def chw(array: np.ndarray) -> torch.Tensor:
    """[H, W, 3] -> [3, H, W]"""
    return torch.from_numpy(np.array(array)).permute(2, 0, 1)


def scaled(v: np.ndarray) -> np.ndarray:
    return np.floor(v.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)  # round(v * 255 / 65535)


def write_png16_rgb(path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG (Pillow has no mode to write one) of uint16 [H, W, 3]."""
    h, w, _ = pixels.shape
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def exif_jpeg(path, orientation: int) -> None:
    """A 16 x 24 black JPEG with a white 4 x 4 block in its stored top-left corner, EXIF `orientation`."""
    pixels = np.zeros((16, 24, 3), dtype=np.uint8)
    pixels[:4, :4] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


def write_kinds(folder) -> dict:
    """One file of each kind in `folder`: {name: (path, expected uint8 [3, H, W] or None where lossy)}."""
    folder.mkdir(parents=True, exist_ok=True)
    kinds = {}
    gray16 = np.array([[0, 257, 257 * 7, 32768, 65535, 1000, 40000], [65534, 128, 129, 200, 30000, 257 * 200, 3]],
                      dtype=np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")
    kinds["gray16.png"] = (folder / "gray16.png", chw(np.repeat(scaled(gray16)[..., None], 3, -1)))
    rgb16 = RNG.integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    write_png16_rgb(folder / "rgb16.png", rgb16)
    kinds["rgb16.png"] = (folder / "rgb16.png", chw(scaled(rgb16)))
    Image.fromarray(gray16).save(folder / "gray16.tif")
    kinds["gray16.tif"] = (folder / "gray16.tif", chw(np.repeat(scaled(gray16)[..., None], 3, -1)))
    Image.new("CMYK", (10, 8), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)
    kinds["cmyk.jpg"] = (folder / "cmyk.jpg", None)
    palette = Image.fromarray(rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(folder / "palette.png")
    kinds["palette.png"] = (folder / "palette.png", chw(np.asarray(palette.convert("RGB"))))
    gray = RNG.integers(0, 256, (6, 9), dtype=np.uint8)
    Image.fromarray(np.stack([gray, RNG.integers(0, 256, (6, 9), dtype=np.uint8)], -1), "LA").save(folder / "la.png")
    kinds["la.png"] = (folder / "la.png", chw(np.repeat(gray[..., None], 3, -1)))
    colour = rgb()
    Image.fromarray(np.concatenate([colour, RNG.integers(0, 256, (6, 9, 1), dtype=np.uint8)], -1), "RGBA") \
        .save(folder / "rgba.png")
    kinds["rgba.png"] = (folder / "rgba.png", chw(colour))
    exif_jpeg(folder / "exif6.jpg", 6)
    kinds["exif6.jpg"] = (folder / "exif6.jpg", None)
    for suffix in ("webp", "bmp", "tif"):
        pixels = rgb()
        Image.fromarray(pixels).save(folder / f"plain.{suffix}", **({"lossless": True} if suffix == "webp" else {}))
        kinds[f"plain.{suffix}"] = (folder / f"plain.{suffix}", chw(pixels))
    first, second = Image.new("RGB", (9, 6), (255, 0, 0)), Image.new("RGB", (9, 6), (0, 0, 255))
    first.save(folder / "two.gif", save_all=True, append_images=[second])
    kinds["two.gif"] = (folder / "two.gif", chw(np.asarray(first)))
    first.save(folder / "two.webp", save_all=True, append_images=[second], lossless=True)  # animated: Pillow's
    kinds["two.webp"] = (folder / "two.webp", chw(np.asarray(first)))
    upper = rgb()
    Image.fromarray(upper).save(folder / "upper.PNG")
    kinds["upper.PNG"] = (folder / "upper.PNG", chw(upper))
    Image.fromarray(rgb()).save(folder / "upper.JPG", quality=90)
    kinds["upper.JPG"] = (folder / "upper.JPG", None)
    named = rgb()
    Image.fromarray(named).save(folder / "png_named.JPEG", format="PNG")
    kinds["png_named.JPEG"] = (folder / "png_named.JPEG", chw(named))
    return kinds


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    return write_kinds(tmp_path_factory.mktemp("kinds") / "train" / "any")


def test_lossless_kinds_decode_to_their_rgb_pixels_exactly(kinds):
    for name, (path, expected) in kinds.items():
        image = decode_file(path)
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and image.ndim == 3, name
        if expected is not None:
            assert torch.equal(image, expected), name


def test_16_bit_samples_are_scaled_to_8_bits_not_clipped(kinds):
    image = decode_file(kinds["gray16.png"][0])  # 0, 257, 257*7, 32768, 65535, ...
    assert image[:, 0, :5].tolist() == [[0, 1, 7, 128, 255]] * 3
    assert image[0, 1, 5].item() == 200  # 257 * 200
    everything = torch.arange(65536)
    assert torch.equal(to_8_bits(everything), torch.from_numpy(scaled(everything.numpy())))
    assert torch.equal(decode_file(kinds["gray16.tif"][0]), image)  # Pillow's path, the same rule


def test_cmyk_jpeg_becomes_its_rgb_colour(kinds):
    image = decode_file(kinds["cmyk.jpg"][0]).int()  # cyan 0, magenta and yellow full, black 0: red
    assert (image[0] >= 250).all() and (image[1:] <= 5).all()


def test_exif_orientation_is_applied(tmp_path):
    exif_jpeg(tmp_path / "six.jpg", 6)  # shown turned 90 degrees clockwise: the top-left corner goes top-right
    exif_jpeg(tmp_path / "eight.jpg", 8)  # shown turned 90 degrees anticlockwise: top-left goes bottom-left
    six, eight = decode_file(tmp_path / "six.jpg"), decode_file(tmp_path / "eight.jpg")
    assert six.shape == eight.shape == (3, 24, 16)
    assert six[:, :4, -4:].float().mean() > 200 and six[:, :4, :4].float().mean() < 50
    assert eight[:, -4:, :4].float().mean() > 200 and eight[:, :4, :4].float().mean() < 50


def test_an_ordinary_jpeg_decodes_to_the_pixels_stores_held_before(tmp_path):
    from torchvision.io import ImageReadMode, decode_image, read_file

    Image.fromarray(rgb(37, 53)).save(tmp_path / "photo.jpg", quality=90)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        before = decode_image(read_file(str(tmp_path / "photo.jpg")), mode=ImageReadMode.RGB)  # the old rule
    assert torch.equal(decode_file(tmp_path / "photo.jpg"), before)


def test_every_suffix_in_any_case_is_listed(kinds):
    listed = image_data.list_image_folder(kinds["gray16.png"][0].parent.parent)[0]
    assert sorted(p.name for p in listed) == sorted(kinds)


def test_the_store_and_streamed_batches_give_equal_pixels_for_every_kind(kinds, tmp_path):
    folder = kinds["gray16.png"][0].parent.parent
    paths = image_data.list_image_folder(folder)[0]
    stored = image_data.load_or_decode(folder, "train", paths, [0] * len(paths), store=tmp_path, size=8)[0]
    streamed = StreamedRows(paths, (3, 8, 8), torch.arange(len(paths)), workers=1)
    assert stored.shape == (len(paths), 3, 8, 8)
    assert torch.equal(streamed[0:len(paths)], stored[:]) and torch.equal(decode_images(paths, 8), stored[:])
    assert image_data.store_path(folder, "train", paths, 8).name.endswith(f"-8px-{DECODER}.safetensors")


def truncated_jpegs(folder) -> list:
    Image.fromarray(rgb(40, 60)).save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    cuts = []
    for cut in (len(data) - 2, len(data) - 50, len(data) // 2):  # without the end marker, mid-scan, half
        (folder / f"cut{cut}.jpg").write_bytes(data[:cut])
        cuts.append(folder / f"cut{cut}.jpg")
    return cuts


def test_unreadable_files_raise_with_their_path_and_reason(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not a picture")
    Image.fromarray(rgb()).save(tmp_path / "half.png")
    (tmp_path / "half.png").write_bytes((tmp_path / "half.png").read_bytes()[:60])
    expected = {tmp_path / "empty.png": "empty file", tmp_path / "notes.jpg": "not an image",
                tmp_path / "half.png": "truncated", tmp_path / "missing.png": "no such file or directory",
                **{path: "truncated" for path in truncated_jpegs(tmp_path)}}
    for path, reason in expected.items():
        with pytest.raises(UnreadableImage) as caught:
            decode_file(path)
        assert caught.value.path == path and caught.value.reason == reason
        assert str(caught.value) == f"{path}: not a readable image ({reason}); remove it or replace it"
    with pytest.raises(UnreadableImage, match="empty.png"):
        decode_images([tmp_path / "whole.jpg", tmp_path / "empty.png"], 8)
    assert header_problem(tmp_path / "empty.png") == "empty file"
    assert header_problem(tmp_path / "notes.jpg") == "not an image"
    assert header_problem(tmp_path / "whole.jpg") is None


def test_an_unreadable_file_in_a_worker_is_one_line_naming_it_and_remembered(tmp_path):
    cut = truncated_jpegs(tmp_path)[0]
    told = []
    streamed = StreamedRows([tmp_path / "whole.jpg", cut], (3, 8, 8), torch.arange(2), workers=1,
                            on_unreadable=told.append)
    with pytest.raises(BcpkdError) as caught:
        streamed[0:2]  # decoded in a DataLoader worker, re-raised here from its message
    assert str(caught.value).startswith(f"{cut}: not a readable image (truncated), found while streaming")
    assert "data.skip_unreadable=true" in str(caught.value) and "--resume" in str(caught.value)
    assert told == [{cut: "truncated"}]


def test_the_gpu_paths_orientation_rule_is_the_cpu_decoders(tmp_path):
    from torchvision.io import ImageReadMode, decode_image

    paths = []
    for orientation in range(1, 9):
        exif_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
        paths.append(tmp_path / f"o{orientation}.jpg")
    data = read_bytes(paths)
    assert nvjpeg_orientations(data) == list(range(1, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for orientation, encoded in zip(range(1, 9), data):
            stored = decode_image(encoded, mode=ImageReadMode.RGB)  # as nvJPEG gives it: not turned
            assert torch.equal(orient(stored, orientation), decode_file(paths[orientation - 1]))
    assert nvjpeg_orientations(read_bytes(truncated_jpegs(tmp_path)[:1] + paths[:1])) is None  # the CPU decides
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert nvjpeg_orientations(read_bytes([paths[0], tmp_path / "empty.jpg", tmp_path / "missing.jpg"])) is None
