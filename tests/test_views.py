"""Exact augmentation views: deterministic, distinct, and equal to pad-crop-flip done by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bcpkd_cli.data.views import N_VIEWS, apply_views, draw_view_slots, select_views, view_params

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI


@pytest.fixture(scope="module")
def images():
    return torch.randint(1, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def by_hand(image: torch.Tensor, view_id: int) -> torch.Tensor:
    rows, cols, flip = view_params(torch.tensor([view_id]))
    padded = F.pad(image, (4, 4, 4, 4))
    crop = padded[:, rows.item():rows.item() + 32, cols.item():cols.item() + 32]
    return crop.flip(-1) if flip.item() else crop


def test_162_views_and_view_zero_is_the_image(images):
    assert N_VIEWS == 162
    assert torch.equal(apply_views(images, torch.zeros(4, dtype=torch.long)), images)
    assert torch.equal(apply_views(images, torch.ones(4, dtype=torch.long)), images.flip(-1))


def test_every_view_matches_pad_crop_flip_by_hand(images):
    for view_id in range(N_VIEWS):
        got = apply_views(images[:1], torch.tensor([view_id]))[0]
        assert torch.equal(got, by_hand(images[0], view_id)), view_id


def test_all_162_views_of_an_image_are_distinct(images):
    views = apply_views(images[0].expand(N_VIEWS, -1, -1, -1), torch.arange(N_VIEWS))
    assert len({v.numpy().tobytes() for v in views}) == N_VIEWS


def test_a_view_is_the_same_tensor_whatever_the_batch(images):
    ids = torch.tensor([5, 77, 161, 42])
    batch = apply_views(images, ids)
    for i in range(4):
        assert torch.equal(batch[i], apply_views(images[i:i + 1], ids[i:i + 1])[0])
    assert torch.equal(batch, apply_views(images, ids))


def test_offsets_span_the_pad_4_window():
    rows, cols, flip = view_params(torch.arange(N_VIEWS))
    assert set(rows.tolist()) == set(range(9)) == set(cols.tolist())
    assert flip.sum().item() == 81
    assert len(set(zip(rows.tolist(), cols.tolist(), flip.tolist()))) == N_VIEWS


def test_select_and_draw_are_seeded():
    subset = select_views(8, seed=3)
    assert subset[0] == 0 and len(set(subset.tolist())) == 8 and torch.equal(subset, select_views(8, seed=3))
    assert torch.equal(select_views(N_VIEWS, 0), torch.arange(N_VIEWS))
    slots = draw_view_slots(1000, 8, seed=1, epoch=2)
    assert torch.equal(slots, draw_view_slots(1000, 8, seed=1, epoch=2))
    assert not torch.equal(slots, draw_view_slots(1000, 8, seed=1, epoch=3))
    assert slots.min() >= 0 and slots.max() == 7


def test_out_of_range_view_ids_are_refused(images):
    with pytest.raises(ValueError):
        apply_views(images, torch.tensor([0, 1, 2, N_VIEWS]))


def test_an_empty_batch_has_no_views(images):
    """A torchrun process's share of a short last batch can be empty."""
    empty = apply_views(images[:0], torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0, *images.shape[1:]) and empty.dtype == images.dtype


def test_reflect_padding_views_mirror_the_border(images):
    """data.view_padding=reflect pads as torchvision's RandomCrop(padding_mode='reflect')."""
    import torch.nn.functional as F

    view = 2 * (0 * 9 + 5)  # row offset 4 (none), column offset 0: the crop starts 4 pixels left, in the padding
    padded = F.pad(images[:1].float(), (4, 4, 4, 4), mode="reflect").to(images.dtype)
    got = apply_views(images[:1], torch.tensor([view]), "reflect")[0]
    assert torch.equal(got, padded[0, :, 4:4 + images.shape[2], 0:images.shape[3]])
    assert torch.equal(got[:, :, 4:], images[0, :, :, :-4]) and torch.equal(got[:, :, 0], images[0, :, :, 4])
