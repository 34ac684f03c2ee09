"""Model zoo: registry, exact parameter counts, output shapes on 1/3 channels at 28/32 px."""

import pytest
import torch

from tensorcut import models
from tensorcut.errors import TensorcutError

EXPECTED_PARAMS = {
    "vanilla-cnn": 18_617_482,
    "resnet20": 269_722,
    "resnet56": 853_018,
    "resnet18": 11_173_962,
    "resnet34": 21_282_122,
    "resnet50": 23_520_842,
    "vgg11": 9_231_114,
    "vgg16": 14_728_266,
    "vgg19": 20_040_522,
}


def test_registry_lists_every_model_with_a_count():
    assert sorted(EXPECTED_PARAMS) == models.list_models()


@pytest.mark.parametrize("name", models.list_models())
def test_parameter_count_matches_source(name):
    m = models.create(name, num_classes=10, in_channels=3)
    assert sum(p.numel() for p in m.parameters()) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", models.list_models())
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (1, 32), (3, 28)])
def test_output_shape(name, channels, size):
    width = 0.125 if name in ("resnet50", "resnet34", "vgg19", "vgg16") else 0.25
    m = models.create(
        name, num_classes=7, in_channels=channels, width=width, input_size=size
    ).eval()
    with torch.no_grad():
        y = m(torch.randn(2, channels, size, size))
    assert y.shape == (2, 7)


def test_width_scales_channels():
    small = models.create("resnet20", width=0.5)
    assert small.conv1.out_channels == 8
    assert sum(p.numel() for p in small.parameters()) < EXPECTED_PARAMS["resnet20"] / 3


def test_vanilla_cnn_has_paper_layer_names():
    m = models.create("vanilla-cnn", width=0.125)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d)]
    assert convs == ["conv1", "conv2", "conv3", "conv4"]
    assert [m.conv1.kernel_size, m.conv3.kernel_size] == [(5, 5), (3, 3)]


def test_unknown_model_lists_valid_names():
    with pytest.raises(
        TensorcutError, match=r"unknown model 'nope'; choose one of: resnet18, .*vgg19"
    ):
        models.create("nope")


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"width": 0}, "width must be > 0"),
        ({"num_classes": 0}, "num_classes"),
        ({"input_size": 2}, "input_size must be >= 4"),
    ],
)
def test_bad_arguments(kw, msg):
    with pytest.raises(TensorcutError, match=msg):
        models.create("resnet20", **kw)
