"""The BCP cache does not depend on the inference batch (calibrate.batch_size, 0: chosen per device): every row
is computed in a batch of the chosen size (the last one filled up), and eval-mode networks compute each example
on its own, so on the CPU the rows are equal bit for bit between batches that are multiples of 32, and within
1e-6 otherwise (float32 matrix products may round the rows of an incomplete block of 32 in another order)."""

from __future__ import annotations

import pytest
import torch

from bcpkd_cli.calibration import build_cache_probs, inference_batch
from bcpkd_cli.models import INFERENCE_BATCH
from bcpkd_cli.config import CalibrateConfig, build_recipe
from bcpkd_cli.data import Dataset, Split
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models import build_model, model_spec
from bcpkd_cli.teachers.deterministic import DeterministicTeacher

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def image_data():
    gen = torch.Generator().manual_seed(0)

    def split(n):
        return Split(torch.randint(0, 256, (n, 3, 16, 16), generator=gen, dtype=torch.uint8),
                     torch.randint(0, 100, (n,), generator=gen), None)

    return Dataset(split(300), split(4), split(4), n_classes=100, input_shape=(3, 16, 16), fingerprint="f", seed=0)


@pytest.fixture(scope="module")
def teacher():
    """A resnet20 with BatchNorm statistics of its own (not 0 and 1) and a 100-class head."""
    torch.manual_seed(0)
    model = build_model(model_spec("resnet20", (3, 16, 16), 100, ()))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return DeterministicTeacher(model.eval())


def test_the_automatic_batch_follows_the_device():
    assert inference_batch(CalibrateConfig(), "cpu") == INFERENCE_BATCH["cpu"] == 128
    assert inference_batch(CalibrateConfig(), torch.device("cuda", 1)) == INFERENCE_BATCH["cuda"]
    assert inference_batch(CalibrateConfig(batch_size=64), "cuda") == 64
    assert build_recipe({}).calibrate.batch_size == 0
    assert build_recipe({"calibrate": {"batch_size": 0}}).calibrate.batch_size == 0
    with pytest.raises(BcpkdError, match=r"calibrate.batch_size: must be 0 \(automatic\) or positive"):
        build_recipe({"calibrate": {"batch_size": -1}})
    with pytest.raises(BcpkdError, match="distill.batch_size: must be positive"):
        build_recipe({"distill": {"batch_size": 0}})


@pytest.mark.parametrize("views", [1, 3])
def test_any_batch_builds_the_automatic_batchs_cache(image_data, teacher, views):
    automatic = build_cache_probs(teacher, image_data, 1.0, CalibrateConfig(views=views))
    assert automatic.shape == (300, views, 100)
    for batch in (64, 96, 256, 1024):  # 300 rows: last batches of 44, 12, 44 and 300 rows, filled up
        assert torch.equal(build_cache_probs(teacher, image_data, 1.0, CalibrateConfig(views=views, batch_size=batch)),
                           automatic), batch
    torch.testing.assert_close(build_cache_probs(teacher, image_data, 1.0, CalibrateConfig(views=views, batch_size=7)),
                               automatic, rtol=0, atol=1e-6)


def test_the_calibration_line_says_what_was_chosen_and_what_it_did():
    from bcpkd_cli.tuning import calibration_line

    report = {"heldout_examples": 200, "prior_precision": 15.848932, "before": {"nll": 0.41981, "ece": 0.05234},
              "after": {"nll": 0.41953, "ece": 0.04911}}
    assert calibration_line(report) == ("calibrated: prior precision 15.85; held-out NLL 0.4198 -> 0.4195; held-out "
                                        "ECE 0.0523 -> 0.0491 (200 examples)")
    kept = {"heldout_examples": 0, "before": {}, "after": {}}
    assert calibration_line(kept) == "calibrated: nothing to tune for this teacher with these settings (no held-out " \
                                     "examples)"
