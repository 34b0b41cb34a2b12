"""Exact augmentation views: augmentation as a deterministic function of (example, view id).

For 32x32 images the view space is CIFAR's usual pad-4 random crop x horizontal flip: 9 x 9 crop
offsets x 2 flips = 162 views. View id v encodes flip = v % 2 and offset o = v // 2 with
row offset (o // 9 + 4) % 9 and column offset (o % 9 + 4) % 9 into the zero-padded image, so view 0
is the image itself. Larger images of side S are padded by S / 8 and the 9 offsets per axis are spread
over that padding (steps of S / 32 pixels): the same 162 views at every size. Views are applied to a
whole batch with one gather: no per-image Python work.

Random-resized-crop views (data.crop: resized, ImageNet-style) draw each view's box from a seeded hash
of (example, view id): scale and aspect ratio as torchvision's RandomResizedCrop (area 8% to 100%, ratio
3/4 to 4/3, ten tries, then the centre crop), flipped for odd ids, resized back to the image's size with
bilinear interpolation as torchvision's resized_crop (to 2e-3 in float, within one level in uint8; one
batched grid sample; nothing to antialias: a box is never larger than the image). View 0 is the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAD = 4
N_OFFSETS = 2 * PAD + 1  # 9 crop positions per axis
N_VIEWS = N_OFFSETS * N_OFFSETS * 2  # 162


def view_params(view_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """view ids [B] -> row offsets [B], column offsets [B] (into the padded image), flip flags [B]."""
    offset = view_ids // 2
    rows = (offset // N_OFFSETS + PAD) % N_OFFSETS
    cols = (offset % N_OFFSETS + PAD) % N_OFFSETS
    return rows, cols, (view_ids % 2).bool()


def apply_views(images: torch.Tensor, view_ids: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """images [B, C, H, W] (any dtype), view ids [B] -> the views [B, C, H, W]; `padding` zeros or reflect
    (as torchvision's RandomCrop padding_mode)."""
    if len(view_ids) == 0:  # an empty share of a batch (torchrun)
        return images
    if int(view_ids.min()) < 0 or int(view_ids.max()) >= N_VIEWS:
        raise ValueError(f"view ids must lie in [0, {N_VIEWS})")
    b, c, h, w = images.shape
    pad = max(PAD, round(min(h, w) / 8))  # 4 up to 32 pixels, S / 8 beyond
    if padding == "reflect":  # reflect padding is not defined for integer tensors: done on float copies
        padded = F.pad(images.float(), (pad, pad, pad, pad), mode="reflect").to(images.dtype)
    else:
        padded = F.pad(images, (pad, pad, pad, pad))  # [B, C, H + 2 pad, W + 2 pad]
    row_off, col_off, flip = view_params(view_ids.to(images.device))
    if pad != PAD:  # the 9 offsets per axis spread over the padding: pad + (k - 4) * pad / 4
        row_off = pad + torch.round((row_off - PAD) * (pad / PAD)).long()
        col_off = pad + torch.round((col_off - PAD) * (pad / PAD)).long()
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = row_off[:, None] + ar_h  # [B, H]
    cols = col_off[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # [B, W], reversed when flipped
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def select_views(count: int, seed: int) -> torch.Tensor:
    """A seeded subset of `count` view ids, always starting with view 0 (the unaugmented image)."""
    if not 1 <= count <= N_VIEWS:
        raise ValueError(f"the number of views must lie in [1, {N_VIEWS}]")
    others = torch.randperm(N_VIEWS - 1, generator=torch.Generator().manual_seed(seed))[: count - 1] + 1
    return torch.cat([torch.zeros(1, dtype=torch.long), others.sort().values])


def draw_view_slots(n_examples: int, n_views: int, seed: int, epoch: int) -> torch.Tensor:
    """The view slot (0 .. V-1, a column of the [N, V, C] cache) each example uses in one epoch -> [N]."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randint(n_views, (n_examples,), generator=generator)


def sample_index(example_index: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
    """The id that seeds a teacher's Monte Carlo draws for one view of one example."""
    return example_index.cpu() * N_VIEWS + view_ids.cpu()


class ViewSampler:
    """Per epoch, one seeded view slot per example; `slots(rows, epoch)` -> slots [B] on rows' device."""

    def __init__(self, n_examples: int, n_views: int, seed: int):
        self.n_examples, self.n_views, self.seed = n_examples, n_views, seed
        self._epoch, self._slots = -1, torch.empty(0, dtype=torch.long)

    def slots(self, rows: torch.Tensor, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._epoch = epoch
            self._slots = draw_view_slots(self.n_examples, self.n_views, self.seed, epoch).to(rows.device)
        return self._slots[rows]


SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop's defaults
RATIO = (3 / 4, 4 / 3)
TRIES = 10
MASK64 = (1 << 64) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic; logical shifts by masking)."""
    def shr(v: torch.Tensor, k: int) -> torch.Tensor:
        return (v >> k) & ((1 << (64 - k)) - 1)

    x = (x ^ shr(x, 30)) * -4658895280553007687  # 0xbf58476d1ce4e5b9 as int64
    x = (x ^ shr(x, 27)) * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ shr(x, 31)


def hash_uniform(seed: int, example_ids: torch.Tensor, view_ids: torch.Tensor, stream: int) -> torch.Tensor:
    """Uniform numbers in [0, 1) [B] (float64), a pure function of (seed, example, view, stream)."""
    x = _mix(torch.full_like(example_ids, seed) * 0x9E3779B9 + example_ids)
    x = _mix(x * 0x85EBCA6B + view_ids * 64 + stream)
    return ((x >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)


def resized_crop_boxes(example_ids: torch.Tensor, view_ids: torch.Tensor, height: int, width: int,
                       seed: int) -> torch.Tensor:
    """Crop boxes [B, 4] (top, left, box height, box width; int64 pixels) of random-resized-crop views, drawn as
    torchvision's RandomResizedCrop.get_params draws them, from a hash instead of a random generator (with its
    fallback after ten tries: the centre crop of the nearest allowed aspect ratio); view 0 is the whole
    image."""
    example_ids, view_ids = example_ids.cpu().long(), view_ids.cpu().long()
    area = float(height * width)
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    fallback_w, fallback_h = width, height
    if width / height < RATIO[0]:
        fallback_h = round(width / RATIO[0])
    elif width / height > RATIO[1]:
        fallback_w = round(height * RATIO[1])
    boxes = torch.tensor([(height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h, fallback_w])
    boxes = boxes.repeat(len(view_ids), 1)
    boxes[view_ids == 0] = torch.tensor([0, 0, height, width])
    found = view_ids == 0
    for attempt in range(TRIES):
        u = [hash_uniform(seed, example_ids, view_ids, 4 * attempt + k) for k in range(4)]
        target_area = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * u[0])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u[1])
        w = torch.round(torch.sqrt(target_area * ratio)).long()
        h = torch.round(torch.sqrt(target_area / ratio)).long()
        fits = ~found & (w > 0) & (w <= width) & (h > 0) & (h <= height)
        top = torch.floor(u[2] * (height - h + 1).double()).long()
        left = torch.floor(u[3] * (width - w + 1).double()).long()
        boxes[fits] = torch.stack([top, left, h, w], dim=1)[fits]
        found |= fits
    return boxes


def resized_crops(images: torch.Tensor, example_ids: torch.Tensor, view_ids: torch.Tensor,
                  seed: int) -> torch.Tensor:
    """images [B, C, H, W] (uint8 or float), example ids [B], view ids [B] -> random-resized-crop views
    [B, C, H, W] of the same dtype: each box resized to H x W (bilinear), mirrored for odd view ids."""
    if len(view_ids) == 0:
        return images
    b, c, h, w = images.shape
    boxes = resized_crop_boxes(example_ids, view_ids, h, w, seed).double()  # [B, 4]
    flip = (view_ids.cpu() % 2).bool()

    def source(start: torch.Tensor, length: torch.Tensor, size: int, mirrored: torch.Tensor) -> torch.Tensor:
        """Sampling positions [B, size] in [-1, 1] (align_corners=True units) of a box's bilinear resize, as
        torch's interpolate computes them (half-pixel centres, clamped to the box)."""
        at = torch.arange(size, dtype=torch.float64)
        at = torch.where(mirrored[:, None], size - 1 - at, at)
        inside = ((at + 0.5) * (length[:, None] / size) - 0.5).clamp_min(0)
        pixel = start[:, None] + torch.minimum(inside, length[:, None] - 1)
        return pixel * (2.0 / (size - 1)) - 1 if size > 1 else pixel * 0

    ys = source(boxes[:, 0], boxes[:, 2], h, torch.zeros_like(flip))  # [B, H]
    xs = source(boxes[:, 1], boxes[:, 3], w, flip)  # [B, W]
    grid = torch.stack([xs[:, None, :].expand(b, h, w), ys[:, :, None].expand(b, h, w)], dim=-1)  # [B, H, W, 2]
    crops = F.grid_sample(images.float(), grid.float().to(images.device), mode="bilinear", padding_mode="border",
                          align_corners=True)
    crops = crops.round_().clamp_(0, 255).to(torch.uint8) if images.dtype == torch.uint8 else crops.to(images.dtype)
    whole = ((boxes[:, 2] == h) & (boxes[:, 3] == w)).to(images.device)  # exactly the image (or its mirror)
    mirrored = flip.to(images.device)
    crops[whole & ~mirrored] = images[whole & ~mirrored]
    crops[whole & mirrored] = images[whole & mirrored].flip(-1)
    return crops


@dataclass(frozen=True)
class ViewSpace:
    """How a dataset's views are made: `pad` crops (zeros or reflect padding) or `resized` crops seeded by
    `seed` and interpolated on a `device` type (CPU and CUDA kernels may round a pixel differently, so a
    cache records where its crops were made). `apply(images, example_ids, view_ids)` -> the views;
    `settings()` what a cache key records."""

    crop: str = "pad"
    padding: str = "zeros"
    seed: int = 0
    device: str = "cpu"

    def apply(self, images: torch.Tensor, example_ids: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W], the examples' ids in the training split [B], view ids [B] -> views [B, C, H, W]."""
        if self.crop == "resized":
            return resized_crops(images, example_ids, view_ids, self.seed)
        return apply_views(images, view_ids, self.padding)

    def settings(self) -> dict:
        """The view space where it differs from the first one (pad crops, zero padding), for cache keys."""
        if self.crop == "resized":
            return {"crop": "resized", "view_seed": self.seed, "view_device": self.device}
        return {"view_padding": self.padding} if self.padding != "zeros" else {}

    def describe(self) -> str:
        if self.crop == "resized":
            return f"random-resized crop (seed {self.seed}) x flip"
        return f"pad crop ({self.padding} padding) x flip"
