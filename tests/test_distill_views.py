"""Distillation draws a view per example per epoch and pairs it with that view's exact target."""

from __future__ import annotations

import pytest
import torch

from bcpkd_cli.calibration import build_cache_probs, cache_view_ids
from bcpkd_cli.config import build_recipe
from bcpkd_cli.data import Dataset, Split
from bcpkd_cli.data.views import apply_views
from bcpkd_cli.models import build_model, model_spec
from bcpkd_cli.targets import OnlineTargets, TableTargets, view_batches
from bcpkd_cli.teachers.deterministic import DeterministicTeacher

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI


@pytest.fixture(scope="module")
def image_data():
    gen = torch.Generator().manual_seed(0)
    def split(n):
        return Split(torch.randint(0, 256, (n, 3, 16, 16), generator=gen, dtype=torch.uint8),
                     torch.randint(0, 3, (n,), generator=gen), None)
    return Dataset(split(12), split(4), split(4), n_classes=3, input_shape=(3, 16, 16), fingerprint="f", seed=0)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return DeterministicTeacher(build_model(model_spec("resnet20", (3, 16, 16), 3, ())).eval())


def batches(r, data, targets_or_teacher):
    """The single-student batch function: (inputs, targets) of a group of one."""
    source = TableTargets(targets_or_teacher) if isinstance(targets_or_teacher, torch.Tensor) else \
        OnlineTargets(targets_or_teacher, r.distill.t_teacher, {})
    group = view_batches(data, r.calibrate, r.distill.seed, [source], torch.device("cpu"), torch.arange(12))

    def batch(rows, epoch):
        inputs, targets = group(rows, epoch)
        return inputs, targets[0]

    return batch


def recipe(views: int, targets: str = "teacher"):
    return build_recipe({"data": {"name": "imagefolder", "root": "unused"}, "calibrate": {"views": views},
                         "distill": {"targets": targets, "seed": 3, "arch": "wrn_16_1"}, "teacher": {"arch": "resnet20"}})


def test_batches_are_the_drawn_views_with_their_cached_targets(image_data, teacher):
    r = recipe(views=5)
    cache = build_cache_probs(teacher, image_data, 1.0, r.calibrate)  # [12, 5, 3]
    assert cache.shape == (12, 5, 3)
    view_ids = cache_view_ids(image_data, r.calibrate)
    batch = batches(r, image_data, cache)
    rows = torch.tensor([0, 3, 7, 11])
    seen = set()
    for epoch in range(6):
        inputs, targets = batch(rows, epoch)
        for k, row in enumerate(rows.tolist()):
            slot = int(torch.nonzero((cache[row] == targets[k]).all(dim=1))[0])
            assert torch.equal(inputs[k], apply_views(image_data.train.inputs[row:row + 1], view_ids[slot:slot + 1])[0])
            seen.add((row, slot))
    assert len(seen) > len(rows)  # different epochs draw different views
    again = batches(r, image_data, cache)(rows, 2)
    assert all(torch.equal(a, b) for a, b in zip(again, batch(rows, 2)))  # seeded


def test_online_targets_equal_the_cached_ones(image_data, teacher):
    r = recipe(views=5)
    cache = build_cache_probs(teacher, image_data, 2.0, r.calibrate)
    rows = torch.arange(12)
    cached = batches(r, image_data, cache)(rows, 1)
    r_online = build_recipe({"data": {"name": "imagefolder", "root": "unused"}, "calibrate": {"views": 5},
                             "distill": {"targets": "online", "seed": 3, "t_teacher": 2.0, "arch": "wrn_16_1"},
                             "teacher": {"arch": "resnet20"}})
    online = batches(r_online, image_data, teacher)(rows, 1)
    assert torch.equal(cached[0], online[0])
    torch.testing.assert_close(online[1], cached[1], atol=1e-6, rtol=0)
