"""The ReLU family and its smooth replacements (``upi_lightning.activations``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from upi_lightning.activations import (
    SmoothReLU6,
    functional_relus,
    replace_relu,
    replace_relu6,
    smooth_functional_relus,
)


class EveryCallStyle(nn.Module):
    """One ReLU in each way a forward can call it, and two calls that are not ReLUs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x) + torch.relu(x) + x.relu() + F.relu6(x)
        x = torch.relu_(x.clone()) + F.relu(input=x, inplace=False)
        return F.gelu(x) + x.clamp(min=0)  # neither counts (clamps are not detected)


def test_functional_relus_counts_every_call_style_and_nothing_else() -> None:
    model = EveryCallStyle()
    assert functional_relus(model) == 6
    smooth = smooth_functional_relus(model, beta=4.0)
    assert functional_relus(smooth) == 0
    kinds = [type(m).__name__ for name, m in smooth.named_modules() if name.startswith("smooth_relu_")]
    assert sorted(kinds) == ["SmoothReLU6"] + ["Softplus"] * 5
    plain = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert functional_relus(plain) == 0 and smooth_functional_relus(plain, beta=4.0) is plain


def test_module_replacements_and_the_smooth_relu6_bound() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Sequential(nn.ReLU6(), nn.ReLU()))
    assert replace_relu(model, 5.0) == 2 and replace_relu6(model, 5.0) == 1
    assert [type(m).__name__ for m in model.modules()][1:] == ["Softplus", "Sequential", "SmoothReLU6", "Softplus"]
    shared = nn.ReLU()
    aliased = nn.Sequential(shared, nn.Sequential(shared))  # one module under two names: both are replaced
    assert replace_relu(aliased, 5.0) == 2 and not any(isinstance(m, nn.ReLU) for m in aliased.modules())
    z = torch.linspace(-10, 16, 200)
    for beta in (1.0, 10.0):
        gap = (SmoothReLU6(beta)(z) - F.relu6(z)).abs().max().item()
        assert gap <= math.log(2) / beta + 1e-6
    assert (torch.diff(SmoothReLU6(10.0)(z)) >= 0).all()  # non-decreasing
