"""Random-resized-crop views (data.crop: resized): pure functions of (example, view id), drawn as
torchvision's RandomResizedCrop draws them, and the teacher's cached target is computed on exactly the
crop the student trains on."""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import functional as TF

from bcpkd_cli.calibration import build_cache_probs, cache_view_ids
from bcpkd_cli.config import DataConfig, build_recipe
from bcpkd_cli.choices import Crop
from bcpkd_cli.data import Dataset, Split
from bcpkd_cli.data.views import N_VIEWS, resized_crop_boxes, resized_crops, sample_index
from bcpkd_cli.targets import TableTargets, view_batches


def test_boxes_follow_torchvision_ranges_and_are_pure_functions_of_example_and_view():
    examples = torch.arange(4000) // 8
    view_ids = torch.arange(4000) % 8 + 1
    boxes = resized_crop_boxes(examples, view_ids, 64, 48, seed=0)  # [B, 4]: top, left, height, width
    top, left, h, w = boxes.unbind(1)
    assert bool((top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 48).all())
    area = (h * w).double() / (64 * 48)
    assert area.min() >= 0.07 and area.max() <= 1.0  # 8% .. 100% (pixel rounding)
    ratio = (w / h).double()
    drawn = area < 1  # the fallback (whole image) is not a drawn box
    assert ratio[drawn].min() > 3 / 4 * 0.9 and ratio[drawn].max() < 4 / 3 * 1.1
    # torchvision's RandomResizedCrop.get_params on a 64 x 48 image: mean area 0.441 (20,000 draws, seed 0)
    assert abs(area.mean().item() - 0.441) < 0.02
    assert len({tuple(b) for b in boxes.tolist()}) > 3800  # distinct per example and view (a few collide by chance)
    assert torch.equal(resized_crop_boxes(examples, view_ids, 64, 48, seed=0), boxes)  # pure
    assert not torch.equal(resized_crop_boxes(examples, view_ids, 64, 48, seed=1), boxes)  # seeded
    assert torch.equal(resized_crop_boxes(torch.tensor([5]), torch.tensor([0]), 64, 48, 0)[0], torch.tensor([0, 0, 64, 48]))


def test_crops_equal_torchvision_resized_crop_then_flip():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(40, 3, 24, 20, generator=gen) * 255
    examples, view_ids = torch.arange(40), torch.arange(40) % 7
    crops = resized_crops(images, examples, view_ids, seed=2)
    boxes = resized_crop_boxes(examples, view_ids, 24, 20, seed=2)
    for i in range(40):
        expected = TF.resized_crop(images[i], *boxes[i].tolist(), [24, 20], antialias=False)
        expected = expected.flip(-1) if view_ids[i] % 2 else expected
        torch.testing.assert_close(crops[i], expected, atol=2e-3, rtol=0)
    assert torch.equal(crops[view_ids == 0], images[view_ids == 0])  # view 0: the image itself


def test_a_view_does_not_depend_on_the_batch_it_is_in():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    examples, view_ids = torch.arange(16) * 3, torch.arange(16) * 5 % N_VIEWS
    together = resized_crops(images, examples, view_ids, seed=0)
    assert together.dtype == torch.uint8
    for i in range(16):
        assert torch.equal(resized_crops(images[i:i + 1], examples[i:i + 1], view_ids[i:i + 1], 0)[0], together[i])


class RecordingTeacher:
    """Records the pixels it is asked about, per sample index (example x view), and predicts uniformly."""

    def __init__(self, n_classes: int):
        self.n_classes, self.seen = n_classes, {}

    def predictive_at(self, inputs: torch.Tensor, index: torch.Tensor):
        for image, key in zip(inputs, index.tolist()):
            self.seen[key] = image.clone()
        return lambda t: torch.full((len(inputs), self.n_classes), 1.0 / self.n_classes)


def test_the_student_sees_exactly_the_crop_the_teacher_was_asked_about():
    gen = torch.Generator().manual_seed(0)

    def split(n):
        return Split(torch.randint(0, 256, (n, 3, 20, 20), generator=gen, dtype=torch.uint8),
                     torch.randint(0, 3, (n,), generator=gen), None)

    data = Dataset(split(10), split(2), split(2), n_classes=3, input_shape=(3, 20, 20), fingerprint="f", seed=0,
                   config=DataConfig(name="imagefolder", crop=Crop.resized))
    r = build_recipe({"data": {"name": "imagefolder", "root": "unused", "crop": "resized"},
                      "calibrate": {"views": 6}, "distill": {"seed": 3}})
    teacher = RecordingTeacher(3)
    cache = build_cache_probs(teacher, data, 1.0, r.calibrate)  # [10, 6, 3]
    view_ids = cache_view_ids(data, r.calibrate)
    assert len(teacher.seen) == 10 * 6
    group = view_batches(data, r.calibrate, r.distill.seed, [TableTargets(cache)], torch.device("cpu"), torch.arange(10))
    rows = torch.tensor([1, 4, 9, 0])
    drawn = set()
    for epoch in range(8):
        inputs, _ = group(rows, epoch)
        for image, row in zip(inputs, rows.tolist()):
            keys = [int(sample_index(torch.tensor([row]), view_ids[s:s + 1])) for s in range(6)]
            match = [k for k in keys if torch.equal(teacher.seen[k], image)]
            assert match, "the student's pixels are none of the teacher's views of its example"
            drawn.add(match[0])
    assert len(drawn) > 8  # several crops per example over the epochs
    pad = Dataset(*[data.train, data.heldout, data.test], n_classes=3, input_shape=(3, 20, 20), fingerprint="f",
                  seed=0, config=DataConfig(name="imagefolder"))
    padded = pad.views.apply(data.train.inputs[:4], torch.arange(4), torch.full((4,), 3))
    assert not torch.equal(padded, data.views.apply(data.train.inputs[:4], torch.arange(4), torch.full((4,), 3)))
    assert math.isclose(float(cache.sum(-1).mean()), 1.0, rel_tol=1e-6)
