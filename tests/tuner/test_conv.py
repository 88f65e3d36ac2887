"""FuRA on ``nn.Conv2d`` (output-channel blocks); the full guarantees on UNet2D / ResNet are in test_architectures."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import fura
from fura.tuner.conv import FuraConv2d


class TinyCNN(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 12, 3, padding=1)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=groups)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.grouped(torch.relu(self.conv(x))).mean(dim=(2, 3)))


def _images():
    return torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(1))


def test_conv_is_planned_on_its_output_channels_whatever_the_decomp_mode():
    torch.manual_seed(0)
    model = get_peft_model(
        TinyCNN(), fura.FuraConfig(target_modules=["conv", "grouped"], decomp_mode="output_one_block")
    )
    layer = model.base_model.model.conv
    assert isinstance(layer, FuraConv2d)
    plan = layer.fura_plan["default"]
    assert (plan.decomp_mode, plan.out_features, plan.in_features) == ("input_one_block", 12, 4 * 3 * 3)
    assert (plan.out_blocks, plan.out_block_size) == (3, 4)


def test_grouped_convolution_is_refused_and_the_model_left_intact():
    torch.manual_seed(0)
    model = TinyCNN(groups=3)
    before = {name: module for name, module in model.named_modules()}
    with pytest.raises(TypeError, match=r"'grouped' with groups=3.*Fix: leave it out"):
        get_peft_model(model, fura.FuraConfig(target_modules=["conv", "grouped"]))
    assert {name: module for name, module in model.named_modules()} == before


def test_mixed_batch_equals_each_image_through_its_adapter():
    torch.manual_seed(0)
    model = get_peft_model(TinyCNN(), fura.FuraConfig(target_modules=["conv", "grouped"], init_weights=False))
    model.add_adapter("other", fura.FuraConfig(target_modules=["conv", "grouped"], init_weights=False))
    model.eval()
    images = _images()
    names = ["default", "__base__", "other"]
    mixed = model(images, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model(images[row : row + 1])
        else:
            model.set_adapter(name)
            alone = model(images[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-6, rtol=1e-5)


def test_unadapted_convolutions_are_reported_with_the_fix():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"Conv2d: \d+% of the model, name them in target_modules"):
        get_peft_model(TinyCNN(), fura.FuraConfig(target_modules=["head"]))
