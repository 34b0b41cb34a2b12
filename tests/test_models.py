"""The architecture zoo: shapes, the features/head split, reference parameter counts, checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bcpkd_cli.config import Arch
from bcpkd_cli.models import ARCHITECTURES, HEAD_NAME, MLP, build_model, model_spec

IMAGE_ARCHS = [name for name in ARCHITECTURES if name != "mlp"]

pytestmark = pytest.mark.usefixtures("single_thread")  # batches of 2: threads only wait for each other

# Exact total parameter counts. Each was obtained by instantiating a faithful copy of the named
# reference definition (a scratch file outside the repo) and summing p.numel(); published figures,
# where noted, agree (rounded, from the CIFAR-100 setup table of Heo et al. 2019, "A Comprehensive
# Overhaul of Feature Distillation", README of clovaai/overhaul-distillation).
PARAMS_100 = {
    "resnet18": 11_220_132,  # kuangliu/pytorch-cifar models/resnet.py ResNet18, 100 classes
    "resnet34": 21_328_292,  # kuangliu/pytorch-cifar models/resnet.py ResNet34, 100 classes
    "resnet50": 23_705_252,  # kuangliu/pytorch-cifar models/resnet.py ResNet50, 100 classes
    "resnet20": 278_324,  # RepDistiller models/resnet.py resnet20, 100 classes
    "resnet56": 861_620,  # RepDistiller models/resnet.py resnet56, 100 classes (Heo et al.: 0.86M)
    "resnet8x4": 1_233_540,  # RepDistiller models/resnet.py resnet8x4, 100 classes
    "resnet32x4": 7_433_860,  # RepDistiller models/resnet.py resnet32x4, 100 classes
    "wrn_16_1": 180_916,  # RepDistiller models/wrn.py wrn_16_1, 100 classes
    "wrn_16_2": 703_284,  # RepDistiller models/wrn.py wrn_16_2, 100 classes (Heo et al.: 0.70M)
    "wrn_40_1": 569_780,  # RepDistiller models/wrn.py wrn_40_1, 100 classes
    "wrn_40_2": 2_255_156,  # RepDistiller models/wrn.py wrn_40_2, 100 classes
    "vgg8": 3_965_028,  # RepDistiller models/vgg.py vgg8_bn, 100 classes
    "vgg13": 9_462_180,  # RepDistiller models/vgg.py vgg13_bn, 100 classes
    "mobilenetv2": 812_836,  # RepDistiller models/mobilenetv2.py mobile_half(100)
}
PARAMS_10 = {
    "resnet18": 11_173_962,  # kuangliu/pytorch-cifar ResNet18, CIFAR-10; the widely published 11,173,962
    "resnet34": 21_282_122,  # kuangliu/pytorch-cifar models/resnet.py ResNet34, 10 classes
    "resnet50": 23_520_842,  # kuangliu/pytorch-cifar models/resnet.py ResNet50, 10 classes
}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_architecture_is_registered_and_in_the_config_enum():
    assert set(ARCHITECTURES) == {a.value for a in Arch} == {"mlp", *PARAMS_100}


@pytest.mark.parametrize("arch", IMAGE_ARCHS)
def test_image_model_shapes_head_and_parameter_count(arch):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for n_classes in (10, 100):
        model = ARCHITECTURES[arch]((3, 32, 32), n_classes, ()).eval()
        head = getattr(model, HEAD_NAME)
        assert isinstance(head, nn.Linear) and head.out_features == n_classes
        with torch.no_grad():
            feats = model.features(x)
            logits = model(x)
        assert feats.shape == (2, head.in_features)
        assert logits.shape == (2, n_classes)
        torch.testing.assert_close(logits, head(feats))
        expected = (PARAMS_100 if n_classes == 100 else PARAMS_10).get(arch)
        if expected is not None:
            assert _n_params(model) == expected


def test_build_model_round_trips_a_state_dict():
    spec = model_spec("wrn_16_2", (3, 32, 32), 100, ())
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():  # move BN statistics away from their defaults so they are checked too
        model.train()(torch.randn(8, 3, 32, 32))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    copy = build_model(spec, state)
    for key, value in copy.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(copy.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_mlp_still_works_on_flat_inputs():
    model = build_model(model_spec("mlp", (30,), 5, (16, 8)))
    assert isinstance(model, MLP) and isinstance(model.head, nn.Linear) and model.head.out_features == 5
    x = torch.randn(4, 30)
    assert model.features(x).shape == (4, 8) and model(x).shape == (4, 5)
    assert _n_params(model) == 30 * 16 + 16 + 16 * 8 + 8 + 8 * 5 + 5


def test_image_models_reject_flat_input_shapes():
    with pytest.raises(ValueError, match="image inputs"):
        build_model(model_spec("resnet20", (30,), 5, ()))
