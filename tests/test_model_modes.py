"""Model-mode and autograd contexts (``upi_lightning.model_modes``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from upi_lightning.model_modes import evaluation_mode, gradients_enabled, twice_differentiable


class CountedDropout(nn.Dropout):
    """Dropout that counts the calls of its ``train`` (``eval()`` calls ``train(False)``)."""

    calls = 0

    def train(self, mode: bool = True) -> CountedDropout:
        CountedDropout.calls += 1
        return super().train(mode)


def test_evaluation_mode_restores_each_flag_and_leaves_an_eval_model_alone() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(CountedDropout(), nn.BatchNorm1d(2)))
    model[1][1].eval()  # a frozen batch norm inside a training model
    flags = [module.training for module in model.modules()]
    with evaluation_mode(model):
        assert not any(module.training for module in model.modules())
    assert [module.training for module in model.modules()] == flags
    model.eval()
    CountedDropout.calls = 0
    with evaluation_mode(model):
        assert not any(module.training for module in model.modules())
    assert CountedDropout.calls == 0  # an eval model is not put in eval mode again
    assert not any(module.training for module in model.modules())


def test_gradients_enabled_context() -> None:
    with torch.inference_mode(), gradients_enabled():
        assert torch.is_grad_enabled()
        assert not torch.is_inference_mode_enabled()
    with torch.no_grad(), gradients_enabled():
        assert torch.is_grad_enabled()


def test_attention_is_twice_differentiable_inside_the_context() -> None:
    x = torch.rand(3, 4, 8, requires_grad=True)

    def second_order(enabled: bool) -> torch.Tensor:
        with twice_differentiable(enabled):
            q = x.unsqueeze(1)
            out = F.scaled_dot_product_attention(q, q, q).sum()
        (grad,) = torch.autograd.grad(out, x, create_graph=True)
        return torch.autograd.grad(grad.pow(2).sum(), x)[0]

    assert second_order(True).abs().max() > 0  # the fused CPU kernel's backward has no derivative (torch 2.14)
