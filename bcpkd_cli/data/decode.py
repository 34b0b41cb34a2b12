"""Image files -> RGB uint8 [3, H, W], by one rule for the store and for streamed batches.

torchvision decodes JPEG, PNG, WEBP and GIF (an ordinary JPEG gives the pixels stores always held); Pillow
decodes what torchvision does not (BMP, TIFF, animated WEBP). Either way the EXIF orientation is applied,
16-bit samples are scaled to 8 bits (round(v * 255 / 65535), never clipped), gray, palette and CMYK images
become RGB, alpha is dropped and an animation gives its first frame. The content decides, not the suffix. A
file that no decoder reads (empty, truncated, not an image) raises UnreadableImage.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from bcpkd_cli.errors import BcpkdError

DECODER = "decode2"  # names this rule in store names and fingerprints: pixels of an older rule are not reused
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}  # compared in lower case
ORIENTATION = 0x0112  # the EXIF tag
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # Pillow's modes of 16-bit gray images
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM", b"II*\0", b"MM\0*")  # how image files begin
_MESSAGE = re.compile(r"^(?:[\w.]*UnreadableImage: )?(.+): not a readable image \(([^()]*)\); remove it or "
                      r"replace it$", re.MULTILINE)


class UnreadableImage(BcpkdError):
    """An image file that no decoder reads: its `path`, and the `reason` in a few words ("truncated")."""

    def __init__(self, path: Path | str, reason: str | None = None):
        if reason is None:  # rebuilt from a message alone: DataLoader re-raises a worker's error that way
            found = _MESSAGE.findall(str(path))
            path, reason = found[-1] if found else (path, "unknown")
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: not a readable image ({reason}); remove it or replace it")


def to_8_bits(image: torch.Tensor) -> torch.Tensor:
    """16-bit samples (0..65535, any integer dtype) -> uint8 of the same shape: round(v * 255 / 65535)."""
    wide = image.to(torch.int64).clamp_(0, 65535)
    return torch.div(wide * 510 + 65535, 131070, rounding_mode="floor").to(torch.uint8)  # no ties to break


def decode_file(path: Path) -> torch.Tensor:
    """One image file -> RGB uint8 [3, H, W] by the rule above; UnreadableImage if no decoder reads it."""
    try:
        data = np.fromfile(path, dtype=np.uint8)  # [bytes]
    except OSError as err:
        raise UnreadableImage(path, (err.strerror or "cannot be read").lower()) from None
    if not len(data):
        raise UnreadableImage(path, "empty file")
    from torchvision.io import ImageReadMode, decode_image

    try:
        with warnings.catch_warnings():  # torchvision 0.29 marks its decoders deprecated in favour of torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(torch.from_numpy(data), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as err:
        if "truncated" in str(err):  # libjpeg's premature end: refused whatever Pillow is set to accept
            raise UnreadableImage(path, "truncated") from None
        image = _decode_with_pillow(path, data.tobytes())
    if image.ndim == 4:  # an animated GIF [T, 3, H, W]
        image = image[0]
    return image if image.dtype == torch.uint8 else to_8_bits(image)  # 16-bit PNGs arrive as uint16


def _decode_with_pillow(path: Path, data: bytes) -> torch.Tensor:
    """What torchvision does not decode (BMP, TIFF, animated WEBP, ...) -> RGB uint8 [3, H, W]: the first frame,
    EXIF-oriented; 16-bit gray scaled (Pillow's convert would clip it). Pillow reduces 16-bit RGB TIFFs to
    8 bits itself (the high byte)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()  # a cut file raises here
            image = ImageOps.exif_transpose(opened)
            if image.mode in SIXTEEN_BIT:
                return to_8_bits(torch.from_numpy(np.asarray(image).astype(np.int64))).repeat(3, 1, 1)
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    except UnidentifiedImageError:
        raise UnreadableImage(path, "corrupt" if data.startswith(SIGNATURES) else "not an image") from None
    except Image.DecompressionBombError:
        raise UnreadableImage(path, "too many pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error) as err:
        raise UnreadableImage(path, "truncated" if "truncated" in str(err).lower() else "corrupt") from None


ENDINGS = {b"\xff\xd8\xff": b"\xff\xd9", b"\x89PNG": b"IEND\xaeB`\x82"}  # how whole JPEG and PNG files end


def header_problem(path: Path) -> str | None:
    """Why a file cannot be a readable image, judged from its first and last bytes (no pixels decoded, except
    for a JPEG or PNG that does not end as a whole one does, which may be cut: `decode_file` decides): the
    reason `decode_file` would give ("empty file", "not an image", "truncated", an OS error), or None where
    it may be one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if not head:
                return "empty file"
            ending = next((end for start, end in ENDINGS.items() if head.startswith(start)), None)
            if ending is not None:
                f.seek(-min(len(ending), len(head)), 2)
                if f.read() != ending:
                    try:
                        decode_file(path)
                    except UnreadableImage as err:
                        return err.reason
                return None
            if head.startswith(SIGNATURES):
                return None
            f.seek(0)
            with Image.open(f):  # other kinds Pillow knows (reads their header only)
                return None
    except UnidentifiedImageError:
        return "not an image"
    except OSError as err:
        return (err.strerror or "cannot be read").lower()


def square(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [C, H, W] -> uint8 [C, size, size]: the shorter side resized to `size` (antialiased), centre crop."""
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(TF.resize(image, [size], antialias=True), [size, size])


def decode_images(paths: list[Path], size: int = 0) -> torch.Tensor:
    """Decode image files to RGB uint8 [N, 3, H, W] (`decode_file`); with `size`, each at size x size
    (`square`), else all must share one size."""
    images = [square(decode_file(p), size) if size else decode_file(p) for p in paths]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise BcpkdError(f"{paths[0].parent.parent}: images have different sizes {sorted(shapes)[:3]}; set "
                         f"--set data.image_size=S to decode them all at S x S (shorter side resized, centre crop)")
    return torch.stack(images)


def decode_files(files: list[Path], image_shape: tuple[int, int, int], resize: bool = True) -> torch.Tensor:
    """RGB uint8 [B, 3, H, W] of image files, decoded exactly as the store decodes them: each resized to
    H x W (`square`, H = W), or (resize False) each required to be H x W already."""
    if not files:
        return torch.zeros(0, *image_shape, dtype=torch.uint8)
    images = decode_images(files, image_shape[-1] if resize else 0)
    if tuple(images.shape[1:]) != tuple(image_shape):
        raise BcpkdError(f"{files[0].parent.parent}: images have different sizes ({tuple(images.shape[1:])} and "
                         f"{tuple(image_shape)}); set --set data.image_size=S to decode them all at S x S (shorter "
                         f"side resized, centre crop)")
    return images


def read_bytes(files: list[Path]) -> list[torch.Tensor]:
    """The files' bytes as uint8 tensors [n] (for a batched decoder on the device); empty for a file that cannot
    be read (no end-of-image marker: the CPU decoder then says why)."""
    data = []
    for p in files:
        try:
            data.append(torch.from_numpy(np.fromfile(p, dtype=np.uint8)))
        except OSError:
            data.append(torch.zeros(0, dtype=torch.uint8))
    return data


def exif_orientation(data: torch.Tensor) -> int:
    """The EXIF orientation (1-8) in an encoded image's bytes [n]; 1 where it has none (or Pillow cannot tell)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.numpy())) as image:
            value = image.getexif().get(ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error):
        return 1  # then nvJPEG refuses the file too, and the CPU decoder decides
    return value if value in range(1, 9) else 1


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """[C, H, W] turned as EXIF `orientation` (1-8) says, as decode_image(apply_exif_orientation=True) does."""
    if orientation >= 5:  # rows and columns swap
        image = image.transpose(-1, -2)
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}.get(orientation)
    return image.flip(flips) if flips else image


def nvjpeg_orientations(data: list[torch.Tensor]) -> list[int] | None:
    """For the batched GPU decoder, which applies no EXIF orientation and may not notice a cut file: each JPEG's
    orientation (for `orient`), or None when a file does not end with the end-of-image marker (truncated, or
    bytes after it): such a batch is decoded on the CPU, which decides."""
    if not all(bytes(d[-2:].numpy()) == b"\xff\xd9" for d in data):
        return None
    return [exif_orientation(d) for d in data]
