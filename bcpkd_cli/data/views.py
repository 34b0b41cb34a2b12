"""Exact augmentation views: augmentation as a deterministic function of (image, view id).

For 32x32 images the view space is CIFAR's usual pad-4 random crop x horizontal flip: 9 x 9 crop
offsets x 2 flips = 162 views. View id v encodes flip = v % 2 and offset o = v // 2 with
row offset (o // 9 + 4) % 9 and column offset (o % 9 + 4) % 9 into the zero-padded image, so view 0
is the image itself. Larger images of side S are padded by S / 8 and the 9 offsets per axis are spread
over that padding (steps of S / 32 pixels): the same 162 views at every size. Views are applied to a
whole batch with one gather: no per-image Python work.
"""

from __future__ import annotations

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
